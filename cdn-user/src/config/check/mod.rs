//! The rules a deserialised configuration must follow, checked all together so that one
//! edit-and-retry round fixes every problem. Each problem names its field
//! (`cluster.members[2].underlay`).

mod pops;
mod quic;
mod values;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use cdn_common::maps::{MAX_MEMBERS, MAX_SERVICE_PORTS, MAX_SERVICES};

use super::schema::{
    BgpSettings, Config, HealthCheck, HealthProbe, MetricsSettings, NodeSettings, ServiceSettings,
};
use super::{Prefix, Problem};
use cdn_common::maps::is_prime;

pub use pops::MAX_POP_NAME_LEN;
pub use values::{
    MAX_SERVICE_NAME_LEN, MAX_UNIX_SOCKET_PATH, MIN_CLIENT_PACKET, MIN_VIP_PREFIX_V4,
    MIN_VIP_PREFIX_V6, min_max_frame,
};

/// Largest accepted `cluster.table_size` (a prime): about a million buckets, 8 MB per table
/// half in the kernel, is far more than even loads over [`MAX_MEMBERS`] members need.
pub const MAX_CLUSTER_TABLE_SIZE: u32 = 1_000_003;
/// Largest accepted member weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Accepted range of `cluster.hop_budget`.
pub const HOP_BUDGET_RANGE: std::ops::RangeInclusive<u8> = 1..=8;
/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Adds the problems of `config` to `problems`, which holds those the document pass found:
/// a field reported there holds a placeholder and is not checked again.
pub(super) fn check(config: &Config, problems: &mut Vec<Problem>) {
    let mut checker = Checker {
        unparsed: problems.iter().map(|p| p.field.clone()).collect(),
        problems,
    };
    checker.config(config);
}

struct Checker<'a> {
    problems: &'a mut Vec<Problem>,
    /// Fields whose text did not parse.
    unparsed: HashSet<String>,
}

/// A VIP prefix and where it was written, for overlap messages.
struct VipAt {
    prefix: Prefix,
    field: String,
}

