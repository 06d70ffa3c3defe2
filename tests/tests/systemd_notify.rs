//! cdn-steer under systemd, without systemd as PID 1: the daemon runs in a network namespace
//! with `NOTIFY_SOCKET` pointing at a socket this test reads, as systemd's would be. Checked:
//! READY=1 only once the program is attached and the tables written, watchdog pings at half
//! WATCHDOG_USEC, STATUS lines, RELOADING=1/READY=1 around `cdn-steer reload` (accepted and
//! refused), STOPPING=1 on SIGTERM; the logfmt lines of real state changes; a start with only
//! the unit's capabilities, each of them needed, logging in the journal's format; and
//! `systemd-analyze verify` on the unit.
//!
//! Needs the `cdn-steer` binary: `cargo build --release -p cdn-user --bin cdn-steer` first.

use std::{
    os::linux::net::SocketAddrExt as _,
    os::unix::{
        fs::MetadataExt as _,
        net::{SocketAddr as UnixAddr, UnixDatagram},
    },
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use cdn_test_support::{
    BpfMount, Netns, Process, binaries::cdn_steer, process::Group, scratch::ScratchDir, wait::until,
};

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/systemd/cdn-steer.service"
);
/// WATCHDOG_USEC given to the daemon: it should ping every 200 ms.
const WATCHDOG_USEC: u64 = 400_000;

/// A namespace with one veth pair (10.77.0.1 on veth0, where XDP goes; 10.77.0.2 on veth1)
/// and a configuration: member n1 (this node, healthy once its own /ready answers) and n2
/// (nothing listens: down).
struct Node {
    bin: PathBuf,
    config: PathBuf,
    ns: Netns,
    // Dropped last: the daemon must be gone before its bpffs is unmounted.
    _bpffs: BpfMount,
    dir: ScratchDir,
}

fn config_text(bpffs: &Path, socket: &Path, table_size: u32) -> String {
    format!(
        r#"[node]
name = "n1"
interfaces = ["veth0"]
underlay_v4 = "10.77.0.1"
bpffs = "{bpffs}"
control_socket = "{socket}"

[cluster]
hash_key = "000102030405060708090a0b0c0d0e0f"
table_size = {table_size}

[[cluster.members]]
name = "n1"
id = 1
underlay = "10.77.0.1"
[cluster.members.health]
kind = "http"
port = 9465
path = "/ready"
interval_ms = 100
timeout_ms = 80
rise = 2
fall = 2

[[cluster.members]]
name = "n2"
id = 2
underlay = "10.77.0.2"
[cluster.members.health]
kind = "tcp"
port = 9
interval_ms = 100
timeout_ms = 80
rise = 2
fall = 2

[[services]]
name = "web"
vips = ["192.0.2.1/32", "2001:db8::1/128"]
tcp_ports = [80]

[metrics]
listen = "10.77.0.1:9465"
"#,
        bpffs = bpffs.display(),
        socket = socket.display(),
    )
}

impl Node {
    fn new(tag: &str) -> Result<Self> {
        let bin = cdn_steer()?;
        let dir = ScratchDir::new(tag)?;
        let bpffs = BpfMount::new(&dir.path().join("bpffs"))?;
        let ns = Netns::new(tag)?;
        ns.ip_batch(
            "link add veth0 type veth peer name veth1\n\
             addr add 10.77.0.1/24 dev veth0\naddr add 10.77.0.2/24 dev veth1\n\
             link set veth0 up\nlink set veth1 up\n",
        )?;
        let config = dir.path().join("cdn-steer.toml");
        let node = Self {
            bin,
            config,
            ns,
            _bpffs: bpffs,
            dir,
        };
        node.write_config(251)?;
        Ok(node)
    }

    fn write_config(&self, table_size: u32) -> Result<()> {
        let text = config_text(
            &self.dir.path().join("bpffs/n1"),
            &self.dir.path().join("control.sock"),
            table_size,
        );
        Ok(std::fs::write(&self.config, text)?)
    }

    /// `cdn-steer run` under `wrapper` (e.g. setpriv and its options) with `env`.
    fn start(&self, wrapper: &[&str], env: &[(&str, String)], log: &Path) -> Result<Process> {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = self.ns.command(program);
                c.args(args).arg(&self.bin);
                c
            }
            None => self.ns.command(&self.bin.to_string_lossy()),
        };
        command
            .args(["run", "--config"])
            .arg(&self.config)
            .args(["--shutdown-grace-ms", "100"])
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_PID");
        for (k, v) in env {
            command.env(k, v);
        }
        Process::spawn("cdn-steer", command, Group::Own, log)
    }

    /// `cdn-steer <args> --config <config>`.
    fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(&self.bin)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()?)
    }

    /// Whether an XDP program is attached to veth0.
    fn xdp_attached(&self) -> Result<bool> {
        Ok(self
            .ns
            .ip(&["link", "show", "dev", "veth0"])?
            .contains("prog/xdp"))
    }
}

