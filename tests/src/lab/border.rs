//! Border routers (`LabOptions::border_routers`, with `pops` >= 2): issue #8's multi-PoP
//! topology. Each PoP has a border router of its own between the nodes and the "internet"
//! router (the lab's router namespace), and the PoPs reach each other's underlays through the
//! border routers, routed, never bridged.
//!
//! ```text
//!                                  ┌─ border1 (AS 65101, ECMP) ─┬─ node1 10.1.1.2 (AS 65001)
//!                                  │    10.2.1.2 / 10.2.1.6     └─ node2 10.1.2.2
//!   client ── router (AS 65000) ───┼─ border2 (AS 65102) ───────┬─ node3
//!             "internet", ECMP     │    10.2.2.2 / 10.2.2.6     └─ node4
//!             over the borders     └─ border3 (AS 65103) ───────┬─ node5
//!                                       10.2.3.2 / 10.2.3.6     └─ node6
//! ```
//!
//! - Nodes keep their BIRD and AS 65001 and peer (eBGP) with their PoP's border, which has a
//!   private AS per PoP (65100 + PoP number). The border installs the VIP with ECMP over its
//!   nodes (`merge paths`, the router's multipath hash sysctls).
//! - Each border has two eBGP sessions with the router over its one link: `up` (10.2.p.2 <->
//!   10.2.p.1) carries the VIP routes, the "internet" announcement; `bb` (10.2.p.6 <->
//!   10.2.p.5) is the backbone and carries the PoP's underlay prefixes (10.1.i.0/24,
//!   fd00:1:i::/64). The borders send everything else (client, other PoPs) to the router by
//!   a default route. A steered packet between PoPs goes node -> border -> router -> border ->
//!   node, every link with the underlay MTU.
//! - A shift between PoPs is a border disabling its `up` sessions: its PoP's VIP routes leave
//!   the internet while its underlay stays reachable over the backbone (the flows that still
//!   live there must be found). A shift inside a PoP is the border disabling one node's
//!   sessions.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use cdn_test_support::bird::Bird;

use super::{Lab, VIP_V4, VIP_V6, attach_pass_programs, underlay_veth};
use crate::netns::Netns;

/// BGP timers of every session: fast convergence for the tests.
const TIMERS: &str = "hold time 3; keepalive time 1;\n  \
    connect retry time 1; error wait time 1,2; connect delay time 1;";

/// The border router of one PoP. Fields drop in order: BIRD and the XDP programs before the
/// namespace.
pub struct Border {
    bird: Option<Bird>,
    /// XDP_PASS on the node-facing veths (see `Lab::router_xdp`): the nodes' XDP_TX lands here.
    xdp: Option<aya::Ebpf>,
    pub ns: Netns,
}

/// The AS of PoP `p`'s (0-based) border router.
pub fn border_as(p: usize) -> u32 {
    65101 + p as u32
}

/// The router's BIRD with border routers: the `up` (VIP) and `bb` (backbone) sessions, v4 and
/// v6, with every border; ECMP over the borders.
pub(super) fn router_config(pops: usize) -> String {
    let mut c = String::from(
        "router id 10.100.0.1;\n\
         protocol device { scan time 2; }\n\
         protocol kernel k4 { ipv4 { import none; export all; }; merge paths on; }\n\
         protocol kernel k6 { ipv6 { import none; export all; }; merge paths on; }\n",
    );
    for p in 0..pops {
        let (n, asn) = (p + 1, border_as(p));
        for (name, local, neighbor, channel) in [
            (
                format!("b{n}"),
                format!("10.2.{n}.1"),
                format!("10.2.{n}.2"),
                "ipv4",
            ),
            (
                format!("b{n}v6"),
                format!("fd00:2:{n}::1"),
                format!("fd00:2:{n}::2"),
                "ipv6",
            ),
            (
                format!("bb{n}"),
                format!("10.2.{n}.5"),
                format!("10.2.{n}.6"),
                "ipv4",
            ),
            (
                format!("bb{n}v6"),
                format!("fd00:2:{n}::5"),
                format!("fd00:2:{n}::6"),
                "ipv6",
            ),
        ] {
            c.push_str(&format!(
                "protocol bgp {name} {{\n  local {local} as 65000;\n  neighbor {neighbor} as {asn};\n  \
                 {channel} {{ import all; export none; }};\n  {TIMERS}\n}}\n"
            ));
        }
    }
    c
}

