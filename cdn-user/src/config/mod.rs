//! The TOML configuration: parsed, checked as a whole, and turned into typed settings.
//!
//! Parsing happens in two steps. The file is first read into plain structures that mirror it
//! (unknown keys are errors, so a typo cannot silently fall back to a default); then every rule
//! is checked and all the problems found are reported together, each naming the field it is
//! about (`cluster.members[2].underlay: …`), so one edit-and-retry round fixes them all. Only a
//! configuration without any problem becomes a [`Config`], whose fields are typed and resolved
//! (defaults applied, addresses and prefixes parsed, durations as [`Duration`]).
//!
//! Every node of a cluster must carry the same `[cluster]` and `[[services]]` sections: the
//! steering table is computed independently on each node from them. `[node]` differs per node.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use cdn_common::maps::{
    DEFAULT_STEER_PORT, DEFAULT_TABLE_SIZE, MAX_MEMBERS, MAX_SERVICE_PORTS, MAX_SERVICES,
};
use thiserror::Error;

use crate::cluster::maglev::is_prime;

/// Largest accepted `cluster.table_size` (a prime): about a million buckets, 8 MB per table
/// half in the kernel, is far more than even loads over [`MAX_MEMBERS`] members need.
pub const MAX_CLUSTER_TABLE_SIZE: u32 = 1_000_003;
/// Largest accepted member weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Accepted range of `cluster.hop_budget`.
pub const HOP_BUDGET_RANGE: std::ops::RangeInclusive<u8> = 1..=8;
/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/cdn-steer";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/cdn-steer.sock";
const DEFAULT_BIRD_SOCKET: &str = "/run/bird/bird.ctl";
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9465";
const DEFAULT_WEIGHT: u32 = 100;
const DEFAULT_HOP_BUDGET: u8 = 3;
const DEFAULT_HISTORY_SYNC_MS: u32 = 5000;
const DEFAULT_INTERVAL_MS: u32 = 1000;
const DEFAULT_TIMEOUT_MS: u32 = 500;
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_POLL_INTERVAL_MS: u32 = 1000;

/// A complete, valid configuration for the first node of a three-member cluster.
pub const EXAMPLE: &str = r#"# cdn-steer configuration.
#
# Every node of a cluster carries the same [cluster] and [[services]] sections: each node computes
# the steering table from them on its own, and they must agree. Only [node] differs per node.

[node]
# This node's name: one of the cluster members below (unless steer_only = true).
name = "node-a"
# Interfaces the XDP program attaches to: the ones client traffic and steering traffic arrive on.
interfaces = ["eth0"]
# This node's underlay addresses (at least one). Steering packets are sent from and to them.
underlay_v4 = "10.0.0.1"
# underlay_v6 = "fd00::1"
# "native" (in the driver, default) or "generic" (slower; for drivers without XDP support).
xdp_mode = "native"
# true: this node steers client packets to the members but is not one itself.
steer_only = false
# Largest frame the underlay carries, Ethernet header included. A client packet that would
# exceed it once encapsulated is dropped and counted (too_big). 0 = do not check.
max_frame = 1514
# Where the maps and the program are pinned, so a restart keeps flows going.
bpffs = "/sys/fs/bpf/cdn-steer"
# Unix socket of the control interface (drain, status).
control_socket = "/run/cdn-steer.sock"

[cluster]
# 128-bit SipHash key for the flow hash, the same on every node. Keep it secret: whoever knows
# it can aim traffic at one member. Generate one with `openssl rand -hex 16`.
hash_key = "00112233445566778899aabbccddeeff"
# UDP port of the steering encapsulation between nodes.
steer_port = 6080
# Buckets in the steering table: a prime larger than the number of members.
table_size = 65537
# How many times a packet may be passed on between members before it is dropped.
hop_budget = 3
# How often to merge a healthy member's hop history into ours (through its `sync` endpoint).
history_sync_ms = 5000

[[cluster.members]]
name = "node-a"
# Stable member id, the same on every node, 0 to 1023. Never reuse the id of a removed member
# while flows it owned may still be open.
id = 0
underlay = "10.0.0.1"
# Relative share of new flows; 0 takes none (the member keeps serving its open flows).
weight = 100
# The member's controller endpoint ([metrics] listen on its node): a starting node copies the
# hop history from a healthy member there. Recommended on every member.
sync = "10.0.0.1:9465"
# No [cluster.members.health]: a TCP connect to the first service TCP port (80 here).

[[cluster.members]]
name = "node-b"
id = 1
underlay = "10.0.0.2"
weight = 100
[cluster.members.health]
# An HTTP request instead of a TCP connect; any 2xx answer counts as healthy.
kind = "http"
port = 80
path = "/healthz"
host = "www.example.org"
interval_ms = 1000
timeout_ms = 500
# Consecutive successes before a member takes new flows, failures before it stops taking them.
rise = 2
fall = 3

[[cluster.members]]
name = "node-c"
id = 2
underlay = "10.0.0.3"
# Half the share of the others, e.g. a smaller machine.
weight = 50

[[services]]
name = "web"
# Anycast prefixes this cluster serves, announced by every healthy node.
vips = ["192.0.2.1/32", "2001:db8::1/128"]
tcp_ports = [80, 443]
udp_ports = [443]

# Optional: announce the VIPs through BIRD only while this node is healthy and ready.
[bgp]
enabled = true
bird_socket = "/run/bird/bird.ctl"
# The BIRD static protocols holding the VIP routes (one per address family); the controller
# enables them while this node should be announced and disables them otherwise.
protocols = ["anycast_vips", "anycast_vips6"]
poll_interval_ms = 1000

[metrics]
# Prometheus endpoint, also /ready (for the members' health checks) and /table (for a starting
# member's history sync). Keep it on the underlay or a management network, never public.
listen = "10.0.0.1:9465"
"#;

// ---------------------------------------------------------------------------------------------
// Typed, validated configuration
// ---------------------------------------------------------------------------------------------

/// A checked configuration. Built only by [`parse`] and [`load`], so every rule in this module
/// holds for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `[node]`: this node.
    pub node: NodeSettings,
    /// `[cluster]`: the member list and the steering parameters, identical on every node.
    pub cluster: ClusterSettings,
    /// `[[services]]`: the anycast prefixes and ports served, identical on every node. At
    /// least one.
    pub services: Vec<ServiceSettings>,
    /// `[bgp]` (optional): route announcement through BIRD. Absent: the controller does not
    /// touch routing.
    pub bgp: Option<BgpSettings>,
    /// `[metrics]` (optional): the Prometheus endpoint.
    pub metrics: MetricsSettings,
}

/// `[node]`: settings of this node only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// `name` (required): this node's name. It must be the name of one of `cluster.members`,
    /// unless `steer_only` is set, in which case it must not be.
    pub name: String,
    /// `interfaces` (required, at least one): network interfaces the XDP program attaches to.
    /// Each name is 1 to 15 characters without `/`, `:` or whitespace; no duplicates.
    pub interfaces: Vec<String>,
    /// `underlay_v4` (optional): this node's IPv4 underlay address. At least one of
    /// `underlay_v4` and `underlay_v6` is required; members whose underlay is IPv4 can only be
    /// reached if this is set.
    pub underlay_v4: Option<Ipv4Addr>,
    /// `underlay_v6` (optional): this node's IPv6 underlay address; see `underlay_v4`.
    pub underlay_v6: Option<Ipv6Addr>,
    /// `xdp_mode` (default `"native"`): `"native"` runs the program in the driver;
    /// `"generic"` runs it in the kernel's generic path (slower; for drivers without XDP).
    pub xdp_mode: XdpMode,
    /// `steer_only` (default `false`): this node steers client packets to the members but
    /// owns no flows itself.
    pub steer_only: bool,
    /// `max_frame` (default 0): largest frame in bytes, Ethernet header included, that the
    /// underlay carries; encapsulated packets that would exceed it are dropped and counted.
    /// 0 disables the check.
    pub max_frame: u32,
    /// `bpffs` (default `"/sys/fs/bpf/cdn-steer"`): absolute path of the directory where the
    /// program and maps are pinned.
    pub bpffs: PathBuf,
    /// `control_socket` (default `"/run/cdn-steer.sock"`): absolute path of the control
    /// socket.
    pub control_socket: PathBuf,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the network driver (`XDP_FLAGS_DRV_MODE`).
    #[default]
    Native,
    /// In the kernel's generic receive path (`XDP_FLAGS_SKB_MODE`).
    Generic,
}

