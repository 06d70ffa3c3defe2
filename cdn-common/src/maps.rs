//! BPF map layouts. Byte order is stated on every field: "network" fields hold the bytes exactly
//! as they appear on the wire, everything else is in host order.

/// Marks an empty hop slot in a [`Bucket`] and "no member" elsewhere.
pub const NO_MEMBER: u16 = u16::MAX;

/// Member ids are indices into the member array: `0..MAX_MEMBERS`.
pub const MAX_MEMBERS: u32 = 1024;

/// Services (VIP prefixes) per address family.
pub const MAX_SERVICES: u32 = 64;

/// PoPs a cluster can have (`[[cluster.members]] pop`): PoP sets are one byte. PoPs are
/// numbered by the order of their names, the same on every node.
pub const MAX_POPS: usize = 8;

/// Ports one service can list; a service with no port listed accepts every port.
pub const MAX_SERVICE_PORTS: usize = 8;

/// Default Maglev table size M: prime, large enough that one member's share is even to 1%.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Whether `n` is prime, as every table size must be (deterministic trial division; `n < 2^32`
/// needs at most 2^15 steps). The configuration checks sizes with it before Maglev builds a
/// table of that size.
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = n as u64;
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Hops kept per bucket: the current owner and two previous owners.
pub const MAX_HOPS: usize = 3;

/// Default UDP port of the steering encapsulation.
pub const DEFAULT_STEER_PORT: u16 = 6080;

// Map names: the program defines maps with these names and the controller opens (and pins) them
// by the same names.
/// Named anew when `NodeConfig` grew the steering MAC key, so that a controller upgraded in
/// place never reuses a pinned entry of the old, shorter layout.
pub const MAP_CONFIG: &str = "NODE_CONFIG";
/// Interfaces steering packets are accepted on (`[node] underlay_interfaces`): ifindex -> 1.
/// Read only while `NODE_UNDERLAY_IFACES` is set.
pub const MAP_UNDERLAY_IFACES: &str = "UNDERLAY_IFACES";
/// Entries of [`MAP_UNDERLAY_IFACES`].
pub const MAX_UNDERLAY_IFACES: u32 = 64;
pub const MAP_SERVICES_V4: &str = "SERVICES_V4";
pub const MAP_SERVICES_V6: &str = "SERVICES_V6";
pub const MAP_TABLE: &str = "TABLE";
pub const MAP_MEMBERS: &str = "MEMBERS";
pub const MAP_MEMBER_ADDRS: &str = "MEMBER_ADDRS";
pub const MAP_NEXT_HOPS: &str = "NEXT_HOPS";
/// QUIC-LB server ID -> member id ([`NO_MEMBER`] where none), [`crate::quic_lb::QUIC_SERVER_IDS`]
/// entries, indexed by the server ID's value.
pub const MAP_QUIC_SERVERS: &str = "QUIC_SERVERS";
pub const MAP_DEVICES: &str = "DEVICES";
/// Indexed by (reason, action) since the verdict split; named anew so that a controller
/// upgraded in place never reuses a pinned map of the old, per-reason layout.
pub const MAP_COUNTERS: &str = "VERDICT_COUNTS";
pub const MAP_MEMBER_STATS: &str = "MEMBER_STATS";
/// The live trace's filter (`cdn_common::trace::TraceFilter`, one entry).
pub const MAP_TRACE_FILTER: &str = "TRACE_FILTER";
/// The live trace's events (`cdn_common::trace::TraceEvent`), a ring buffer.
pub const MAP_TRACE_EVENTS: &str = "TRACE_EVENTS";
/// Trace events lost because the ring buffer was full, per CPU (one `u64` slot).
pub const MAP_TRACE_LOST: &str = "TRACE_LOST";

