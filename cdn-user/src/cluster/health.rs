//! Health checking of the cluster members.
//!
//! Every member is probed by its own tokio task at its underlay address: a TCP connect, or an
//! HTTP/1.1 `GET` (with the client of `crate::cluster::peer_http`) whose status must be 2xx. A
//! probe, connect included, never takes longer than the check's timeout, and the probes of one
//! member never overlap. An HTTP probe reads the whole answer (up to [`MAX_ANSWER_BODY`]) before
//! it closes, so that the member sees a clean close rather than a reset.
//!
//! The first result of a member decides its health at once, so that a freshly started
//! controller does not wait `rise` intervals before it can steer anything. After that, `rise`
//! consecutive successes are needed to become healthy and `fall` consecutive failures to
//! become unhealthy, so that a single lost probe does not move flows around.
//!
//! The state of every member is published on a [`tokio::sync::watch`] channel after each probe;
//! the steering code subscribes to it and rebuilds the table when health changes.
//!
//! A probe that fails for a local reason ([`crate::cluster::probe`]: out of descriptors or
//! buffers, no local port, no route) is retried a few times within the interval and counted in
//! [`LocalFaultCounts`], but never counts against the member: its health, streaks and counters
//! stay as they were. Probe connections end with a FIN unless the check asks for a reset.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::cluster::peer_http::{self as http, Failure, Get};
use crate::cluster::probe::{self, ConnectError, LocalFault, LocalFaultCounts};
use crate::config::{HealthCheck, HealthProbe};

/// Most bytes of an HTTP answer's body read. Only the status counts; the body is read so that
/// the connection closes cleanly, and a longer one is left unread (the member then sees a reset).
const MAX_ANSWER_BODY: usize = 64 * 1024;

/// Shortest probe period used, whatever the target says: [`tokio::time::interval`] panics on a
/// zero period, and probing in a busy loop would help nobody.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// The `User-Agent` of HTTP probes, so that members can tell them apart in their access logs.
const USER_AGENT: &str = "cdn-steer-health";

/// Retries of a probe that failed locally, within one interval; each waits a little longer
/// ([`LOCAL_RETRY_PAUSE`] times the retry's number), so a short descriptor or port shortage
/// passes, and a long one costs a handful of syscalls per interval.
const LOCAL_RETRIES: u32 = 2;
const LOCAL_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// One member to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The member's stable id: the key of its state in [`HealthMonitor`].
    pub member_id: u16,
    /// The member's name, used in log messages.
    pub name: String,
    /// The address probed (the member's underlay address); the port comes from `check`.
    pub addr: IpAddr,
    /// How to probe the member and how to turn results into health.
    pub check: HealthCheck,
}

/// What is known about the health of one member.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberHealth {
    /// `None` until the first probe has finished; the first result decides at once, later
    /// changes need `rise`/`fall` consecutive results.
    pub healthy: Option<bool>,
    /// Duration of the last probe, successful or not.
    pub last_latency: Option<Duration>,
    /// Reason of the most recent failed probe (`"connection refused"`, `"timeout after
    /// 500ms"`, `"HTTP 500"`); kept after later successes, `None` if no probe has failed yet.
    pub last_error: Option<String>,
    /// Consecutive successful probes up to the last one (0 if the last one failed).
    pub consecutive_ok: u32,
    /// Consecutive failed probes up to the last one (0 if the last one succeeded).
    pub consecutive_failed: u32,
    /// Successful probes since the target was (re)started.
    pub checks_ok: u64,
    /// Failed probes since the target was (re)started.
    pub checks_failed: u64,
    /// When `healthy` last changed; until the first result, when the target was started.
    pub changed_at: SystemTime,
}

/// A change of [`MemberHealth::healthy`], as reported by [`MemberHealth::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Transition {
    /// The new health.
    healthy: bool,
    /// Whether this was the first result (which decides alone, without `rise`/`fall`).
    first: bool,
    /// The length of the streak of equal results that caused the change.
    streak: u32,
}

impl MemberHealth {
    /// The state of a target that has not been probed yet.
    fn unknown(now: SystemTime) -> Self {
        MemberHealth {
            healthy: None,
            last_latency: None,
            last_error: None,
            consecutive_ok: 0,
            consecutive_failed: 0,
            checks_ok: 0,
            checks_failed: 0,
            changed_at: now,
        }
    }

    /// Accounts for one probe result (`Err` holds the reason of a failure) and applies the
    /// rise/fall hysteresis. Returns the change of health it caused, if any.
    fn record(
        &mut self,
        outcome: Result<(), String>,
        latency: Duration,
        rise: u32,
        fall: u32,
        now: SystemTime,
    ) -> Option<Transition> {
        // A threshold of 0 would mean "change without any evidence"; treat it as 1.
        let (rise, fall) = (rise.max(1), fall.max(1));
        self.last_latency = Some(latency);
        let ok = outcome.is_ok();
        match outcome {
            Ok(()) => {
                self.consecutive_ok = self.consecutive_ok.saturating_add(1);
                self.consecutive_failed = 0;
                self.checks_ok = self.checks_ok.saturating_add(1);
            }
            Err(reason) => {
                self.consecutive_failed = self.consecutive_failed.saturating_add(1);
                self.consecutive_ok = 0;
                self.checks_failed = self.checks_failed.saturating_add(1);
                self.last_error = Some(reason);
            }
        }
        let (first, streak) = match (self.healthy, ok) {
            (None, _) => (true, 1),
            (Some(false), true) if self.consecutive_ok >= rise => (false, self.consecutive_ok),
            (Some(true), false) if self.consecutive_failed >= fall => {
                (false, self.consecutive_failed)
            }
            _ => return None,
        };
        self.healthy = Some(ok);
        self.changed_at = now;
        Some(Transition {
            healthy: ok,
            first,
            streak,
        })
    }
}

