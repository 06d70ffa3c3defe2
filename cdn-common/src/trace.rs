//! Live packet tracing (`cdn-steer trace`): the filter the controller writes and the event the
//! program emits for every packet that passes it.
//!
//! Tracing is off unless `NodeConfig::flags` has [`NODE_TRACE`](crate::maps::NODE_TRACE): the
//! program tests that bit on the configuration it reads anyway, so a node that is not traced
//! pays one compare. When on, the program checks the filter before it writes anything, and
//! sends each matching packet's event through the `TRACE_EVENTS` ring buffer.

/// `TraceFilter::fields`: only flows to `TraceFilter::vip`.
pub const TRACE_MATCH_VIP: u32 = 1 << 0;
/// `TraceFilter::fields`: only flows from `TraceFilter::client`.
pub const TRACE_MATCH_CLIENT: u32 = 1 << 1;
/// `TraceFilter::fields`: only flows to `TraceFilter::port` (the VIP side's port).
pub const TRACE_MATCH_PORT: u32 = 1 << 2;
/// `TraceFilter::fields`: the filter's addresses are IPv6 (otherwise IPv4, in their first four
/// bytes); flows of the other family never match an address.
pub const TRACE_MATCH_V6: u32 = 1 << 3;

/// Bytes of the `TRACE_EVENTS` ring buffer: about 4500 events, a few seconds of a busy node at
/// full speed, which only an unfiltered trace comes near. A full ring loses events; the
/// program counts them in the per-CPU `TRACE_LOST` counter.
pub const TRACE_RING_BYTES: u32 = 512 * 1024;

/// What to trace: the one entry of the `TRACE_FILTER` array. Unset fields match everything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    /// The flow's destination (network order; IPv4 in the first four bytes).
    pub vip: [u8; 16],
    /// The flow's source (network order; IPv4 in the first four bytes).
    pub client: [u8; 16],
    /// `TRACE_MATCH_*` bits: which of the fields must match.
    pub fields: u32,
    /// Bit `r` set: packets whose verdict reason has index `r` are traced; 0: every reason.
    pub reasons: u32,
    /// The flow's destination port (host order), with [`TRACE_MATCH_PORT`].
    pub port: u16,
    pub _pad: [u8; 6],
}

/// `TraceEvent::flags`: the flow is IPv6.
pub const TRACE_EV_V6: u8 = 1 << 0;
/// `TraceEvent::flags`: the flow's addresses and ports were found (a non-IP frame has none).
pub const TRACE_EV_FLOW: u8 = 1 << 1;
/// `TraceEvent::flags`: after the program, the frame carries a steering header (this node
/// encapsulated it, or a steering packet was dropped or passed as it came); `underlay_*` and
/// `steer_*` are set.
pub const TRACE_EV_STEERED: u8 = 1 << 2;
/// `TraceEvent::flags`: the underlay addresses are IPv6.
pub const TRACE_EV_UNDERLAY_V6: u8 = 1 << 3;

/// One packet's decision, as the program saw the frame once it had finished with it. The
/// flow is always the client's (inside the encapsulation, if there is one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// CLOCK_MONOTONIC, nanoseconds.
    pub time_ns: u64,
    /// Flow source and destination, network order (IPv4 in the first four bytes).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Outer addresses of the steering packet, network order, with [`TRACE_EV_STEERED`].
    pub underlay_src: [u8; 16],
    pub underlay_dst: [u8; 16],
    /// Informational reasons counted on top of the verdict: bit i for `Reason::INFO[i]`.
    pub info: u32,
    /// Interface the packet arrived on.
    pub ifindex: u32,
    /// Interface a redirect sent it out of, when the next-hop cache chose it; 0 otherwise
    /// (not redirected, or the kernel's FIB chose).
    pub egress_ifindex: u32,
    /// Flow ports, host order (0 for protocols without ports).
    pub src_port: u16,
    pub dst_port: u16,
    /// The member the packet was encapsulated for (or would have been, for an encapsulation
    /// that failed); `NO_MEMBER` if none.
    pub target: u16,
    /// Hops listed in the steering header (host order; `NO_MEMBER` for empty slots).
    pub steer_hops: [u16; 2],
    /// `cdn_common::counters::Reason` index of the verdict.
    pub reason: u8,
    /// `cdn_common::counters::Action`: the XDP action returned.
    pub action: u8,
    /// IP protocol of the flow.
    pub proto: u8,
    /// TCP flags (TCP only).
    pub tcp_flags: u8,
    /// `TRACE_EV_*` bits.
    pub flags: u8,
    /// Hop budget left in the steering header.
    pub steer_budget: u8,
    pub _pad: [u8; 4],
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<TraceFilter>(), 16 + 16 + 4 + 4 + 2 + 6);
        assert_eq!(
            size_of::<TraceEvent>(),
            8 + 4 * 16 + 3 * 4 + 2 * 2 + 2 + 2 * 2 + 6 + 4
        );
        // The ring buffer hands out 8-byte aligned records.
        assert_eq!(align_of::<TraceEvent>(), 8);
    }
}