/// Flows a claim taught this node (README "PoPs: learned owners"): [`FlowKey`] ->
/// [`Learned`], an LRU hash of [`MAX_LEARNED`] entries written by the controller. Read at
/// ingress only for buckets whose bit is set in [`MAP_LEARNED_BUCKETS`].
pub const MAP_LEARNED: &str = "LEARNED";
/// Entries of [`MAP_LEARNED`].
pub const MAX_LEARNED: u32 = 65536;
/// One bit per bucket index (bucket `b`: word `b / 32`, bit `b % 32`; the same index space for
/// every service and PoP): set while some learned flow hashes to that bucket, so that a packet
/// of any other bucket pays one array read and no hash lookup. Written by the controller.
pub const MAP_LEARNED_BUCKETS: &str = "LEARNED_BUCKETS";
/// Words of [`MAP_LEARNED_BUCKETS`]: room for the largest table (1,000,003 buckets).
pub const LEARNED_BUCKET_WORDS: u32 = 1_000_003u32.div_ceil(32);
/// Searches this node's member accepted ([`ClaimEvent`]), a ring buffer the controller turns
/// into claims to the PoP where the search started.
pub const MAP_CLAIM_EVENTS: &str = "CLAIM_EVENTS";
/// Bytes of [`MAP_CLAIM_EVENTS`].
pub const CLAIM_RING_BYTES: u32 = 256 * 1024;

/// A flow as the learned map keys it: the client's address and port, the VIP's, and the
/// protocol, as in the client's packet. Addresses in network order, IPv4 as IPv4-mapped
/// (`::ffff:a.b.c.d`, like [`MemberAddr`]); ports in network order. Word-aligned so that the
/// program builds it with word stores.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: [u8; 16],
    pub vip: [u8; 16],
    /// Network order.
    pub client_port: u16,
    /// Network order.
    pub vip_port: u16,
    /// IP protocol (6 TCP, 17 UDP).
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of [`MAP_LEARNED`]: where the flow lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// The member that claimed the flow.
    pub member: u16,
    pub _pad: [u8; 6],
    /// Packets sent there on the strength of this entry (not per CPU; an approximate count
    /// the controller watches to expire idle entries).
    pub packets: u64,
}

/// One event of [`MAP_CLAIM_EVENTS`]: this node accepted a search for `key` that `starter`
/// (a member of the PoP where the flow landed) started.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimEvent {
    pub key: FlowKey,
    /// The member that started the search (the search header's `hops[0]`).
    pub starter: u16,
    /// The search header's hop budget when it arrived here: the search took
    /// `NodeConfig::search_budget - budget_left + 1` hops (its start and every pass-on).
    /// `CLAIM_BUDGET_UNKNOWN` if the program could not read it.
    pub budget_left: u8,
    pub _pad: [u8; 5],
}

/// `ClaimEvent::budget_left` when the program could not read the search header again.
pub const CLAIM_BUDGET_UNKNOWN: u8 = 0xff;

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "cdn_steer";

/// A trivial XDP_PASS program in the same object, for benchmarks only.
pub const BASELINE_PROGRAM_NAME: &str = "baseline_pass";
/// `cdn_steer`'s packet path wrapped so that it restores the frame after each run (benchmarks).
pub const BENCH_PROGRAM_NAME: &str = "bench_steer";
/// The same wrapper around nothing (benchmarks).
pub const BENCH_BASELINE_PROGRAM_NAME: &str = "bench_baseline";

