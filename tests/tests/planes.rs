//! The controller's listeners under floods, in a two-node lab (each node health-checks both
//! members at `/ready` on their peer planes every 200 ms, giving up after 150 ms, down after
//! two failures):
//!
//! - 1,000 slow connections on node1's peer plane and 1,000 on its metrics listener, from 20
//!   outside addresses, held (and re-opened when closed) for 10 s: no member's health changes
//!   on either node, no table is rebuilt, both nodes' `status` still get each other's digests
//!   over the peer plane, `/metrics` answers a scraper within [`SCRAPE_BOUND`] throughout, and
//!   node1's peak RSS stays under [`RSS_LIMIT_KB`].
//! - 30,000 connections to node1's control socket, half silent, half with a partial request:
//!   its tables stay as they were (generation and digests of owners and history), its peak RSS
//!   stays under [`RSS_LIMIT_KB`], and `cdn-steer status` answers within [`STATUS_BOUND`]
//!   while the flood goes on.
//!
//! The numbers measured are printed (`--nocapture` shows them).

use std::io::{ErrorKind, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use cdn_tests::lab::{Lab, LabOptions, METRICS_PORT, PEER_PORT};
use serde_json::Value;
use socket2::{Domain, Socket, Type};

/// Slow connections per listener.
const SLOW_PER_LISTENER: usize = 1000;
/// Outside addresses they come from (`10.100.0.100` on, in the client namespace).
const FLOOD_SOURCES: u8 = 20;
const FLOOD_TIME: Duration = Duration::from_secs(10);
/// A slow connection closed by the node is opened again after this.
const REOPEN_AFTER: Duration = Duration::from_secs(1);
/// Longest a scrape of `/metrics` may take during the flood.
const SCRAPE_BOUND: Duration = Duration::from_secs(1);
const CONTROL_FLOOD: usize = 30_000;
/// Peak RSS of the daemon after a flood.
const RSS_LIMIT_KB: u64 = 30 * 1024;
/// Longest `cdn-steer status` (a process, its request and the drift fetch from the peer) may
/// take during the control-socket flood.
const STATUS_BOUND: Duration = Duration::from_secs(3);

/// One lab at a time: two would share the two cores and the timing.
static LABS: Mutex<()> = Mutex::new(());

fn lab(tag: &str) -> Result<Lab> {
    Lab::start(LabOptions {
        nodes: 2,
        tag: tag.into(),
        file_size: 4096,
        ..LabOptions::default()
    })
}

/// What must not change under a flood: per service, its generation and the digest of its
/// table (owners and hop history).
fn tables(lab: &Lab, i: usize) -> Result<Vec<(String, Value, Value)>> {
    let status = lab.status(i)?;
    let digests = &status["drift"]["ours"]["tables"];
    status["services"]
        .as_array()
        .context("status has services")?
        .iter()
        .map(|s| {
            let name = s["name"].as_str().context("service name")?.to_owned();
            Ok((
                name.clone(),
                s["generation"].clone(),
                digests[&name].clone(),
            ))
        })
        .collect()
}

/// Each member's name and `healthy` as one node sees them.
type Members = Vec<(String, Value)>;

/// Every member as node `i` sees it, and why its peers did not answer its digest request.
fn health(lab: &Lab, i: usize) -> Result<(Members, Vec<String>)> {
    let status = lab.status(i)?;
    let members = status["members"]
        .as_array()
        .context("status has members")?
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("?").to_owned(),
                m["healthy"].clone(),
            )
        })
        .collect();
    let peer_errors = status["drift"]["peers"]
        .as_array()
        .context("status has a drift report")?
        .iter()
        .filter_map(|p| p["error"].as_str().map(str::to_owned))
        .collect();
    Ok((members, peer_errors))
}