/// PoP `p`'s border BIRD: sessions with its `nodes` (lab indices, 1-based), the VIP towards the
/// router on `up`, the PoP's underlay on `bb`; the kernel gets the nodes' VIP routes (ECMP).
fn border_config(p: usize, nodes: &[usize]) -> String {
    let (n, asn) = (p + 1, border_as(p));
    let mut c = format!(
        "router id 10.2.{n}.2;\n\
         protocol device {{ scan time 2; }}\n\
         protocol direct underlay {{ ipv4; ipv6; interface \"n*\"; }}\n\
         protocol kernel k4 {{ ipv4 {{ import none; export where source = RTS_BGP; }}; merge paths on; }}\n\
         protocol kernel k6 {{ ipv6 {{ import none; export where source = RTS_BGP; }}; merge paths on; }}\n"
    );
    for (name, local, neighbor, channel, export) in [
        (
            "up",
            format!("10.2.{n}.2"),
            format!("10.2.{n}.1"),
            "ipv4",
            "source = RTS_BGP",
        ),
        (
            "up6",
            format!("fd00:2:{n}::2"),
            format!("fd00:2:{n}::1"),
            "ipv6",
            "source = RTS_BGP",
        ),
        (
            "bb",
            format!("10.2.{n}.6"),
            format!("10.2.{n}.5"),
            "ipv4",
            "proto = \"underlay\"",
        ),
        (
            "bb6",
            format!("fd00:2:{n}::6"),
            format!("fd00:2:{n}::5"),
            "ipv6",
            "proto = \"underlay\"",
        ),
    ] {
        c.push_str(&format!(
            "protocol bgp {name} {{\n  local {local} as {asn};\n  neighbor {neighbor} as 65000;\n  \
             {channel} {{ import none; export where {export}; }};\n  {TIMERS}\n}}\n"
        ));
    }
    for &i in nodes {
        for (suffix, local, neighbor, channel) in [
            ("", format!("10.1.{i}.1"), format!("10.1.{i}.2"), "ipv4"),
            (
                "v6",
                format!("fd00:1:{i}::1"),
                format!("fd00:1:{i}::2"),
                "ipv6",
            ),
        ] {
            c.push_str(&format!(
                "protocol bgp n{i}{suffix} {{\n  local {local} as {asn};\n  neighbor {neighbor} as 65001;\n  \
                 {channel} {{ import all; export none; }};\n  {TIMERS}\n}}\n"
            ));
        }
    }
    c
}

impl Lab {
    /// Whether the lab has border routers.
    pub fn has_borders(&self) -> bool {
        !self.borders.is_empty()
    }

    /// The AS node `i` (index into `nodes`) peers with: its border's, or the router's.
    pub(super) fn uplink_as(&self, i: usize) -> u32 {
        match self.pop_of(i) {
            Some(p) if self.opts.border_routers => border_as(p),
            _ => 65000,
        }
    }

    /// The namespace at the other end of node `i`'s (index into `nodes`) link.
    pub(super) fn uplink_ns(&self, i: usize) -> &Netns {
        match self.pop_of(i) {
            Some(p) if self.has_borders() => &self.borders[p].ns,
            _ => &self.router,
        }
    }

    /// Creates the border namespaces and their links to the router (before the nodes').
    pub(super) fn build_borders(&mut self) -> Result<()> {
        for p in 0..self.opts.pops {
            let n = p + 1;
            let ns = Netns::new(&format!("{}b{n}", self.opts.tag))?;
            let peer = format!("b{n}");
            underlay_veth(&ns, "uplink", &self.router, &peer)?;
            self.router.sh(&format!(
                "ip link set {peer} up; ip addr add 10.2.{n}.1/24 dev {peer}; ip addr add 10.2.{n}.5/24 dev {peer}; \
                 ip addr add fd00:2:{n}::1/64 dev {peer} nodad; ip addr add fd00:2:{n}::5/64 dev {peer} nodad; \
                 sysctl -qw net.ipv4.conf.{peer}.rp_filter=0"
            ))?;
            ns.sh(&format!(
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
                   net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
                   net.ipv4.fib_multipath_hash_policy=3 net.ipv4.fib_multipath_hash_fields=0x0037 \
                   net.ipv6.fib_multipath_hash_policy=3 net.ipv6.fib_multipath_hash_fields=0x0037; \
                 ip link set lo up; ip link set uplink up; \
                 ip addr add 10.2.{n}.2/24 dev uplink; ip addr add 10.2.{n}.6/24 dev uplink; \
                 ip addr add fd00:2:{n}::2/64 dev uplink nodad; ip addr add fd00:2:{n}::6/64 dev uplink nodad; \
                 ip route add default via 10.2.{n}.1; ip -6 route add default via fd00:2:{n}::1"
            ))?;
            self.borders.push(Border {
                bird: None,
                xdp: None,
                ns,
            });
        }
        Ok(())
    }

    /// Attaches XDP_PASS to every border's node-facing veths.
    pub(super) fn attach_border_programs(&mut self) -> Result<()> {
        for p in 0..self.borders.len() {
            let peers: Vec<String> = self
                .pop_nodes(p)
                .into_iter()
                .map(|i| format!("n{}", self.nodes[i].index))
                .collect();
            self.borders[p].xdp = Some(attach_pass_programs(&self.borders[p].ns, &peers)?);
        }
        Ok(())
    }

    /// Starts every border's BIRD.
    pub(super) fn start_border_birds(&mut self) -> Result<()> {
        for p in 0..self.borders.len() {
            let nodes: Vec<usize> = self
                .pop_nodes(p)
                .into_iter()
                .map(|i| self.nodes[i].index)
                .collect();
            let bird = self.bird(
                &self.borders[p].ns,
                &format!("border{}", p + 1),
                &border_config(p, &nodes),
            )?;
            self.borders[p].bird = Some(bird);
        }
        Ok(())
    }

