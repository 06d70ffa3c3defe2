//! Health checks against real daemons in network namespaces: a node out of file descriptors
//! keeps its members and its table (its probes fail locally and are only counted); a node that
//! sees every member fail in one check round holds its table and says so; a member whose web server dies
//! while its controller lives is taken down by its peers and comes back with its web server;
//! probes close with a FIN, and with a reset only when `reset = true`.
//!
//! Two namespaces joined by a veth pair: A (10.77.0.1, the prober, member n1) and B
//! (10.77.0.2, member n2, with a web server and, in one test, a controller of its own).
//!
//! Needs the `cdn-steer` binary: `cargo build --release -p cdn-user --bin cdn-steer` first.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use cdn_test_support::{
    BpfMount, Netns, Process, binaries::cdn_steer, cmd::run, process::Group, scratch::ScratchDir,
    wait::until,
};
use serde_json::Value;

const VIP: &str = "192.0.2.1";
const HTTPD: &str = env!("CARGO_BIN_EXE_cdn-lab-httpd");
const PATIENCE: Duration = Duration::from_secs(10);

/// The two namespaces and a scratch directory. Processes are started by the tests and must be
/// dropped before this (declare them after it).
struct Pair {
    bin: PathBuf,
    a: Netns,
    b: Netns,
    // Dropped after the namespaces, whose daemons are gone by then.
    _bpffs: BpfMount,
    dir: ScratchDir,
}

impl Pair {
    fn new(tag: &str) -> Result<Self> {
        let bin = cdn_steer()?;
        let dir = ScratchDir::new(tag)?;
        let bpffs = BpfMount::new(&dir.path().join("bpffs"))?;
        let a = Netns::new(tag)?;
        let b = Netns::new(tag)?;
        a.ip(&[
            "link",
            "add",
            "va",
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "netns",
            b.name(),
        ])?;
        a.ip_batch("addr add 10.77.0.1/24 dev va\nlink set va up\n")?;
        b.ip_batch("addr add 10.77.0.2/24 dev vb\nlink set vb up\n")?;
        Ok(Self {
            bin,
            a,
            b,
            _bpffs: bpffs,
            dir,
        })
    }