/// Runs the health checks of all members and publishes their state.
///
/// Dropping the monitor stops every check.
#[derive(Debug)]
pub struct HealthMonitor {
    /// Where the check tasks run: the runtime [`HealthMonitor::start`] was called on, so that
    /// [`HealthMonitor::reconfigure`] also works from a thread outside the runtime.
    runtime: Handle,
    /// The published state, keyed by member id. Entries are added and removed only by the
    /// monitor; the tasks only update existing ones.
    state: watch::Sender<BTreeMap<u16, MemberHealth>>,
    /// The running check of every member, keyed by member id.
    checks: HashMap<u16, Check>,
    /// Probes that failed for a local reason, shared by all the tasks.
    local_faults: Arc<LocalFaultCounts>,
}

/// The task checking one member.
#[derive(Debug)]
struct Check {
    target: Arc<Target>,
    /// Set (under the watch channel's lock) when the task is replaced or removed, so that a
    /// probe finishing after [`JoinHandle::abort`] cannot write into the state of whatever took
    /// its place: on a multi-threaded runtime the task may be running while it is aborted.
    retired: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Check {
    /// Stops the task. Must be called with the watch channel's lock held (inside
    /// `send_modify`/`send_if_modified`) so that it orders with the task's own updates.
    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

impl HealthMonitor {
    /// Starts one task per target on the current tokio runtime. Targets with the same member id
    /// as a later one are ignored (with a warning).
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime.
    pub fn start(targets: Vec<Target>) -> Self {
        let (state, _) = watch::channel(BTreeMap::new());
        let mut monitor = HealthMonitor {
            runtime: Handle::current(),
            state,
            checks: HashMap::new(),
            local_faults: Arc::default(),
        };
        monitor.reconfigure(targets);
        monitor
    }

    /// Watch channel with the state of every member, keyed by member id. A new value is
    /// published after every probe (each one updates at least the latency and a counter) and on
    /// every [`HealthMonitor::reconfigure`]. The channel closes once the monitor is dropped.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<u16, MemberHealth>> {
        self.state.subscribe()
    }

    /// Probes that failed for a local reason since start, by reason: the same counters for the
    /// monitor's whole life, reloads included.
    pub fn local_faults(&self) -> Arc<LocalFaultCounts> {
        Arc::clone(&self.local_faults)
    }

    /// The current state of every member, keyed by member id.
    pub fn snapshot(&self) -> BTreeMap<u16, MemberHealth> {
        self.state.borrow().clone()
    }

    /// Replaces the target list (configuration reload). Targets whose address and check are
    /// unchanged keep their state and their task (a renamed one keeps its state; its task is
    /// restarted so that it logs the new name); removed ones stop and leave the state; new or
    /// changed ones start over with `healthy = None`. If a member id appears more than once,
    /// the last one wins.
    pub fn reconfigure(&mut self, targets: Vec<Target>) {
        let mut wanted: BTreeMap<u16, Target> = BTreeMap::new();
        for target in targets {
            if let Some(earlier) = wanted.insert(target.member_id, target) {
                warn!(
                    "health check: member id {} appears more than once; ignoring member {}",
                    earlier.member_id, earlier.name
                );
            }
        }

        // Checks left in `old` at the end are stopped: they are either gone or replaced.
        let mut old = std::mem::take(&mut self.checks);
        // Tasks to start once their state is in place, with whether they keep the state.
        let mut to_start: Vec<(Target, bool)> = Vec::new();
        for (id, target) in wanted {
            match old.get(&id) {
                Some(check) if *check.target == target => {
                    if let Some(check) = old.remove(&id) {
                        self.checks.insert(id, check);
                    }
                }
                Some(check) => {
                    let same_probe =
                        check.target.addr == target.addr && check.target.check == target.check;
                    to_start.push((target, same_probe));
                }
                None => to_start.push((target, false)),
            }
        }

        let restarted = |id: &u16| to_start.iter().any(|(target, _)| target.member_id == *id);
        let now = SystemTime::now();
        self.state.send_modify(|map| {
            for (id, check) in &old {
                check.retire();
                if !restarted(id) {
                    map.remove(id);
                }
            }
            for (target, keep_state) in &to_start {
                let fresh = MemberHealth::unknown(now);
                if *keep_state {
                    map.entry(target.member_id).or_insert(fresh);
                } else {
                    map.insert(target.member_id, fresh);
                }
            }
        });
        for (id, check) in &old {
            if !restarted(id) {
                info!(member = check.target.name.as_str(), cause = "configuration reload"; "health check stopped");
            }
        }
        for (target, _) in to_start {
            let id = target.member_id;
            let check = self.spawn(target);
            self.checks.insert(id, check);
        }
    }

    /// Waits until every target has a first result, or `limit` elapsed.
    pub async fn first_results(&self, limit: Duration) {
        let mut receiver = self.subscribe();
        let all_known =
            |map: &BTreeMap<u16, MemberHealth>| map.values().all(|health| health.healthy.is_some());
        // A closed channel cannot happen while `self` holds the sender; either way there is
        // nothing more to wait for.
        let _ = tokio::time::timeout(limit, receiver.wait_for(all_known)).await;
    }

    /// Starts the task checking `target`; its state entry must already exist.
    fn spawn(&self, target: Target) -> Check {
        let target = Arc::new(target);
        let retired = Arc::new(AtomicBool::new(false));
        let task = self.runtime.spawn(run_checks(
            Arc::clone(&target),
            self.state.clone(),
            Arc::clone(&retired),
            Arc::clone(&self.local_faults),
        ));
        Check {
            target,
            retired,
            task,
        }
    }
}

impl Drop for HealthMonitor {
    /// Stops every check.
    fn drop(&mut self) {
        for check in self.checks.values() {
            check.task.abort();
        }
    }
}

/// The body of the task checking one member: probes it forever, one probe at a time.
async fn run_checks(
    target: Arc<Target>,
    state: watch::Sender<BTreeMap<u16, MemberHealth>>,
    retired: Arc<AtomicBool>,
    local_faults: Arc<LocalFaultCounts>,
) {
    let check = &target.check;
    let addr = SocketAddr::new(target.addr, check.port);
    debug!(
        "health check of member {} started: {:?} on {addr} every {:?}",
        target.name, check.probe, check.interval
    );
    // Spread the members over the first tenth of the interval: probing all of them at the same
    // instant makes bursts, and a reload would keep them aligned forever.
    tokio::time::sleep(first_probe_delay(check.interval)).await;
    // An interval measures start to start. `Delay`: when a probe overran (only possible if the
    // timeout is not below the interval), the next one starts right after it and the rhythm
    // restarts from there, instead of firing the missed ticks in a burst.
    let mut ticks = tokio::time::interval(check.interval.max(MIN_INTERVAL));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Whether the last probe failed locally (and was warned about).
    let mut local_streak = false;
    loop {
        ticks.tick().await;
        let started = Instant::now();
        let mut outcome = probe(addr, check).await;
        let mut retries = 0;
        while let Err(ProbeError::Local(fault, error)) = &outcome {
            local_faults.add(*fault);
            if retries == LOCAL_RETRIES {
                // Not counted against the member: its state stays as it was. Warned about
                // once per streak, so a node out of descriptors does not flood its log.
                if !local_streak {
                    warn!(member = target.name.as_str(), reason = fault.name(), error:% = error;
                        "health check failed locally; not counted against the member");
                }
                local_streak = true;
                break;
            }
            retries += 1;
            tokio::time::sleep(LOCAL_RETRY_PAUSE * retries).await;
            outcome = probe(addr, check).await;
        }
        if matches!(outcome, Err(ProbeError::Local(..))) {
            continue;
        }
        if std::mem::take(&mut local_streak) {
            info!(member = target.name.as_str(); "health check works again");
        }
        let latency = started.elapsed();
        let outcome = outcome.map_err(|e| e.to_string());
        if let Err(reason) = &outcome {
            debug!("health check of member {} failed: {reason}", target.name);
        }

        let mut change = None;
        state.send_if_modified(|map| {
            if retired.load(Ordering::Relaxed) {
                return false;
            }
            let Some(health) = map.get_mut(&target.member_id) else {
                return false;
            };
            change = health
                .record(outcome, latency, check.rise, check.fall, SystemTime::now())
                .map(|transition| (transition, health.last_error.clone()));
            true
        });
        // Logged outside the channel's lock.
        if let Some((transition, reason)) = change {
            log_transition(&target.name, transition, reason.as_deref(), latency);
        }
    }
}

/// Logs a change of health with its cause: going down at warn (with the check's error),
/// everything else at info. `checks` is the streak of equal results that made the change.
fn log_transition(name: &str, transition: Transition, reason: Option<&str>, latency: Duration) {
    let checks = transition.streak;
    let latency_ms = (latency.as_secs_f64() * 10_000.0).round() / 10.0;
    if transition.healthy {
        let reason = if transition.first {
            "first check succeeded"
        } else {
            "checks succeed again"
        };
        info!(member = name, checks, latency_ms, reason; "member up");
    } else {
        let reason = reason.unwrap_or("unknown reason");
        warn!(member = name, checks, reason; "member down");
    }
}

/// A random delay below a tenth of `interval`.
fn first_probe_delay(interval: Duration) -> Duration {
    // std's RandomState draws random keys for every instance: random enough to spread probes,
    // without a dependency on a random number crate.
    let random = std::collections::hash_map::RandomState::new().hash_one(0_u8);
    let spread = u64::try_from((interval / 10).as_nanos()).unwrap_or(u64::MAX);
    if spread == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(random % spread)
}

/// Why a probe failed. The `Display` text is what ends up in [`MemberHealth::last_error`] and
/// in the logs (with the member's name, so without its address).
#[derive(Debug, Error)]
enum ProbeError {
    /// No connection, no answer in time, or not an HTTP answer.
    #[error(transparent)]
    Client(#[from] Failure),
    /// A status other than 2xx.
    #[error("HTTP {0}")]
    Status(u16),
    /// This node's fault, not the member's.
    #[error("local fault ({name}): {1}", name = .0.name())]
    Local(LocalFault, std::io::Error),
}

/// Connects for a probe of `addr` by `deadline`.
async fn connect(
    addr: SocketAddr,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<TcpStream, ProbeError> {
    probe::connect(addr, deadline).await.map_err(|e| match e {
        ConnectError::Local(fault, error) => ProbeError::Local(fault, error),
        ConnectError::Member(error) => ProbeError::Client(Failure::Connect(error)),
        ConnectError::Timeout => ProbeError::Client(Failure::Timeout(timeout)),
    })
}

/// Probes `addr` once as `check` says, within its timeout.
async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<(), ProbeError> {
    let timeout = check.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    match &check.probe {
        HealthProbe::Tcp => {
            // An established connection is all a TCP check asks for.
            let stream = connect(addr, deadline, timeout).await?;
            probe::close(stream, check.reset);
            Ok(())
        }
        HealthProbe::Http { path, host } => {
            let host = host.clone().unwrap_or_else(|| default_host(addr));
            let request = Get {
                path,
                host: &host,
                user_agent: USER_AGENT,
                body_limit: MAX_ANSWER_BODY,
            };
            let stream = connect(addr, deadline, timeout).await?;
            if check.reset {
                probe::reset_on_drop(&stream);
            }
            // Once the whole answer is read, dropping the connection closes it with a FIN.
            let answer = http::get_on(stream, addr, &request, deadline, timeout)
                .await
                .map_err(|e| e.failure)?;
            if let Err(e) = &answer.body {
                debug!("health probe: body of the answer not read whole: {e}");
            }
            if answer.status.is_success() {
                Ok(())
            } else {
                Err(ProbeError::Status(answer.status.as_u16()))
            }
        }
    }
}

/// The `Host` header for a member without a configured one: its address, bracketed if IPv6,
/// with the port unless it is HTTP's default.
fn default_host(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) if v4.port() == 80 => v4.ip().to_string(),
        SocketAddr::V6(v6) if v6.port() == 80 => format!("[{}]", v6.ip()),
        _ => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const INTERVAL: Duration = Duration::from_millis(50);
    const TIMEOUT: Duration = Duration::from_millis(30);
    /// How long a test waits for something that should happen within a few intervals; generous
    /// so that a loaded machine does not fail the test, never spent when things work.
    const PATIENCE: Duration = Duration::from_secs(5);

    fn target(id: u16, addr: SocketAddr, probe: HealthProbe, rise: u32, fall: u32) -> Target {
        Target {
            member_id: id,
            name: format!("node-{id}"),
            addr: addr.ip(),
            check: HealthCheck {
                probe,
                port: addr.port(),
                interval: INTERVAL,
                timeout: TIMEOUT,
                rise,
                fall,
                reset: false,
            },
        }
    }

    /// One probe of `addr` with `probe` and `timeout`.
    async fn probe_once(
        addr: SocketAddr,
        probe: HealthProbe,
        timeout: Duration,
    ) -> Result<(), ProbeError> {
        let mut check = target(1, addr, probe, 1, 1).check;
        check.timeout = timeout;
        super::probe(addr, &check).await
    }

    fn http(path: &str) -> HealthProbe {
        HealthProbe::Http {
            path: path.into(),
            host: None,
        }
    }

    async fn listen() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        (listener, addr)
    }

