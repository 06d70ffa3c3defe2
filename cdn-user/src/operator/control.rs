//! The control socket: how `cdn-steer status|drain|undrain|lookup` talk to the running daemon.
//!
//! One JSON request per connection, one JSON response, over a unix socket that only root can
//! open (mode 0600). The types here are the whole protocol.
//!
//! One exception, `trace`: the daemon answers with a stream of responses, one a line (events,
//! lost-event reports, and a last `trace_end`), for as long as the client keeps its side of the
//! connection open. Closing it ends the trace.
//!
//! Even root's clients are bounded: a runaway script opening connections by the ten thousand
//! must not exhaust the daemon's file descriptors (its health probes need some) or memory. At
//! most [`MAX_CONNECTIONS`] are open at once; a newcomer to a full socket closes the oldest
//! connection that has not sent its request yet (see [`crate::operator::http::gate`]), so a
//! real `cdn-steer` command, which sends its request at once, always gets in. A client has
//! [`REQUEST_TIMEOUT`] to send its request line of at most [`MAX_REQUEST`] bytes, and
//! [`WRITE_TIMEOUT`] to take the answer.

use std::{
    fmt,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use super::report::{DriftReport, HealthChecksReport, MemberReport};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        UnixListener, UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::http::gate::{Gate, Reporter, Slots, Ticket};

/// Longest request line accepted; longer ones are answered as bad requests.
pub const MAX_REQUEST: usize = 4096;
/// Connections open at once. `cdn-steer` commands come one at a time, scripts a few.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client gets, from connecting, to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client gets to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the answer, how long and how much of what the client still sends is read and dropped.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_MAX: u64 = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Drain,
    Undrain,
    /// Drain (`drain` true) or undrain this node and every other member of its PoP (those
    /// over the peer plane); answered with `PopDrain`.
    DrainPop {
        drain: bool,
    },
    Lookup {
        src: SocketAddr,
        dst: SocketAddr,
        udp: bool,
    },
    /// Decode a QUIC connection ID (hex) for every QUIC service, with the members the live
    /// `QUIC_SERVERS` map names.
    Cid {
        cid: String,
    },
    /// Re-read the daemon's configuration file, as SIGHUP does. Answered with `Done` when the
    /// new configuration is in force, `Error` with the reason when it was refused.
    Reload,
    /// Stream the data plane's decisions on the packets that match (see [`TraceSpec`]).
    Trace(TraceSpec),
}

/// What `cdn-steer trace` asks for. Every field left out matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSpec {
    /// The flow's destination address (the VIP).
    pub vip: Option<IpAddr>,
    /// The flow's source address (the client).
    pub client: Option<IpAddr>,
    /// The flow's destination port (the VIP side).
    pub port: Option<u16>,
    /// Verdict reasons, by their metric name (`forwarded`, `port_miss`...); any of them.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// End the trace after this many events.
    pub count: Option<u64>,
}

/// Who sent a request, from the socket's peer credentials: logged with the state changes it
/// asks for (drain, reload).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.pid) {
            (Some(uid), Some(pid)) => write!(f, "control socket, uid {uid} pid {pid}"),
            (Some(uid), None) => write!(f, "control socket, uid {uid}"),
            _ => write!(f, "control socket"),
        }
    }
}

/// What answers requests.
pub type Handler = Arc<dyn Fn(Request, Caller) -> Response + Send + Sync>;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusReport>),
    Lookup(LookupReport),
    Cid(Box<super::quic::CidDocument>),
    PopDrain(super::pop_drain::PopDrainReport),
    Done {
        message: String,
    },
    Error {
        message: String,
    },
    /// One traced packet.
    Trace(Box<TraceRecord>),
    /// Events the ring buffer had no room for so far in this trace (sent when it grows).
    TraceLost {
        lost: u64,
    },
    /// The trace is over: events sent, events lost, and why it ended.
    TraceEnd {
        events: u64,
        lost: u64,
        reason: String,
    },
}