/// `[cluster]`: parameters every node must share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `hash_key` (required): the 128-bit SipHash key of the flow hash, written as exactly 32
    /// hex digits. The first 16 digits, read as a big-endian number, are `hash_key[0]`, the
    /// last 16 are `hash_key[1]`: `"00112233445566778899aabbccddeeff"` gives
    /// `[0x0011223344556677, 0x8899aabbccddeeff]`.
    pub hash_key: [u64; 2],
    /// `steer_port` (default 6080): UDP port of the steering encapsulation. Not 0, and not a
    /// port of any service.
    pub steer_port: u16,
    /// `table_size` (default 65537): buckets in the steering table. A prime larger than the
    /// number of members, at most 1000003.
    pub table_size: u32,
    /// `hop_budget` (default 3): how many times a packet may be passed on from member to
    /// member; 1 to 8.
    pub hop_budget: u8,
    /// `history_sync_ms` (default 5000; 0 = never): how often this node merges a healthy
    /// member's hop history (through its `sync` endpoint) into its own. Nodes that saw a
    /// membership change differently (one saw a member flap, one was starting) each know
    /// owners the other does not; merging heals that within this interval.
    pub history_sync: Option<Duration>,
    /// `[[cluster.members]]` (at least one): every member of the cluster, including ones that
    /// take no new flows.
    pub members: Vec<MemberSettings>,
}

/// `[[cluster.members]]`: one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSettings {
    /// `name` (required): unique name, no whitespace. The member's place in the steering table
    /// derives from it, so renaming a member moves its flows.
    pub name: String,
    /// `id` (required): unique, stable member id, 0 to 1023, given explicitly so that every
    /// node uses the same one. It is what the steering table stores.
    pub id: u16,
    /// `underlay` (required): the member's underlay address, unique. This node must have an
    /// underlay address of the same family; for this node's own member it must be that
    /// address.
    pub underlay: IpAddr,
    /// `weight` (default 100, 0 to 10000): relative share of new flows. 0 takes no new flows
    /// but keeps the member in the cluster.
    pub weight: u32,
    /// `[cluster.members.health]` (optional): how this node checks the member. Default: a TCP
    /// connect to the first TCP port of the first service that lists one.
    pub health: HealthCheck,
    /// `sync` (optional): address and port of the member's controller HTTP endpoint (its
    /// `[metrics] listen`). A starting controller copies the hop history of the steering
    /// tables from a healthy member through it, so that it knows every member that may hold
    /// a flow; without any, a node that starts while others run may send flows that began
    /// during its absence to the wrong member.
    pub sync: Option<SocketAddr>,
}

/// `[cluster.members.health]`: the health check of one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `kind` (default `"tcp"`), with `path` and `host` for `"http"`: see [`HealthProbe`].
    pub probe: HealthProbe,
    /// `port` (default: the first TCP port of the first service listing one): port probed at
    /// the member's underlay address; not 0.
    pub port: u16,
    /// `interval_ms` (default 1000): time between two probes.
    pub interval: Duration,
    /// `timeout_ms` (default 500): time a probe may take; more than 0 and less than
    /// `interval_ms`.
    pub timeout: Duration,
    /// `rise` (default 2, at least 1): consecutive successes that make a member healthy.
    pub rise: u32,
    /// `fall` (default 3, at least 1): consecutive failures that make a member unhealthy.
    pub fall: u32,
}

/// What a health probe does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthProbe {
    /// `kind = "tcp"`: a TCP connection that is established counts as success.
    Tcp,
    /// `kind = "http"`: a `GET` whose answer has a 2xx status counts as success.
    Http {
        /// `path` (default `"/"`): request path; starts with `/`, no whitespace or control
        /// characters.
        path: String,
        /// `host` (optional): `Host` header; default: the member's underlay address.
        host: Option<String>,
    },
}

/// `[[services]]`: one anycast service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSettings {
    /// `name` (required): unique name, used in logs and metrics.
    pub name: String,
    /// `vips` (required, at least one): anycast prefixes such as `"192.0.2.1/32"` or
    /// `"2001:db8::/64"`, host bits zero. No prefix may overlap another one, in this service
    /// or any other; at most 64 prefixes per address family over all services.
    pub vips: Vec<Prefix>,
    /// `tcp_ports` (default none): TCP ports served, at most 8, no duplicates, not 0.
    /// `tcp_ports` and `udp_ports` must not both be empty.
    pub tcp_ports: Vec<u16>,
    /// `udp_ports` (default none): UDP ports served; same rules as `tcp_ports`.
    pub udp_ports: Vec<u16>,
}

/// `[bgp]`: route announcement through BIRD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpSettings {
    /// `enabled` (default `true`): whether the controller drives BIRD at all.
    pub enabled: bool,
    /// `bird_socket` (default `"/run/bird/bird.ctl"`): absolute path of BIRD's control socket.
    pub bird_socket: PathBuf,
    /// `protocols` (required, at least one; `protocol = "name"` is accepted for a single one):
    /// names of the BIRD static protocols that hold the VIP routes (one per address family: a
    /// BIRD static protocol carries one). The controller enables them while this node is ready
    /// and healthy and disables them otherwise.
    pub protocols: Vec<String>,
    /// `poll_interval_ms` (default 1000, more than 0): how often the protocol's state is
    /// checked and corrected.
    pub poll_interval: Duration,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSettings {
    /// `listen` (default `"127.0.0.1:9465"`): address and port of the HTTP metrics endpoint.
    pub listen: SocketAddr,
}

impl Config {
    /// This node's own member entry; `None` for a steering-only node.
    pub fn self_member(&self) -> Option<&MemberSettings> {
        if self.node.steer_only {
            return None;
        }
        self.cluster
            .members
            .iter()
            .find(|m| m.name == self.node.name)
    }

    /// The member with id `id`, if configured.
    pub fn member(&self, id: u16) -> Option<&MemberSettings> {
        self.cluster.members.iter().find(|m| m.id == id)
    }

    /// Whether an id belongs to a configured member, as a lookup in a bitmap over the id space:
    /// cheap enough to call for every hop of every bucket (see [`crate::cluster::history::advance`]),
    /// where searching the member list each time would not be.
    pub fn known_ids(&self) -> impl Fn(u16) -> bool + use<> {
        let mut known = vec![false; MAX_MEMBERS as usize];
        for m in &self.cluster.members {
            if let Some(k) = known.get_mut(usize::from(m.id)) {
                *k = true;
            }
        }
        move |id| known.get(usize::from(id)).copied().unwrap_or(false)
    }
}

// ---------------------------------------------------------------------------------------------
// Prefixes
// ---------------------------------------------------------------------------------------------

/// An IP prefix with all host bits zero, such as `192.0.2.0/24` or `2001:db8::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why a string is not a [`Prefix`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PrefixError {
    #[error("{0:?} has no prefix length (write it as address/length, e.g. 192.0.2.1/32)")]
    MissingLength(String),
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
    #[error("{0:?} is not a prefix length")]
    BadLength(String),
    #[error("prefix length {len} is longer than {max} for {addr}")]
    TooLong { addr: IpAddr, len: u8, max: u8 },
    #[error("{addr}/{len} has host bits set (did you mean {network}?)")]
    HostBitsSet {
        addr: IpAddr,
        len: u8,
        network: Prefix,
    },
}

