//! The configuration's shape: the typed settings, deserialised straight from the file with
//! serde, and [`FIELDS`], one row per key with its default and whether changing it needs a
//! restart. Each field's doc comment is its documentation; the README's table is checked
//! against [`FIELDS`] (`tests/tests/readme.rs`).
//!
//! Adding a key: its field here (with serde attributes if the key or type differ from the
//! file), its row in [`FIELDS`], a rule in `check.rs` if it needs one, a line in
//! `example.toml`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use cdn_common::quic_lb::QuicLbConfig;

use super::document::{Compute, FIRST_TCP_PORT, HTTP_PATH, MEMBER_ID, Text, parse_hash_key};
use super::prefix::Prefix;

/// A checked configuration. Built only by [`super::parse`] and [`super::load`], so every rule
/// in this module holds for it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[node]`: this node.
    pub node: NodeSettings,
    /// `[cluster]`: the member list and the steering parameters, identical on every node.
    pub cluster: ClusterSettings,
    /// `[[services]]`: the anycast prefixes and ports served, identical on every node. At
    /// least one.
    #[serde(default)]
    pub services: Vec<ServiceSettings>,
    /// `[bgp]` (optional): route announcement through BIRD. Absent: the controller does not
    /// touch routing.
    pub bgp: Option<BgpSettings>,
    /// `[metrics]` (optional): the Prometheus endpoint.
    pub metrics: MetricsSettings,
}

/// `[node]`: settings of this node only.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// This node's name. It must be the name of one of `cluster.members`, unless `steer_only`
    /// is set, in which case it must not be.
    pub name: String,
    /// Network interfaces the XDP program attaches to (at least one). Each name is 1 to 15
    /// characters without `/`, `:` or whitespace; no duplicates.
    pub interfaces: Vec<String>,
    /// The interfaces among `interfaces` that the underlay (the other members) is reached
    /// through: steering packets arriving on any other one are dropped (`not_underlay`).
    /// Empty: steering packets are trusted on every interface, by their outer source address
    /// alone (and the MAC, with `cluster.steer_auth`).
    pub underlay_interfaces: Vec<String>,
    /// This node's IPv4 underlay address. At least one of `underlay_v4` and `underlay_v6` is
    /// required; members whose underlay is IPv4 can only be reached if this is set.
    pub underlay_v4: Option<Ipv4Addr>,
    /// This node's IPv6 underlay address; see `underlay_v4`.
    pub underlay_v6: Option<Ipv6Addr>,
    /// `"native"` runs the program in the driver; `"generic"` runs it in the kernel's generic
    /// path (slower; for drivers without XDP).
    pub xdp_mode: XdpMode,
    /// This node steers client packets to the members but owns no flows itself.
    pub steer_only: bool,
    /// This node's PoP, when the members have one (`cluster.members[].pop`): required on a
    /// steering-only node then; on a member node, it may be left out and must otherwise be its
    /// member's. New connections landing here are placed by this PoP's table.
    pub pop: Option<String>,
    /// Largest frame in bytes, Ethernet header included, that the underlay carries;
    /// encapsulated packets that would exceed it are dropped and counted. 0 disables the check.
    pub max_frame: u32,
    /// Absolute path of the directory where the program and maps are pinned.
    pub bpffs: PathBuf,
    /// Absolute path of the control socket.
    pub control_socket: PathBuf,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the network driver (`XDP_FLAGS_DRV_MODE`).
    #[default]
    Native,
    /// In the kernel's generic receive path (`XDP_FLAGS_SKB_MODE`).
    Generic,
}

/// Default of `cluster.learned_idle_ms`.
pub const DEFAULT_LEARNED_IDLE_MS: u32 = 30_000;

