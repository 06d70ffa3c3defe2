//! BPF map layouts. Byte order is stated on every field: "network" fields hold the bytes exactly
//! as they appear on the wire, everything else is in host order.

/// Marks an empty hop slot in a [`Bucket`] and "no member" elsewhere.
pub const NO_MEMBER: u16 = u16::MAX;

/// Member ids are indices into the member array: `0..MAX_MEMBERS`.
pub const MAX_MEMBERS: u32 = 1024;

/// Services (VIP prefixes) per address family.
pub const MAX_SERVICES: u32 = 64;

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
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_SERVICES_V4: &str = "SERVICES_V4";
pub const MAP_SERVICES_V6: &str = "SERVICES_V6";
pub const MAP_TABLE: &str = "TABLE";
pub const MAP_MEMBERS: &str = "MEMBERS";
pub const MAP_MEMBER_ADDRS: &str = "MEMBER_ADDRS";
pub const MAP_NEXT_HOPS: &str = "NEXT_HOPS";
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

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "cdn_steer";

/// A trivial XDP_PASS program in the same object, for benchmarks only.
pub const BASELINE_PROGRAM_NAME: &str = "baseline_pass";
/// `cdn_steer`'s packet path wrapped so that it restores the frame after each run (benchmarks).
pub const BENCH_PROGRAM_NAME: &str = "bench_steer";
/// The same wrapper around nothing (benchmarks).
pub const BENCH_BASELINE_PROGRAM_NAME: &str = "bench_baseline";

/// `NodeConfig::flags`: this node is draining: it takes no new TCP connections as owner.
pub const NODE_DRAINING: u32 = 1 << 0;
/// `NodeConfig::flags`: the controller has written a complete configuration. Until then the
/// program passes every packet to the kernel untouched.
pub const NODE_READY: u32 = 1 << 1;
/// `NodeConfig::flags`: a live trace is running: packets that pass the `TRACE_FILTER` are
/// reported through `TRACE_EVENTS` (see `cdn_common::trace`). Set only while `cdn-steer trace`
/// is connected; a starting controller always writes it cleared.
pub const NODE_TRACE: u32 = 1 << 2;

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
    pub _pad: [u8; 3],
    /// Largest frame (bytes, Ethernet header included) the underlay carries; 0 = no limit.
    pub max_frame: u32,
    pub _pad2: u32,
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

/// Cached next hop towards a member, filled by the controller from the kernel's routing and
/// neighbour tables. Valid while `expires_ns` (CLOCK_MONOTONIC; the program compares it with
/// the coarse variant of that clock) lies in the future; a missing or stale entry makes the
/// program ask `bpf_fib_lookup` instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ifindex: u32,
    pub expires_ns: u64,
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
            16 + 4 + 16 + 2 + 2 + 4 + 1 + 3 + 4 + 4
        );
        assert_eq!(size_of::<Service>(), 4 + 4 + 4 + 16 + 16 + 4);
        assert_eq!(size_of::<Bucket>(), 8);
        assert_eq!(size_of::<Member>(), 20);
        assert_eq!(size_of::<NextHop>(), 24);
    }
}