    /// A port nothing listens on: bound once to get a free port, then closed.
    async fn closed_port() -> SocketAddr {
        listen().await.1
    }

    /// Accepts connections and closes them at once; counts them.
    fn serve_accept(listener: TcpListener) -> Arc<AtomicUsize> {
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        accepted
    }

    /// Accepts connections and never answers, holding them open.
    fn serve_hang(listener: TcpListener) {
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
    }

    /// What an HTTP test server saw.
    #[derive(Default)]
    struct Seen {
        /// Every request head received.
        requests: Vec<String>,
        /// When every connection was accepted.
        accepted: Vec<Instant>,
    }

    /// Answers every connection with an HTTP status chosen by `status(n)`, `n` counting
    /// connections from 0, after waiting `delay`.
    fn serve_http(
        listener: TcpListener,
        delay: Duration,
        status: impl Fn(usize) -> u16 + Send + 'static,
    ) -> Arc<Mutex<Seen>> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                let code = status(n);
                n += 1;
                let record = Arc::clone(&record);
                record.lock().expect("lock").accepted.push(Instant::now());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0_u8; 512];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(len) => head.extend_from_slice(&buf[..len]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    record.lock().expect("lock").requests.push(head);
                    tokio::time::sleep(delay).await;
                    let answer = format!("HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\n\r\n");
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        seen
    }

