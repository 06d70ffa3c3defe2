//! The lab: a client, a router running BIRD with ECMP over eBGP, and N anycast nodes, each
//! with BIRD, a web server on the VIP and (optionally) `cdn-steer`, all in network namespaces
//! on this machine.
//!
//! ```text
//!   client (10.100.0.2) ── router (AS 65000, ECMP) ─┬─ node1 10.1.1.2 (AS 65001) VIP on lo
//!                                                   ├─ node2 10.1.2.2
//!                                                   └─ node3 10.1.3.2
//! ```
//!
//! The router links double as the underlay: steered packets go node -> router -> node. Route
//! changes are made at the router (a BGP session disabled and enabled again), which is what
//! an upstream routing change looks like to the nodes (with `LabOptions::border_routers`, a
//! border router per PoP sits in between: see `lab/border.rs`). Everything the lab starts is
//! stopped by pid and every namespace and mount is removed when the `Lab` is dropped, also on
//! failure.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use cdn_test_support::{
    bird::{Bird, BirdFiles},
    process::{Group, Process},
    run, wait,
};

use cdn_common::quic_lb::QuicLbConfig;

use crate::{h3::Identity, netns::Netns};

mod border;
mod config;
mod faults;
mod pops;
mod routes;

pub use pops::PopCounters;

use config::{controller_config, router_bird_config};

pub const VIP_V4: &str = "192.0.2.1";
/// The client's address: every download comes from it.
pub const CLIENT_V4: &str = "10.100.0.2";
pub const CLIENT_V6: &str = "fd00:100::2";
pub const VIP_V6: &str = "2001:db8::1";
pub const HASH_KEY: &str = "5ca1ab1e0ddba11cafef00d15ea5e000";
pub const METRICS_PORT: u16 = 9465;
/// Each node's peer plane (`/ready`, `/table`, `/digests`): its member's `sync` address, which
/// the members' HTTP health checks probe too.
pub const PEER_PORT: u16 = 9466;
/// The UDP port the lab's service serves when `LabOptions::udp_mode` is set.
pub const UDP_PORT: u16 = 5353;
/// Underlay MTU: room for the 50-byte encapsulation of a full 1500-byte client packet.
pub const UNDERLAY_MTU: u32 = 1600;
/// The UDP port of HTTP/3 when `LabOptions::h3` is set.
pub const H3_PORT: u16 = 443;
/// The QUIC-LB configuration of the lab's service (`quic = { ... }`) and its web servers.
pub const LAB_QUIC_LB: QuicLbConfig = QuicLbConfig {
    config_id: 0,
    server_id_len: 2,
    cid_len: 8,
};
/// The stateless-reset key every node's HTTP/3 server shares (see `h3::server::ServerSpec`).
const H3_RESET_KEY: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

/// How the lab's service treats HTTP/3 (UDP [`H3_PORT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuicRouting {
    /// The service's `quic` table is set: QUIC packets are routed by connection ID.
    Cid,
    /// No `quic` table: UDP 443 is plain UDP of the service's `udp_mode` (`owner` unless
    /// `LabOptions::udp_mode` says otherwise), the negative control.
    Off,
}

#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of nodes; with `pops` >= 2, `pops` times the nodes per PoP.
    pub nodes: usize,
    /// 0 or 1: no `pop` in the configurations (one implicit PoP). N >= 2: the nodes form N
    /// PoPs "pop1".."popN" of `nodes / pops` consecutive nodes each (see `lab/pops.rs`).
    pub pops: usize,
    /// Run `cdn-steer` on the nodes. Without it the nodes announce the VIP statically: the
    /// plain-anycast negative control.
    pub steering: bool,
    /// Size of the file the web servers serve.
    pub file_size: usize,
    pub file_seed: u64,
    /// Short name used in namespace names.
    pub tag: String,
    /// Serve UDP on the VIPs' port [`UDP_PORT`] with this `udp_mode` (each node's web server
    /// answers with its node name); `None`: no UDP service.
    pub udp_mode: Option<&'static str>,
    /// Serve HTTP/3 on every node's VIP:[`H3_PORT`]/udp (its QUIC server ID: the member id) and
    /// add the port to the service, routed as this says; `None`: no HTTP/3.
    pub h3: Option<QuicRouting>,
    /// With `pops` >= 2: a border router per PoP between the nodes and the router, and a
    /// routed backbone between the PoPs (see `lab/border.rs`); false: every node behind the
    /// one router.
    pub border_routers: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            pops: 0,
            steering: true,
            file_size: 2 << 20,
            file_seed: 7,
            tag: "lab".into(),
            udp_mode: None,
            h3: None,
            border_routers: false,
        }
    }
}