/// One packet's decision, as `cdn-steer trace` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// When the program saw it: Unix time, seconds.
    pub time: f64,
    /// Interface it arrived on (name, or the index if it has none here).
    pub interface: String,
    pub ifindex: u32,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
    /// The client's flow, inside the encapsulation if there is one; absent for frames that
    /// are not IP.
    pub src: Option<IpAddr>,
    pub src_port: u16,
    pub dst: Option<IpAddr>,
    pub dst_port: u16,
    /// TCP flags, e.g. `SA` for SYN+ACK.
    pub tcp_flags: Option<String>,
    pub reason: String,
    pub action: String,
    /// Informational reasons counted with it (`fib_lookup`, `fib_miss`).
    pub info: Vec<String>,
    /// The flow's step on this node: `first hop`, `pass-on`, `owner redirect`, `accepted here`.
    pub hop: Option<String>,
    /// The member it was encapsulated for (or would have been: a too_big drop names it too).
    pub member_id: Option<u16>,
    pub member: Option<String>,
    /// Interface a redirect sent it out of, when the next-hop cache chose it.
    pub egress: Option<String>,
    /// Outer addresses, when the frame carries a steering header.
    pub underlay_src: Option<IpAddr>,
    pub underlay_dst: Option<IpAddr>,
    /// The steering header's hop budget and remaining hops (member ids).
    pub steer_budget: Option<u8>,
    pub steer_hops: Vec<u16>,
}

/// `addr:port`, bracketed for IPv6, or `-` if unknown.
fn endpoint(addr: Option<IpAddr>, port: u16, with_port: bool) -> String {
    match (addr, with_port) {
        (None, _) => "-".to_string(),
        (Some(a), false) => a.to_string(),
        (Some(a), true) => SocketAddr::new(a, port).to_string(),
    }
}