// Packet-rate benchmark (`cargo xtask bench --rate`): a live-frames generator, bare programs
// to compare `cdn_steer` with, and a sink for what comes back. None of them is ever attached by
// the controller.
/// Generator run by BPF_PROG_TEST_RUN in live-frames mode: writes the frame of
/// [`MAP_BENCH_GEN_FRAME`] and redirects it out of the interface [`BENCH_GEN_IFINDEX`] names.
pub const BENCH_GEN_PROGRAM_NAME: &str = "bench_gen";
/// Bare XDP_TX (counts in [`BENCH_SLOT_BARE`]).
pub const BENCH_TX_PROGRAM_NAME: &str = "bench_tx";
/// Bare redirect through a devmap to the interface at index 0 of [`MAP_BENCH_DEVICES`]
/// (counts in [`BENCH_SLOT_BARE`]).
pub const BENCH_REDIRECT_PROGRAM_NAME: &str = "bench_redirect";
/// Bare XDP_PASS (counts in [`BENCH_SLOT_BARE`]).
pub const BENCH_PASS_PROGRAM_NAME: &str = "bench_pass";
/// XDP_DROP that counts (in [`BENCH_SLOT_SINK`]): the receiving end of forwarded frames.
pub const BENCH_SINK_PROGRAM_NAME: &str = "bench_sink";
/// The generator's frame: `[u8; BENCH_FRAME_BYTES]`, one entry; its length is in
/// [`MAP_BENCH_GEN_CONF`].
pub const MAP_BENCH_GEN_FRAME: &str = "BENCH_GEN_FRAME";
/// The generator's settings: `u32` entries indexed by `BENCH_GEN_*`.
pub const MAP_BENCH_GEN_CONF: &str = "BENCH_GEN_CONF";
pub const BENCH_GEN_IFINDEX: u32 = 0;
pub const BENCH_GEN_LEN: u32 = 1;
pub const BENCH_GEN_CONF_ENTRIES: u32 = 2;
/// Largest frame the generator sends (its length must also stay below this).
pub const BENCH_FRAME_BYTES: usize = 256;
/// Devmap of the bare redirect program.
pub const MAP_BENCH_DEVICES: &str = "BENCH_DEVICES";
/// Per-CPU `u64` packet counts of the rate benchmark's programs, indexed by `BENCH_SLOT_*`.
pub const MAP_BENCH_COUNTS: &str = "BENCH_COUNTS";
pub const BENCH_SLOT_GEN: u32 = 0;
pub const BENCH_SLOT_BARE: u32 = 1;
pub const BENCH_SLOT_SINK: u32 = 2;
pub const BENCH_SLOTS: u32 = 3;

/// `NodeConfig::flags`: this node is draining: it takes no new TCP connections as owner.
pub const NODE_DRAINING: u32 = 1 << 0;
/// `NodeConfig::flags`: the controller has written a complete configuration. Until then the
/// program passes every packet to the kernel untouched.
pub const NODE_READY: u32 = 1 << 1;
/// `NodeConfig::flags`: a live trace is running: packets that pass the `TRACE_FILTER` are
/// reported through `TRACE_EVENTS` (see `cdn_common::trace`). Set only while `cdn-steer trace`
/// is connected; a starting controller always writes it cleared.
pub const NODE_TRACE: u32 = 1 << 2;
/// `NodeConfig::flags`: steering packets are accepted only from the interfaces listed in
/// `UNDERLAY_IFACES` (`[node] underlay_interfaces` is not empty); without it, from any
/// attached interface.
pub const NODE_UNDERLAY_IFACES: u32 = 1 << 3;
/// `NodeConfig::flags`: `[cluster] steer_auth`: encapsulations carry a MAC (steering header
/// version 2, keyed with `NodeConfig::auth_key`), and version-1 headers are dropped.
pub const NODE_STEER_AUTH: u32 = 1 << 4;

/// The node's own settings: one entry in the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Cluster-wide SipHash key (identical on every node).
    pub hash_key: [u64; 2],
    /// This node's underlay IPv4 address (network order), 0 if none.
    pub underlay_v4: [u8; 4],
    /// This node's underlay IPv6 address (network order), all zero if none.
    pub underlay_v6: [u8; 16],
    /// Steering UDP port (host order).
    pub steer_port: u16,
    /// This node's member id, [`NO_MEMBER`] if the node only steers.
    pub self_member: u16,
    /// `NODE_*` flags.
    pub flags: u32,
    /// Hop budget written into new encapsulations; each pass-on spends one.
    pub hop_budget: u8,
    /// Index of this node's PoP (0 when the cluster has no PoPs).
    pub self_pop: u8,
    /// Hop budget of a search (steering header version 3): enough for every hop of every
    /// other PoP's chain; 0 when the cluster has one PoP.
    pub search_budget: u8,
    pub _pad: u8,
    /// Largest frame (bytes, Ethernet header included) the underlay carries; 0 = no limit.
    pub max_frame: u32,
    pub _pad2: u32,
    /// SipHash-2-4 key of the steering MAC, derived from `hash_key`
    /// ([`crate::hash::steer_auth_key`]). Version-2 headers are checked with it whatever
    /// `NODE_STEER_AUTH` says.
    pub auth_key: [u64; 2],
}