/// Starts `program` in `ns`, its output going to `log`. Each process gets a process group of
/// its own: Ctrl-C at the terminal reaches the lab, which stops its processes in order, not
/// every process at once. Killed (by pid) when the returned value is dropped.
/// A veth pair at the underlay MTU between two of the lab's namespaces: `name` in `a`, `peer`
/// in `b`.
fn underlay_veth(a: &Netns, name: &str, b: &Netns, peer: &str) -> Result<()> {
    let mtu = UNDERLAY_MTU.to_string();
    run(
        "ip",
        &[
            "link",
            "add",
            name,
            "netns",
            a.name(),
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            b.name(),
            "mtu",
            &mtu,
        ],
    )?;
    Ok(())
}

fn spawn(ns: &Netns, name: &str, program: &Path, args: &[&str], log: &Path) -> Result<Process> {
    let mut command = ns.command(&program.to_string_lossy());
    command.args(args).env("RUST_LOG", "info");
    Process::spawn(name, command, Group::Own, log)
}

/// The packets counted under `reason` in a node's metrics text: the sum of every
/// `cdn_steer_packets_total{reason="<reason>",action=...}` series, whatever the action.
pub fn packets_counter(metrics: &str, reason: &str) -> u64 {
    let series = format!("cdn_steer_packets_total{{reason=\"{reason}\",");
    metrics
        .lines()
        .filter(|l| l.starts_with(&series))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// One anycast node.
pub struct LabNode {
    pub ns: Netns,
    pub index: usize,
    pub name: String,
    pub underlay: String,
    pub underlay_v6: String,
    pub config: PathBuf,
    pub control: PathBuf,
    pub bird_socket: PathBuf,
    pub bird: Option<Bird>,
    pub httpd: Option<Process>,
    pub controller: Option<Process>,
}

/// Paths of the programs the lab runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub cdn_steer: PathBuf,
    pub httpd: PathBuf,
}

impl Binaries {
    /// Finds `cdn-steer` and `cdn-lab-httpd` next to the running executable (in
    /// `target/<profile>/`, or its parent for test executables in `deps/`).
    pub fn locate() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut dirs = Vec::new();
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_path_buf());
            if let Some(up) = dir.parent() {
                dirs.push(up.to_path_buf());
            }
        }
        let find = |name: &str| -> Result<PathBuf> {
            dirs.iter()
                .map(|d| d.join(name))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{name} not found next to {} (build it first: cargo build --release --bins)",
                        exe.display()
                    )
                })
        };
        Ok(Self {
            cdn_steer: find("cdn-steer")?,
            httpd: find("cdn-lab-httpd")?,
        })
    }
}

pub struct Lab {
    pub opts: LabOptions,
    /// XDP_PASS programs on the router's node-facing veths: veth hands frames that a peer
    /// sends with XDP_TX only to a device with an XDP program (GRO alone did not suffice on
    /// this kernel). Real NICs need nothing of the kind. Detached when dropped.
    router_xdp: Option<aya::Ebpf>,
    pub dir: PathBuf,
    pub bin: Binaries,
    pub client: Netns,
    pub router: Netns,
    pub router_bird_socket: PathBuf,
    router_bird: Option<Bird>,
    pub nodes: Vec<LabNode>,
    /// One per PoP with `LabOptions::border_routers`; none otherwise.
    borders: Vec<border::Border>,
    bpffs: Option<PathBuf>,
    /// The certificate every node's HTTP/3 server presents (with `LabOptions::h3`).
    pub h3_identity: Option<Identity>,
}

/// Attaches the object's trivial XDP_PASS program, in native mode, to `interfaces` of `ns`.
fn attach_pass_programs(ns: &Netns, interfaces: &[String]) -> Result<aya::Ebpf> {
    ns.enter(|| -> Result<aya::Ebpf> {
        let mut ebpf = aya::Ebpf::load(cdn_user::dataplane::object::bytes())?;
        let program: &mut aya::programs::Xdp = ebpf
            .program_mut(cdn_common::maps::BASELINE_PROGRAM_NAME)
            .context("no baseline program in the object")?
            .try_into()?;
        program.load()?;
        for iface in interfaces {
            program
                .attach(iface, aya::programs::XdpMode::Driver)
                .with_context(|| format!("attaching XDP_PASS to {iface}"))?;
        }
        Ok(ebpf)
    })?
}