/// `[cluster]`: parameters every node must share.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// The 128-bit SipHash key of the flow hash, written as exactly 32 hex digits. The first
    /// 16 digits, read as a big-endian number, are `hash_key[0]`, the last 16 are
    /// `hash_key[1]`: `"00112233445566778899aabbccddeeff"` gives
    /// `[0x0011223344556677, 0x8899aabbccddeeff]`.
    #[serde(deserialize_with = "hash_key")]
    pub hash_key: [u64; 2],
    /// UDP port of the steering encapsulation. Not 0, and not a port of any service.
    pub steer_port: u16,
    /// Buckets in the steering table. A prime larger than the number of members, at most
    /// 1000003.
    pub table_size: u32,
    /// How many times a packet may be passed on from member to member; 1 to 8.
    pub hop_budget: u8,
    /// Every steering packet carries a MAC (SipHash-2-4 keyed from `hash_key`) over its outer
    /// source, inner flow and hop fields; packets without a valid one are dropped
    /// (`auth_failed`). Must be the same on every node: see the README, "Steering trust".
    pub steer_auth: bool,
    /// `history_sync_ms` (0 = never): how often this node merges a healthy member's hop
    /// history (through its `sync` endpoint) into its own. Nodes that saw a membership change
    /// differently (one saw a member flap, one was starting) each know owners the other does
    /// not; merging heals that within this interval.
    #[serde(rename = "history_sync_ms", deserialize_with = "millis_or_never")]
    pub history_sync: Option<Duration>,
    /// `learned_idle_ms` (1000 to 3600000): a flow a claim taught this node (README "PoPs:
    /// learned owners") is forgotten once no packet used it for this long. Used only with PoPs.
    #[serde(rename = "learned_idle_ms", deserialize_with = "millis")]
    pub learned_idle: Duration,
    /// `[[cluster.members]]` (at least one): every member of the cluster, including ones that
    /// take no new flows.
    #[serde(default)]
    pub members: Vec<MemberSettings>,
}

/// `[[cluster.members]]`: one member.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSettings {
    /// Unique name, no whitespace. The member's place in the steering table derives from it,
    /// so renaming a member moves its flows.
    pub name: String,
    /// Unique, stable member id, 0 to 1023, given explicitly so that every node uses the same
    /// one. It is what the steering table stores.
    pub id: u16,
    /// The member's underlay address, unique. This node must have an underlay address of the
    /// same family; for this node's own member it must be that address.
    pub underlay: IpAddr,
    /// Relative share of new flows, 0 to 10000. 0 takes no new flows but keeps the member in
    /// the cluster.
    pub weight: u32,
    /// `[cluster.members.health]`: how this node checks the member. Left out: a TCP connect to
    /// the first TCP port of the first service that lists one.
    pub health: HealthCheck,
    /// Address and port of the member's peer plane: its controller's listener for `/ready`,
    /// `/table` and `/digests`, which its own controller binds. A starting controller copies
    /// the hop history of the steering tables from a healthy member through it, so that it
    /// knows every member that may hold a flow; without any, a node that starts while others
    /// run may send flows that began during its absence to the wrong member. Point HTTP health
    /// checks of `/ready` at its port. When it is left out, or equal to the member's
    /// `[metrics] listen`, the member serves the peer plane and metrics on one listener.
    pub sync: Option<SocketAddr>,
    /// The QUIC-LB server ID this member's QUIC servers put into the connection IDs they
    /// issue: packets whose destination connection ID carries it are routed here. Unique; it
    /// must fit the smallest `server_id_len` of the services with `quic`. Default: the
    /// member's `id`.
    pub quic_server_id: u32,
    /// The PoP (point of presence) the member stands in: 1 to 32 characters of `a-z`, `0-9`,
    /// `_` and `-`. Either every member has one or none; at most 8 PoPs. New connections stay
    /// in the PoP where they land (README "PoPs").
    pub pop: Option<String>,
}

/// `[cluster.members.health]`: the health check of one member.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "HealthTable")]
pub struct HealthCheck {
    /// `kind`, with `path` and `host` for `"http"`: see [`HealthProbe`].
    pub probe: HealthProbe,
    /// Port probed at the member's underlay address; not 0.
    pub port: u16,
    /// `interval_ms`: time between two probes.
    pub interval: Duration,
    /// `timeout_ms`: time a probe may take; more than 0 and less than `interval_ms`.
    pub timeout: Duration,
    /// Consecutive successes that make a member healthy; at least 1.
    pub rise: u32,
    /// Consecutive failures that make a member unhealthy; at least 1.
    pub fall: u32,
    /// `reset`: end every probe connection that is still open when the probe is done with a
    /// reset (`SO_LINGER` 0) instead of a FIN: every TCP check; an HTTP exchange is normally
    /// closed by both sides by then (`Connection: close`). Off by default: resets show up in
    /// the `TcpOutRsts` counter operators watch.
    pub reset: bool,
}