/// Value of the VIP LPM tries: a service and where its active table half lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index of bucket 0 of the active table half in `TABLE`.
    pub table_offset: u32,
    /// Number of buckets M (prime).
    pub table_size: u32,
    /// `SERVICE_*` flags.
    pub flags: u32,
    /// TCP ports served (host order); 0 marks an unused slot.
    pub tcp_ports: [u16; MAX_SERVICE_PORTS],
    /// UDP ports served (host order); 0 marks an unused slot.
    pub udp_ports: [u16; MAX_SERVICE_PORTS],
    /// Incremented by the controller at every table swap.
    pub generation: u32,
    /// UDP ports whose packets are QUIC routed by connection ID (`SERVICE_QUIC`); a subset of
    /// `udp_ports`, 0 marks an unused slot.
    pub quic_ports: [u16; MAX_SERVICE_PORTS],
    /// QUIC-LB configuration ([`crate::quic_lb::QuicLbConfig`]): config rotation bits,
    /// server ID length and connection ID length.
    pub quic_config_id: u8,
    pub quic_server_id_len: u8,
    pub quic_cid_len: u8,
    /// PoPs a flow this node's PoP does not hold is searched in (bit `i`: the PoP of index
    /// `i`): every PoP but this node's own. 0 when the cluster has one PoP: no search.
    pub search_pops: u8,
    /// Per PoP (by index): bucket 0 of the active half of that PoP's table in `TABLE`.
    /// `table_offset` is this node's own PoP's. Read by searches, and by the placement of new
    /// connections with `SERVICE_PLACE_ELSEWHERE`.
    pub pop_tables: [u32; MAX_POPS],
}

/// `Service::flags`: TCP is served (on `tcp_ports`).
pub const SERVICE_TCP: u32 = 1 << 0;
/// `Service::flags`: UDP is served (on `udp_ports`).
pub const SERVICE_UDP: u32 = 1 << 1;
/// `Service::flags`: every port of the served protocols, whatever the port lists say.
pub const SERVICE_ALL_PORTS: u32 = 1 << 2;
/// `Service::flags`, UDP placement (`udp_mode = "owner"`): a UDP flow is accepted by its
/// current owner (`hops[0]` of its bucket) without a socket check, and never passed on.
pub const SERVICE_UDP_OWNER: u32 = 1 << 3;
/// `Service::flags`, UDP placement (`udp_mode = "local"`): a UDP flow is accepted by whichever
/// node it lands on; nothing is steered.
pub const SERVICE_UDP_LOCAL: u32 = 1 << 4;
/// `Service::flags`: UDP to `quic_ports` is QUIC, routed by the server ID its destination
/// connection ID carries (`QUIC_SERVERS`), or by flow hash to the current owner when it
/// carries none (a client's first flight); the receiving member always accepts.
pub const SERVICE_QUIC: u32 = 1 << 5;
/// `Service::flags`: new connections landing here are placed by the table of another PoP, the
/// one whose index `SERVICE_PLACE_POP_SHIFT` gives, because this node's own PoP has no member
/// that may take them (all drained or down). A new connection is a TCP SYN, a UDP flow of
/// `udp_mode = "owner"` or a QUIC packet routed by flow hash. Established flows still follow
/// this node's own PoP's chain (`table_offset`), which the searches of other nodes walk too:
/// that table keeps listing the PoP's own members while none is eligible.
pub const SERVICE_PLACE_ELSEWHERE: u32 = 1 << 6;
/// `Service::flags` bits 8..11: with `SERVICE_PLACE_ELSEWHERE`, the index into `pop_tables`
/// of the PoP that places new connections.
pub const SERVICE_PLACE_POP_SHIFT: u32 = 8;
/// Mask of the PoP index at `SERVICE_PLACE_POP_SHIFT`: any value is a valid index of
/// `pop_tables`.
pub const SERVICE_PLACE_POP_MASK: u32 = (MAX_POPS as u32) - 1;
const _: () = assert!(MAX_POPS.is_power_of_two(), "a masked index is in bounds");
// Neither UDP placement flag: `udp_mode = "connected"`, the owner check finds connected
// sockets along the bucket's hops, as for TCP.