impl Lab {
    /// Builds the whole lab and waits until the router has an ECMP route to the VIPs over
    /// every node.
    pub fn start(opts: LabOptions) -> Result<Self> {
        pops::check_options(&opts)?;
        let bin = Binaries::locate()?;
        let dir = std::env::temp_dir().join(format!("cdn-lab-{}-{}", opts.tag, std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let client = Netns::new(&format!("{}c", opts.tag))?;
        let router = Netns::new(&format!("{}r", opts.tag))?;
        let mut lab = Lab {
            router_bird_socket: BirdFiles::new(&dir, "router").socket,
            opts,
            dir,
            bin,
            client,
            router,
            router_bird: None,
            router_xdp: None,
            nodes: Vec::new(),
            borders: Vec::new(),
            bpffs: None,
            h3_identity: None,
        };
        if lab.opts.h3.is_some() {
            let identity = Identity::self_signed()?;
            identity.write(&lab.dir.join("h3.crt.der"), &lab.dir.join("h3.key.der"))?;
            lab.h3_identity = Some(identity);
        }
        lab.build_network()?;
        if lab.has_borders() {
            lab.attach_border_programs()?;
        } else {
            let peers: Vec<String> = (1..=lab.opts.nodes).map(|i| format!("n{i}")).collect();
            lab.router_xdp = Some(attach_pass_programs(&lab.router, &peers)?);
        }
        lab.start_routing()?;
        if lab.opts.steering {
            lab.start_controllers()?;
        }
        lab.wait_for_routes(lab.opts.nodes, Duration::from_secs(30))?;
        if lab.opts.steering {
            lab.wait_settled()?;
        }
        Ok(lab)
    }

    /// Waits until every node sees every member healthy, then two history-gossip rounds, so
    /// that what the nodes saw while starting one after another is merged everywhere.
    pub fn wait_settled(&self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.wait_until(
                Duration::from_secs(20),
                "every member healthy everywhere",
                || {
                    let s = self.status(i)?;
                    Ok(s["members"]
                        .as_array()
                        .is_some_and(|m| m.iter().all(|m| m["healthy"] == true)))
                },
            )?;
        }
        std::thread::sleep(Duration::from_millis(2500));
        Ok(())
    }

    fn build_network(&mut self) -> Result<()> {
        let (c, r) = (&self.client, &self.router);
        run(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                c.name(),
                "type",
                "veth",
                "peer",
                "name",
                "client",
                "netns",
                r.name(),
            ],
        )?;
        c.sh(
            "ip link set eth0 up; ip addr add 10.100.0.2/24 dev eth0; ip addr add fd00:100::2/64 dev eth0 nodad; \
             ip route add default via 10.100.0.1; ip -6 route add default via fd00:100::1",
        )?;
        r.sh(
            "ip link set client up; ip addr add 10.100.0.1/24 dev client; ip addr add fd00:100::1/64 dev client nodad; \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
               net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
               net.ipv4.fib_multipath_hash_policy=3 net.ipv4.fib_multipath_hash_fields=0x0037 \
               net.ipv6.fib_multipath_hash_policy=3 net.ipv6.fib_multipath_hash_fields=0x0037",
        )?;
        if self.opts.border_routers {
            self.build_borders()?;
        }
        for i in 1..=self.opts.nodes {
            let ns = Netns::new(&format!("{}n{i}", self.opts.tag))?;
            let peer = format!("n{i}");
            // The router, or with border routers the node's PoP's border.
            let up = self.uplink_ns(i - 1);
            underlay_veth(&ns, "eth0", up, &peer)?;
            up.sh(&format!(
                "ip link set {peer} up; ip addr add 10.1.{i}.1/24 dev {peer}; ip addr add fd00:1:{i}::1/64 dev {peer} nodad; \
                 sysctl -qw net.ipv4.conf.{peer}.rp_filter=0; ethtool -K {peer} gro on >/dev/null"
            ))?;
            ns.sh(&format!(
                "ip link set eth0 up; ip addr add 10.1.{i}.2/24 dev eth0; ip addr add fd00:1:{i}::2/64 dev eth0 nodad; \
                 ip route add default via 10.1.{i}.1; ip -6 route add default via fd00:1:{i}::1; \
                 ip addr add {VIP_V4}/32 dev lo; ip addr add {VIP_V6}/128 dev lo; \
                 sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0 \
                   net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
                   net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
                   net.ipv4.conf.all.accept_local=1 net.ipv4.conf.eth0.accept_local=1; \
                 ethtool -K eth0 gro on >/dev/null"
            ))?;
            let name = format!("node{i}");
            self.nodes.push(LabNode {
                ns,
                index: i,
                config: self.dir.join(format!("{name}.toml")),
                control: self.dir.join(format!("{name}.sock")),
                bird_socket: BirdFiles::new(&self.dir, &name).socket,
                underlay: format!("10.1.{i}.2"),
                underlay_v6: format!("fd00:1:{i}::2"),
                name,
                bird: None,
                httpd: None,
                controller: None,
            });
        }
        Ok(())
    }