    /// Writes the configuration of node `n` (1: in A, 2: in B) with `health` as the health
    /// table of both members, `n1` then `n2`.
    fn config(&self, n: u8, health: [&str; 2]) -> Result<PathBuf> {
        let dir = self.dir.path();
        let text = format!(
            r#"[node]
name = "n{n}"
interfaces = ["{dev}"]
underlay_v4 = "10.77.0.{n}"
bpffs = "{bpffs}/n{n}"
control_socket = "{dir}/n{n}.sock"

[cluster]
hash_key = "000102030405060708090a0b0c0d0e0f"
table_size = 251

[[cluster.members]]
name = "n1"
id = 1
underlay = "10.77.0.1"
[cluster.members.health]
{h1}

[[cluster.members]]
name = "n2"
id = 2
underlay = "10.77.0.2"
[cluster.members.health]
{h2}

[[services]]
name = "web"
vips = ["{VIP}/32"]
tcp_ports = [80]

[metrics]
listen = "10.77.0.{n}:9465"
"#,
            dev = if n == 1 { "va" } else { "vb" },
            bpffs = dir.join("bpffs").display(),
            dir = dir.display(),
            h1 = health[0],
            h2 = health[1],
        );
        let path = dir.join(format!("n{n}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    fn ns(&self, n: u8) -> &Netns {
        if n == 1 { &self.a } else { &self.b }
    }

    /// `cdn-steer run` for node `n` with `config`.
    fn daemon(&self, n: u8, config: &Path) -> Result<Process> {
        let mut command = self.ns(n).command(&self.bin.to_string_lossy());
        command
            .args(["run", "--config"])
            .arg(config)
            .args(["--shutdown-grace-ms", "100"])
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM");
        let log = self.dir.path().join(format!("n{n}.log"));
        Process::spawn(&format!("cdn-steer n{n}"), command, Group::Own, &log)
    }

    /// The lab's web server in node `n`'s namespace on `addr:80`.
    fn httpd(&self, n: u8, addr: &str, tag: &str) -> Result<Process> {
        let mut command = self.ns(n).command(HTTPD);
        command.args(["--size", "1024", "--listen", &format!("{addr}:80")]);
        let log = self.dir.path().join(format!("httpd-{tag}.log"));
        Process::spawn("httpd", command, Group::Own, &log)
    }

    /// `cdn-steer status --json` of the daemon using `config`.
    fn status(&self, config: &Path) -> Result<Value> {
        let out = Command::new(&self.bin)
            .args(["status", "--json", "--config"])
            .arg(config)
            .output()?;
        ensure!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// Member `name`'s `healthy` in a status report (`Null` before its first result).
fn healthy(status: &Value, name: &str) -> Value {
    status["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .map_or(Value::Null, |m| m["healthy"].clone())
}

fn generation(status: &Value) -> Option<u64> {
    status["services"][0]["generation"].as_u64()
}

/// `Tcp: <key>` of /proc/net/snmp in `ns`.
fn tcp_counter(ns: &Netns, key: &str) -> Result<u64> {
    let snmp = ns.sh("cat /proc/net/snmp")?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().context("no Tcp")?, tcp.next().context("no Tcp")?);
    let index = names
        .split_whitespace()
        .position(|n| n == key)
        .with_context(|| format!("no {key}"))?;
    Ok(values
        .split_whitespace()
        .nth(index)
        .context("short Tcp line")?
        .parse()?)
}

/// A TCP check of `port`, every 100 ms, two results to change.
fn tcp_check(port: u16, extra: &str) -> String {
    format!(
        "kind = \"tcp\"\nport = {port}\ninterval_ms = 100\ntimeout_ms = 80\nrise = 2\nfall = 2\n{extra}"
    )
}

fn ready_check(extra: &str) -> String {
    format!(
        "kind = \"http\"\nport = 9465\npath = \"/ready\"\ninterval_ms = 100\ntimeout_ms = 80\n\
         rise = 2\nfall = 2\n{extra}"
    )
}

/// Both members of A's view up, and the table built from that (a rebuild follows a health
/// change within its debounce).
fn wait_all_up(pair: &Pair, config: &Path) -> Result<Value> {
    until(PATIENCE, "both members up", || {
        let s = pair.status(config)?;
        Ok(healthy(&s, "n1") == true && healthy(&s, "n2") == true)
    })?;
    std::thread::sleep(Duration::from_millis(400));
    pair.status(config)
}

#[test]
fn out_of_descriptors_the_members_and_the_table_stay() -> Result<()> {
    let pair = Pair::new("hfd")?;
    let config = pair.config(1, [&tcp_check(9465, ""), &tcp_check(80, "")])?;
    let _web = pair.httpd(2, "10.77.0.2", "b")?;
    let mut daemon = pair.daemon(1, &config)?;
    let before = wait_all_up(&pair, &config)?;
    let pid = daemon.pid().to_string();
    let logged = daemon.log_text().len();

    // No descriptor can be opened any more: every probe fails in socket() with EMFILE, while
    // the members are fine. Long enough for ten check rounds, five times `fall`.
    let soft = run(
        "prlimit",
        &[
            "--pid",
            &pid,
            "--nofile",
            "--output=SOFT",
            "--noheadings",
            "--raw",
        ],
    )?
    .trim()
    .to_owned();
    run("prlimit", &["--pid", &pid, "--nofile=0:"])?;
    std::thread::sleep(Duration::from_millis(1000));
    run("prlimit", &["--pid", &pid, &format!("--nofile={soft}:")])?;

    let after = wait_all_up(&pair, &config)?;
    let log = daemon.log_text().split_off(logged);
    ensure!(daemon.is_running(), "daemon died:\n{log}");
    ensure!(!log.contains("member down"), "a member went down:\n{log}");
    ensure!(
        generation(&after) == generation(&before),
        "table rewritten: {before:#} -> {after:#}"
    );
    let counted = after["health_checks"]["local_errors"]["fd_limit"]
        .as_u64()
        .unwrap_or(0);
    // Two members, about ten rounds, three attempts each.
    ensure!(counted >= 20, "local errors not counted: {after:#}");
    for member in ["member=n1 ", "member=n2 "] {
        let warned = log
            .lines()
            .filter(|l| l.contains("health check failed locally") && l.contains(member))
            .count();
        ensure!(warned == 1, "{member}warned {warned} times:\n{log}");
    }
    eprintln!(
        "fd exhaustion for 1 s: {counted} local errors counted, table generation {:?} kept",
        generation(&after)
    );
    Ok(())
}

#[test]
fn every_member_failing_in_one_round_holds_the_table() -> Result<()> {
    let pair = Pair::new("hmf")?;
    let config = pair.config(1, [&tcp_check(80, ""), &tcp_check(80, "")])?;
    let mut web_a = pair.httpd(1, "10.77.0.1", "a")?;
    let mut web_b = pair.httpd(2, "10.77.0.2", "b")?;
    let daemon = pair.daemon(1, &config)?;
    let before = wait_all_up(&pair, &config)?;

    // Both members fail in the same check round. Seen from one node, that is what a local
    // fault looks like (its checks cannot tell), and what a total outage looks like: the
    // table is held either way.
    web_a.signal(libc::SIGKILL, Duration::from_secs(5))?;
    web_b.signal(libc::SIGKILL, Duration::from_secs(5))?;
    until(PATIENCE, "the mass-flap hold", || {
        let s = pair.status(&config)?;
        Ok(s["health_checks"]["held_members"].as_array().map(Vec::len) == Some(2))
    })
    .with_context(|| daemon.log_text())?;
    let s = pair.status(&config)?;
    ensure!(
        healthy(&s, "n1") == false && healthy(&s, "n2") == false,
        "{s:#}"
    );
    let flag = run(
        "ip",
        &[
            "netns",
            "exec",
            pair.a.name(),
            "curl",
            "-s",
            "http://10.77.0.1:9465/metrics",
        ],
    )?;
    ensure!(flag.contains("cdn_steer_health_mass_flap 1"), "{flag}");
    // The table is the one both members were up in. (The first to fall stays in it while the
    // other fails too; if the other's failing probe came a moment after, the first may have
    // left it for a moment: then it is back within the rebuild's debounce.)
    let buckets = |s: &Value| {
        s["members"]
            .as_array()
            .map(|m| m.iter().map(|m| m["buckets"].clone()).collect::<Vec<_>>())
    };
    until(Duration::from_secs(2), "the table of both members", || {
        Ok(buckets(&pair.status(&config)?) == buckets(&before))
    })
    .with_context(|| {
        format!(
            "{before:#} -> {:#}",
            pair.status(&config).unwrap_or_default()
        )
    })?;
    let _web_a = pair.httpd(1, "10.77.0.1", "a2")?;
    let _web_b = pair.httpd(2, "10.77.0.2", "b2")?;
    // Back to normal: the hold ends, the members are up.
    until(PATIENCE, "the hold to end", || {
        let s = pair.status(&config)?;
        Ok(s["health_checks"]["held_members"]
            .as_array()
            .is_some_and(Vec::is_empty)
            && healthy(&s, "n1") == true
            && healthy(&s, "n2") == true)
    })?;
    let log = daemon.log_text();
    ensure!(
        log.matches("went down within one check round").count() == 1,
        "{log}"
    );
    ensure!(log.contains("health checks work again"), "{log}");
    Ok(())
}

#[test]
fn a_dead_web_server_takes_its_member_down() -> Result<()> {
    let pair = Pair::new("hws")?;
    for ns in [&pair.a, &pair.b] {
        ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    }
    let ready = ready_check("");
    let config_a = pair.config(1, [&ready, &ready])?;
    let config_b = pair.config(2, [&ready, &ready])?;
    let _web_a = pair.httpd(1, VIP, "a")?;
    let mut web_b = pair.httpd(2, VIP, "b")?;
    let _b = pair.daemon(2, &config_b)?;
    let a = pair.daemon(1, &config_a)?;
    wait_all_up(&pair, &config_a).with_context(|| a.log_text())?;

    // B's web server dies; its controller lives on. Down on A within B's own fall (2 x 100
    // ms) plus A's fall on B's /ready (2 x 100 ms), plus timeouts and scheduling.
    web_b.signal(libc::SIGKILL, Duration::from_secs(5))?;
    let killed = Instant::now();
    until(PATIENCE, "n2 down on A", || {
        Ok(healthy(&pair.status(&config_a)?, "n2") == false)
    })?;
    let down_after = killed.elapsed();
    let answer = pair.b.sh("curl -s http://10.77.0.2:9465/ready || true")?;
    ensure!(
        answer.contains("service web (192.0.2.1:80) down"),
        "/ready: {answer}"
    );

    let _web_b = pair.httpd(2, VIP, "b2")?;
    let restarted = Instant::now();
    until(PATIENCE, "n2 up on A", || {
        Ok(healthy(&pair.status(&config_a)?, "n2") == true)
    })?;
    let up_after = restarted.elapsed();
    eprintln!(
        "web server killed: n2 down on A after {down_after:?}; restarted: up after {up_after:?}"
    );
    ensure!(
        down_after < Duration::from_secs(3),
        "took {down_after:?} to go down"
    );
    Ok(())
}

/// TcpOutRsts in A and connections B accepted over 1.5 s of checks every 50 ms (a TCP check
/// of B's web server, an HTTP check of A's own /ready) with `reset`.
fn resets_over_checks(reset: bool) -> Result<(u64, u64)> {
    let pair = Pair::new(if reset { "hrs" } else { "hfn" })?;
    let extra = format!("reset = {reset}\n");
    let fast = |check: String| {
        check
            .replace("interval_ms = 100", "interval_ms = 50")
            .replace("timeout_ms = 80", "timeout_ms = 40")
    };
    let config = pair.config(
        1,
        [&fast(ready_check(&extra)), &fast(tcp_check(80, &extra))],
    )?;
    let _web = pair.httpd(2, "10.77.0.2", "b")?;
    let _daemon = pair.daemon(1, &config)?;
    wait_all_up(&pair, &config)?;
    // Past start-up (where a check of our own port before it listens is refused with a reset).
    std::thread::sleep(Duration::from_millis(300));
    let (rsts, accepted) = (
        tcp_counter(&pair.a, "OutRsts")?,
        tcp_counter(&pair.b, "PassiveOpens")?,
    );
    std::thread::sleep(Duration::from_millis(1500));
    Ok((
        tcp_counter(&pair.a, "OutRsts")? - rsts,
        tcp_counter(&pair.b, "PassiveOpens")? - accepted,
    ))
}

#[test]
fn checks_close_with_fin_unless_reset_is_asked_for() -> Result<()> {
    let (rsts, checks) = resets_over_checks(false)?;
    eprintln!("reset = false: {rsts} resets over {checks} TCP checks of B (and as many HTTP of A)");
    ensure!(checks >= 15, "too few checks: {checks}");
    ensure!(rsts == 0, "{rsts} resets over {checks} checks");

    let (rsts, checks) = resets_over_checks(true)?;
    eprintln!("reset = true: {rsts} resets over {checks} TCP checks of B (and as many HTTP of A)");
    ensure!(checks >= 15, "too few checks: {checks}");
    // One per TCP check of B (the windows of the two counters differ by a check or so). The
    // HTTP checks of A's /ready end with both sides' FIN before the prober lets go (the
    // exchange is `Connection: close`), so there is nothing left to reset.
    ensure!(
        rsts * 10 >= checks * 9,
        "{rsts} resets over {checks} checks"
    );
    Ok(())
}