/// What a health probe does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthProbe {
    /// `kind = "tcp"`: a TCP connection that is established counts as success.
    Tcp,
    /// `kind = "http"`: a `GET` whose answer has a 2xx status counts as success.
    Http {
        /// Request path; starts with `/`, no whitespace or control characters.
        path: String,
        /// `Host` header; default: the member's underlay address.
        host: Option<String>,
    },
}

/// `[cluster.members.health]` as written: [`HealthCheck`] folds `kind`, `path` and `host` into
/// one [`HealthProbe`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthTable {
    kind: HealthKind,
    // Optional so that a missing default (no service lists a TCP port) is reported once, by
    // the document pass, rather than again as a missing key.
    port: Option<u16>,
    path: Option<String>,
    host: Option<String>,
    interval_ms: u32,
    timeout_ms: u32,
    rise: u32,
    fall: u32,
    reset: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum HealthKind {
    Tcp,
    Http,
}

impl TryFrom<HealthTable> for HealthCheck {
    type Error = String;

    fn try_from(t: HealthTable) -> Result<Self, String> {
        let probe = match t.kind {
            HealthKind::Tcp if t.path.is_some() || t.host.is_some() => {
                return Err("path and host are only valid with kind = \"http\"".to_owned());
            }
            HealthKind::Tcp => HealthProbe::Tcp,
            HealthKind::Http => HealthProbe::Http {
                // The document pass fills in "/" for an HTTP check.
                path: t.path.unwrap_or_default(),
                host: t.host,
            },
        };
        Ok(HealthCheck {
            probe,
            // 0 only where the document pass already reported the missing port.
            port: t.port.unwrap_or(0),
            interval: Duration::from_millis(t.interval_ms.into()),
            timeout: Duration::from_millis(t.timeout_ms.into()),
            rise: t.rise,
            fall: t.fall,
            reset: t.reset,
        })
    }
}

/// `[[services]]`: one anycast service.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Anycast prefixes (at least one) such as `"192.0.2.1/32"` or `"2001:db8::/64"`, host
    /// bits zero. No prefix may overlap another one, in this service or any other; at most 64
    /// prefixes per address family over all services.
    pub vips: Vec<Prefix>,
    /// TCP ports served, at most 8, no duplicates, not 0. `tcp_ports` and `udp_ports` must not
    /// both be empty.
    pub tcp_ports: Vec<u16>,
    /// UDP ports served; same rules as `tcp_ports`.
    pub udp_ports: Vec<u16>,
    /// Who accepts a UDP flow (see [`UdpMode`]).
    pub udp_mode: UdpMode,
    /// `quic` (optional): QUIC on some of the UDP ports, routed by the server ID in the
    /// connection ID (QUIC-LB plaintext). Absent: no QUIC routing; its UDP follows `udp_mode`.
    pub quic: Option<QuicSettings>,
}

/// `[services.quic]`: QUIC-LB routing of one service's QUIC ports. Every QUIC server behind
/// the service must issue connection IDs of this layout (see `cdn_common::quic_lb`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicSettings {
    /// UDP ports carrying QUIC (at least one), each one of the service's `udp_ports`, no
    /// duplicates.
    pub ports: Vec<u16>,
    /// Config rotation bits of the connection IDs, 0 to 6 (7 marks an unroutable CID).
    pub config_id: u8,
    /// Octets of server ID in a connection ID, 1 or 2.
    pub server_id_len: u8,
    /// Octets of the whole connection ID: the first octet, the server ID and a nonce of at
    /// least 4 octets; at most 20.
    pub cid_len: u8,
}

impl QuicSettings {
    /// The QUIC-LB configuration both sides use.
    pub const fn lb(&self) -> QuicLbConfig {
        QuicLbConfig {
            config_id: self.config_id,
            server_id_len: self.server_id_len,
            cid_len: self.cid_len,
        }
    }
}

/// Who accepts a UDP flow of a service. TCP always finds its connection by socket lookup.
///
/// The default is `owner`: most UDP servers (QUIC, DNS, syslog) serve from one unconnected
/// socket, which `connected` cannot find, so under `connected` every such flow is passed along
/// its bucket's history and funnels onto the last member listed there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UdpMode {
    /// The flow's current owner accepts it, without a socket check; flows move only when the
    /// owner changes. For unconnected servers that keep per-flow state.
    #[default]
    Owner,
    /// Accepted wherever it lands; nothing is steered. For stateless request/response (DNS).
    Local,
    /// The owner check looks for a connected socket along the bucket's hops, as for TCP. For
    /// servers that connect one socket per flow.
    Connected,
}