/// One line: time, interface, flow, verdict, and where it went.
impl fmt::Display for TraceRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs_of_day = self.time.rem_euclid(86_400.0);
        let (h, m) = (
            (secs_of_day / 3600.0) as u32,
            (secs_of_day / 60.0) as u32 % 60,
        );
        let s = secs_of_day % 60.0;
        let ports = self.proto == "tcp" || self.proto == "udp";
        write!(
            f,
            "{h:02}:{m:02}:{s:09.6} {} {} {} -> {}",
            self.interface,
            self.proto,
            endpoint(self.src, self.src_port, ports),
            endpoint(self.dst, self.dst_port, ports)
        )?;
        if let Some(flags) = &self.tcp_flags {
            write!(f, " [{flags}]")?;
        }
        write!(f, " {}/{}", self.reason, self.action)?;
        if let Some(hop) = &self.hop {
            write!(f, " {hop}")?;
        }
        if let (Some(id), Some(name)) = (self.member_id, &self.member) {
            write!(f, " -> {name} (id {id})")?;
        }
        if let Some(egress) = &self.egress {
            write!(f, " via {egress}")?;
        }
        if let (Some(from), Some(to)) = (self.underlay_src, self.underlay_dst) {
            write!(f, " underlay {from} -> {to}")?;
            if let Some(budget) = self.steer_budget {
                write!(f, " budget {budget}")?;
            }
            if !self.steer_hops.is_empty() {
                let hops: Vec<String> = self.steer_hops.iter().map(u16::to_string).collect();
                write!(f, " hops [{}]", hops.join(","))?;
            }
        }
        if !self.info.is_empty() {
            write!(f, " ({})", self.info.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: String,
    pub config_path: String,
    pub attachments: Vec<AttachmentStatus>,
    pub ready: bool,
    pub draining: bool,
    pub table_size: u32,
    pub members: Vec<MemberReport>,
    pub services: Vec<ServiceStatus>,
    /// ("reason/action", packets) for every data-plane counter, summed over CPUs.
    pub counters: Vec<(String, u64)>,
    /// One entry per BIRD protocol the controller drives.
    pub bgp: Vec<BgpStatus>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Local probe failures and the mass-flap hold.
    #[serde(default)]
    pub health_checks: HealthChecksReport,
    /// Every PoP; empty (and left out of the JSON) without PoPs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pops: Vec<super::report::PopReport>,
    /// Learned owners and claims; `None` (left out of the JSON) without PoPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned: Option<super::report::LearnedReport>,
    /// This node's digests against its peers'; `None` from a daemon that does not compare.
    #[serde(default)]
    pub drift: Option<DriftReport>,
    /// Every member's QUIC-LB server ID and what the live map holds for it.
    #[serde(default)]
    pub quic_servers: Vec<super::quic::QuicServerStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttachmentStatus {
    pub interface: String,
    pub mode: String,
    pub replaced: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vips: Vec<String>,
    pub generation: u32,
    pub slot: u32,
    pub active_half: u32,
    /// Who accepts its UDP flows: `owner`, `local` or `connected`.
    pub udp_mode: String,
    /// Its `[services.quic]`, if any.
    #[serde(default)]
    pub quic: Option<super::quic::QuicStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BgpStatus {
    pub protocol: String,
    pub bird_reachable: bool,
    pub announced: Option<bool>,
    pub wanted: bool,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LookupReport {
    pub service: String,
    pub hash: u64,
    pub bucket: u32,
    pub table_generation: u32,
    /// (member id, name) of each hop, current owner first.
    pub hops: Vec<(u16, String)>,
    /// Which member accepts the flow, as the service's placement decides it.
    pub accepted_by: String,
    /// The service's QUIC settings, if it has any.
    #[serde(default)]
    pub quic: Option<super::quic::QuicStatus>,
    /// With PoPs: the bucket's chain in every PoP's table; empty without PoPs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pops: Vec<PopChain>,
    /// With PoPs: the flow's learned entry, if a claim taught this node one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned: Option<LearnedFlow>,
}

/// A flow's entry in the learned map (`lookup`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedFlow {
    /// The member that claimed the flow, and its name.
    pub member: u16,
    pub name: String,
    /// Packets the program sent there on the strength of the entry (approximate).
    pub packets: u64,
}

/// One PoP's chain for a flow's bucket (`lookup`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopChain {
    pub pop: String,
    /// This node's own PoP (the chain `hops` shows).
    pub own: bool,
    /// (member id, name) of each hop, the PoP's owner first.
    pub hops: Vec<(u16, String)>,
}

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("cannot reach the daemon at {path}: {source} (is `cdn-steer run` running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad message on the control socket: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
    #[error("control socket {path} is in use by a running daemon")]
    InUse { path: String },
}

/// Sends one request to the daemon and returns its response.
pub async fn call(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ControlError> {
    let exchange = async {
        let stream = connect(path)
            .await
            .map_err(|source| ControlError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_string(request)?;
        line.push('\n');
        write.write_all(line.as_bytes()).await?;
        write.shutdown().await?;
        let mut reader = BufReader::new(read);
        let mut reply = String::new();
        reader.read_line(&mut reply).await?;
        Ok(serde_json::from_str(&reply)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ControlError::Timeout(timeout))?
}

/// A streamed answer (`trace`): the responses as they come. The request side stays open until
/// this is dropped, which tells the daemon to stop.
pub struct ResponseStream {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    _write: OwnedWriteHalf,
}

impl ResponseStream {
    /// The next response, `None` once the daemon has closed the connection.
    pub async fn next(&mut self) -> Result<Option<Response>, ControlError> {
        match self.lines.next_line().await? {
            Some(line) => Ok(Some(serde_json::from_str(&line)?)),
            None => Ok(None),
        }
    }
}

/// Sends a streaming request (`trace`) and returns its responses as they come.
pub async fn stream(path: &Path, request: &Request) -> Result<ResponseStream, ControlError> {
    let stream = connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    Ok(ResponseStream {
        lines: BufReader::new(read).lines(),
        _write: write,
    })
}

/// The daemon's side of a streamed answer.
pub struct TraceStream {
    /// Resolves when the client goes away.
    pub hangup: Hangup,
    pub out: Sender,
}

/// The read side of a streaming connection, watched for the client going away.
/// The request was read through a [`MAX_REQUEST`] limit; a client that sends that much more
/// after it reads as gone, which ends its trace.
pub struct Hangup(BufReader<tokio::io::Take<OwnedReadHalf>>);

impl Hangup {
    /// Resolves when the client has closed the connection. The client sends nothing after its
    /// request, so anything it sends is read and ignored. Cancel-safe.
    pub async fn wait(&mut self) {
        let mut buf = [0u8; 256];
        while let Ok(n) = self.0.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    }
}

/// Connects to the control socket. A listen backlog filled by a burst of connections (a
/// runaway script) refuses newcomers with `EAGAIN` until the daemon has caught up, which it
/// does in milliseconds: retried until the caller's timeout ends it.
async fn connect(path: &Path) -> std::io::Result<UnixStream> {
    loop {
        match UnixStream::connect(path).await {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            done => return done,
        }
    }
}

/// The write side of a streaming connection.
pub struct Sender(OwnedWriteHalf);

impl Sender {
    /// Sends one response line.
    pub async fn send(&mut self, response: &Response) -> Result<(), ControlError> {
        let mut out = serde_json::to_string(response)?;
        out.push('\n');
        self.0.write_all(out.as_bytes()).await?;
        Ok(())
    }
}

/// Serves a `trace` request until it ends; the daemon provides it.
pub type TraceHandler =
    Arc<dyn Fn(TraceSpec, TraceStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Binds the control socket, replacing a stale socket file but refusing to steal one that a
/// running daemon still answers on.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse {
                path: path.display().to_string(),
            });
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests with `handler` (and `trace` requests with `trace`) until the task is
/// dropped.
pub async fn serve(listener: UnixListener, handler: Handler, trace: TraceHandler) {
    let gate = Gate::new(Slots {
        members: 0,
        others: MAX_CONNECTIONS,
        per_source: 0,
    });
    let mut reporter = Reporter::new("control");
    let mut report = tokio::time::interval(Reporter::EVERY);
    loop {
        reporter.tick(&gate);
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = report.tick() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(ticket) = gate.admit(None, false) else {
            log::debug!("control connection refused: every place is busy");
            continue;
        };
        let handler = handler.clone();
        let trace = trace.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, handler, trace, ticket).await {
                log::debug!("control connection: {e}");
            }
        });
        // Let the new connection read the request it most likely has sent already, and so
        // become busy, before the next newcomer may evict it.
        tokio::task::yield_now().await;
    }
}

async fn answer(
    stream: UnixStream,
    handler: Handler,
    trace: TraceHandler,
    ticket: Ticket,
) -> Result<(), ControlError> {
    let caller = stream.peer_cred().map_or(Caller::default(), |c| Caller {
        uid: Some(c.uid()),
        pid: c.pid(),
    });
    let (read, mut write) = stream.into_split();
    // A small buffer: requests are a few hundred bytes.
    let mut reader = BufReader::with_capacity(1024, read.take(MAX_REQUEST as u64));
    let mut line = String::new();
    tokio::select! {
        read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)) => {
            read.map_err(|_| ControlError::Timeout(REQUEST_TIMEOUT))??;
        }
        () = ticket.evicted() => return Ok(()),
    }
    if !ticket.busy() {
        // Evicted just as the request arrived.
        return Ok(());
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Trace(spec)) => {
            let stream = TraceStream {
                hangup: Hangup(reader),
                out: Sender(write),
            };
            trace(spec, stream).await;
            return Ok(());
        }
        Ok(request) => {
            // The handler takes locks and may write maps: keep it off the async threads.
            tokio::task::spawn_blocking(move || handler(request, caller))
                .await
                .unwrap_or_else(|e| Response::Error {
                    message: format!("request handler failed: {e}"),
                })
        }
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    let send = async {
        write.write_all(out.as_bytes()).await?;
        write.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, send)
        .await
        .map_err(|_| ControlError::Timeout(WRITE_TIMEOUT))??;
    // Closing with unread input resets the connection, which can destroy the answer before the
    // client has read it (a request over MAX_REQUEST): read what is left, within bounds, and
    // let a newcomer have the place meanwhile.
    ticket.idle();
    let mut rest = reader.into_inner().into_inner().take(LINGER_MAX);
    let mut sink = tokio::io::sink();
    let drain = tokio::io::copy(&mut rest, &mut sink);
    tokio::select! {
        _ = tokio::time::timeout(LINGER, drain) => {}
        () = ticket.evicted() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded() -> TraceRecord {
        TraceRecord {
            // 12:34:56.123456 UTC on the first day of the epoch.
            time: 45_296.123_456,
            interface: "eth0".into(),
            ifindex: 2,
            proto: "tcp".into(),
            src: Some("198.51.100.7".parse().expect("address")),
            src_port: 40000,
            dst: Some("192.0.2.1".parse().expect("address")),
            dst_port: 443,
            tcp_flags: Some("A".into()),
            reason: "forwarded".into(),
            action: "redirect".into(),
            info: Vec::new(),
            hop: Some("first hop".into()),
            member_id: Some(2),
            member: Some("node-b".into()),
            egress: Some("eth1".into()),
            underlay_src: Some("10.0.0.1".parse().expect("address")),
            underlay_dst: Some("10.0.0.2".parse().expect("address")),
            steer_budget: Some(3),
            steer_hops: vec![4],
        }
    }

    #[test]
    fn trace_lines_read_like_a_packet_log() {
        assert_eq!(
            forwarded().to_string(),
            "12:34:56.123456 eth0 tcp 198.51.100.7:40000 -> 192.0.2.1:443 [A] \
             forwarded/redirect first hop -> node-b (id 2) via eth1 \
             underlay 10.0.0.1 -> 10.0.0.2 budget 3 hops [4]"
        );
        let drop = TraceRecord {
            time: 45_297.5,
            proto: "udp".into(),
            src_port: 5353,
            dst_port: 9999,
            tcp_flags: None,
            reason: "port_miss".into(),
            action: "drop".into(),
            hop: None,
            member_id: None,
            member: None,
            egress: None,
            underlay_src: None,
            underlay_dst: None,
            steer_budget: None,
            steer_hops: Vec::new(),
            ..forwarded()
        };
        assert_eq!(
            drop.to_string(),
            "12:34:57.500000 eth0 udp 198.51.100.7:5353 -> 192.0.2.1:9999 port_miss/drop"
        );
    }

    #[test]
    fn trace_responses_are_one_json_object_a_line() -> Result<(), serde_json::Error> {
        let request = Request::Trace(TraceSpec {
            port: Some(443),
            count: Some(10),
            ..TraceSpec::default()
        });
        let line = serde_json::to_string(&request)?;
        assert_eq!(
            line,
            r#"{"cmd":"trace","vip":null,"client":null,"port":443,"reasons":[],"count":10}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line)?, request);
        let event = serde_json::to_value(Response::Trace(Box::new(forwarded())))?;
        assert_eq!(event["result"], "trace");
        assert_eq!(event["member"], "node-b");
        assert_eq!(event["dst_port"], 443);
        let end = serde_json::to_string(&Response::TraceEnd {
            events: 10,
            lost: 0,
            reason: "count reached".into(),
        })?;
        assert_eq!(
            end,
            r#"{"result":"trace_end","events":10,"lost":0,"reason":"count reached"}"#
        );
        Ok(())
    }

    use std::time::Instant;

    /// A control socket answering `Done` to everything, in a temporary directory.
    async fn server(tag: &str) -> (std::path::PathBuf, tokio::task::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("cdn-control-{tag}-{}", std::process::id()));
        let path = dir.join("control.sock");
        let listener = bind(&path).await.unwrap();
        let handler: Handler = Arc::new(|_, _| Response::Done {
            message: "ok".into(),
        });
        let trace: TraceHandler = Arc::new(|_, _| Box::pin(async {}));
        (path, tokio::spawn(serve(listener, handler, trace)))
    }

    #[tokio::test]
    async fn silent_clients_are_closed_and_do_not_keep_others_out() {
        let (path, task) = server("silent").await;
        // Far more silent clients than places.
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS * 4 {
            silent.push(connect(&path).await.unwrap());
        }
        let started = Instant::now();
        let answer = call(&path, &Request::Status, Duration::from_secs(2)).await;
        assert!(matches!(answer, Ok(Response::Done { .. })), "{answer:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // The last silent client is closed by the request timeout, without an answer.
        let last = silent.last_mut().unwrap();
        let waited = Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(REQUEST_TIMEOUT * 3, last.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        let took = waited.elapsed();
        assert!(took <= REQUEST_TIMEOUT + Duration::from_secs(1), "{took:?}");
        task.abort();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn oversized_requests_are_refused() {
        let (path, task) = server("huge").await;
        let mut client = connect(&path).await.unwrap();
        // Beyond the limit (the socket buffers take it all); the server stops at MAX_REQUEST.
        client
            .write_all(&vec![b'{'; MAX_REQUEST * 2])
            .await
            .unwrap();
        let mut reply = String::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut reply)).await;
        assert!(matches!(read, Ok(Ok(_))), "{read:?}");
        assert!(reply.contains("bad request"), "{reply:?}");
        task.abort();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