    /// Waits until member `id` satisfies `condition`; panics with the state after `PATIENCE`.
    async fn wait_until(
        monitor: &HealthMonitor,
        id: u16,
        condition: impl Fn(&MemberHealth) -> bool,
    ) -> MemberHealth {
        let mut receiver = monitor.subscribe();
        let reached = tokio::time::timeout(
            PATIENCE,
            receiver.wait_for(|state| state.get(&id).is_some_and(&condition)),
        )
        .await;
        match reached {
            Ok(Ok(state)) => state[&id].clone(),
            _ => panic!(
                "member {id} never reached the condition: {:#?}",
                monitor.snapshot()
            ),
        }
    }

    async fn first_result(monitor: &HealthMonitor, id: u16) -> MemberHealth {
        monitor.first_results(PATIENCE).await;
        let health = monitor.snapshot()[&id].clone();
        assert!(health.healthy.is_some(), "no first result: {health:#?}");
        health
    }

    // --- Hysteresis, without the network --------------------------------------------------

    /// Feeds `results` to a fresh state; returns the health after each one.
    fn replay(results: &[bool], rise: u32, fall: u32) -> Vec<Option<bool>> {
        let mut health = MemberHealth::unknown(SystemTime::UNIX_EPOCH);
        results
            .iter()
            .map(|&ok| {
                let outcome = if ok { Ok(()) } else { Err("boom".to_string()) };
                health.record(
                    outcome,
                    Duration::from_millis(1),
                    rise,
                    fall,
                    SystemTime::now(),
                );
                health.healthy
            })
            .collect()
    }