    /// `birdc` on PoP `p`'s border router.
    pub fn border_birdc(&self, p: usize, command: &str) -> Result<String> {
        self.borders
            .get(p)
            .and_then(|b| b.bird.as_ref())
            .with_context(|| format!("border{}'s BIRD is not running", p + 1))?
            .birdc(command)
    }

    /// Disables (`enable` false) or enables the named BGP sessions of PoP `p`'s border.
    pub(super) fn border_sessions(&self, p: usize, names: &[String], enable: bool) -> Result<()> {
        let verb = if enable { "enable" } else { "disable" };
        names
            .iter()
            .try_for_each(|n| self.border_birdc(p, &format!("{verb} {n}")).map(drop))
    }

    /// PoP `p`'s border withdraws (or, `enable`, announces again) the VIPs towards the router:
    /// its `up` sessions. The backbone session stays: the PoP's underlay remains reachable.
    pub(super) fn border_vip_sessions(&self, p: usize, enable: bool) -> Result<()> {
        self.border_sessions(p, &["up".into(), "up6".into()], enable)
    }

    /// The nodes (indices into `nodes`) the VIP's route goes to: the borders the router's route
    /// uses, and in each the nodes its route uses.
    pub(super) fn border_route_nodes(&self, vip: &str) -> Result<Vec<usize>> {
        let family = if vip.contains(':') { "-6" } else { "-4" };
        let at_router = self.router.ip(&[family, "route", "show", vip])?;
        let mut nodes = Vec::new();
        for (p, border) in self.borders.iter().enumerate() {
            let n = p + 1;
            let via = [format!("via 10.2.{n}.2 "), format!("via fd00:2:{n}::2 ")];
            let via6 = format!("via inet6 fd00:2:{n}::2 ");
            if !via.iter().any(|v| at_router.contains(v)) && !at_router.contains(&via6) {
                continue;
            }
            let at_border = border.ns.ip(&[family, "route", "show", vip])?;
            for i in self.pop_nodes(p) {
                let node = &self.nodes[i];
                let hop = if family == "-6" {
                    &node.underlay_v6
                } else {
                    &node.underlay
                };
                if at_border.contains(&format!("via {hop} "))
                    || at_border.contains(&format!("via inet6 {hop} "))
                {
                    nodes.push(i);
                }
            }
        }
        nodes.sort_unstable();
        Ok(nodes)
    }

    /// The node (index into `nodes`) where the client's TCP connection from `port` to the IPv4
    /// VIP's port 80 lands: the kernel's multipath choice at the router (`ip route get` with the
    /// flow's ports) and, with border routers, at the chosen border.
    pub fn landing_node(&self, port: u16) -> Result<usize> {
        let flow = |ns: &Netns, iif: &str| -> Result<String> {
            let out = ns.ip(&[
                "-4",
                "route",
                "get",
                VIP_V4,
                "from",
                super::CLIENT_V4,
                "iif",
                iif,
                "ipproto",
                "tcp",
                "sport",
                &port.to_string(),
                "dport",
                "80",
            ])?;
            out.split_whitespace()
                .skip_while(|w| *w != "dev")
                .nth(1)
                .map(str::to_owned)
                .with_context(|| format!("no device in {out:?}"))
        };
        let number = |dev: &str, prefix: char| -> Result<usize> {
            dev.strip_prefix(prefix)
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n >= 1)
                .with_context(|| format!("route to an unexpected device {dev:?}"))
        };
        let mut dev = flow(&self.router, "client")?;
        if self.has_borders() {
            let p = number(&dev, 'b')? - 1;
            let border = self.borders.get(p).context("no such border")?;
            dev = flow(&border.ns, "uplink")?;
        }
        let n = number(&dev, 'n')?;
        ensure!(n <= self.nodes.len(), "route to n{n}: no such node");
        Ok(n - 1)
    }

    /// Every border's routes to the VIPs, for failure messages.
    pub(super) fn border_diagnostics(&self) -> String {
        let mut out = String::new();
        for (p, b) in self.borders.iter().enumerate() {
            for vip in [VIP_V4, VIP_V6] {
                if let Ok(r) = b.ns.ip(&["route", "show", vip]) {
                    out.push_str(&format!("border{} route to {vip}:\n{r}", p + 1));
                }
            }
        }
        out
    }

    /// Waits until the borders' BGP sessions with the router are up (the backbone carries
    /// every PoP's underlay), which the nodes' health checks need.
    pub(super) fn wait_for_backbone(&self, limit: Duration) -> Result<()> {
        self.wait_until(limit, "the backbone routes to every node", || {
            let routes = self.router.ip(&["-4", "route"])?;
            Ok(self
                .nodes
                .iter()
                .all(|n| routes.contains(&format!("10.1.{}.0/24 via", n.index))))
        })
    }
}