impl Checker<'_> {
    fn problem(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn parsed(&self, field: &str) -> bool {
        !self.unparsed.contains(field)
    }

    fn config(&mut self, config: &Config) {
        self.node(&config.node);
        let vips = self.services(&config.services);
        self.cluster(config, &vips);
        self.pops(config);
        self.quic(config);
        for (field, addr) in [
            ("node.underlay_v4", config.node.underlay_v4.map(IpAddr::V4)),
            ("node.underlay_v6", config.node.underlay_v6.map(IpAddr::V6)),
        ] {
            if let Some(addr) = addr
                && self.parsed(field)
            {
                self.not_in_vips(field, addr, &vips);
            }
        }
        if let Some(bgp) = &config.bgp {
            self.bgp(bgp);
        }
        self.metrics(&config.metrics);
        if let Some(conflict) = super::listeners::conflict(&config.listeners())
            && self.parsed("metrics.listen")
        {
            self.problem("metrics.listen", conflict);
        }
    }

    fn node(&mut self, node: &NodeSettings) {
        if node.name.is_empty() {
            self.problem("node.name", "must not be empty");
        }
        if node.interfaces.is_empty() {
            self.problem("node.interfaces", "at least one interface is required");
        }
        for (i, name) in node.interfaces.iter().enumerate() {
            let field = format!("node.interfaces[{i}]");
            if let Some(reason) = interface_name_problem(name) {
                self.problem(field, reason);
            } else if let Some(j) = node.interfaces[..i].iter().position(|n| n == name) {
                self.problem(field, format!("duplicate interface {name:?} (also [{j}])"));
            }
        }
        for (i, name) in node.underlay_interfaces.iter().enumerate() {
            let field = format!("node.underlay_interfaces[{i}]");
            if !node.interfaces.contains(name) {
                self.problem(
                    field,
                    format!("{name:?} is not one of node.interfaces: the program only sees those"),
                );
            } else if let Some(j) = node.underlay_interfaces[..i].iter().position(|n| n == name) {
                self.problem(field, format!("duplicate interface {name:?} (also [{j}])"));
            }
        }
        for (field, addr) in [
            ("node.underlay_v4", node.underlay_v4.map(IpAddr::V4)),
            ("node.underlay_v6", node.underlay_v6.map(IpAddr::V6)),
        ] {
            if let Some(addr) = addr
                && self.parsed(field)
            {
                self.unicast(field, addr);
            }
        }
        if node.underlay_v4.is_none() && node.underlay_v6.is_none() {
            self.problem(
                "node.underlay_v4",
                "neither node.underlay_v4 nor node.underlay_v6 is set; at least one is required",
            );
        }
        if let Some(reason) = values::bpffs_problem(&node.bpffs) {
            self.problem("node.bpffs", reason);
        }
        self.socket_path("node.control_socket", &node.control_socket);
        let min_frame = values::min_max_frame(node.underlay_v6.is_some());
        if node.max_frame != 0 && node.max_frame < min_frame {
            self.problem(
                "node.max_frame",
                format!(
                    "{} is below {min_frame}, the frame a {MIN_CLIENT_PACKET}-byte client packet \
                     (the IPv6 minimum MTU) makes once encapsulated on this node's underlay; \
                     set the underlay's largest frame (e.g. 1514 for a 1500 MTU), or 0 for no \
                     check",
                    node.max_frame
                ),
            );
        }
    }

    fn cluster(&mut self, config: &Config, vips: &[VipAt]) {
        let cluster = &config.cluster;
        let steer_port = cluster.steer_port;
        if steer_port == 0 {
            self.problem("cluster.steer_port", "must not be 0");
        }
        for (s, service) in config.services.iter().enumerate() {
            for (list, ports) in [
                ("tcp_ports", &service.tcp_ports),
                ("udp_ports", &service.udp_ports),
            ] {
                if let Some(k) = ports.iter().position(|&p| p != 0 && p == steer_port) {
                    self.problem(
                        "cluster.steer_port",
                        format!(
                            "{steer_port} is also services[{s}].{list}[{k}]; the steering port \
                             must not be a service port"
                        ),
                    );
                }
            }
        }

        let table_size = cluster.table_size;
        if !is_prime(table_size) {
            self.problem("cluster.table_size", format!("{table_size} is not prime"));
        }
        if table_size as usize <= cluster.members.len() {
            self.problem(
                "cluster.table_size",
                format!(
                    "{table_size} must be larger than the number of members ({})",
                    cluster.members.len()
                ),
            );
        }
        if table_size > MAX_CLUSTER_TABLE_SIZE {
            self.problem(
                "cluster.table_size",
                format!("{table_size} is larger than the maximum {MAX_CLUSTER_TABLE_SIZE}"),
            );
        }

        if cluster.hash_key == [0, 0] && self.parsed("cluster.hash_key") {
            self.problem(
                "cluster.hash_key",
                "is all zeros, a placeholder rather than a secret: anyone could compute which \
                 member owns a flow; generate a key with `openssl rand -hex 16`",
            );
        }

        let hop_budget = cluster.hop_budget;
        if !HOP_BUDGET_RANGE.contains(&hop_budget) {
            self.problem(
                "cluster.hop_budget",
                format!(
                    "{hop_budget} is outside {}..={}",
                    HOP_BUDGET_RANGE.start(),
                    HOP_BUDGET_RANGE.end()
                ),
            );
        }
        self.members(config, vips);
    }

    fn members(&mut self, config: &Config, vips: &[VipAt]) {
        let (node, members) = (&config.node, &config.cluster.members);
        if members.is_empty() {
            self.problem("cluster.members", "at least one member is required");
        }
        // Underlays that parsed and are unicast, to find duplicates.
        let mut underlays: Vec<Option<IpAddr>> = Vec::with_capacity(members.len());
        for (i, m) in members.iter().enumerate() {
            let at = format!("cluster.members[{i}]");
            if let Some(reason) = member_name_problem(&m.name) {
                self.problem(format!("{at}.name"), reason);
            } else if let Some(j) = members[..i].iter().position(|o| o.name == m.name) {
                self.problem(
                    format!("{at}.name"),
                    format!("duplicate name {:?} (also members[{j}])", m.name),
                );
            }
            if u32::from(m.id) >= MAX_MEMBERS {
                self.problem(
                    format!("{at}.id"),
                    format!(
                        "{} is out of range, ids go from 0 to {}",
                        m.id,
                        MAX_MEMBERS - 1
                    ),
                );
            } else if let Some(j) = members[..i].iter().position(|o| o.id == m.id) {
                self.problem(
                    format!("{at}.id"),
                    format!("duplicate id {} (also members[{j}])", m.id),
                );
            }

            let field = format!("{at}.underlay");
            let addr = m.underlay;
            let usable = self.parsed(&field) && self.unicast(&field, addr);
            if usable {
                if let Some(j) = underlays.iter().position(|o| *o == Some(addr)) {
                    self.problem(
                        &field,
                        format!("duplicate address {addr} (also members[{j}])"),
                    );
                }
                // A node address that did not parse still tells its family.
                let (family, declared) = match addr {
                    IpAddr::V4(_) => ("IPv4", node.underlay_v4.is_some()),
                    IpAddr::V6(_) => ("IPv6", node.underlay_v6.is_some()),
                };
                if !declared {
                    let key = if addr.is_ipv4() { "v4" } else { "v6" };
                    self.problem(
                        &field,
                        format!(
                            "{addr} is {family} but node.underlay_{key} is not set, so this node \
                             cannot reach the member"
                        ),
                    );
                }
                self.not_in_vips(&field, addr, vips);
                if m.name == node.name {
                    self.own_underlay(&field, addr, node);
                }
            }
            underlays.push(usable.then_some(addr));

            if m.weight > MAX_WEIGHT {
                self.problem(
                    format!("{at}.weight"),
                    format!("{} is above the maximum {MAX_WEIGHT}", m.weight),
                );
            }
            self.health(&format!("{at}.health"), &m.health);
            let sync_field = format!("{at}.sync");
            if let Some(sync) = m.sync
                && self.parsed(&sync_field)
            {
                self.endpoint(&sync_field, sync);
            }
        }
        if !members.is_empty() && members.iter().all(|m| m.weight == 0) {
            self.problem(
                "cluster.members",
                "every member has weight 0, so no member could take a new connection; give at \
                 least one member a weight above 0",
            );
        }

        let own = members.iter().position(|m| m.name == node.name);
        match (own, node.steer_only) {
            (None, false) if !node.name.is_empty() => self.problem(
                "node.name",
                format!(
                    "{:?} is not the name of any cluster member (set node.steer_only = true for \
                     a node that only steers)",
                    node.name
                ),
            ),
            (Some(j), true) => self.problem(
                "node.steer_only",
                format!(
                    "node {:?} is cluster.members[{j}]; a steering-only node must not be a \
                     member",
                    node.name
                ),
            ),
            _ => {}
        }
    }

    /// This node's own member address must be one of the node's underlay addresses: it is the
    /// address steering packets to this member arrive at. (Not checked against a node address
    /// that did not parse: that is reported once, at the node.)
    fn own_underlay(&mut self, field: &str, addr: IpAddr, node: &NodeSettings) {
        let (matches, node_field) = match addr {
            IpAddr::V4(a) => (node.underlay_v4 == Some(a), "node.underlay_v4"),
            IpAddr::V6(a) => (node.underlay_v6 == Some(a), "node.underlay_v6"),
        };
        if !matches && self.parsed(node_field) {
            let show = |a: Option<String>| a.unwrap_or_else(|| "unset".to_owned());
            self.problem(
                field,
                format!(
                    "{addr} is this node's own member address but is neither node.underlay_v4 \
                     ({}) nor node.underlay_v6 ({})",
                    show(node.underlay_v4.map(|a| a.to_string())),
                    show(node.underlay_v6.map(|a| a.to_string())),
                ),
            );
        }
    }

    /// An underlay address inside a VIP prefix would make steering packets look like client
    /// traffic to the data plane.
    fn not_in_vips(&mut self, field: &str, addr: IpAddr, vips: &[VipAt]) {
        if let Some(vip) = vips.iter().find(|v| v.prefix.contains(addr)) {
            self.problem(
                field,
                format!(
                    "{addr} lies inside VIP prefix {} ({}); underlay and VIP addresses must not \
                     overlap",
                    vip.prefix, vip.field
                ),
            );
        }
    }

    fn health(&mut self, at: &str, health: &HealthCheck) {
        let port_field = format!("{at}.port");
        if health.port == 0 && self.parsed(&port_field) {
            self.problem(port_field, "must not be 0");
        }
        if let HealthProbe::Http { path, host } = &health.probe {
            if !path.starts_with('/') || has_space_or_control(path) {
                self.problem(
                    format!("{at}.path"),
                    format!(
                        "{path:?} must start with '/' and contain no whitespace or control \
                         characters"
                    ),
                );
            }
            if let Some(host) = host
                && (host.is_empty() || has_space_or_control(host))
            {
                self.problem(
                    format!("{at}.host"),
                    format!("{host:?} must be non-empty, without whitespace or control characters"),
                );
            }
        }
        let (interval_ms, timeout_ms) = (health.interval.as_millis(), health.timeout.as_millis());
        if interval_ms == 0 {
            self.problem(format!("{at}.interval_ms"), "must be more than 0");
        }
        if timeout_ms == 0 {
            self.problem(format!("{at}.timeout_ms"), "must be more than 0");
        } else if timeout_ms >= interval_ms {
            self.problem(
                format!("{at}.timeout_ms"),
                format!("{timeout_ms} must be less than interval_ms ({interval_ms})"),
            );
        }
        for (key, value) in [("rise", health.rise), ("fall", health.fall)] {
            if value == 0 {
                self.problem(format!("{at}.{key}"), "must be at least 1");
            }
        }
    }

    /// Checks the services; returns their VIPs that parsed, for the overlap checks.
    fn services(&mut self, services: &[ServiceSettings]) -> Vec<VipAt> {
        if services.is_empty() {
            self.problem("services", "at least one [[services]] entry is required");
        }
        let mut all_vips: Vec<VipAt> = Vec::new();
        for (s, service) in services.iter().enumerate() {
            let at = format!("services[{s}]");
            if let Some(reason) = values::service_name_problem(&service.name) {
                self.problem(format!("{at}.name"), reason);
            } else if let Some(j) = services[..s].iter().position(|o| o.name == service.name) {
                self.problem(
                    format!("{at}.name"),
                    format!("duplicate name {:?} (also services[{j}])", service.name),
                );
            }
            if service.vips.is_empty() {
                self.problem(format!("{at}.vips"), "at least one VIP prefix is required");
            }
            for (v, &prefix) in service.vips.iter().enumerate() {
                let field = format!("{at}.vips[{v}]");
                if !self.parsed(&field) {
                    continue;
                }
                if let Some(reason) = values::vip_problem(&prefix) {
                    self.problem(&field, reason);
                }
                if let Some(other) = all_vips.iter().find(|o| o.prefix.overlaps(&prefix)) {
                    let reason = if other.prefix == prefix {
                        format!("duplicate prefix {prefix} (also {})", other.field)
                    } else {
                        format!("{prefix} overlaps {} ({})", other.prefix, other.field)
                    };
                    self.problem(&field, reason);
                }
                all_vips.push(VipAt { prefix, field });
            }
            if service.tcp_ports.is_empty() && service.udp_ports.is_empty() {
                self.problem(
                    at.clone(),
                    "lists neither tcp_ports nor udp_ports; at least one port is required",
                );
            }
            self.ports(&format!("{at}.tcp_ports"), &service.tcp_ports);
            self.ports(&format!("{at}.udp_ports"), &service.udp_ports);
        }
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let count = all_vips.iter().filter(|v| v.prefix.is_ipv4() == v4).count();
            if count > MAX_SERVICES as usize {
                self.problem(
                    "services",
                    format!(
                        "{count} {family} VIP prefixes in all; at most {MAX_SERVICES} are supported"
                    ),
                );
            }
        }
        all_vips
    }

    fn ports(&mut self, field: &str, ports: &[u16]) {
        if ports.len() > MAX_SERVICE_PORTS {
            self.problem(
                field,
                format!(
                    "{} ports; at most {MAX_SERVICE_PORTS} are supported",
                    ports.len()
                ),
            );
        }
        for (k, &port) in ports.iter().enumerate() {
            if port == 0 {
                self.problem(format!("{field}[{k}]"), "port 0 is not a valid port");
            } else if let Some(j) = ports[..k].iter().position(|&p| p == port) {
                self.problem(
                    format!("{field}[{k}]"),
                    format!("duplicate port {port} (also [{j}])"),
                );
            }
        }
    }

    fn bgp(&mut self, bgp: &BgpSettings) {
        self.socket_path("bgp.bird_socket", &bgp.bird_socket);
        if bgp.protocols.is_empty() {
            self.problem("bgp.protocols", "at least one BIRD protocol is required");
        }
        for (i, protocol) in bgp.protocols.iter().enumerate() {
            let at = format!("bgp.protocols[{i}]");
            if !is_bird_symbol(protocol) {
                self.problem(
                    at,
                    format!(
                        "{protocol:?} is not a BIRD protocol name (a letter or '_', then \
                         letters, digits or '_')"
                    ),
                );
            } else if bgp.protocols[..i].contains(protocol) {
                self.problem(at, format!("{protocol:?} is listed twice"));
            }
        }
        if bgp.poll_interval.is_zero() {
            self.problem("bgp.poll_interval_ms", "must be more than 0");
        }
    }

    fn metrics(&mut self, metrics: &MetricsSettings) {
        if metrics.listen.port() == 0 && self.parsed("metrics.listen") {
            self.problem(
                "metrics.listen",
                format!(
                    "{}: port 0 would listen on a random port the members' health checks and \
                     history sync cannot know; give a fixed port, e.g. {}:9465",
                    metrics.listen,
                    metrics.listen.ip()
                ),
            );
        }
    }

    /// A peer's address to connect to: a real address and port.
    fn endpoint(&mut self, field: &str, addr: std::net::SocketAddr) {
        if addr.port() == 0 {
            self.problem(field, format!("{addr}: port 0 cannot be connected to"));
        } else if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            self.problem(
                field,
                format!("{addr}: not a unicast address to connect to"),
            );
        }
    }

    /// An absolute path that fits a unix socket address.
    fn socket_path(&mut self, field: &str, path: &Path) {
        if !path.is_absolute() {
            self.absolute(field, path);
        } else if let Some(reason) = values::socket_path_problem(path) {
            self.problem(field, reason);
        }
    }

    /// Whether `addr` can be a node's underlay address; records a problem if not.
    fn unicast(&mut self, field: &str, addr: IpAddr) -> bool {
        let bad = addr.is_unspecified()
            || addr.is_multicast()
            || matches!(addr, IpAddr::V4(a) if a.is_broadcast());
        if bad {
            self.problem(field, format!("{addr} is not a unicast address"));
        }
        !bad
    }

    fn absolute(&mut self, field: &str, path: &Path) {
        if !path.is_absolute() {
            self.problem(
                field,
                format!("{} must be an absolute path", path.display()),
            );
        }
    }
}

fn interface_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("interface name must not be empty".to_owned())
    } else if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "{name:?} is {} bytes long, the kernel allows at most {MAX_IFNAME_LEN}",
            name.len()
        ))
    } else if name == "." || name == ".." || name.contains(['/', ':']) || has_space_or_control(name)
    {
        Some(format!(
            "{name:?} is not a valid interface name (no '/', ':' or whitespace)"
        ))
    } else {
        None
    }
}

fn member_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("must not be empty".to_owned())
    } else if has_space_or_control(name) {
        Some(format!(
            "{name:?} must not contain whitespace or control characters"
        ))
    } else {
        None
    }
}

fn has_space_or_control(text: &str) -> bool {
    text.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn is_bird_symbol(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