/// The notifications the daemon sent, with their arrival times.
struct Notifications {
    socket: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl Notifications {
    fn new(socket: UnixDatagram) -> Result<Self> {
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Self {
            socket,
            seen: Vec::new(),
        })
    }

    /// Receives until a message contains `line` (as a whole line), calling `on_arrival` on it
    /// at once; returns its index in `seen`.
    fn wait_for(
        &mut self,
        line: &str,
        limit: Duration,
        mut on_arrival: impl FnMut(&str) -> Result<()>,
    ) -> Result<usize> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(text) = self.recv()? {
                let hit = text.lines().any(|l| l == line);
                if hit {
                    on_arrival(&text)?;
                }
                self.seen.push((Instant::now(), text));
                if hit {
                    return Ok(self.seen.len() - 1);
                }
            }
        }
        bail!("no {line:?} within {limit:?}; got {:?}", self.texts())
    }

    /// Receives everything that arrives within `span`.
    fn collect(&mut self, span: Duration) -> Result<()> {
        let end = Instant::now() + span;
        while Instant::now() < end {
            if let Some(text) = self.recv()? {
                self.seen.push((Instant::now(), text));
            }
        }
        Ok(())
    }

    /// One message, or None after the read timeout.
    fn recv(&self) -> Result<Option<String>> {
        let mut buf = vec![0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn texts(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, t)| t.as_str()).collect()
    }

    /// The STATUS= values sent since message `from`.
    fn statuses_since(&self, from: usize) -> Vec<String> {
        self.seen[from..]
            .iter()
            .flat_map(|(_, t)| t.lines())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .map(str::to_string)
            .collect()
    }
}

/// Parses a logfmt line into its (key, value) pairs; fails on anything else.
fn logfmt(line: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .with_context(|| format!("no key=value at {rest:?} in {line:?}"))?;
        ensure!(
            !key.is_empty() && !key.contains([' ', '"']),
            "bad key {key:?} in {line:?}"
        );
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("dangling escape in {line:?}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated quote in {line:?}"),
                }
            };
            (value, &quoted[end + 1..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            let value = &after[..end];
            ensure!(
                !value.is_empty() && !value.contains(['"', '=']),
                "bad bare value {value:?} in {line:?}"
            );
            (value.to_string(), &after[end..])
        };
        pairs.push((key.to_string(), value));
        rest = match after.strip_prefix(' ') {
            Some(r) => r,
            None if after.is_empty() => after,
            None => bail!("no space after a value in {line:?}"),
        };
    }
    Ok(pairs)
}

/// The parsed log lines whose msg is `msg` (every line of the log must be logfmt).
fn lines_with_msg(log: &str, msg: &str) -> Result<Vec<Vec<(String, String)>>> {
    let mut found = Vec::new();
    for line in log.lines() {
        let pairs = logfmt(line)?;
        let keys: Vec<&str> = pairs.iter().take(4).map(|(k, _)| k.as_str()).collect();
        ensure!(keys == ["ts", "level", "target", "msg"], "{line}");
        if pairs[3].1 == msg {
            found.push(pairs);
        }
    }
    Ok(found)
}

