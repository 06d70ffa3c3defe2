//! `cdn-steer trace` end to end: a real daemon in a network namespace, its XDP program on a
//! veth, real packets from a client namespace, and `cdn-steer trace --json` reading the
//! decisions back through the control socket. Checks the events, the filter, the refusal of a
//! second concurrent trace, and that the trace flag is off again once the trace ends.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{Array, Map, MapData};
use cdn_common::maps::{MAP_CONFIG, NODE_READY, NODE_TRACE, NodeConfig};
use cdn_test_support::{
    BpfMount,
    process::{Group, Process},
    scratch::ScratchDir,
    wait,
};
use cdn_tests::{lab::Binaries, netns::Netns};
use serde_json::Value;

const NODE: &str = "10.77.0.1";
const CLIENT: &str = "10.77.0.2";
const VIP: &str = "192.0.2.1";

/// One node (member 1 of a one-member cluster) and a client on a veth pair.
struct Setup {
    // Field order is drop order: the daemon stops before its namespace and mount go.
    daemon: Process,
    _listener: TcpListener,
    bin: PathBuf,
    config: PathBuf,
    pins: PathBuf,
    node: Netns,
    client: Netns,
    _bpffs: BpfMount,
    dir: ScratchDir,
}

fn config(dir: &Path, bpffs: &Path) -> String {
    format!(
        "[node]\nname = \"node1\"\ninterfaces = [\"n0\"]\nunderlay_v4 = \"{NODE}\"\n\
         bpffs = \"{bpffs}\"\ncontrol_socket = \"{ctl}\"\n\n\
         [cluster]\nhash_key = \"00112233445566778899aabbccddeeff\"\ntable_size = 251\n\n\
         [[cluster.members]]\nname = \"node1\"\nid = 1\nunderlay = \"{NODE}\"\n\
         [cluster.members.health]\nkind = \"tcp\"\ninterval_ms = 100\ntimeout_ms = 80\nrise = 1\nfall = 2\n\n\
         [[services]]\nname = \"web\"\nvips = [\"{VIP}/32\"]\ntcp_ports = [80]\n\n\
         [metrics]\nlisten = \"{NODE}:9477\"\n",
        bpffs = bpffs.display(),
        ctl = dir.join("ctl.sock").display(),
    )
}

impl Setup {
    fn start() -> Result<Self> {
        let bin = Binaries::locate()?.cdn_steer;
        let dir = ScratchDir::new("trace")?;
        let client = Netns::new("trc")?;
        let node = Netns::new("trn")?;
        node.ip_batch(&format!(
            "link add n0 type veth peer name c0 netns {client}\n\
             addr add {NODE}/24 dev n0\nlink set n0 up\naddr add {VIP}/32 dev lo\n",
            client = client.name()
        ))?;
        client.ip_batch(&format!(
            "addr add {CLIENT}/24 dev c0\nlink set c0 up\nroute add {VIP}/32 via {NODE}\n"
        ))?;
        // The member's health check (a TCP connect to port 80) and the test's connections
        // are answered by this listener; the kernel completes handshakes without accept().
        let listener = node.enter(|| TcpListener::bind("0.0.0.0:80"))??;
        let bpffs = BpfMount::new(&dir.path().join("bpffs"))?;
        let pins = bpffs.join("node1");
        let config = dir.path().join("node1.toml");
        std::fs::write(&config, config_text(&dir, &pins))?;
        let daemon = start_daemon(&node, &bin, &config, &dir, "daemon")?;
        let setup = Self {
            daemon,
            _listener: listener,
            bin,
            config,
            pins,
            node,
            client,
            _bpffs: bpffs,
            dir,
        };
        setup.wait(Duration::from_secs(20), "the data plane ready", || {
            Ok(setup.node_flags()? & NODE_READY != 0)
        })?;
        Ok(setup)
    }

    fn wait(&self, limit: Duration, what: &str, check: impl FnMut() -> Result<bool>) -> Result<()> {
        wait::until(limit, what, check)
            .with_context(|| format!("daemon log:\n{}", self.daemon.log_text()))
    }