impl Prefix {
    /// A prefix of `len` bits at `addr`; `addr` must have no bit set beyond the first `len`.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let max = max_len(addr);
        if len > max {
            return Err(PrefixError::TooLong { addr, len, max });
        }
        let network = Prefix {
            addr: mask(addr, len),
            len,
        };
        if network.addr != addr {
            return Err(PrefixError::HostBitsSet { addr, len, network });
        }
        Ok(network)
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` lies in this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// Whether some address lies in both prefixes (one of them then contains the other).
    pub fn overlaps(&self, other: &Prefix) -> bool {
        let (wide, narrow) = if self.len <= other.len {
            (self, other)
        } else {
            (other, self)
        };
        wide.contains(narrow.addr)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with every bit after the first `len` cleared; `len` at most the family's width.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a)
                .checked_shr(32 - u32::from(len))
                .unwrap_or(0)
                .checked_shl(32 - u32::from(len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a)
                .checked_shr(128 - u32::from(len))
                .unwrap_or(0)
                .checked_shl(128 - u32::from(len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| PrefixError::MissingLength(s.to_owned()))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| PrefixError::BadAddress(addr.to_owned()))?;
        // u8::from_str accepts a leading '+'; a prefix length is plain digits.
        let len: u8 = len
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| len.parse().ok())
            .flatten()
            .ok_or_else(|| PrefixError::BadLength(len.to_owned()))?;
        Prefix::new(addr, len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One rule a configuration breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending field, e.g. `cluster.members[2].underlay`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Why a configuration could not be loaded. The underlying error's text is part of each
/// message, so printing the error alone tells everything.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The text is not TOML, or does not have the configuration's shape (unknown key, wrong
    /// type, missing required key). The message gives line and column.
    #[error("{}{error}", origin(path.as_deref()))]
    Parse {
        path: Option<PathBuf>,
        // Boxed: the TOML error is large and would bloat every `Result` carrying this type.
        error: Box<toml::de::Error>,
    },
    /// The configuration breaks one or more rules; every problem found is listed.
    #[error("{}", invalid_message(path.as_deref(), problems))]
    Invalid {
        path: Option<PathBuf>,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The rules broken, for an [`ConfigError::Invalid`] configuration; empty otherwise.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

fn origin(path: Option<&Path>) -> String {
    path.map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

fn invalid_message(path: Option<&Path>, problems: &[Problem]) -> String {
    let plural = if problems.len() == 1 { "" } else { "s" };
    let mut message = format!(
        "{}invalid configuration, {} problem{plural}:",
        origin(path),
        problems.len()
    );
    for problem in problems {
        message.push_str("\n  ");
        message.push_str(&problem.to_string());
    }
    message
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Reads and checks the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_from(&text, Some(path))
}

/// Parses and checks a configuration given as text.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_from(text, None)
}

fn parse_from(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
    let file: raw::File = toml::from_str(text).map_err(|error| ConfigError::Parse {
        path: path.map(Path::to_owned),
        error: Box::new(error),
    })?;
    let mut checker = Checker::default();
    let config = checker.config(file);
    if checker.problems.is_empty() {
        return Ok(config);
    }
    // Checks run in dependency order (services before the cluster that refers to them); report
    // in the order of the file instead, keeping the order within each section.
    let mut problems = checker.problems;
    problems.sort_by_key(|p| section_rank(&p.field));
    Err(ConfigError::Invalid {
        path: path.map(Path::to_owned),
        problems,
    })
}

fn section_rank(field: &str) -> usize {
    const SECTIONS: [&str; 5] = ["node", "cluster", "services", "bgp", "metrics"];
    let section = field.split(['.', '[']).next().unwrap_or(field);
    SECTIONS
        .iter()
        .position(|s| *s == section)
        .unwrap_or(SECTIONS.len())
}

/// The file as written: every field optional that has a default, strings where the text still
/// has to be checked, so that each problem can be reported with its field path.
mod raw {
    use std::path::PathBuf;

    use serde::Deserialize;

    use super::XdpMode;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub node: Node,
        pub cluster: Cluster,
        #[serde(default)]
        pub services: Vec<Service>,
        pub bgp: Option<Bgp>,
        #[serde(default)]
        pub metrics: Metrics,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Node {
        pub name: String,
        #[serde(default)]
        pub interfaces: Vec<String>,
        pub underlay_v4: Option<String>,
        pub underlay_v6: Option<String>,
        #[serde(default)]
        pub xdp_mode: XdpMode,
        #[serde(default)]
        pub steer_only: bool,
        #[serde(default)]
        pub max_frame: u32,
        pub bpffs: Option<PathBuf>,
        pub control_socket: Option<PathBuf>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Cluster {
        pub hash_key: String,
        pub steer_port: Option<u16>,
        pub table_size: Option<u32>,
        pub hop_budget: Option<u8>,
        pub history_sync_ms: Option<u32>,
        #[serde(default)]
        pub members: Vec<Member>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Member {
        pub name: String,
        pub id: u16,
        pub underlay: String,
        pub weight: Option<u32>,
        pub health: Option<Health>,
        pub sync: Option<String>,
    }

    #[derive(Clone, Copy, Default, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum HealthKind {
        #[default]
        Tcp,
        Http,
    }

    #[derive(Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Health {
        #[serde(default)]
        pub kind: HealthKind,
        pub port: Option<u16>,
        pub path: Option<String>,
        pub host: Option<String>,
        pub interval_ms: Option<u32>,
        pub timeout_ms: Option<u32>,
        pub rise: Option<u32>,
        pub fall: Option<u32>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Service {
        pub name: String,
        #[serde(default)]
        pub vips: Vec<String>,
        #[serde(default)]
        pub tcp_ports: Vec<u16>,
        #[serde(default)]
        pub udp_ports: Vec<u16>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Bgp {
        pub enabled: Option<bool>,
        pub bird_socket: Option<PathBuf>,
        pub protocol: Option<String>,
        pub protocols: Option<Vec<String>>,
        pub poll_interval_ms: Option<u32>,
    }

    #[derive(Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Metrics {
        pub listen: Option<String>,
    }
}

/// Collects problems while turning the raw file into a [`Config`]. Fields that fail get a
/// placeholder value so the other checks can go on; the result is discarded whenever a
/// problem was recorded, so placeholders never escape.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

/// Underlay address families the node declared.
#[derive(Clone, Copy)]
struct Families {
    v4: bool,
    v6: bool,
}

/// A VIP prefix and where it was written, for overlap messages.
struct VipAt {
    prefix: Prefix,
    field: String,
}

impl Checker {
    fn problem(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn config(&mut self, file: raw::File) -> Config {
        // Which families the node declared, even if the address itself is invalid: that is
        // reported at node.underlay_*, and repeating it for every member would only be noise.
        let families = Families {
            v4: file.node.underlay_v4.is_some(),
            v6: file.node.underlay_v6.is_some(),
        };
        let node = self.node(file.node);
        let (services, vips) = self.services(file.services);
        let cluster = self.cluster(file.cluster, &node, families, &services, &vips);
        for (field, addr) in [
            ("node.underlay_v4", node.underlay_v4.map(IpAddr::V4)),
            ("node.underlay_v6", node.underlay_v6.map(IpAddr::V6)),
        ] {
            if let Some(addr) = addr {
                self.not_in_vips(field, addr, &vips);
            }
        }
        let bgp = file.bgp.map(|bgp| self.bgp(bgp));
        let metrics = self.metrics(file.metrics);
        Config {
            node,
            cluster,
            services,
            bgp,
            metrics,
        }
    }

    fn node(&mut self, raw: raw::Node) -> NodeSettings {
        if raw.name.is_empty() {
            self.problem("node.name", "must not be empty");
        }
        if raw.interfaces.is_empty() {
            self.problem("node.interfaces", "at least one interface is required");
        }
        for (i, name) in raw.interfaces.iter().enumerate() {
            let field = format!("node.interfaces[{i}]");
            if let Some(reason) = interface_name_problem(name) {
                self.problem(field, reason);
            } else if let Some(j) = raw.interfaces[..i].iter().position(|n| n == name) {
                self.problem(field, format!("duplicate interface {name:?} (also [{j}])"));
            }
        }
        let underlay_v4 = raw.underlay_v4.as_deref().and_then(|text| {
            let addr = self.parse_addr::<Ipv4Addr>("node.underlay_v4", text, "an IPv4 address")?;
            self.unicast("node.underlay_v4", IpAddr::V4(addr))
                .then_some(addr)
        });
        let underlay_v6 = raw.underlay_v6.as_deref().and_then(|text| {
            let addr = self.parse_addr::<Ipv6Addr>("node.underlay_v6", text, "an IPv6 address")?;
            self.unicast("node.underlay_v6", IpAddr::V6(addr))
                .then_some(addr)
        });
        if raw.underlay_v4.is_none() && raw.underlay_v6.is_none() {
            self.problem(
                "node.underlay_v4",
                "neither node.underlay_v4 nor node.underlay_v6 is set; at least one is required",
            );
        }
        let bpffs = self.absolute("node.bpffs", raw.bpffs, DEFAULT_BPFFS);
        let control_socket = self.absolute(
            "node.control_socket",
            raw.control_socket,
            DEFAULT_CONTROL_SOCKET,
        );
        NodeSettings {
            name: raw.name,
            interfaces: raw.interfaces,
            underlay_v4,
            underlay_v6,
            xdp_mode: raw.xdp_mode,
            steer_only: raw.steer_only,
            max_frame: raw.max_frame,
            bpffs,
            control_socket,
        }
    }

    fn cluster(
        &mut self,
        raw: raw::Cluster,
        node: &NodeSettings,
        families: Families,
        services: &[ServiceSettings],
        vips: &[VipAt],
    ) -> ClusterSettings {
        let hash_key = parse_hash_key(&raw.hash_key).unwrap_or_else(|reason| {
            self.problem("cluster.hash_key", reason);
            [0; 2]
        });

        let steer_port = raw.steer_port.unwrap_or(DEFAULT_STEER_PORT);
        if steer_port == 0 {
            self.problem("cluster.steer_port", "must not be 0");
        }
        for (s, service) in services.iter().enumerate() {
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

        let table_size = raw.table_size.unwrap_or(DEFAULT_TABLE_SIZE);
        if !is_prime(table_size) {
            self.problem("cluster.table_size", format!("{table_size} is not prime"));
        }
        if table_size as usize <= raw.members.len() {
            self.problem(
                "cluster.table_size",
                format!(
                    "{table_size} must be larger than the number of members ({})",
                    raw.members.len()
                ),
            );
        }
        if table_size > MAX_CLUSTER_TABLE_SIZE {
            self.problem(
                "cluster.table_size",
                format!("{table_size} is larger than the maximum {MAX_CLUSTER_TABLE_SIZE}"),
            );
        }

        let hop_budget = raw.hop_budget.unwrap_or(DEFAULT_HOP_BUDGET);
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

        let history_sync = match raw.history_sync_ms.unwrap_or(DEFAULT_HISTORY_SYNC_MS) {
            0 => None,
            ms => Some(Duration::from_millis(ms.into())),
        };
        let members = self.members(raw.members, node, families, services, vips);
        ClusterSettings {
            hash_key,
            steer_port,
            table_size,
            hop_budget,
            history_sync,
            members,
        }
    }

    fn members(
        &mut self,
        raw: Vec<raw::Member>,
        node: &NodeSettings,
        families: Families,
        services: &[ServiceSettings],
        vips: &[VipAt],
    ) -> Vec<MemberSettings> {
        if raw.is_empty() {
            self.problem("cluster.members", "at least one member is required");
        }
        // The first TCP port of the first service listing one: the default health check port.
        // (Port 0 is reported at the service; defaulting to it would only repeat that.)
        let default_port = services
            .iter()
            .find_map(|s| s.tcp_ports.iter().copied().find(|&p| p != 0));

        let mut members: Vec<MemberSettings> = Vec::with_capacity(raw.len());
        // Parsed underlays, None where parsing failed, to find duplicates.
        let mut underlays: Vec<Option<IpAddr>> = Vec::with_capacity(raw.len());
        for (i, m) in raw.into_iter().enumerate() {
            let at = format!("cluster.members[{i}]");
            if let Some(reason) = member_name_problem(&m.name) {
                self.problem(format!("{at}.name"), reason);
            } else if let Some(j) = members.iter().position(|o| o.name == m.name) {
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
            } else if let Some(j) = members.iter().position(|o| o.id == m.id) {
                self.problem(
                    format!("{at}.id"),
                    format!("duplicate id {} (also members[{j}])", m.id),
                );
            }

            let field = format!("{at}.underlay");
            let underlay = self
                .parse_addr::<IpAddr>(&field, &m.underlay, "an IP address")
                .filter(|&addr| self.unicast(&field, addr));
            if let Some(addr) = underlay {
                if let Some(j) = underlays.iter().position(|o| *o == Some(addr)) {
                    self.problem(
                        &field,
                        format!("duplicate address {addr} (also members[{j}])"),
                    );
                }
                match addr {
                    IpAddr::V4(_) if !families.v4 => self.problem(
                        &field,
                        format!(
                            "{addr} is IPv4 but node.underlay_v4 is not set, so this node cannot \
                             reach the member"
                        ),
                    ),
                    IpAddr::V6(_) if !families.v6 => self.problem(
                        &field,
                        format!(
                            "{addr} is IPv6 but node.underlay_v6 is not set, so this node cannot \
                             reach the member"
                        ),
                    ),
                    _ => {}
                }
                self.not_in_vips(&field, addr, vips);
                if m.name == node.name {
                    self.own_underlay(&field, addr, node);
                }
            }
            underlays.push(underlay);

            let weight = m.weight.unwrap_or(DEFAULT_WEIGHT);
            if weight > MAX_WEIGHT {
                self.problem(
                    format!("{at}.weight"),
                    format!("{weight} is above the maximum {MAX_WEIGHT}"),
                );
            }
            let health = self.health(&at, m.health, default_port);
            let sync = m.sync.as_deref().and_then(|text| {
                self.parse_addr::<SocketAddr>(&format!("{at}.sync"), text, "an address and port")
            });
            members.push(MemberSettings {
                name: m.name,
                id: m.id,
                underlay: underlay.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                weight,
                health,
                sync,
            });
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
        members
    }

    /// This node's own member address must be one of the node's underlay addresses: it is the
    /// address steering packets to this member arrive at.
    fn own_underlay(&mut self, field: &str, addr: IpAddr, node: &NodeSettings) {
        let matches = match addr {
            IpAddr::V4(a) => node.underlay_v4 == Some(a),
            IpAddr::V6(a) => node.underlay_v6 == Some(a),
        };
        if !matches {
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

    fn health(
        &mut self,
        member: &str,
        raw: Option<raw::Health>,
        default_port: Option<u16>,
    ) -> HealthCheck {
        let at = format!("{member}.health");
        let raw = raw.unwrap_or_default();
        let port = match raw.port.or(default_port) {
            Some(0) => {
                self.problem(format!("{at}.port"), "must not be 0");
                0
            }
            Some(port) => port,
            None => {
                self.problem(
                    format!("{at}.port"),
                    "not set, and no service lists a TCP port to check by default",
                );
                0
            }
        };
        let probe = match raw.kind {
            raw::HealthKind::Tcp => {
                for (key, value) in [("path", &raw.path), ("host", &raw.host)] {
                    if value.is_some() {
                        self.problem(format!("{at}.{key}"), "only valid with kind = \"http\"");
                    }
                }
                HealthProbe::Tcp
            }
            raw::HealthKind::Http => {
                let path = raw.path.unwrap_or_else(|| "/".to_owned());
                if !path.starts_with('/') || has_space_or_control(&path) {
                    self.problem(
                        format!("{at}.path"),
                        format!(
                            "{path:?} must start with '/' and contain no whitespace or control \
                             characters"
                        ),
                    );
                }
                if let Some(host) = &raw.host
                    && (host.is_empty() || has_space_or_control(host))
                {
                    self.problem(
                        format!("{at}.host"),
                        format!(
                            "{host:?} must be non-empty, without whitespace or control characters"
                        ),
                    );
                }
                HealthProbe::Http {
                    path,
                    host: raw.host,
                }
            }
        };
        let interval_ms = raw.interval_ms.unwrap_or(DEFAULT_INTERVAL_MS);
        let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
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
        let rise = raw.rise.unwrap_or(DEFAULT_RISE);
        let fall = raw.fall.unwrap_or(DEFAULT_FALL);
        for (key, value) in [("rise", rise), ("fall", fall)] {
            if value == 0 {
                self.problem(format!("{at}.{key}"), "must be at least 1");
            }
        }
        HealthCheck {
            probe,
            port,
            interval: Duration::from_millis(interval_ms.into()),
            timeout: Duration::from_millis(timeout_ms.into()),
            rise,
            fall,
        }
    }

    fn services(&mut self, raw: Vec<raw::Service>) -> (Vec<ServiceSettings>, Vec<VipAt>) {
        if raw.is_empty() {
            self.problem("services", "at least one [[services]] entry is required");
        }
        let mut services: Vec<ServiceSettings> = Vec::with_capacity(raw.len());
        let mut all_vips: Vec<VipAt> = Vec::new();
        for (s, service) in raw.into_iter().enumerate() {
            let at = format!("services[{s}]");
            if service.name.is_empty() {
                self.problem(format!("{at}.name"), "must not be empty");
            } else if let Some(j) = services.iter().position(|o| o.name == service.name) {
                self.problem(
                    format!("{at}.name"),
                    format!("duplicate name {:?} (also services[{j}])", service.name),
                );
            }
            if service.vips.is_empty() {
                self.problem(format!("{at}.vips"), "at least one VIP prefix is required");
            }
            let mut vips = Vec::with_capacity(service.vips.len());
            for (v, text) in service.vips.iter().enumerate() {
                let field = format!("{at}.vips[{v}]");
                let prefix = match text.parse::<Prefix>() {
                    Ok(prefix) => prefix,
                    Err(e) => {
                        self.problem(field, e.to_string());
                        continue;
                    }
                };
                if let Some(other) = all_vips.iter().find(|o| o.prefix.overlaps(&prefix)) {
                    let reason = if other.prefix == prefix {
                        format!("duplicate prefix {prefix} (also {})", other.field)
                    } else {
                        format!("{prefix} overlaps {} ({})", other.prefix, other.field)
                    };
                    self.problem(&field, reason);
                }
                vips.push(prefix);
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
            services.push(ServiceSettings {
                name: service.name,
                vips,
                tcp_ports: service.tcp_ports,
                udp_ports: service.udp_ports,
            });
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
        (services, all_vips)
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

    fn bgp(&mut self, raw: raw::Bgp) -> BgpSettings {
        let bird_socket = self.absolute("bgp.bird_socket", raw.bird_socket, DEFAULT_BIRD_SOCKET);
        let (field, protocols) = match (raw.protocol, raw.protocols) {
            (Some(_), Some(_)) => {
                self.problem(
                    "bgp.protocol",
                    "give either protocol or protocols, not both",
                );
                ("bgp.protocols", Vec::new())
            }
            (Some(one), None) => ("bgp.protocol", vec![one]),
            (None, Some(list)) => ("bgp.protocols", list),
            (None, None) => ("bgp.protocol", vec![String::new()]),
        };
        if protocols.is_empty() {
            self.problem(field, "at least one BIRD protocol is required");
        }
        for (i, protocol) in protocols.iter().enumerate() {
            let at = if field == "bgp.protocol" {
                field.to_string()
            } else {
                format!("{field}[{i}]")
            };
            if !is_bird_symbol(protocol) {
                self.problem(
                    at,
                    format!(
                        "{protocol:?} is not a BIRD protocol name (a letter or '_', then \
                         letters, digits or '_')"
                    ),
                );
            } else if protocols[..i].contains(protocol) {
                self.problem(at, format!("{protocol:?} is listed twice"));
            }
        }
        let poll_interval_ms = raw.poll_interval_ms.unwrap_or(DEFAULT_POLL_INTERVAL_MS);
        if poll_interval_ms == 0 {
            self.problem("bgp.poll_interval_ms", "must be more than 0");
        }
        BgpSettings {
            enabled: raw.enabled.unwrap_or(true),
            bird_socket,
            protocols,
            poll_interval: Duration::from_millis(poll_interval_ms.into()),
        }
    }

    fn metrics(&mut self, raw: raw::Metrics) -> MetricsSettings {
        let text = raw.listen.as_deref().unwrap_or(DEFAULT_METRICS_LISTEN);
        let listen = self
            .parse_addr::<SocketAddr>("metrics.listen", text, "an address:port")
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        MetricsSettings { listen }
    }

    fn parse_addr<T: FromStr>(&mut self, field: &str, text: &str, what: &str) -> Option<T> {
        let parsed = text.parse().ok();
        if parsed.is_none() {
            self.problem(field, format!("{text:?} is not {what}"));
        }
        parsed
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

    fn absolute(&mut self, field: &str, path: Option<PathBuf>, default: &str) -> PathBuf {
        let path = path.unwrap_or_else(|| PathBuf::from(default));
        if !path.is_absolute() {
            self.problem(
                field,
                format!("{} must be an absolute path", path.display()),
            );
        }
        path
    }
}

/// `[u64; 2]` from exactly 32 hex digits; see [`ClusterSettings::hash_key`].
fn parse_hash_key(text: &str) -> Result<[u64; 2], String> {
    // Checked digit by digit: u64::from_str_radix would also take a sign.
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "must be exactly 32 hex digits (128 bits), got {} characters{}",
            text.chars().count(),
            if text.chars().all(|c| c.is_ascii_hexdigit()) {
                ""
            } else {
                " with non-hex characters"
            }
        ));
    }
    let word = |digits: &str| u64::from_str_radix(digits, 16).map_err(|e| e.to_string());
    Ok([word(&text[..16])?, word(&text[16..])?])
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The example with the first occurrence of each `from` replaced by its `to`.
    fn example_with(edits: &[(&str, &str)]) -> String {
        let mut text = EXAMPLE.to_owned();
        for (from, to) in edits {
            assert!(text.contains(from), "example has no {from:?}");
            text = text.replacen(from, to, 1);
        }
        text
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(other) => panic!("expected rule violations, got: {other}"),
            Ok(_) => panic!("configuration unexpectedly valid"),
        }
    }

    /// Asserts that the configuration is rejected with a problem at `field` whose reason
    /// mentions `reason`, and that the error message shows it.
    #[track_caller]
    fn assert_problem(text: &str, field: &str, reason: &str) {
        let found = problems(text);
        assert!(
            found
                .iter()
                .any(|p| p.field == field && p.reason.contains(reason)),
            "no problem at {field} mentioning {reason:?} in {found:#?}"
        );
        let message = parse(text).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains(&format!("\n  {field}: ")), "{message}");
    }

    #[test]
    fn example_parses() {
        let config = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.node.name, "node-a");
        assert_eq!(config.node.interfaces, ["eth0"]);
        assert_eq!(config.node.underlay_v4, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(config.node.underlay_v6, None);
        assert_eq!(config.node.xdp_mode, XdpMode::Native);
        assert_eq!(config.node.max_frame, 1514);
        assert_eq!(
            config.cluster.hash_key,
            [0x0011_2233_4455_6677, 0x8899_aabb_ccdd_eeff]
        );
        assert_eq!(config.cluster.members.len(), 3);
        let a = &config.cluster.members[0];
        assert_eq!(
            a.health,
            HealthCheck {
                probe: HealthProbe::Tcp,
                port: 80,
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 3,
            }
        );
        let b = &config.cluster.members[1];
        assert_eq!(
            b.health.probe,
            HealthProbe::Http {
                path: "/healthz".into(),
                host: Some("www.example.org".into())
            }
        );
        assert_eq!(config.cluster.members[2].weight, 50);
        assert_eq!(
            config.services[0].vips,
            [
                "192.0.2.1/32".parse::<Prefix>().expect("valid prefix"),
                "2001:db8::1/128".parse().expect("valid prefix"),
            ]
        );
        let bgp = config.bgp.as_ref().expect("example has [bgp]");
        assert_eq!(bgp.protocols, ["anycast_vips", "anycast_vips6"]);
        assert_eq!(
            config.metrics.listen,
            "10.0.0.1:9465".parse().expect("valid")
        );
        assert_eq!(config.self_member().map(|m| m.id), Some(0));
        assert_eq!(config.member(2).map(|m| m.name.as_str()), Some("node-c"));
        let known = config.known_ids();
        assert!(known(0) && known(1) && known(2));
        assert!(!known(3) && !known(1023) && !known(cdn_common::maps::NO_MEMBER));
    }

    #[test]
    fn defaults_apply() {
        let config = parse(
            r#"
            [node]
            name = "n1"
            interfaces = ["eth1"]
            underlay_v6 = "fd00::1"
            [cluster]
            hash_key = "ffffffffffffffff0000000000000001"
            [[cluster.members]]
            name = "n1"
            id = 7
            underlay = "fd00::1"
            [[services]]
            name = "dns"
            vips = ["2001:db8:53::/48"]
            udp_ports = [53]
            tcp_ports = [53]
            "#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.node.xdp_mode, XdpMode::Native);
        assert!(!config.node.steer_only);
        assert_eq!(config.node.max_frame, 0);
        assert_eq!(config.node.bpffs, Path::new("/sys/fs/bpf/cdn-steer"));
        assert_eq!(config.node.control_socket, Path::new("/run/cdn-steer.sock"));
        assert_eq!(config.cluster.hash_key, [u64::MAX, 1]);
        assert_eq!(config.cluster.steer_port, DEFAULT_STEER_PORT);
        assert_eq!(config.cluster.table_size, DEFAULT_TABLE_SIZE);
        assert_eq!(config.cluster.hop_budget, 3);
        assert_eq!(config.cluster.members[0].weight, 100);
        assert_eq!(config.cluster.members[0].health.port, 53);
        assert_eq!(config.bgp, None);
        assert_eq!(
            config.metrics.listen,
            SocketAddr::from(([127, 0, 0, 1], 9465))
        );
    }

    #[test]
    fn steer_only_node_needs_no_member_entry() {
        let text = example_with(&[
            ("name = \"node-a\"", "name = \"edge-1\"\nsteer_only = true"),
            ("steer_only = false\n", ""),
            ("underlay_v4 = \"10.0.0.1\"", "underlay_v4 = \"10.0.0.9\""),
        ]);
        let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.self_member().is_none());
    }

    #[test]
    fn bgp_defaults() {
        let text = example_with(&[
            ("enabled = true\n", ""),
            ("bird_socket = \"/run/bird/bird.ctl\"\n", ""),
            ("poll_interval_ms = 1000\n", ""),
        ]);
        let bgp = parse(&text)
            .unwrap_or_else(|e| panic!("{e}"))
            .bgp
            .expect("[bgp] present");
        assert!(bgp.enabled);
        assert_eq!(bgp.bird_socket, Path::new("/run/bird/bird.ctl"));
        assert_eq!(bgp.poll_interval, Duration::from_secs(1));
    }

    #[test]
    fn unknown_keys_are_errors_with_line_and_column() {
        let text = example_with(&[("hop_budget = 3", "hop_budgte = 3")]);
        let err = parse(&text).expect_err("typo must be rejected");
        assert!(matches!(err, ConfigError::Parse { .. }));
        let message = err.to_string();
        let line = 1 + text
            .lines()
            .position(|l| l.starts_with("hop_budgte"))
            .unwrap_or(0);
        assert!(
            message.contains(&format!("line {line}, column 1")),
            "{message}"
        );
        assert!(message.contains("column"), "{message}");
        assert!(message.contains("hop_budgte"), "{message}");

        // Every table denies unknown keys, including nested ones.
        let text = example_with(&[("rise = 2", "raise = 2")]);
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
        assert!(matches!(
            parse(&format!("{EXAMPLE}\n[extra]\nx = 1\n")),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn syntax_and_type_errors_give_line_and_column() {
        let err = parse("[node]\nname = \"a\"\ninterfaces = [\"eth0\"\n").expect_err("bad TOML");
        assert!(err.to_string().contains("line 3"), "{err}");
        let text = example_with(&[("id = 1\n", "id = \"one\"\n")]);
        let err = parse(&text).expect_err("string id");
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().contains("line "), "{err}");
        let text = example_with(&[("xdp_mode = \"native\"", "xdp_mode = \"offload\"")]);
        let err = parse(&text).expect_err("unknown mode");
        assert!(err.to_string().contains("generic"), "{err}");
    }

    #[test]
    fn all_problems_are_reported_together() {
        let text = example_with(&[
            ("id = 1\n", "id = 0\n"),
            (
                "hash_key = \"00112233445566778899aabbccddeeff\"",
                "hash_key = \"abc\"",
            ),
            ("tcp_ports = [80, 443]", "tcp_ports = [80, 0]"),
            ("timeout_ms = 500", "timeout_ms = 1000"),
        ]);
        let found = problems(&text);
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "cluster.hash_key",
                "cluster.members[1].id",
                "cluster.members[1].health.timeout_ms",
                "services[0].tcp_ports[1]",
            ]
        );
        let message = parse(&text).expect_err("invalid").to_string();
        assert_eq!(message.lines().count(), 1 + found.len(), "{message}");
        assert!(
            message.starts_with("invalid configuration, 4 problems:"),
            "{message}"
        );
        assert!(message.contains("\n  cluster.members[1].id: duplicate id 0 (also members[0])"));
    }

    #[test]
    fn member_names_ids_and_addresses_are_unique() {
        assert_problem(
            &example_with(&[("name = \"node-b\"", "name = \"node-a\"")]),
            "cluster.members[1].name",
            "duplicate name \"node-a\" (also members[0])",
        );
        assert_problem(
            &example_with(&[("id = 2", "id = 1")]),
            "cluster.members[2].id",
            "duplicate id 1 (also members[1])",
        );
        assert_problem(
            &example_with(&[("underlay = \"10.0.0.3\"", "underlay = \"10.0.0.1\"")]),
            "cluster.members[2].underlay",
            "duplicate address 10.0.0.1 (also members[0])",
        );
    }

    #[test]
    fn member_fields_are_checked() {
        assert_problem(
            &example_with(&[("id = 2", "id = 1024")]),
            "cluster.members[2].id",
            "out of range",
        );
        assert_problem(
            &example_with(&[("name = \"node-c\"", "name = \"node c\"")]),
            "cluster.members[2].name",
            "whitespace",
        );
        assert_problem(
            &example_with(&[("weight = 50", "weight = 10001")]),
            "cluster.members[2].weight",
            "above the maximum 10000",
        );
        assert_problem(
            &example_with(&[("underlay = \"10.0.0.3\"", "underlay = \"10.0.0.300\"")]),
            "cluster.members[2].underlay",
            "not an IP address",
        );
        assert_problem(
            &example_with(&[("underlay = \"10.0.0.3\"", "underlay = \"224.0.0.1\"")]),
            "cluster.members[2].underlay",
            "not a unicast address",
        );
        let start = EXAMPLE.find("\n[[cluster.members]]").expect("members");
        let end = EXAMPLE.find("\n[[services]]").expect("services");
        let text = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]).replacen(
            "steer_only = false",
            "steer_only = true",
            1,
        );
        assert_eq!(problems(&text).len(), 1, "{:#?}", problems(&text));
        assert_problem(&text, "cluster.members", "at least one member");
    }

    #[test]
    fn node_must_be_a_member_unless_steer_only() {
        assert_problem(
            &example_with(&[("name = \"node-a\"", "name = \"node-x\"")]),
            "node.name",
            "not the name of any cluster member",
        );
        assert_problem(
            &example_with(&[("steer_only = false", "steer_only = true")]),
            "node.steer_only",
            "must not be a member",
        );
    }

    #[test]
    fn own_member_address_must_be_a_node_underlay() {
        assert_problem(
            &example_with(&[("underlay = \"10.0.0.1\"", "underlay = \"10.0.0.11\"")]),
            "cluster.members[0].underlay",
            "neither node.underlay_v4 (10.0.0.1) nor node.underlay_v6 (unset)",
        );
    }

    #[test]
    fn member_families_need_a_node_underlay() {
        assert_problem(
            &example_with(&[("underlay = \"10.0.0.3\"", "underlay = \"fd00::3\"")]),
            "cluster.members[2].underlay",
            "IPv6 but node.underlay_v6 is not set",
        );
        // With an IPv6 underlay on the node as well, the mixed cluster is fine.
        let text = example_with(&[
            ("underlay = \"10.0.0.3\"", "underlay = \"fd00::3\""),
            ("# underlay_v6 = \"fd00::1\"", "underlay_v6 = \"fd00::1\""),
        ]);
        parse(&text).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn node_underlays_are_checked() {
        assert_problem(
            &example_with(&[("underlay_v4 = \"10.0.0.1\"", "")]),
            "node.underlay_v4",
            "at least one is required",
        );
        assert_problem(
            &example_with(&[("underlay_v4 = \"10.0.0.1\"", "underlay_v4 = \"fd00::1\"")]),
            "node.underlay_v4",
            "is not an IPv4 address",
        );
        assert_problem(
            &example_with(&[("# underlay_v6 = \"fd00::1\"", "underlay_v6 = \"::\"")]),
            "node.underlay_v6",
            "not a unicast address",
        );
        // An invalid node address is reported once, not again for every member.
        let found = problems(&example_with(&[(
            "underlay_v4 = \"10.0.0.1\"",
            "underlay_v4 = \"ten\"",
        )]));
        assert_eq!(
            found
                .iter()
                .filter(|p| p.field.starts_with("cluster"))
                .count(),
            1,
            "{found:#?}"
        );
    }

    #[test]
    fn interfaces_are_checked() {
        assert_problem(
            &example_with(&[("interfaces = [\"eth0\"]", "interfaces = []")]),
            "node.interfaces",
            "at least one interface",
        );
        let text = example_with(&[(
            "interfaces = [\"eth0\"]",
            "interfaces = [\"eth0\", \"\", \"a-very-long-name0\", \"eth0\", \"a/b\"]",
        )]);
        assert_problem(&text, "node.interfaces[1]", "must not be empty");
        assert_problem(&text, "node.interfaces[2]", "at most 15");
        assert_problem(
            &text,
            "node.interfaces[3]",
            "duplicate interface \"eth0\" (also [0])",
        );
        assert_problem(&text, "node.interfaces[4]", "not a valid interface name");
        // Exactly 15 characters is fine.
        let text = example_with(&[(
            "interfaces = [\"eth0\"]",
            "interfaces = [\"abcdefghijklmno\"]",
        )]);
        parse(&text).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn paths_must_be_absolute() {
        assert_problem(
            &example_with(&[("bpffs = \"/sys/fs/bpf/cdn-steer\"", "bpffs = \"bpf\"")]),
            "node.bpffs",
            "absolute",
        );
        assert_problem(
            &example_with(&[(
                "control_socket = \"/run/cdn-steer.sock\"",
                "control_socket = \"x.sock\"",
            )]),
            "node.control_socket",
            "absolute",
        );
    }

    #[test]
    fn hash_key_is_exactly_32_hex_digits() {
        let key = "hash_key = \"00112233445566778899aabbccddeeff\"";
        for bad in [
            "hash_key = \"00112233445566778899aabbccddeef\"",
            "hash_key = \"00112233445566778899aabbccddeeff0\"",
            "hash_key = \"0x112233445566778899aabbccddeeff\"",
            "hash_key = \"+0112233445566778899aabbccddeeff\"",
            "hash_key = \"\"",
        ] {
            assert_problem(
                &example_with(&[(key, bad)]),
                "cluster.hash_key",
                "32 hex digits",
            );
        }
        let upper = example_with(&[(key, "hash_key = \"00112233445566778899AABBCCDDEEFF\"")]);
        let config = parse(&upper).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.cluster.hash_key[1], 0x8899_aabb_ccdd_eeff);
    }

    #[test]
    fn table_size_is_a_prime_above_the_member_count() {
        assert_problem(
            &example_with(&[("table_size = 65537", "table_size = 65536")]),
            "cluster.table_size",
            "not prime",
        );
        assert_problem(
            &example_with(&[("table_size = 65537", "table_size = 3")]),
            "cluster.table_size",
            "larger than the number of members (3)",
        );
        assert_problem(
            &example_with(&[("table_size = 65537", "table_size = 1000033")]),
            "cluster.table_size",
            "larger than the maximum",
        );
        let text = example_with(&[("table_size = 65537", "table_size = 5")]);
        assert_eq!(parse(&text).map(|c| c.cluster.table_size).ok(), Some(5));
    }

    #[test]
    fn steer_port_and_hop_budget_are_checked() {
        assert_problem(
            &example_with(&[("steer_port = 6080", "steer_port = 0")]),
            "cluster.steer_port",
            "must not be 0",
        );
        assert_problem(
            &example_with(&[("steer_port = 6080", "steer_port = 443")]),
            "cluster.steer_port",
            "443 is also services[0].tcp_ports[1]",
        );
        for budget in ["0", "9"] {
            assert_problem(
                &example_with(&[("hop_budget = 3", &format!("hop_budget = {budget}"))]),
                "cluster.hop_budget",
                "outside 1..=8",
            );
        }
    }

    #[test]
    fn health_checks_are_checked() {
        assert_problem(
            &example_with(&[("timeout_ms = 500", "timeout_ms = 1000")]),
            "cluster.members[1].health.timeout_ms",
            "less than interval_ms (1000)",
        );
        assert_problem(
            &example_with(&[("timeout_ms = 500", "timeout_ms = 0")]),
            "cluster.members[1].health.timeout_ms",
            "more than 0",
        );
        assert_problem(
            &example_with(&[("rise = 2", "rise = 0")]),
            "cluster.members[1].health.rise",
            "at least 1",
        );
        assert_problem(
            &example_with(&[("fall = 3", "fall = 0")]),
            "cluster.members[1].health.fall",
            "at least 1",
        );
        assert_problem(
            &example_with(&[("path = \"/healthz\"", "path = \"healthz\"")]),
            "cluster.members[1].health.path",
            "must start with '/'",
        );
        assert_problem(
            &example_with(&[("path = \"/healthz\"", "path = \"/a b\"")]),
            "cluster.members[1].health.path",
            "whitespace",
        );
        assert_problem(
            &example_with(&[("kind = \"http\"", "kind = \"tcp\"")]),
            "cluster.members[1].health.path",
            "only valid with kind = \"http\"",
        );
        assert_problem(
            &example_with(&[("port = 80", "port = 0")]),
            "cluster.members[1].health.port",
            "must not be 0",
        );
        // No TCP port to default to: every member without an explicit port is reported.
        let text = example_with(&[("tcp_ports = [80, 443]", "tcp_ports = []")]);
        assert_problem(
            &text,
            "cluster.members[0].health.port",
            "no service lists a TCP port",
        );
        assert_problem(
            &text,
            "cluster.members[2].health.port",
            "no service lists a TCP port",
        );
        assert!(
            !problems(&text)
                .iter()
                .any(|p| p.field.starts_with("cluster.members[1]"))
        );
    }

    #[test]
    fn services_are_checked() {
        let start = EXAMPLE.find("\n[[services]]").expect("services");
        let end = EXAMPLE.find("# Optional: announce").expect("bgp");
        let text = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]);
        assert_problem(&text, "services", "at least one");
        assert_problem(
            &example_with(&[(
                "vips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]",
                "vips = []",
            )]),
            "services[0].vips",
            "at least one VIP",
        );
        assert_problem(
            &example_with(&[("tcp_ports = [80, 443]\nudp_ports = [443]", "")]),
            "services[0]",
            "neither tcp_ports nor udp_ports",
        );
        assert_problem(
            &example_with(&[("name = \"web\"", "name = \"\"")]),
            "services[0].name",
            "must not be empty",
        );
        let second =
            "\n[[services]]\nname = \"web\"\nvips = [\"198.51.100.0/24\"]\ntcp_ports = [22]\n";
        assert_problem(
            &format!("{EXAMPLE}{second}"),
            "services[1].name",
            "duplicate name \"web\" (also services[0])",
        );
    }

    #[test]
    fn ports_are_checked() {
        let text = example_with(&[
            ("tcp_ports = [80, 443]", "tcp_ports = [80, 0, 80]"),
            (
                "udp_ports = [443]",
                "udp_ports = [1, 2, 3, 4, 5, 6, 7, 8, 9]",
            ),
        ]);
        assert_problem(&text, "services[0].tcp_ports[1]", "port 0");
        assert_problem(
            &text,
            "services[0].tcp_ports[2]",
            "duplicate port 80 (also [0])",
        );
        assert_problem(&text, "services[0].udp_ports", "9 ports; at most 8");
        let text = example_with(&[("udp_ports = [443]", "udp_ports = [1, 2, 3, 4, 5, 6, 7, 8]")]);
        parse(&text).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn vips_are_checked() {
        let vips = "vips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]";
        assert_problem(
            &example_with(&[(vips, "vips = [\"192.0.2.1/24\"]")]),
            "services[0].vips[0]",
            "host bits set (did you mean 192.0.2.0/24?)",
        );
        assert_problem(
            &example_with(&[(vips, "vips = [\"192.0.2.1\"]")]),
            "services[0].vips[0]",
            "no prefix length",
        );
        assert_problem(
            &example_with(&[(vips, "vips = [\"2001:db8::/129\"]")]),
            "services[0].vips[0]",
            "longer than 128",
        );
        assert_problem(
            &example_with(&[(vips, "vips = [\"192.0.2.0/24\", \"192.0.2.0/24\"]")]),
            "services[0].vips[1]",
            "duplicate prefix 192.0.2.0/24 (also services[0].vips[0])",
        );
        let second =
            "\n[[services]]\nname = \"dns\"\nvips = [\"192.0.2.0/30\"]\nudp_ports = [53]\n";
        assert_problem(
            &format!("{EXAMPLE}{second}"),
            "services[1].vips[0]",
            "192.0.2.0/30 overlaps 192.0.2.1/32 (services[0].vips[0])",
        );
        // Another family never overlaps.
        let second = "\n[[services]]\nname = \"dns\"\nvips = [\"::/0\"]\nudp_ports = [53]\n";
        assert_problem(
            &format!("{EXAMPLE}{second}"),
            "services[1].vips[0]",
            "overlaps 2001:db8::1/128",
        );
    }

    #[test]
    fn vip_count_per_family_is_limited() {
        let many: Vec<String> = (0..=MAX_SERVICES)
            .map(|i| format!("\"198.51.100.{i}/32\""))
            .collect();
        let text = example_with(&[(
            "vips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]",
            &format!("vips = [{}]", many.join(", ")),
        )]);
        assert_problem(&text, "services", "65 IPv4 VIP prefixes in all; at most 64");
        // 64 is allowed.
        let text = text.replacen("\"198.51.100.64/32\", ", "", 1);
        let text = text.replacen(", \"198.51.100.64/32\"", "", 1);
        assert_eq!(
            parse(&text).map(|c| c.services[0].vips.len()).ok(),
            Some(64)
        );
    }

    #[test]
    fn underlay_must_not_be_a_vip() {
        assert_problem(
            &example_with(&[(
                "vips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]",
                "vips = [\"10.0.0.0/30\"]",
            )]),
            "cluster.members[1].underlay",
            "10.0.0.2 lies inside VIP prefix 10.0.0.0/30 (services[0].vips[0])",
        );
    }

    #[test]
    fn bgp_and_metrics_are_checked() {
        const LIST: &str = "protocols = [\"anycast_vips\", \"anycast_vips6\"]";
        assert_problem(
            &example_with(&[(LIST, "protocols = [\"anycast_vips\", \"anycast vips\"]")]),
            "bgp.protocols[1]",
            "not a BIRD protocol name",
        );
        assert_problem(
            &example_with(&[(LIST, "protocols = [\"a\", \"a\"]")]),
            "bgp.protocols[1]",
            "listed twice",
        );
        assert_problem(
            &example_with(&[(LIST, "protocols = []")]),
            "bgp.protocols",
            "at least one",
        );
        assert_problem(
            &example_with(&[(LIST, "protocol = \"anycast vips\"")]),
            "bgp.protocol",
            "not a BIRD protocol name",
        );
        assert_problem(
            &example_with(&[(LIST, "")]),
            "bgp.protocol",
            "not a BIRD protocol name",
        );
        assert_problem(
            &example_with(&[(LIST, "protocol = \"x\"\nprotocols = [\"y\"]")]),
            "bgp.protocol",
            "not both",
        );
        let one = parse(&example_with(&[(LIST, "protocol = \"anycast_vips\"")]))
            .expect("a single protocol is accepted");
        assert_eq!(one.bgp.expect("bgp").protocols, ["anycast_vips"]);
        assert_problem(
            &example_with(&[("poll_interval_ms = 1000", "poll_interval_ms = 0")]),
            "bgp.poll_interval_ms",
            "more than 0",
        );
        assert_problem(
            &example_with(&[(
                "bird_socket = \"/run/bird/bird.ctl\"",
                "bird_socket = \"bird.ctl\"",
            )]),
            "bgp.bird_socket",
            "absolute",
        );
        assert_problem(
            &example_with(&[("listen = \"10.0.0.1:9465\"", "listen = \"localhost\"")]),
            "metrics.listen",
            "not an address:port",
        );
        let text = example_with(&[("listen = \"10.0.0.1:9465\"", "listen = \"[::1]:9100\"")]);
        let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.metrics.listen, "[::1]:9100".parse().expect("valid"));
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("cdn-steer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("good.toml");
        std::fs::write(&good, EXAMPLE).expect("write");
        assert_eq!(load(&good).ok(), parse(EXAMPLE).ok());

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, example_with(&[("hop_budget = 3", "hop_budget = 0")])).expect("write");
        let message = load(&bad).expect_err("invalid").to_string();
        assert!(message.starts_with(&format!("{}: invalid configuration", bad.display())));

        std::fs::write(&bad, "node = 1\n").expect("write");
        let message = load(&bad).expect_err("wrong shape").to_string();
        assert!(
            message.starts_with(&format!("{}: ", bad.display())),
            "{message}"
        );

        let missing = dir.join("missing.toml");
        let err = load(&missing).expect_err("no such file");
        assert!(
            matches!(&err, ConfigError::Read { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(err.to_string().contains(&missing.display().to_string()));
        assert!(err.problems().is_empty());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn prefixes_parse_and_compare() {
        let p = |s: &str| s.parse::<Prefix>().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(p("192.0.2.0/24").to_string(), "192.0.2.0/24");
        assert_eq!(p("2001:db8::/32").prefix_len(), 32);
        assert_eq!(p("0.0.0.0/0").addr(), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert!(p("192.0.2.0/24").contains("192.0.2.255".parse().expect("ip")));
        assert!(!p("192.0.2.0/24").contains("192.0.3.0".parse().expect("ip")));
        assert!(!p("0.0.0.0/0").contains("::1".parse().expect("ip")));
        assert!(p("::/0").contains("2001:db8::1".parse().expect("ip")));
        assert!(p("192.0.2.0/24").overlaps(&p("192.0.2.128/25")));
        assert!(p("192.0.2.128/25").overlaps(&p("192.0.2.0/24")));
        assert!(!p("192.0.2.0/25").overlaps(&p("192.0.2.128/25")));
        assert!(!p("0.0.0.0/0").overlaps(&p("::/0")));

        let e = |s: &str| s.parse::<Prefix>().expect_err(s);
        assert!(matches!(e("192.0.2.0"), PrefixError::MissingLength(_)));
        assert!(matches!(e("192.0.2/24"), PrefixError::BadAddress(_)));
        assert!(matches!(e("192.0.2.0/+24"), PrefixError::BadLength(_)));
        assert!(matches!(e("192.0.2.0/"), PrefixError::BadLength(_)));
        assert!(matches!(
            e("192.0.2.0/33"),
            PrefixError::TooLong { max: 32, .. }
        ));
        assert!(
            matches!(e("2001:db8::1/64"), PrefixError::HostBitsSet { network, .. }
            if network == p("2001:db8::/64"))
        );
        assert!(matches!(e("0.0.0.1/0"), PrefixError::HostBitsSet { .. }));
        assert!(Prefix::new("10.1.2.3".parse().expect("ip"), 32).is_ok());
    }
}