impl UdpMode {
    /// The name used in the configuration, status and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Local => "local",
            Self::Connected => "connected",
        }
    }
}

/// `[bgp]`: route announcement through BIRD.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpSettings {
    /// Whether the controller drives BIRD at all.
    pub enabled: bool,
    /// Absolute path of BIRD's control socket.
    pub bird_socket: PathBuf,
    /// Names of the BIRD static protocols that hold the VIP routes (at least one; one per
    /// address family, as a BIRD static protocol carries one). `protocol = "name"` is accepted
    /// for a single one. The controller enables them while this node is ready and healthy and
    /// disables them otherwise.
    #[serde(alias = "protocol", deserialize_with = "one_or_more")]
    pub protocols: Vec<String>,
    /// `poll_interval_ms` (more than 0): how often the protocols' state is checked and
    /// corrected.
    #[serde(rename = "poll_interval_ms", deserialize_with = "millis")]
    pub poll_interval: Duration,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address and port of the metrics listener (`/metrics`). The peer plane (`/ready`,
    /// `/table`, `/digests`) is served on this member's `sync` address; when that is absent or
    /// the same as this, one listener serves both.
    pub listen: SocketAddr,
}

fn hash_key<'de, D: Deserializer<'de>>(d: D) -> Result<[u64; 2], D::Error> {
    parse_hash_key(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Ok(Duration::from_millis(u32::deserialize(d)?.into()))
}

fn millis_or_never<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Ok(Some(millis(d)?).filter(|d| !d.is_zero()))
}

fn one_or_more<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a name or a list of names")]
    enum OneOrMore {
        One(String),
        More(Vec<String>),
    }
    Ok(match OneOrMore::deserialize(d)? {
        OneOrMore::One(name) => vec![name],
        OneOrMore::More(names) => names,
    })
}

// ---------------------------------------------------------------------------------------------
// The field table
// ---------------------------------------------------------------------------------------------

/// Default of `node.control_socket`, also where `cdn-steer` commands look without `-c`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/cdn-steer.sock";

/// One key of the file.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// Path of the key, arrays written `[]`: `cluster.members[].health.rise`.
    pub path: &'static str,
    /// What a file that leaves the key out gets.
    pub when_absent: WhenAbsent,
    /// How the key's text is checked before deserialisation, for keys whose value is text
    /// with a syntax of its own (addresses, prefixes).
    pub(super) text: Option<Text>,
    /// For a key that a running controller cannot take over on reload: whether it differs
    /// between two configurations.
    pub(super) restart: Option<fn(&Config, &Config) -> bool>,
}