    #[test]
    fn first_result_decides_then_rise_and_fall_hold() {
        let (t, f) = (Some(true), Some(false));
        assert_eq!(replay(&[true], 2, 3), [t]);
        assert_eq!(replay(&[false], 2, 3), [f]);
        assert_eq!(
            replay(&[true, false, false, true, false, false, false], 2, 3),
            [t, t, t, t, t, t, f]
        );
        assert_eq!(
            replay(&[false, true, false, true, true, true], 2, 3),
            [f, f, f, f, t, t]
        );
        // A threshold of 0 behaves as 1.
        assert_eq!(replay(&[true, false, true], 0, 0), [t, f, t]);
    }

    #[test]
    fn record_keeps_counters_and_reports_transitions() {
        let mut health = MemberHealth::unknown(SystemTime::UNIX_EPOCH);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        let ms = Duration::from_millis;
        let first = health.record(Err("HTTP 500".into()), ms(3), 2, 2, now);
        assert_eq!(
            first,
            Some(Transition {
                healthy: false,
                first: true,
                streak: 1
            })
        );
        assert_eq!(health.changed_at, now);
        assert_eq!(health.record(Ok(()), ms(4), 2, 2, now), None);
        let later = now + Duration::from_secs(1);
        let up = health.record(Ok(()), ms(5), 2, 2, later);
        assert_eq!(
            up,
            Some(Transition {
                healthy: true,
                first: false,
                streak: 2
            })
        );
        assert_eq!(
            health,
            MemberHealth {
                healthy: Some(true),
                last_latency: Some(ms(5)),
                // The reason of the last failure outlives the recovery.
                last_error: Some("HTTP 500".into()),
                consecutive_ok: 2,
                consecutive_failed: 0,
                checks_ok: 2,
                checks_failed: 1,
                changed_at: later,
            }
        );
    }

    // --- Pieces of the probe ---------------------------------------------------------------

    #[test]
    fn default_host_header() {
        let host = |s: &str| default_host(s.parse().expect("socket address"));
        assert_eq!(host("10.0.0.2:80"), "10.0.0.2");
        assert_eq!(host("10.0.0.2:8080"), "10.0.0.2:8080");
        assert_eq!(host("[fd00::2]:80"), "[fd00::2]");
        assert_eq!(host("[fd00::2]:8080"), "[fd00::2]:8080");
    }

    #[test]
    fn first_probe_delay_is_within_a_tenth_of_the_interval() {
        assert_eq!(first_probe_delay(Duration::ZERO), Duration::ZERO);
        let delays: Vec<Duration> = (0..200)
            .map(|_| first_probe_delay(Duration::from_secs(1)))
            .collect();
        assert!(delays.iter().all(|d| *d < Duration::from_millis(100)));
        // Random, not a constant.
        assert!(delays.iter().any(|d| *d != delays[0]));
    }

    #[test]
    fn socket_errors_read_short() {
        let refused = ProbeError::from(Failure::Connect(std::io::Error::from_raw_os_error(
            libc::ECONNREFUSED,
        )));
        assert_eq!(refused.to_string(), "connection refused");
        let timeout = ProbeError::from(Failure::Timeout(Duration::from_millis(500)));
        assert_eq!(timeout.to_string(), "timeout after 500ms");
        assert_eq!(ProbeError::Status(500).to_string(), "HTTP 500");
    }

    // --- Against real servers -----------------------------------------------------------------

    #[tokio::test]
    async fn accepting_listener_is_healthy() {
        let (listener, addr) = listen().await;
        let accepted = serve_accept(listener);
        let monitor = HealthMonitor::start(vec![target(1, addr, HealthProbe::Tcp, 2, 2)]);
        let health = first_result(&monitor, 1).await;
        assert_eq!(health.healthy, Some(true), "{health:#?}");
        assert_eq!(health.last_error, None);
        assert!(health.last_latency.is_some());
        assert!(accepted.load(Ordering::SeqCst) >= 1);
        // It keeps probing.
        wait_until(&monitor, 1, |h| h.checks_ok >= 3).await;
    }