fn field<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn notify_protocol_reload_and_log_lines() -> Result<()> {
    let node = Node::new("sdnotify")?;
    let notify_path = node.dir.path().join("notify.sock");
    let mut notes = Notifications::new(UnixDatagram::bind(&notify_path)?)?;
    let log = node.dir.path().join("daemon.log");
    let mut daemon = node.start(
        &[],
        &[
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
            ("WATCHDOG_USEC", WATCHDOG_USEC.to_string()),
        ],
        &log,
    )?;

    // READY=1 arrives only once the program is attached and the tables are written: checked
    // the moment it arrives.
    let ready = notes
        .wait_for("READY=1", Duration::from_secs(30), |_| {
            ensure!(node.xdp_attached()?, "READY=1 before XDP was attached");
            let out = node.cli(&["status", "--json"])?;
            ensure!(out.status.success(), "status at READY=1: {out:?}");
            let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            ensure!(status["ready"] == true, "{status}");
            ensure!(
                status["services"][0]["generation"].as_u64() >= Some(1),
                "{status}"
            );
            Ok(())
        })
        .with_context(|| daemon.log_text())?;
    assert!(
        notes.seen[..ready]
            .iter()
            .all(|(_, t)| !t.contains("WATCHDOG=1")),
        "pings before READY: {:?}",
        notes.texts()
    );
    assert_eq!(
        notes.statuses_since(ready)[0],
        "ready, 2 VIPs (no BGP), 0/2 members up"
    );

    // n1 comes up once its own /ready answers (rise 2): a state change the STATUS follows.
    until(Duration::from_secs(10), "n1 up in STATUS", || {
        notes.collect(Duration::from_millis(100))?;
        Ok(notes
            .statuses_since(ready)
            .iter()
            .any(|s| s == "ready, 2 VIPs (no BGP), 1/2 members up"))
    })?;

    // Watchdog pings every WATCHDOG_USEC/2, never a gap as long as WATCHDOG_USEC.
    let from = notes.seen.len();
    notes.collect(Duration::from_millis(1500))?;
    let pings: Vec<Instant> = notes.seen[from..]
        .iter()
        .filter(|(_, t)| t == "WATCHDOG=1\n")
        .map(|(at, _)| *at)
        .collect();
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(pings.len() >= 5, "{} pings in 1.5 s", pings.len());
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(
        mean > Duration::from_millis(150) && mean < Duration::from_millis(260),
        "mean ping interval {mean:?}"
    );
    let longest = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        longest < Duration::from_micros(WATCHDOG_USEC),
        "longest gap {longest:?}"
    );

    // An accepted reload: RELOADING=1 (with the monotonic time), then READY=1.
    let out = node.cli(&["reload"])?;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration reloaded"));
    let reloading = notes.wait_for("RELOADING=1", Duration::from_secs(5), |text| {
        ensure!(text.contains("MONOTONIC_USEC="), "{text}");
        Ok(())
    })?;
    let again = notes.wait_for("READY=1", Duration::from_secs(5), |_| Ok(()))?;
    assert!(again > reloading);

    // A refused reload (table_size only changes with a restart): non-zero exit with the
    // reason; the daemon still says RELOADING=1 then READY=1, and runs on.
    node.write_config(257)?;
    let out = node.cli(&["reload"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused reload exited 0");
    assert!(
        stderr.contains("refused") && stderr.contains("cluster.table_size"),
        "{stderr}"
    );
    notes.wait_for("RELOADING=1", Duration::from_secs(5), |_| Ok(()))?;
    notes.wait_for("READY=1", Duration::from_secs(5), |_| Ok(()))?;
    node.write_config(251)?;

    // Drain shows in STATUS.
    let from = notes.seen.len();
    assert!(node.cli(&["drain"])?.status.success());
    until(Duration::from_secs(5), "draining in STATUS", || {
        notes.collect(Duration::from_millis(100))?;
        Ok(notes
            .statuses_since(from)
            .iter()
            .any(|s| s.starts_with("draining")))
    })?;

    // SIGTERM: STOPPING=1, then a clean exit.
    daemon.send_signal(libc::SIGTERM)?;
    notes.wait_for("STOPPING=1", Duration::from_secs(10), |_| Ok(()))?;
    until(Duration::from_secs(10), "daemon exit", || {
        Ok(daemon.exited()?.is_some())
    })?;

    // The state changes, one logfmt line each with its cause.
    let text = daemon.log_text();
    let up = lines_with_msg(&text, "member up")?;
    assert!(
        up.iter().any(|l| field(l, "member") == Some("n1")
            && field(l, "level") == Some("info")
            && field(l, "checks") == Some("2")),
        "{text}"
    );
    let down = lines_with_msg(&text, "member down")?;
    assert!(
        down.iter().any(|l| field(l, "member") == Some("n2")
            && field(l, "level") == Some("warn")
            && field(l, "reason") == Some("connection refused")),
        "{text}"
    );
    let swaps = lines_with_msg(&text, "table swapped")?;
    assert!(
        swaps.iter().any(|l| field(l, "service") == Some("web")
            && field(l, "cause").is_some_and(|c| c.starts_with("health: ") && c.contains("n1 up"))
            && field(l, "generation").is_some_and(|g| g != "1")),
        "{text}"
    );
    let accepted = lines_with_msg(&text, "reload accepted")?;
    assert_eq!(accepted.len(), 1, "{text}");
    assert!(field(&accepted[0], "via").is_some_and(|v| v.starts_with("control socket, uid 0")));
    let refused = lines_with_msg(&text, "reload refused, the running configuration stays")?;
    assert_eq!(refused.len(), 1, "{text}");
    assert_eq!(field(&refused[0], "level"), Some("error"));
    assert!(field(&refused[0], "reason").is_some_and(|r| r.contains("cluster.table_size")));
    let drain = lines_with_msg(&text, "drain")?;
    assert!(field(&drain[0], "by").is_some_and(|b| b.starts_with("control socket, uid 0 pid ")));
    let wanted = lines_with_msg(&text, "routes wanted: withdraw")?;
    assert_eq!(field(&wanted[0], "reason"), Some("draining"), "{text}");
    assert_eq!(lines_with_msg(&text, "stopping")?.len(), 1);
    Ok(())
}

/// The capabilities the unit leaves the daemon, as setpriv names them: `+bpf,+net_admin,...`.
fn unit_capabilities() -> Result<Vec<String>> {
    let unit = std::fs::read_to_string(UNIT)?;
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("no CapabilityBoundingSet in the unit")?;
    Ok(line
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect())
}

fn setpriv(caps: &[String]) -> Vec<String> {
    let mut set = String::from("-all");
    for c in caps {
        set.push_str(&format!(",+{c}"));
    }
    [
        "setpriv",
        "--bounding-set",
        &set,
        "--inh-caps",
        "-all",
        "--no-new-privs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn starts_with_only_the_units_capabilities_and_logs_for_the_journal() -> Result<()> {
    let caps = unit_capabilities()?;
    assert_eq!(caps, ["bpf", "net_admin", "perfmon"]);
    let node = Node::new("sdcaps")?;

    // Each capability is needed: without any one of them the daemon does not start.
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let wrapper = setpriv(&fewer);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let log = node.dir.path().join(format!("without-{dropped}.log"));
        let mut daemon = node.start(&wrapper, &[], &log)?;
        until(
            Duration::from_secs(30),
            "daemon without a capability exits",
            || Ok(daemon.exited()?.is_some()),
        )?;
        let text = daemon.log_text();
        assert!(
            text.contains("Operation not permitted") || text.contains("Permission denied"),
            "without {dropped}: {text}"
        );
        assert!(
            !text.contains("data plane ready"),
            "without {dropped}: {text}"
        );
    }

    // With exactly the unit's set, notified through an abstract socket (bound in the daemon's
    // network namespace: abstract names live there) and with stderr as the journal's stream.
    let name = format!("cdn-steer-test-{}", std::process::id());
    let socket = node.ns.enter(|| -> Result<UnixDatagram> {
        Ok(UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(
            &name,
        )?)?)
    })??;
    let mut notes = Notifications::new(socket)?;
    let log = node.dir.path().join("journal.log");
    let meta = std::fs::File::create(&log)?.metadata()?;
    let wrapper = setpriv(&caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut daemon = node.start(
        &wrapper,
        &[
            ("NOTIFY_SOCKET", format!("@{name}")),
            ("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino())),
        ],
        &log,
    )?;
    notes
        .wait_for("READY=1", Duration::from_secs(30), |_| {
            ensure!(node.xdp_attached()?, "READY=1 before XDP was attached");
            Ok(())
        })
        .with_context(|| daemon.log_text())?;
    let pid = daemon.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff")?
        .trim()
        .to_string();
    // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(
        effective,
        format!("{:016x}", (1u64 << 12) | (1 << 38) | (1 << 39))
    );
    // `cdn-steer reload` as ExecReload runs it: with the same capabilities.
    let mut reload = Command::new(wrapper[0]);
    reload
        .args(&wrapper[1..])
        .arg(&node.bin)
        .args(["reload", "--config"])
        .arg(&node.config);
    let out = reload.output()?;
    assert!(out.status.success(), "{out:?}");
    daemon.signal(libc::SIGTERM, Duration::from_secs(10))?;

    // Journal style: sd-daemon priority prefixes, no timestamps of our own.
    let text = daemon.log_text();
    assert!(
        text.lines().any(|l| l.starts_with("<6>data plane ready ")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("<4>member down member=n2 ") && l.contains("reason=")),
        "{text}"
    );
    assert!(
        text.lines()
            .all(|l| l.starts_with('<') && !l.contains("ts=")),
        "{text}"
    );
    Ok(())
}

#[test]
fn unit_passes_systemd_analyze_verify() -> Result<()> {
    let bin = cdn_steer()?;
    let unit = std::fs::read_to_string(UNIT)?;
    let dir = ScratchDir::new("sdverify")?;
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let verify = |text: &str| -> Result<Output> {
        let path = dir.path().join("cdn-steer.service");
        std::fs::write(&path, text)?;
        Ok(Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()?)
    };
    let local = unit.replace("/usr/bin/cdn-steer", &bin.to_string_lossy());
    let out = verify(&local)?;
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A mistake in the unit shows up (verify exits 0 for what it only ignores).
    let out = verify(&local.replace("WatchdogSec=10s", "WatchdogSec=ten"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Failed to parse") && stderr.contains("ten"),
        "{stderr}"
    );
    Ok(())
}
