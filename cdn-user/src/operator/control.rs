//! The control socket: how `cdn-steer status|drain|undrain|lookup` talk to the running daemon.
//!
//! One JSON request per connection, one JSON response, over a unix socket that only root can
//! open (mode 0600). The types here are the whole protocol.
//!
//! Even root's clients are bounded: a runaway script opening connections by the ten thousand
//! must not exhaust the daemon's file descriptors (its health probes need some) or memory. At
//! most [`MAX_CONNECTIONS`] are open at once; a newcomer to a full socket closes the oldest
//! connection that has not sent its request yet (see [`crate::operator::http::gate`]), so a
//! real `cdn-steer` command, which sends its request at once, always gets in. A client has
//! [`REQUEST_TIMEOUT`] to send its request line of at most [`MAX_REQUEST`] bytes, and
//! [`WRITE_TIMEOUT`] to take the answer.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

pub use super::report::{DriftReport, MemberReport};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
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
    Lookup {
        src: SocketAddr,
        dst: SocketAddr,
        udp: bool,
    },
    /// Re-read the daemon's configuration file, as SIGHUP does. Answered with `Done` when the
    /// new configuration is in force, `Error` with the reason when it was refused.
    Reload,
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
    Done { message: String },
    Error { message: String },
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
    /// This node's digests against its peers'; `None` from a daemon that does not compare.
    #[serde(default)]
    pub drift: Option<DriftReport>,
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

/// Answers requests with `handler` until the task is dropped.
pub async fn serve(listener: UnixListener, handler: Handler) {
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
        tokio::spawn(async move {
            if let Err(e) = answer(stream, handler, ticket).await {
                log::debug!("control connection: {e}");
            }
        });
        // Let the new connection read the request it most likely has sent already, and so
        // become busy, before the next newcomer may evict it.
        tokio::task::yield_now().await;
    }
}

async fn answer(stream: UnixStream, handler: Handler, ticket: Ticket) -> Result<(), ControlError> {
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
    use std::time::Instant;

    /// A control socket answering `Done` to everything, in a temporary directory.
    async fn server(tag: &str) -> (std::path::PathBuf, tokio::task::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("cdn-control-{tag}-{}", std::process::id()));
        let path = dir.join("control.sock");
        let listener = bind(&path).await.unwrap();
        let handler: Handler = Arc::new(|_, _| Response::Done {
            message: "ok".into(),
        });
        (path, tokio::spawn(serve(listener, handler)))
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