    /// `NodeConfig::flags` as the program reads them, from the pinned map.
    fn node_flags(&self) -> Result<u32> {
        let path = self.pins.join("maps").join(MAP_CONFIG);
        if !path.exists() {
            return Ok(0);
        }
        let map = Map::from_map_data(MapData::from_pin(&path)?)?;
        let config: Array<MapData, NodeConfig> = Array::try_from(map)?;
        Ok(config.get(&0, 0)?.flags)
    }

    /// `cdn-steer trace <args> --json` in the node's namespace, its output in `name`.log.
    fn trace(&self, name: &str, args: &[&str]) -> Result<Process> {
        let mut cmd = self.node.command(&self.bin.to_string_lossy());
        cmd.arg("trace")
            .args(args)
            .args(["--json", "--config", &self.config.to_string_lossy()]);
        Process::spawn(
            name,
            cmd,
            Group::Own,
            &self.dir.path().join(format!("{name}.log")),
        )
    }

    /// A TCP connection from the client to the VIP, some data, and a close.
    fn connect(&self) -> Result<()> {
        self.client.enter(|| -> Result<()> {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::new(VIP.parse()?, 80),
                Duration::from_secs(2),
            )?;
            s.write_all(b"hello")?;
            Ok(())
        })?
    }

    /// UDP datagrams to a port no service lists: dropped (port_miss) by the program.
    fn port_miss(&self, n: usize) -> Result<()> {
        self.client.enter(|| -> Result<()> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..n {
                s.send_to(b"x", (VIP, 9999))?;
            }
            Ok(())
        })?
    }
}

/// `cdn-steer run` in `ns`, its output in `<log>.log`.
fn start_daemon(
    ns: &Netns,
    bin: &Path,
    config: &Path,
    dir: &ScratchDir,
    log: &str,
) -> Result<Process> {
    let mut cmd = ns.command(&bin.to_string_lossy());
    cmd.args(["run", "--config", &config.to_string_lossy()])
        .args(["--shutdown-grace-ms", "0"])
        .env("RUST_LOG", "info");
    Process::spawn(
        "cdn-steer run",
        cmd,
        Group::Own,
        &dir.path().join(format!("{log}.log")),
    )
}

fn config_text(dir: &ScratchDir, pins: &Path) -> String {
    config(dir.path(), pins)
}

/// Waits for a trace process to exit and returns its JSON lines.
fn lines_of(p: &mut Process) -> Result<Vec<Value>> {
    wait::until(Duration::from_secs(10), "the trace to end", || {
        Ok(p.exited()?.is_some())
    })
    .with_context(|| format!("trace output:\n{}", p.log_text()))?;
    p.log_text()
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}")))
        .collect()
}