/// One Maglev bucket: `hops[0]` owns new flows, `hops[1..]` are previous owners, newest first.
/// Unused slots hold [`NO_MEMBER`]. Eight bytes so that one store writes a whole bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bucket {
    pub hops: [u16; MAX_HOPS],
    pub _pad: u16,
}

impl Default for Bucket {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl Bucket {
    pub const EMPTY: Self = Self {
        hops: [NO_MEMBER; MAX_HOPS],
        _pad: 0,
    };
}

/// One entry of `QUIC_SERVERS`, indexed by QUIC-LB server ID. The array starts zeroed, so an
/// entry names a member only while `flags` has [`QUIC_SERVER_SET`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuicServer {
    pub member: u16,
    pub flags: u16,
}

/// `QuicServer::flags`: the entry names a configured member.
pub const QUIC_SERVER_SET: u16 = 1;

/// Address family tags.
pub const FAMILY_NONE: u8 = 0;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// One entry of the member array, indexed by member id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Member {
    /// Underlay address, network order; IPv4 uses the first four bytes.
    pub addr: [u8; 16],
    /// `FAMILY_*`; `FAMILY_NONE` marks an unused id.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Key of the reverse map underlay address -> member id, used to reject encapsulated packets
/// that do not come from a member. IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`).
/// Word-aligned so the program can build it with word stores.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemberAddr {
    pub addr: [u8; 16],
}

impl MemberAddr {
    pub const fn v4(addr: [u8; 4]) -> Self {
        Self {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
            ],
        }
    }

    pub const fn v6(addr: [u8; 16]) -> Self {
        Self { addr }
    }
}

/// Bytes of [`NextHop::header`]: the outer headers up to the UDP destination port (58 bytes for
/// an IPv6 underlay, 38 for IPv4), rounded up to whole 8-byte words so the program copies it
/// with word loads and stores.
pub const NEXT_HOP_HEADER_LEN: usize = 64;

/// `NextHop::flags`: the entry may be used. Everything else means "ask the FIB": the program
/// never looks at an entry without this flag.
pub const NEXT_HOP_VALID: u32 = 1 << 0;
/// `NextHop::flags`: the outer header is IPv6 (otherwise IPv4).
pub const NEXT_HOP_V6: u32 = 1 << 1;

/// Offsets in [`NextHop::header`] (from the start of the frame) of the fields the program fills
/// in per packet; the template holds zeros there.
pub mod template {
    use crate::wire::{ETH_HEADER_LEN, IPV4_HEADER_LEN, IPV6_HEADER_LEN};

    /// Start of the outer IP header.
    pub const IP: usize = ETH_HEADER_LEN;
    /// IPv4: total length, and header checksum.
    pub const IPV4_TOTAL_LEN: usize = IP + 2;
    pub const IPV4_CHECKSUM: usize = IP + 10;
    /// IPv6: low 16 bits of the flow label (the top 4 are 0), and payload length.
    pub const IPV6_FLOW_LOW: usize = IP + 2;
    pub const IPV6_PAYLOAD_LEN: usize = IP + 4;
    /// Start of the UDP header (source port, filled per packet; destination port, in the
    /// template).
    pub const UDP_V4: usize = IP + IPV4_HEADER_LEN;
    pub const UDP_V6: usize = IP + IPV6_HEADER_LEN;
    /// Template bytes the program copies: whole words up to the UDP destination port.
    pub const COPY_V4: usize = (UDP_V4 + 4).next_multiple_of(8);
    pub const COPY_V6: usize = (UDP_V6 + 4).next_multiple_of(8);
}