/// What a key left out of the file means.
#[derive(Clone, Copy, Debug)]
pub enum WhenAbsent {
    /// The file must give it.
    Required,
    /// The setting is off (`None`).
    Unset,
    /// This value, as TOML.
    Value(&'static str),
    /// A value that depends on other keys: described by the text, computed by the function
    /// from the table holding the key; `Err` when there is nothing to default to.
    Computed(&'static str, Compute),
}

impl WhenAbsent {
    /// How the README's table shows it.
    pub fn describe(&self) -> String {
        match self {
            WhenAbsent::Required => "required".to_owned(),
            WhenAbsent::Unset => "none".to_owned(),
            WhenAbsent::Value(toml) => format!("`{toml}`"),
            WhenAbsent::Computed(text, _) => (*text).to_owned(),
        }
    }
}

impl Field {
    /// Whether changing the key needs a restart (rather than a reload).
    pub fn restart_only(&self) -> bool {
        self.restart.is_some()
    }

    const fn new(path: &'static str, when_absent: WhenAbsent) -> Field {
        Field {
            path,
            when_absent,
            text: None,
            restart: None,
        }
    }

    const fn text(self, text: Text) -> Field {
        Field {
            text: Some(text),
            ..self
        }
    }

    const fn restart(self, differs: fn(&Config, &Config) -> bool) -> Field {
        Field {
            restart: Some(differs),
            ..self
        }
    }
}

const fn field(path: &'static str, when_absent: WhenAbsent) -> Field {
    Field::new(path, when_absent)
}

use WhenAbsent::{Computed, Required, Unset, Value};

/// Every key of the file, in the order of the README's table. A table whose keys all have
/// defaults may itself be left out (`[metrics]`, `[cluster.members.health]`).
pub const FIELDS: &[Field] = &[
    field("node.name", Required).restart(|a, b| a.node.name != b.node.name),
    field("node.interfaces", Required).restart(|a, b| a.node.interfaces != b.node.interfaces),
    field("node.underlay_interfaces", Value("[]"))
        .restart(|a, b| a.node.underlay_interfaces != b.node.underlay_interfaces),
    field("node.underlay_v4", Unset).text(Text::Ipv4),
    field("node.underlay_v6", Unset).text(Text::Ipv6),
    field("node.xdp_mode", Value("\"native\"")).restart(|a, b| a.node.xdp_mode != b.node.xdp_mode),
    field("node.steer_only", Value("false")).restart(|a, b| a.node.steer_only != b.node.steer_only),
    field("node.pop", Unset),
    field("node.max_frame", Value("0")),
    field("node.bpffs", Value("\"/sys/fs/bpf/cdn-steer\""))
        .restart(|a, b| a.node.bpffs != b.node.bpffs),
    field("node.control_socket", Value("\"/run/cdn-steer.sock\""))
        .restart(|a, b| a.node.control_socket != b.node.control_socket),
    field("cluster.hash_key", Required).text(Text::HashKey),
    field("cluster.steer_port", Value("6080")),
    field("cluster.table_size", Value("65537"))
        .restart(|a, b| a.cluster.table_size != b.cluster.table_size),
    field("cluster.hop_budget", Value("3")),
    field("cluster.steer_auth", Value("false")),
    field("cluster.history_sync_ms", Value("5000")),
    field("cluster.learned_idle_ms", Value("30000")),
    field("cluster.members[].name", Required),
    field("cluster.members[].id", Required),
    field("cluster.members[].underlay", Required).text(Text::Ip),
    field("cluster.members[].weight", Value("100")),
    field("cluster.members[].sync", Unset).text(Text::SocketAddr),
    field(
        "cluster.members[].quic_server_id",
        Computed("the member's `id`", MEMBER_ID),
    ),
    field("cluster.members[].pop", Unset),
    field("cluster.members[].health.kind", Value("\"tcp\"")),
    field(
        "cluster.members[].health.port",
        Computed("first TCP service port", FIRST_TCP_PORT),
    ),
    field(
        "cluster.members[].health.path",
        Computed("`\"/\"` with `kind = \"http\"`", HTTP_PATH),
    ),
    field("cluster.members[].health.host", Unset),
    field("cluster.members[].health.interval_ms", Value("1000")),
    field("cluster.members[].health.timeout_ms", Value("500")),
    field("cluster.members[].health.rise", Value("2")),
    field("cluster.members[].health.fall", Value("3")),
    field("cluster.members[].health.reset", Value("false")),
    field("services[].name", Required),
    field("services[].vips", Required).text(Text::Prefix),
    field("services[].tcp_ports", Value("[]")),
    field("services[].udp_ports", Value("[]")),
    field("services[].udp_mode", Value("\"owner\"")),
    field("services[].quic.ports", Required),
    field("services[].quic.config_id", Value("0")),
    field("services[].quic.server_id_len", Value("2")),
    field("services[].quic.cid_len", Value("8")),
    field("bgp.enabled", Value("true")).restart(|a, b| bgp_differs(a, b, |s| &s.enabled)),
    field("bgp.bird_socket", Value("\"/run/bird/bird.ctl\""))
        .restart(|a, b| bgp_differs(a, b, |s| &s.bird_socket)),
    field("bgp.protocols", Required).restart(|a, b| bgp_differs(a, b, |s| &s.protocols)),
    field("bgp.poll_interval_ms", Value("1000"))
        .restart(|a, b| bgp_differs(a, b, |s| &s.poll_interval)),
    field("metrics.listen", Value("\"127.0.0.1:9465\""))
        .text(Text::SocketAddr)
        .restart(|a, b| a.metrics.listen != b.metrics.listen),
];

fn bgp_differs<T: PartialEq>(a: &Config, b: &Config, key: fn(&BgpSettings) -> &T) -> bool {
    a.bgp.as_ref().map(key) != b.bgp.as_ref().map(key)
}

/// The keys that differ between two configurations and only take effect after a restart, as
/// their paths (`node.interfaces`); empty when `new` can be applied by a reload.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    FIELDS
        .iter()
        .filter(|f| f.restart.is_some_and(|differs| differs(old, new)))
        .map(|f| f.path)
        .collect()
}