#[test]
fn trace_streams_the_decisions_on_real_packets() -> Result<()> {
    let s = Setup::start()?;
    let n0 = s.node.ifindex("n0")?;

    // Port 80 only: the port-miss drops sent first must not show up.
    let mut first = s.trace("trace-port80", &["--port", "80", "--count", "4"])?;
    s.wait(Duration::from_secs(5), "tracing on", || {
        Ok(s.node_flags()? & NODE_TRACE != 0)
    })?;
    // One trace at a time: a second one is refused, and the first goes on.
    let second = Command::new("ip")
        .args([
            "netns",
            "exec",
            s.node.name(),
            &s.bin.to_string_lossy(),
            "trace",
        ])
        .args(["--config", &s.config.to_string_lossy()])
        .output()?;
    ensure!(!second.status.success(), "a second trace was accepted");
    let stderr = String::from_utf8_lossy(&second.stderr);
    ensure!(stderr.contains("already running"), "{stderr}");

    s.port_miss(3)?;
    s.connect()?;
    s.connect()?;
    let lines = lines_of(&mut first)?;
    ensure!(lines.len() == 5, "4 events and the end: {lines:#?}");
    for (i, e) in lines[..4].iter().enumerate() {
        let want = [
            ("result", "trace"),
            ("proto", "tcp"),
            ("src", CLIENT),
            ("dst", VIP),
            ("action", "pass"),
            ("interface", "n0"),
            ("hop", "accepted here"),
        ];
        for (field, value) in want {
            ensure!(e[field] == value, "event {i}: {field} in {e}");
        }
        ensure!(e["dst_port"] == 80 && e["ifindex"] == n0, "event {i}: {e}");
        // The one member is this node: nothing is steered, no member is chosen.
        ensure!(e["member"].is_null() && e["underlay_src"].is_null(), "{e}");
        ensure!(
            e["reason"] == "local_accept" || e["reason"] == "last_hop_accept",
            "event {i}: {e}"
        );
    }
    // The first packet of the first connection is its SYN, accepted as a new connection.
    ensure!(lines[0]["tcp_flags"] == "S" && lines[0]["reason"] == "local_accept");
    let end = &lines[4];
    ensure!(end["result"] == "trace_end" && end["events"] == 4 && end["lost"] == 0);
    ensure!(end["reason"] == "count reached", "{end}");
    ensure!(
        s.node_flags()? & NODE_TRACE == 0,
        "the flag stays on after the trace"
    );

    // The drops, by reason.
    let mut drops = s.trace("trace-drops", &["--reason", "port_miss", "--count", "2"])?;
    s.wait(Duration::from_secs(5), "tracing on", || {
        Ok(s.node_flags()? & NODE_TRACE != 0)
    })?;
    s.connect()?;
    s.port_miss(2)?;
    let lines = lines_of(&mut drops)?;
    ensure!(lines.len() == 3, "{lines:#?}");
    for e in &lines[..2] {
        ensure!(
            e["reason"] == "port_miss"
                && e["action"] == "drop"
                && e["proto"] == "udp"
                && e["src"] == CLIENT
                && e["dst"] == VIP
                && e["dst_port"] == 9999,
            "{e}"
        );
    }
    ensure!(s.node_flags()? & NODE_TRACE == 0);

    // A client that goes away ends its trace too.
    let mut open = s.trace("trace-killed", &[])?;
    s.wait(Duration::from_secs(5), "tracing on", || {
        Ok(s.node_flags()? & NODE_TRACE != 0)
    })?;
    open.signal(libc::SIGTERM, Duration::from_secs(5))?;
    s.wait(
        Duration::from_secs(5),
        "tracing off after the client left",
        || Ok(s.node_flags()? & NODE_TRACE == 0),
    )?;
    if !s.daemon.log_text().contains("trace stopped") {
        bail!("daemon log:\n{}", s.daemon.log_text());
    }
    Ok(())
}

/// A daemon that stops (or restarts) while a trace runs never leaves the flag on, and a
/// restarted daemon traces again through the pinned maps it finds.
#[test]
fn the_flag_ends_with_the_daemon_and_pinned_maps_trace_again() -> Result<()> {
    let mut s = Setup::start()?;
    let mut open = s.trace("trace-open", &[])?;
    s.wait(Duration::from_secs(5), "tracing on", || {
        Ok(s.node_flags()? & NODE_TRACE != 0)
    })?;
    s.daemon.signal(libc::SIGTERM, Duration::from_secs(10))?;
    ensure!(
        s.node_flags()? & NODE_TRACE == 0,
        "the daemon left the flag on"
    );
    // The client learns that its trace is over.
    let lines = lines_of(&mut open)?;
    ensure!(
        lines
            .last()
            .is_some_and(|l| l["result"] == "trace_end" && l["reason"] == "the daemon is stopping"),
        "{lines:#?}"
    );

    s.daemon = start_daemon(&s.node, &s.bin, &s.config, &s.dir, "daemon-2")?;
    s.wait(
        Duration::from_secs(20),
        "the data plane ready again",
        || Ok(s.node_flags()? & NODE_READY != 0),
    )?;
    ensure!(
        s.daemon.log_text().contains("found pinned maps"),
        "{}",
        s.daemon.log_text()
    );
    let mut again = s.trace("trace-again", &["--reason", "port_miss", "--count", "1"])?;
    s.wait(Duration::from_secs(5), "tracing on", || {
        Ok(s.node_flags()? & NODE_TRACE != 0)
    })?;
    s.port_miss(1)?;
    let lines = lines_of(&mut again)?;
    ensure!(
        lines.len() == 2 && lines[0]["reason"] == "port_miss" && lines[0]["src"] == CLIENT,
        "{lines:#?}"
    );
    Ok(())
}