/// Raises this process's soft open-file limit to at least `want`, within the hard limit.
fn raise_nofile(want: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed by pointer, which lives
    // on this stack frame for the duration of the call.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "getrlimit"
        );
        ensure!(
            limit.rlim_max >= want,
            "this test needs {want} open files per process; the hard limit is {}",
            limit.rlim_max
        );
        if limit.rlim_cur < want {
            limit.rlim_cur = want;
            ensure!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0,
                "setrlimit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// `VmRSS` and `VmHWM` (peak) of `pid`, in kB.
fn rss_kb(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} for {pid}"))?;
        Ok(line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

#[derive(Debug, Default)]
struct FloodStats {
    opened: u64,
    /// Connections the node closed (evicted, refused or timed out) before the flood ended.
    closed_by_node: u64,
    open_at_end: usize,
}

/// One slow connection of the flood.
struct Slow {
    socket: Option<Socket>,
    target: SocketAddr,
    source: SocketAddr,
    /// Sends nothing at all (the others send one byte of a request head per second).
    silent: bool,
    sent: usize,
    due: Instant,
}

const PARTIAL_HEAD: &[u8] = b"GET /ready HTTP/1.1\r\nHost: flood\r\nX-Slow: ";

impl Slow {
    fn open(&mut self, stats: &mut FloodStats) -> Result<()> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        socket.bind(&self.source.into())?;
        match socket.connect(&self.target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        stats.opened += 1;
        self.socket = Some(socket);
        self.sent = 0;
        Ok(())
    }

    /// Whether the node still holds the connection (a connection still being set up counts).
    fn alive(socket: &Socket) -> bool {
        let mut buf = [MaybeUninit::<u8>::uninit(); 256];
        match socket.recv(&mut buf) {
            Ok(_) => false,
            Err(e) => e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOTCONN),
        }
    }

    fn step(&mut self, now: Instant, stats: &mut FloodStats) -> Result<()> {
        if now < self.due {
            return Ok(());
        }
        self.due = now + REOPEN_AFTER;
        let Some(socket) = &self.socket else {
            return self.open(stats);
        };
        let mut alive = Self::alive(socket);
        if alive && !self.silent {
            let byte = &PARTIAL_HEAD[self.sent % PARTIAL_HEAD.len()..][..1];
            match socket.send(byte) {
                Ok(_) => self.sent += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => alive = false,
            }
        }
        if !alive {
            stats.closed_by_node += 1;
            self.socket = None;
        }
        Ok(())
    }
}

/// Holds `per_target` slow connections to each target from `sources` for `time`, re-opening
/// the ones the node closes. Run in the client namespace.
fn slowloris(
    targets: &[SocketAddr],
    per_target: usize,
    sources: &[Ipv4Addr],
    time: Duration,
) -> Result<FloodStats> {
    let start = Instant::now();
    let mut stats = FloodStats::default();
    let mut slow: Vec<Slow> = (0..per_target)
        .flat_map(|n| targets.iter().map(move |t| (n, *t)))
        .map(|(n, target)| Slow {
            socket: None,
            target,
            source: SocketAddrV4::new(sources[n % sources.len()], 0).into(),
            silent: n % 2 == 0,
            sent: 0,
            // Opened over the first second, not in one burst.
            due: start + Duration::from_micros((n as u64 * 1_000_000) / per_target as u64),
        })
        .collect();
    while start.elapsed() < time {
        let now = Instant::now();
        for s in &mut slow {
            s.step(now, &mut stats)?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stats.open_at_end = slow
        .iter()
        .filter(|s| s.socket.as_ref().is_some_and(Slow::alive))
        .count();
    Ok(stats)
}

/// GET `/metrics` from `addr`; how long the whole answer took.
fn scrape(addr: SocketAddr) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, SCRAPE_BOUND * 2)?;
    stream.set_read_timeout(Some(SCRAPE_BOUND * 2))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: scraper\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    ensure!(
        text.starts_with("HTTP/1.1 200") && text.contains("cdn_steer_"),
        "scrape answered {:?}",
        &text[..text.len().min(200)]
    );
    Ok(took)
}

/// Lines of node `i`'s controller log containing `what`.
fn log_lines(lab: &Lab, i: usize, what: &str) -> Vec<String> {
    let log = lab.nodes[i]
        .controller
        .as_ref()
        .map(|p| p.log_text())
        .unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

#[test]
fn slow_connection_floods_change_no_members_health() -> Result<()> {
    let _one = LABS.lock().unwrap_or_else(|e| e.into_inner());
    raise_nofile(4 * SLOW_PER_LISTENER as u64)?;
    let lab = lab("plhttp")?;
    let sources: Vec<Ipv4Addr> = (0..FLOOD_SOURCES)
        .map(|n| Ipv4Addr::new(10, 100, 0, 100 + n))
        .collect();
    let batch: String = sources
        .iter()
        .map(|a| format!("addr add {a}/24 dev eth0\n"))
        .collect();
    lab.client.ip_batch(&batch)?;
    let node1 = &lab.nodes[0];
    let underlay: Ipv4Addr = node1.underlay.parse()?;
    let targets = [
        SocketAddr::from((underlay, PEER_PORT)),
        SocketAddr::from((underlay, METRICS_PORT)),
    ];
    let pid = node1.controller.as_ref().context("node1 runs")?.pid();
    let (rss_before, _) = rss_kb(pid)?;
    let tables_before: Vec<_> = (0..2).map(|i| tables(&lab, i)).collect::<Result<_>>()?;
    let down_before: Vec<usize> = (0..2)
        .map(|i| log_lines(&lab, i, "member down").len())
        .collect();

    let mut scrapes = Vec::new();
    let mut samples = 0;
    let stats = std::thread::scope(|scope| -> Result<FloodStats> {
        let flood = scope.spawn(|| {
            lab.client
                .enter(|| slowloris(&targets, SLOW_PER_LISTENER, &sources, FLOOD_TIME))
        });
        // Let the flood build up, then watch every node and scrape node1 until it ends.
        std::thread::sleep(Duration::from_secs(2));
        while !flood.is_finished() {
            for i in 0..2 {
                let (members, peer_errors) = health(&lab, i)?;
                ensure!(
                    members.iter().all(|(_, healthy)| *healthy == true),
                    "node{}: a member's health changed during the flood: {members:?}\n{}",
                    i + 1,
                    lab.diagnostics()
                );
                ensure!(
                    peer_errors.is_empty(),
                    "node{}: a peer's digests could not be fetched: {peer_errors:?}",
                    i + 1
                );
            }
            samples += 1;
            let took = lab
                .router
                .enter(|| scrape(targets[1]))?
                .context("scraping node1 during the flood")?;
            scrapes.push(took);
            std::thread::sleep(Duration::from_millis(200));
        }
        flood
            .join()
            .map_err(|_| anyhow::anyhow!("flood thread panicked"))??
    })?;

    let slowest = scrapes.iter().max().copied().unwrap_or_default();
    let (rss_after, hwm) = rss_kb(pid)?;
    println!(
        "slowloris: {SLOW_PER_LISTENER} per listener from {FLOOD_SOURCES} addresses for \
         {FLOOD_TIME:?}: {} connections opened, {} closed by node1, {} open at the end; \
         {samples} health samples on 2 nodes all healthy; {} scrapes, slowest {slowest:?}; \
         node1 RSS {rss_before} kB before, {rss_after} kB after, peak (VmHWM) {hwm} kB",
        stats.opened,
        stats.closed_by_node,
        stats.open_at_end,
        scrapes.len()
    );
    ensure!(
        hwm < RSS_LIMIT_KB,
        "peak RSS {hwm} kB, limit {RSS_LIMIT_KB} kB"
    );
    ensure!(samples >= 5, "only {samples} samples during the flood");
    ensure!(
        slowest < SCRAPE_BOUND,
        "a scrape took {slowest:?} (bound {SCRAPE_BOUND:?}): {scrapes:?}"
    );
    // The flood really was one: far more connections than the listeners admit at once, and
    // node1 made room by closing them.
    ensure!(
        stats.opened >= 2 * SLOW_PER_LISTENER as u64 && stats.closed_by_node >= 1000,
        "{stats:?}"
    );
    let full = log_lines(&lab, 0, "listener full");
    for listener in ["listener=peer", "listener=metrics"] {
        ensure!(
            full.iter().any(|l| l.contains(listener)),
            "node1 never reported a full {listener}: {full:?}"
        );
    }
    for i in 0..2 {
        ensure!(
            tables(&lab, i)? == tables_before[i],
            "node{}: tables changed during the flood",
            i + 1
        );
        let downs = log_lines(&lab, i, "member down");
        ensure!(
            downs.len() == down_before[i],
            "node{}: {:?}",
            i + 1,
            &downs[down_before[i]..]
        );
    }
    Ok(())
}

/// The flood is opened by this many processes (this one and helpers), each holding its share
/// at once: one process may not have 30,000 files open (the hard limit here is 20,000).
const FLOOD_PROCESSES: usize = 2;
/// Set for a helper process: the control socket to flood.
const HELPER_SOCKET: &str = "CDN_PLANES_CONTROL_FLOOD";

/// Opens `count` connections to the control socket at `path`, every other one with a partial
/// request. Returns them (open) and how long opening them took.
fn control_flood(path: &Path, count: usize) -> Result<(Vec<UnixStream>, Duration)> {
    raise_nofile(count as u64 + 1024)?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(count);
    for n in 0..count {
        let mut stream =
            UnixStream::connect(path).with_context(|| format!("connection {n} of {count}"))?;
        if n % 2 == 1 {
            // The node may have closed it already: that is fine.
            let _ = stream.write_all(b"{\"cmd\":");
        }
        held.push(stream);
    }
    Ok((held, started.elapsed()))
}

/// The helper process: opens its share of the flood, says so on stdout, and holds the
/// connections until its stdin closes.
#[test]
#[ignore = "a helper process that control_socket_flood_leaves_the_table_and_memory_alone starts"]
fn control_flood_helper() -> Result<()> {
    let path = std::env::var_os(HELPER_SOCKET).context("started without the socket to flood")?;
    let (held, took) = control_flood(Path::new(&path), CONTROL_FLOOD / FLOOD_PROCESSES)?;
    println!("open {}", took.as_millis());
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    drop(held);
    Ok(())
}

/// Starts helper processes and opens this process's share; returns when all are open, with
/// the helpers (which close theirs when their stdin is closed) and this process's connections.
fn start_control_flood(path: &Path) -> Result<(Vec<std::process::Child>, Vec<UnixStream>)> {
    let mut helpers = Vec::new();
    for _ in 1..FLOOD_PROCESSES {
        helpers.push(
            std::process::Command::new(std::env::current_exe()?)
                .args([
                    "--ignored",
                    "--exact",
                    "control_flood_helper",
                    "--nocapture",
                    "--quiet",
                ])
                .env(HELPER_SOCKET, path)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()?,
        );
    }
    let (held, _) = control_flood(path, CONTROL_FLOOD / FLOOD_PROCESSES)?;
    for helper in &mut helpers {
        let mut out = std::io::BufReader::new(helper.stdout.as_mut().context("helper stdout")?);
        let mut line = String::new();
        while !line.starts_with("open ") {
            line.clear();
            ensure!(
                std::io::BufRead::read_line(&mut out, &mut line)? > 0,
                "the helper ended before its connections were open"
            );
        }
    }
    Ok((helpers, held))
}

/// Closes the helpers' connections and waits for them.
fn stop_control_flood(helpers: Vec<std::process::Child>) -> Result<()> {
    for mut helper in helpers {
        drop(helper.stdin.take());
        let status = helper.wait()?;
        ensure!(status.success(), "helper: {status}");
    }
    Ok(())
}

#[test]
fn control_socket_flood_leaves_the_table_and_memory_alone() -> Result<()> {
    let _one = LABS.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("plctl")?;
    let node1 = &lab.nodes[0];
    let pid = node1.controller.as_ref().context("node1 runs")?.pid();
    let tables_before = tables(&lab, 0)?;
    let (rss_before, hwm_before) = rss_kb(pid)?;

    let mut answers = Vec::new();
    let mut peak_rss = rss_before;
    let mut flooding = Vec::new();
    let opening = std::thread::scope(|scope| -> Result<Duration> {
        let flood = scope.spawn(|| -> Result<Duration> {
            let started = Instant::now();
            let (helpers, held) = start_control_flood(&node1.control)?;
            let took = started.elapsed();
            // All 30,000 open at once, for a while.
            std::thread::sleep(Duration::from_secs(3));
            drop(held);
            stop_control_flood(helpers)?;
            Ok(took)
        });
        while !flood.is_finished() {
            let started = Instant::now();
            let (members, _) = health(&lab, 0)?;
            answers.push(started.elapsed());
            ensure!(
                members.iter().all(|(_, healthy)| *healthy == true),
                "a member's health changed during the flood: {members:?}"
            );
            peak_rss = peak_rss.max(rss_kb(pid)?.0);
            flooding.push(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count());
            std::thread::sleep(Duration::from_millis(100));
        }
        flood
            .join()
            .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
    })?;
    let (rss_after, hwm) = rss_kb(pid)?;
    let slowest = answers.iter().max().copied().unwrap_or_default();
    let most_fds = flooding.iter().max().copied().unwrap_or_default();
    println!(
        "control flood: {CONTROL_FLOOD} connections from {FLOOD_PROCESSES} processes, all open \
         after {opening:?}, held 3 s; daemon RSS {rss_before} kB before, {peak_rss} kB highest \
         sampled, {rss_after} kB after, peak (VmHWM) {hwm_before} kB before and {hwm} kB after; at most {most_fds} open files; \
         {} `status` during the flood, slowest {slowest:?}",
        answers.len()
    );
    ensure!(answers.len() >= 3, "only {} status answers", answers.len());
    ensure!(
        slowest < STATUS_BOUND,
        "status took {slowest:?} (bound {STATUS_BOUND:?}): {answers:?}"
    );
    ensure!(
        hwm < RSS_LIMIT_KB,
        "peak RSS {hwm} kB, limit {RSS_LIMIT_KB} kB"
    );
    ensure!(tables(&lab, 0)? == tables_before, "the tables changed");
    let full = log_lines(&lab, 0, "listener full");
    ensure!(
        full.iter().any(|l| l.contains("listener=control")),
        "the control socket never reported being full: {full:?}"
    );
    Ok(())
}