    #[tokio::test]
    async fn closed_port_is_down_with_connection_refused() {
        let addr = closed_port().await;
        let monitor = HealthMonitor::start(vec![target(1, addr, HealthProbe::Tcp, 2, 2)]);
        let health = first_result(&monitor, 1).await;
        assert_eq!(health.healthy, Some(false), "{health:#?}");
        assert_eq!(health.last_error.as_deref(), Some("connection refused"));
        assert_eq!((health.checks_ok, health.checks_failed), (0, 1));
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let (listener, addr) = listen().await;
        serve_hang(listener);
        let monitor = HealthMonitor::start(vec![target(1, addr, http("/"), 2, 2)]);
        let health = first_result(&monitor, 1).await;
        assert_eq!(health.healthy, Some(false), "{health:#?}");
        assert_eq!(health.last_error.as_deref(), Some("timeout after 30ms"));
        let latency = health.last_latency.expect("latency");
        assert!(latency >= TIMEOUT, "gave up early: {latency:?}");
        assert!(latency < TIMEOUT * 10, "gave up late: {latency:?}");
        // Each probe gives up, so the next ones run.
        wait_until(&monitor, 1, |h| h.checks_failed >= 3).await;
    }

    #[tokio::test]
    async fn connect_is_bounded_by_the_timeout() {
        // A listener whose accept queue is full: Linux drops further SYNs, so a connect hangs
        // (until its first SYN retransmission, a second later).
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let addr = socket.local_addr().expect("local addr");
        let _listener = socket.listen(1).expect("listen");
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr)).await
            {
                fillers.push(stream);
            }
        }
        let started = Instant::now();
        let result = probe_once(addr, HealthProbe::Tcp, TIMEOUT).await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(ProbeError::Client(Failure::Timeout(t))) if t == TIMEOUT),
            "{result:?}"
        );
        assert!(took < Duration::from_millis(500), "took {took:?}");
    }

    #[tokio::test]
    async fn http_200_is_healthy_and_the_request_is_well_formed() {
        let (listener, addr) = listen().await;
        let seen = serve_http(listener, Duration::ZERO, |_| 200);
        let mut with_host = target(1, addr, http("/healthz"), 2, 2);
        with_host.check.probe = HealthProbe::Http {
            path: "/healthz".into(),
            host: Some("www.example.org".into()),
        };
        let monitor = HealthMonitor::start(vec![
            with_host,
            target(2, addr, http("/ready?full=1"), 2, 2),
        ]);
        monitor.first_results(PATIENCE).await;
        let state = monitor.snapshot();
        for id in [1, 2] {
            assert_eq!(state[&id].healthy, Some(true), "{state:#?}");
            assert_eq!(state[&id].last_error, None);
        }
        let requests = seen.lock().expect("lock").requests.clone();
        let expected_1 = "GET /healthz HTTP/1.1\r\nHost: www.example.org\r\n\
                          User-Agent: cdn-steer-health\r\nConnection: close\r\n\r\n";
        let expected_2 = format!(
            "GET /ready?full=1 HTTP/1.1\r\nHost: {addr}\r\n\
             User-Agent: cdn-steer-health\r\nConnection: close\r\n\r\n"
        );
        assert!(requests.iter().any(|r| r == expected_1), "{requests:#?}");
        assert!(requests.contains(&expected_2), "{requests:#?}");
    }

    #[tokio::test]
    async fn http_500_is_down() {
        let (listener, addr) = listen().await;
        serve_http(listener, Duration::ZERO, |_| 500);
        let monitor = HealthMonitor::start(vec![target(1, addr, http("/"), 2, 2)]);
        let health = first_result(&monitor, 1).await;
        assert_eq!(health.healthy, Some(false), "{health:#?}");
        assert_eq!(health.last_error.as_deref(), Some("HTTP 500"));
    }

    #[tokio::test]
    async fn non_http_answer_is_down() {
        let (listener, addr) = listen().await;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            }
        });
        let monitor = HealthMonitor::start(vec![target(1, addr, http("/"), 2, 2)]);
        let health = first_result(&monitor, 1).await;
        assert_eq!(health.healthy, Some(false));
        assert_eq!(
            health.last_error.as_deref(),
            Some("malformed HTTP answer: invalid HTTP version parsed")
        );
    }

    /// Serves `answer` as it is to every connection and shuts down its sending side, then reads
    /// until the prober closes; the result of that read tells how it closed (`Ok(0)`: cleanly,
    /// an error: with a reset).
    fn serve_raw(
        listener: TcpListener,
        answer: &'static [u8],
    ) -> Arc<Mutex<Vec<std::io::Result<usize>>>> {
        let closes = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&closes);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0_u8; 512];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(len) => head.extend_from_slice(&buf[..len]),
                        }
                    }
                    if stream.write_all(answer).await.is_err() || stream.shutdown().await.is_err() {
                        return;
                    }
                    let end = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await;
                    if let Ok(end) = end {
                        record.lock().expect("lock").push(end);
                    }
                });
            }
        });
        closes
    }

    #[tokio::test]
    async fn status_lines_are_judged_alike() {
        let cases: [(&[u8], Result<u16, &str>); 10] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", Ok(200)),
            (b"HTTP/1.0 503 Service Unavailable\n\n", Ok(503)),
            (b"HTTP/1.1 204\r\n\r\n", Ok(204)),
            (b"HTTP/2 200 OK\r\n\r\n", Err("malformed")),
            (b"HTTP/1.1 20 OK\r\n\r\n", Err("malformed")),
            (b"HTTP/1.1 2000 OK\r\n\r\n", Err("malformed")),
            (b"HTTP/1.1  200 OK\r\n\r\n", Err("malformed")),
            (b"HTTP/1.x 200 OK\r\n\r\n", Err("malformed")),
            (b"http/1.1 200 OK\r\n\r\n", Err("malformed")),
            (b"", Err("closed before message completed")),
        ];
        for (answer, expected) in cases {
            let (listener, addr) = listen().await;
            serve_raw(listener, answer);
            let result = probe_once(addr, http("/"), PATIENCE).await;
            let shown = String::from_utf8_lossy(answer);
            match (expected, result) {
                (Ok(200 | 204), Ok(())) => {}
                (Ok(code), Err(ProbeError::Status(got))) => assert_eq!(code, got, "{shown:?}"),
                (Err(part), Err(e)) => assert!(e.to_string().contains(part), "{shown:?}: {e}"),
                (expected, result) => panic!("{shown:?}: {result:?}, expected {expected:?}"),
            }
        }
    }

    #[tokio::test]
    async fn probes_read_the_whole_answer_and_close_cleanly() {
        const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n";
        let mut answer = ANSWER.to_vec();
        answer.resize(ANSWER.len() + 20_000, b'x');
        let (listener, addr) = listen().await;
        let closes = serve_raw(listener, answer.leak());
        for _ in 0..3 {
            assert!(probe_once(addr, http("/"), PATIENCE).await.is_ok());
        }
        let deadline = Instant::now() + PATIENCE;
        while closes.lock().expect("lock").len() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let closes = closes.lock().expect("lock");
        assert_eq!(closes.len(), 3, "{closes:?}");
        // A reset (an error here) would mean the prober closed with part of the answer unread.
        assert!(closes.iter().all(|c| matches!(c, Ok(0))), "{closes:?}");
    }

    #[tokio::test]
    async fn status_decides_even_with_a_body_over_the_cap() {
        const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
        let mut answer = ANSWER.to_vec();
        answer.resize(ANSWER.len() + 1_000_000, b'x');
        let (listener, addr) = listen().await;
        serve_raw(listener, answer.leak());
        let started = Instant::now();
        assert!(probe_once(addr, http("/"), PATIENCE).await.is_ok());
        // It did not wait for the rest.
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn flapping_member_obeys_rise_and_fall() {
        // Probe n (from 1) gets SCRIPT[n - 1], then failures forever.
        const SCRIPT: [bool; 11] = [
            false, true, false, true, true, false, true, false, true, false, false,
        ];
        // Health after probe n with rise = fall = 2: the first result decides; up only after
        // probe 5 (the first two successes in a row), down again only after probe 11.
        let expected = |n: u64| Some((5..11).contains(&n));
        let (listener, addr) = listen().await;
        serve_http(listener, Duration::ZERO, |n| {
            if SCRIPT.get(n).copied().unwrap_or(false) {
                200
            } else {
                503
            }
        });
        let mut slack = target(1, addr, http("/"), 2, 2);
        // The server answers at once; a probe that timed out on a loaded machine would shift
        // the script, so give it most of the interval.
        slack.check.timeout = INTERVAL * 9 / 10;
        let monitor = HealthMonitor::start(vec![slack]);

        let mut receiver = monitor.subscribe();
        let mut observed = Vec::new();
        let watched = tokio::time::timeout(PATIENCE, async {
            loop {
                let health = receiver.borrow_and_update()[&1].clone();
                let n = health.checks_ok + health.checks_failed;
                if n > 0 && observed.last().is_none_or(|&(last, _)| last != n) {
                    observed.push((n, health.healthy));
                }
                if n >= 13 || receiver.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(watched.is_ok(), "too slow: {observed:?}");
        for &(n, healthy) in &observed {
            assert_eq!(healthy, expected(n), "after probe {n}: {observed:?}");
        }
        // Watch values may be coalesced, but most should have been seen, including some
        // while the member was up.
        assert!(observed.len() >= 8, "{observed:?}");
        assert!(
            observed.iter().any(|&(n, _)| (6..11).contains(&n)),
            "{observed:?}"
        );
    }

    #[tokio::test]
    async fn probes_never_overlap() {
        // The server takes 70 ms to answer while the interval is 30 ms: the next probe may only
        // start once the previous one has finished.
        let (listener, addr) = listen().await;
        let seen = serve_http(listener, Duration::from_millis(70), |_| 200);
        let mut slow = target(1, addr, http("/"), 1, 1);
        slow.check.interval = Duration::from_millis(30);
        slow.check.timeout = Duration::from_millis(500);
        let monitor = HealthMonitor::start(vec![slow]);
        wait_until(&monitor, 1, |h| h.checks_ok >= 5).await;
        let accepted = seen.lock().expect("lock").accepted.clone();
        for pair in accepted.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(65),
                "probes overlapped: {gap:?}"
            );
        }
        assert_eq!(monitor.snapshot()[&1].healthy, Some(true));
    }

    #[tokio::test]
    async fn interval_runs_start_to_start() {
        // Each probe takes 30 ms: start to start the probes are 50 ms apart, end to start they
        // would be 80 ms apart.
        let (listener, addr) = listen().await;
        let seen = serve_http(listener, Duration::from_millis(30), |_| 200);
        let mut paced = target(1, addr, http("/"), 1, 1);
        paced.check.timeout = Duration::from_millis(45);
        let monitor = HealthMonitor::start(vec![paced]);
        wait_until(&monitor, 1, |h| h.checks_ok + h.checks_failed >= 8).await;
        let accepted = seen.lock().expect("lock").accepted.clone();
        let mut gaps: Vec<Duration> = accepted.windows(2).map(|p| p[1] - p[0]).collect();
        gaps.sort();
        let median = gaps[gaps.len() / 2];
        assert!(gaps[0] >= Duration::from_millis(40), "{gaps:?}");
        assert!(median < Duration::from_millis(70), "{gaps:?}");
    }

    #[tokio::test]
    async fn reconfigure_keeps_unchanged_targets() {
        let (listener, up_addr) = listen().await;
        serve_accept(listener);
        let (listener, http_addr) = listen().await;
        serve_http(listener, Duration::ZERO, |_| 200);
        let (listener, removed_addr) = listen().await;
        let removed_probes = serve_accept(listener);
        let closed = closed_port().await;

        let kept = target(1, up_addr, HealthProbe::Tcp, 2, 2);
        let changed = target(2, http_addr, http("/"), 2, 2);
        let removed = target(3, removed_addr, HealthProbe::Tcp, 2, 2);
        let mut renamed = target(4, up_addr, HealthProbe::Tcp, 2, 2);
        let mut monitor = HealthMonitor::start(vec![
            kept.clone(),
            changed.clone(),
            removed,
            renamed.clone(),
        ]);
        monitor.first_results(PATIENCE).await;
        for id in [1, 2, 4] {
            wait_until(&monitor, id, |h| h.checks_ok >= 2).await;
        }
        let before = monitor.snapshot();
        let kept_flag = Arc::clone(&monitor.checks[&1].retired);
        let changed_flag = Arc::clone(&monitor.checks[&2].retired);
        let renamed_flag = Arc::clone(&monitor.checks[&4].retired);

        let mut changed_path = changed.clone();
        changed_path.check.probe = http("/other");
        renamed.name = "node-four".into();
        let new = target(5, closed, HealthProbe::Tcp, 2, 2);
        monitor.reconfigure(vec![new, renamed, changed_path, kept]);

        // Right after the reload, before any new probe could run.
        let after = monitor.snapshot();
        assert_eq!(after.keys().copied().collect::<Vec<_>>(), [1, 2, 4, 5]);
        assert_eq!(after[&1].healthy, Some(true));
        assert_eq!(after[&1].changed_at, before[&1].changed_at);
        assert!(after[&1].checks_ok >= before[&1].checks_ok);
        assert_eq!(after[&2], MemberHealth::unknown(after[&2].changed_at));
        assert_eq!(after[&4].healthy, Some(true));
        assert!(after[&4].checks_ok >= before[&4].checks_ok);
        assert_eq!(after[&5].healthy, None);
        // The unchanged task runs on; the others were replaced.
        assert!(Arc::ptr_eq(&kept_flag, &monitor.checks[&1].retired));
        assert!(!kept_flag.load(Ordering::Relaxed));
        assert!(changed_flag.load(Ordering::Relaxed));
        assert!(renamed_flag.load(Ordering::Relaxed));
        assert_eq!(monitor.checks[&4].target.name, "node-four");

        monitor.first_results(PATIENCE).await;
        // Counted only now: a connection of its last probe may have been waiting for accept.
        let removed_count = removed_probes.load(Ordering::SeqCst);
        let state = monitor.snapshot();
        assert_eq!(state[&2].healthy, Some(true));
        assert_eq!(state[&5].healthy, Some(false));
        assert_eq!(state[&5].last_error.as_deref(), Some("connection refused"));
        let total = before[&1].checks_ok;
        wait_until(&monitor, 1, |h| h.checks_ok >= total + 2).await;
        wait_until(&monitor, 4, |h| h.checks_ok >= before[&4].checks_ok + 2).await;
        assert_eq!(monitor.snapshot()[&1].changed_at, before[&1].changed_at);
        // The removed member is not probed any more.
        assert_eq!(removed_probes.load(Ordering::SeqCst), removed_count);
    }

    #[tokio::test]
    async fn duplicate_ids_keep_the_last_target() {
        let (listener, addr) = listen().await;
        serve_accept(listener);
        let closed = closed_port().await;
        let monitor = HealthMonitor::start(vec![
            target(1, closed, HealthProbe::Tcp, 1, 1),
            target(1, addr, HealthProbe::Tcp, 1, 1),
        ]);
        assert_eq!(monitor.checks.len(), 1);
        let health = first_result(&monitor, 1).await;
        assert_eq!(health.healthy, Some(true));
    }

    #[tokio::test]
    async fn dropping_the_monitor_stops_the_checks() {
        let (listener, addr) = listen().await;
        let accepted = serve_accept(listener);
        let monitor = HealthMonitor::start(vec![target(1, addr, HealthProbe::Tcp, 1, 1)]);
        monitor.first_results(PATIENCE).await;
        let mut receiver = monitor.subscribe();
        drop(monitor);
        // The channel closes once every task is gone.
        let closed = tokio::time::timeout(PATIENCE, async {
            while receiver.changed().await.is_ok() {}
        })
        .await;
        assert!(closed.is_ok(), "the checks kept running");
        // Let the server accept a connection the last probe may have left pending.
        tokio::time::sleep(INTERVAL).await;
        let count = accepted.load(Ordering::SeqCst);
        tokio::time::sleep(INTERVAL * 3).await;
        assert_eq!(accepted.load(Ordering::SeqCst), count);
    }

    #[tokio::test]
    async fn no_targets_need_no_waiting() {
        let monitor = HealthMonitor::start(Vec::new());
        let started = Instant::now();
        monitor.first_results(PATIENCE).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(monitor.snapshot().is_empty());
    }
}
