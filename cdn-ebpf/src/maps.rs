//! The program's maps. Layouts and names come from `cdn_common::maps`; the controller resizes
//! `TABLE` at load time and pins every map so that a restarted controller finds them again.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use cdn_common::{
    counters::COUNTER_SLOTS,
    maps::{
        Bucket, CLAIM_RING_BYTES, FlowKey, LEARNED_BUCKET_WORDS, Learned, MAX_LEARNED, MAX_MEMBERS,
        MAX_SERVICES, MAX_UNDERLAY_IFACES, Member, MemberAddr, MemberStats, NextHop, NodeConfig,
        QuicServer, Service,
    },
    quic_lb::QUIC_SERVER_IDS,
    trace::{TRACE_RING_BYTES, TraceFilter},
};

/// This node's configuration: one entry.
#[map(name = "NODE_CONFIG")]
pub static CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// IPv4 VIP prefixes -> service.
#[map(name = "SERVICES_V4")]
pub static SERVICES_V4: LpmTrie<[u8; 4], Service> = LpmTrie::with_max_entries(MAX_SERVICES, 0);

/// IPv6 VIP prefixes -> service.
#[map(name = "SERVICES_V6")]
pub static SERVICES_V6: LpmTrie<[u8; 16], Service> = LpmTrie::with_max_entries(MAX_SERVICES, 0);

/// Every service's two table halves, back to back. Sized by the controller at load time.
#[map(name = "TABLE")]
pub static TABLE: Array<Bucket> = Array::with_max_entries(1, 0);

/// Member id -> underlay address.
#[map(name = "MEMBERS")]
pub static MEMBERS: Array<Member> = Array::with_max_entries(MAX_MEMBERS, 0);

/// QUIC-LB server ID -> member (`cdn_common::quic_lb`): QUIC packets whose connection ID
/// carries a server ID go straight to its member.
#[map(name = "QUIC_SERVERS")]
pub static QUIC_SERVERS: Array<QuicServer> = Array::with_max_entries(QUIC_SERVER_IDS, 0);

/// Underlay address -> member id: steering packets from any other source are dropped.
#[map(name = "MEMBER_ADDRS")]
pub static MEMBER_ADDRS: HashMap<MemberAddr, u16> = HashMap::with_max_entries(MAX_MEMBERS, 0);

/// Member id -> next hop: egress interface and precomputed outer headers (see
/// `cdn_common::maps::NextHop`).
#[map(name = "NEXT_HOPS")]
pub static NEXT_HOPS: Array<NextHop> = Array::with_max_entries(MAX_MEMBERS, 0);

/// Interfaces steering packets are accepted on (ifindex -> 1); read only while
/// `NODE_UNDERLAY_IFACES` is set.
#[map(name = "UNDERLAY_IFACES")]
pub static UNDERLAY_IFACES: HashMap<u32, u8> = HashMap::with_max_entries(MAX_UNDERLAY_IFACES, 0);

/// Egress interfaces for XDP_REDIRECT, keyed by ifindex.
#[map(name = "DEVICES")]
pub static DEVICES: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// One counter per (reason, action) pair, per CPU: see `cdn_common::counters`. Named
/// `cdn_common::maps::MAP_COUNTERS`.
#[map(name = "VERDICT_COUNTS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Packets and bytes sent to each member, per CPU.
#[map(name = "MEMBER_STATS")]
pub static MEMBER_STATS: PerCpuArray<MemberStats> = PerCpuArray::with_max_entries(MAX_MEMBERS, 0);

/// What the live trace reports (`cdn_common::trace`); read only while `NODE_TRACE` is set.
#[map(name = "TRACE_FILTER")]
pub static TRACE_FILTER: Array<TraceFilter> = Array::with_max_entries(1, 0);

/// The live trace's events, read by the controller.
#[map(name = "TRACE_EVENTS")]
pub static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// Trace events lost because the ring was full, per CPU: the controller reports them.
#[map(name = "TRACE_LOST")]
pub static TRACE_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Flows a claim taught this node -> their member (`learned`), written by the controller.
/// Named `cdn_common::maps::MAP_LEARNED`.
#[map(name = "LEARNED")]
pub static LEARNED: LruHashMap<FlowKey, Learned> = LruHashMap::with_max_entries(MAX_LEARNED, 0);

/// One bit per bucket index: set while `LEARNED` holds a flow of that bucket, so that other
/// packets skip the hash lookup. Named `cdn_common::maps::MAP_LEARNED_BUCKETS`.
#[map(name = "LEARNED_BUCKETS")]
pub static LEARNED_BUCKETS: Array<u32> = Array::with_max_entries(LEARNED_BUCKET_WORDS, 0);

/// Searches this node accepted, for the controller to claim. Named
/// `cdn_common::maps::MAP_CLAIM_EVENTS`.
#[map(name = "CLAIM_EVENTS")]
pub static CLAIM_EVENTS: RingBuf = RingBuf::with_byte_size(CLAIM_RING_BYTES, 0);

/// Bumps one slot of `COUNTERS`; only `verdict::finish` calls it.
#[inline(always)]
pub fn count_slot(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and XDP runs with preemption disabled, so nobody else writes it.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count_member(member: u16, bytes: u64) {
    if let Some(slot) = MEMBER_STATS.get_ptr_mut(member as u32) {
        // SAFETY: as in `count_slot`.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes;
        }
    }
}