    /// Starts BIRD in `ns`, with its files in the lab's directory; returns once it answers.
    fn bird(&self, ns: &Netns, name: &str, config: &str) -> Result<Bird> {
        Bird::start(ns, &self.dir, name, config, Group::Own)
    }

    fn start_routing(&mut self) -> Result<()> {
        let config = if self.has_borders() {
            border::router_config(self.opts.pops)
        } else {
            router_bird_config(self.opts.nodes)
        };
        self.router_bird = Some(self.bird(&self.router, "router", &config)?);
        if self.has_borders() {
            self.start_border_birds()?;
            self.wait_for_backbone(Duration::from_secs(20))?;
        }
        for i in 0..self.nodes.len() {
            self.start_node_bird(i)?;
            self.start_httpd(i)?;
        }
        Ok(())
    }

    fn start_controllers(&mut self) -> Result<()> {
        // A bpffs mounted here, in the host's mount namespace, so that pins survive a
        // controller restart (`ip netns exec` gives each process a private /sys).
        let bpffs = self.dir.join("bpffs");
        std::fs::create_dir_all(&bpffs)?;
        run("mount", &["-t", "bpf", "bpf", &bpffs.to_string_lossy()])?;
        self.bpffs = Some(bpffs.clone());
        for i in 0..self.nodes.len() {
            let config = controller_config(self, &self.nodes[i], &bpffs);
            std::fs::write(&self.nodes[i].config, config)?;
            self.start_controller(i)?;
        }
        Ok(())
    }

    /// Starts (or restarts) node `i`'s controller (index into `nodes`).
    pub fn start_controller(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let log = self.dir.join(format!("{}-cdn-steer.log", node.name));
        let config = node.config.to_string_lossy().into_owned();
        let proc = spawn(
            &node.ns,
            &format!("cdn-steer ({})", node.name),
            &self.bin.cdn_steer,
            &["run", "--config", &config, "--shutdown-grace-ms", "300"],
            &log,
        )?;
        self.nodes[i].controller = Some(proc);
        Ok(())
    }

    /// `cdn-steer <args>` against node `i`'s daemon.
    pub fn steer(&self, i: usize, args: &[&str]) -> Result<String> {
        let node = &self.nodes[i];
        let mut full: Vec<&str> = args.to_vec();
        let config = node.config.to_string_lossy().into_owned();
        full.extend_from_slice(&["--config", &config]);
        let out = node
            .ns
            .command(&self.bin.cdn_steer.to_string_lossy())
            .args(&full)
            .output()?;
        if !out.status.success() {
            bail!(
                "cdn-steer {} on {}: {}",
                args.join(" "),
                node.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The daemon's status of node `i`, as JSON.
    pub fn status(&self, i: usize) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.steer(i, &["status", "--json"])?,
        )?)
    }

    /// Node `i`'s metrics, scraped over HTTP from the router (on the underlay).
    pub fn scrape(&self, i: usize) -> Result<String> {
        let url = format!("http://{}:{METRICS_PORT}/metrics", self.nodes[i].underlay);
        let out = self
            .router
            .command("curl")
            .args(["-sf", "--max-time", "5", &url])
            .output()?;
        if !out.status.success() {
            bail!(
                "scraping {url} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls `check` until it is true; fails after `limit` with the lab's diagnostics.
    pub fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        check: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        wait::until(limit, what, check)
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.diagnostics()))
    }

    /// Router routes and the tail of every log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.router.ip(&["route"]) {
            out.push_str(&format!("router routes:\n{r}"));
        }
        out.push_str(&self.border_diagnostics());
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    out.push_str(&format!("--- {}\n", p.display()));
                    for l in tail.into_iter().rev() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    /// Path of the client namespace, for threads that join it.
    pub fn client_netns_path(&self) -> String {
        self.client.path()
    }

    pub fn vip(&self, v6: bool) -> IpAddr {
        (if v6 { VIP_V6 } else { VIP_V4 }).parse().expect("lab VIP")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first (by pid: only what the lab started), then namespaces, then mounts.
        for node in &mut self.nodes {
            node.controller = None;
            node.httpd = None;
            node.bird = None;
        }
        self.router_bird = None;
        self.router_xdp = None;
        self.nodes.clear();
        self.borders.clear();
        if let Some(bpffs) = self.bpffs.take()
            && let Err(e) = run("umount", &[&bpffs.to_string_lossy()])
        {
            eprintln!("cleanup: {e:#}");
        }
        if std::env::var_os("CDN_LAB_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