/// Next hop towards a member, written by the controller from the kernel's routing and
/// neighbour tables: the egress interface and the outer headers of every packet sent to that
/// member, precomputed, so that the program copies them with a few word stores.
///
/// No expiry time: the controller rewrites an entry when its neighbour, route, or the node's
/// addresses change, and clears [`NEXT_HOP_VALID`] when it can no longer resolve it; an entry
/// without the flag (or a missing one) makes the program ask `bpf_fib_lookup` instead. The
/// entries outlive the controller (pinned maps): if it stops, the last resolved next hops stay
/// in use until a controller starts again and resolves them anew. See the README (next hops).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The frame's first bytes as on the wire: Ethernet (destination MAC, source MAC,
    /// ethertype), the outer IPv4 or IPv6 header, the UDP source and destination ports. Fields
    /// that depend on the packet (see [`template`]) are zero.
    pub header: [u8; NEXT_HOP_HEADER_LEN],
    /// IPv4: one's-complement sum (not folded) of the outer header's 16-bit words read in host
    /// byte order, length and checksum being zero; the program adds the length and folds.
    /// Byte order does not matter to this sum (RFC 1071), so nobody swaps bytes for it. IPv6: 0.
    pub ipv4_sum: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// `NEXT_HOP_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

impl Default for NextHop {
    fn default() -> Self {
        Self::INVALID
    }
}

/// Addresses of a templated next hop: where the frame leaves and the two MACs it carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Link {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
}

/// Outer addresses of a templated next hop, network order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Underlay {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

impl NextHop {
    /// "Ask the FIB".
    pub const INVALID: Self = Self {
        header: [0; NEXT_HOP_HEADER_LEN],
        ipv4_sum: 0,
        ifindex: 0,
        flags: 0,
        _pad: 0,
    };

    /// The entry for sending over `link` between the `underlay` addresses to `steer_port`.
    /// The headers are those the program wrote field by field before templates existed, and
    /// still writes when it falls back to the FIB.
    pub fn new(link: &Link, underlay: &Underlay, steer_port: u16) -> Self {
        use crate::wire::OUTER_TTL;
        use template::*;
        const UDP: u8 = 17;
        let mut hop = Self {
            ifindex: link.ifindex,
            flags: NEXT_HOP_VALID,
            ..Self::INVALID
        };
        let h = &mut hop.header;
        h[0..6].copy_from_slice(&link.dst_mac);
        h[6..12].copy_from_slice(&link.src_mac);
        let udp = match underlay {
            Underlay::V4 { src, dst } => {
                h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                // Version 4, 5 words, TOS 0; length 0; ident 0; don't fragment; TTL; UDP;
                // checksum 0.
                h[IP] = 0x45;
                h[IP + 6] = 0x40;
                h[IP + 8] = OUTER_TTL;
                h[IP + 9] = UDP;
                h[IP + 12..IP + 16].copy_from_slice(src);
                h[IP + 16..IP + 20].copy_from_slice(dst);
                hop.ipv4_sum = h[IP..UDP_V4]
                    .chunks_exact(2)
                    .map(|w| u32::from(u16::from_ne_bytes([w[0], w[1]])))
                    .sum();
                UDP_V4
            }
            Underlay::V6 { src, dst } => {
                hop.flags |= NEXT_HOP_V6;
                h[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
                // Version 6, traffic class 0, flow label filled per packet; payload length
                // per packet; next header UDP; hop limit.
                h[IP] = 0x60;
                h[IP + 6] = UDP;
                h[IP + 7] = OUTER_TTL;
                h[IP + 8..IP + 24].copy_from_slice(src);
                h[IP + 24..IP + 40].copy_from_slice(dst);
                UDP_V6
            }
        };
        h[udp + 2..udp + 4].copy_from_slice(&steer_port.to_be_bytes());
        hop
    }

    pub const fn is_valid(&self) -> bool {
        self.flags & NEXT_HOP_VALID != 0
    }

    /// The interface and MACs of a valid entry.
    pub fn link(&self) -> Option<Link> {
        if !self.is_valid() {
            return None;
        }
        let mut link = Link {
            ifindex: self.ifindex,
            ..Link::default()
        };
        link.dst_mac.copy_from_slice(&self.header[0..6]);
        link.src_mac.copy_from_slice(&self.header[6..12]);
        Some(link)
    }
}

/// Packets and bytes forwarded to one member (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberStats {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(
            size_of::<NodeConfig>(),
            16 + 4 + 16 + 2 + 2 + 4 + 1 + 1 + 1 + 1 + 4 + 4 + 16
        );
        assert_eq!(
            size_of::<Service>(),
            4 + 4 + 4 + 16 + 16 + 4 + 16 + 4 + 4 * MAX_POPS
        );
        assert_eq!(size_of::<QuicServer>(), 4);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Learned>(), 16);
        assert_eq!(size_of::<ClaimEvent>(), 48);
        assert_eq!(size_of::<Bucket>(), 8);
        assert_eq!(size_of::<Member>(), 20);
        assert_eq!(size_of::<NextHop>(), NEXT_HOP_HEADER_LEN + 16);
        assert_eq!(core::mem::align_of::<NextHop>(), 8);
    }

    /// The checksum as the program completes it: template sum plus length, folded, inverted.
    fn program_checksum(hop: &NextHop, total_len: u16) -> [u8; 2] {
        let mut sum = hop.ipv4_sum + u32::from(u16::from_ne_bytes(total_len.to_be_bytes()));
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        (!(sum as u16)).to_ne_bytes()
    }

    const LINK: Link = Link {
        ifindex: 7,
        dst_mac: [2, 0, 0, 0, 0, 0xd],
        src_mac: [2, 0, 0, 0, 0, 0x5],
    };

    #[test]
    fn ipv4_template_and_checksum() {
        let underlay = Underlay::V4 {
            src: [10, 0, 0, 1],
            dst: [192, 168, 255, 254],
        };
        let hop = NextHop::new(&LINK, &underlay, 6080);
        assert!(hop.is_valid() && hop.flags & NEXT_HOP_V6 == 0);
        assert_eq!(hop.link(), Some(LINK));
        let h = &hop.header;
        assert_eq!(&h[12..14], &[0x08, 0x00]);
        assert_eq!(
            &h[14..34],
            &[
                0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 192, 168, 255, 254
            ]
        );
        assert_eq!(&h[34..38], &[0, 0, 0x17, 0xc0]);
        assert!(h[38..].iter().all(|b| *b == 0));
        // A header with the length and the program's checksum in place sums to 0xffff.
        for total in [20u16, 78, 1500, 65535] {
            let mut ip = [0u8; 20];
            ip.copy_from_slice(&h[14..34]);
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[10..12].copy_from_slice(&program_checksum(&hop, total));
            let mut sum: u32 = ip
                .chunks_exact(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum();
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            assert_eq!(sum, 0xffff, "total length {total}");
        }
    }

    #[test]
    fn ipv6_template() {
        let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        let hop = NextHop::new(&LINK, &Underlay::V6 { src, dst }, 6080);
        assert!(hop.is_valid() && hop.flags & NEXT_HOP_V6 != 0);
        assert_eq!(hop.ipv4_sum, 0);
        let h = &hop.header;
        assert_eq!(&h[12..14], &[0x86, 0xdd]);
        assert_eq!(&h[14..22], &[0x60, 0, 0, 0, 0, 0, 17, 64]);
        assert_eq!(&h[22..38], &src);
        assert_eq!(&h[38..54], &dst);
        assert_eq!(&h[54..58], &[0, 0, 0x17, 0xc0]);
        assert!(h[58..].iter().all(|b| *b == 0));
        assert_eq!(template::COPY_V4, 40);
        assert_eq!(template::COPY_V6, 64);
    }

    #[test]
    fn invalid_entries_have_no_link() {
        assert!(!NextHop::default().is_valid());
        assert_eq!(NextHop::default().link(), None);
    }
}
