//! The live trace (`cdn-steer trace`): one event per packet that passes the controller's
//! filter, sent through the `TRACE_EVENTS` ring buffer.
//!
//! Cost when off: [`trace`] tests `NODE_TRACE` on the configuration entry (an array lookup the
//! verifier inlines into a few instructions). Everything else lives in [`emit`], a separate BPF
//! function that only a traced node calls, and that the verifier checks only once (see
//! [`traced`]). The reason filter is checked first, inline (no packet access); `emit` then
//! re-reads the frame as the packet path left it, and writes an event only for a packet that
//! matches the whole filter.
//!
//! The frame may have been encapsulated (this node sent it on), decapsulated (accepted from a
//! steering packet) or left alone. A frame that carries a steering header is recognised the
//! way the program itself does: UDP to the steering port, from or to this node's underlay
//! address. The client's flow is then read from the inner packet. The walk is bounded: at most
//! one encapsulation, no IPv6 extension headers (a flow behind them shows no ports).

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns, macros::map, maps::PerCpuArray, programs::XdpContext,
};
use cdn_common::{
    counters::{Action, Reason},
    maps::{NO_MEMBER, NODE_TRACE, NodeConfig},
    trace::{
        TRACE_EV_FLOW, TRACE_EV_STEERED, TRACE_EV_UNDERLAY_V6, TRACE_EV_V6, TRACE_MATCH_CLIENT,
        TRACE_MATCH_PORT, TRACE_MATCH_V6, TRACE_MATCH_VIP, TraceEvent, TraceFilter,
    },
    wire::{
        STEER_INNER_V6, STEER_MAC_LEN, STEER_VERSION, STEER_VERSION_AUTH, STEER_VERSION_SEARCH,
        STEER_VERSION_SEARCH_AUTH,
    },
};

use crate::{
    maps::{CONFIG, NEXT_HOPS, TRACE_EVENTS, TRACE_FILTER, TRACE_LOST},
    packet::Frame,
    parse::{dst_addr_off, parse_l2, src_addr_off},
    verdict::Verdict,
    wire::{ipv4, ipv6, proto, steer, tcp, udp},
};

/// Where a traced packet's verdict makes a round trip before the trace looks at it: a value
/// loaded from a map is unknown to the verifier, so [`emit`] is verified once for every
/// verdict instead of once per path (see [`traced`]). Not pinned: nothing outlives a run.
#[map(name = "TRACE_SCRATCH")]
static TRACE_SCRATCH: PerCpuArray<Verdict> = PerCpuArray::with_max_entries(1, 0);

/// Reports the packet's verdict if a trace is running, and returns it for counting. Call after
/// the packet path, before counting: the frame is then as the packet leaves.
#[inline(always)]
pub fn trace(ctx: &XdpContext, verdict: Verdict) -> Verdict {
    match CONFIG.get(0) {
        Some(cfg) if cfg.flags & NODE_TRACE != 0 => traced(ctx, verdict),
        _ => verdict,
    }
}

/// Every path reaches the trace with its own constant verdict, and the verifier checks a
/// called function again for every state it is called in: [`emit`] would be verified once
/// per path (it doubled the program's verified instructions, close to the kernel's limit).
/// Loaded back from map memory, the verdict is a value the verifier does not know, so the
/// states of all paths are alike and `emit` (and the counting after it) is verified once.
#[inline(always)]
fn traced(ctx: &XdpContext, verdict: Verdict) -> Verdict {
    // Cheapest first, before anything else: the reason filter needs no look at the packet.
    // Reasons fit in 32 bits.
    let Some(f) = TRACE_FILTER.get(0) else {
        return verdict;
    };
    if f.reasons != 0 && f.reasons & (1 << (verdict.reason() & 31)) == 0 {
        return verdict;
    }
    let Some(slot) = TRACE_SCRATCH.get_ptr_mut(0) else {
        return verdict;
    };
    // SAFETY: per-CPU slot of our map, and XDP runs with preemption disabled, so nobody else
    // touches it. Volatile, so the compiler keeps the round trip through memory.
    let verdict = unsafe {
        core::ptr::write_volatile(slot, verdict);
        core::ptr::read_volatile(slot)
    };
    emit(ctx, verdict);
    verdict
}

/// `verdict`, loaded back from map memory: a value the verifier does not know (see
/// [`traced`]). The search step (`search::search`) is called with one, so that it is verified
/// once rather than once per path that asks for it. It shares the trace's slot: it is done
/// with it before the trace begins. `None` only if the map lookup fails, which it cannot.
#[inline(always)]
pub fn opaque(verdict: Verdict) -> Option<Verdict> {
    let slot = TRACE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: as in `traced`.
    Some(unsafe {
        core::ptr::write_volatile(slot, verdict);
        core::ptr::read_volatile(slot)
    })
}

/// Where the client's packet sits in the frame: offsets only, so that a packet the filter
/// rejects costs no copying. Addresses are read from the frame where they are needed.
#[derive(Clone, Copy)]
struct Found {
    /// The client's IP header, its family, protocol, and the transport header.
    l3: usize,
    v6: bool,
    proto: u8,
    l4: usize,
    /// The outer IP header of a steering packet, and its family; `steer` is the steering
    /// header's offset, 0 if the frame carries none.
    outer_l3: usize,
    outer_v6: bool,
    steer: usize,
}

/// Protocol and transport offset of the IP header at `l3`. One-byte fields are read two bytes
/// at a time (see `Frame::at`); BPF is little-endian, so the first byte is the low half.
#[inline(always)]
fn ip_at(frame: &Frame, l3: usize, v6: bool) -> Option<(u8, usize)> {
    if v6 {
        let next_and_hop_limit = frame.read::<u16>(l3 + ipv6::NEXT_HEADER.off())?;
        frame.read::<[u32; 4]>(l3 + ipv6::DST.off())?;
        Some((next_and_hop_limit as u8, l3 + ipv6::LEN))
    } else {
        let ver_ihl = frame.read::<u16>(l3 + ipv4::VER_IHL.off())? as u8;
        let ttl_and_proto = frame.read::<u16>(l3 + ipv4::TTL.off())?;
        frame.read::<u32>(l3 + ipv4::DST.off())?;
        let ihl = (ver_ihl & 0x0f) as usize * 4;
        if ihl < ipv4::LEN {
            return None;
        }
        Some(((ttl_and_proto >> 8) as u8, l3 + ihl))
    }
}

/// The address at `off` as four words (IPv4: the first word, the others zero). Only called
/// for headers `find` saw whole; a missing address reads as zero, never as an `Option`, whose
/// undefined payload the compiler may move into a register the verifier then rejects.
#[inline(always)]
fn addr_at(frame: &Frame, off: usize, v6: bool) -> [u32; 4] {
    if v6 {
        frame.read::<[u32; 4]>(off).unwrap_or([0; 4])
    } else {
        [frame.read::<u32>(off).unwrap_or(0), 0, 0, 0]
    }
}

/// 16 address bytes of a map value as four words (the fields sit at 4-byte aligned offsets).
#[inline(always)]
fn words(bytes: &[u8; 16]) -> [u32; 4] {
    // SAFETY: reads 16 bytes that `bytes` owns; see above on alignment.
    unsafe { core::ptr::read(bytes.as_ptr().cast::<[u32; 4]>()) }
}

#[inline(always)]
fn bytes(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size and no invalid bit patterns.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// Whether the IP header at `l3` is from or to this node's underlay address.
#[inline(always)]
fn touches_underlay(frame: &Frame, cfg: &NodeConfig, l3: usize, v6: bool) -> bool {
    let (src, dst) = (src_addr_off(l3, v6), dst_addr_off(l3, v6));
    if v6 {
        let ours = words(&cfg.underlay_v6);
        ours != [0; 4]
            && (frame.read::<[u32; 4]>(src) == Some(ours)
                || frame.read::<[u32; 4]>(dst) == Some(ours))
    } else {
        let ours = u32::from_ne_bytes(cfg.underlay_v4);
        ours != 0 && (frame.read::<u32>(src) == Some(ours) || frame.read::<u32>(dst) == Some(ours))
    }
}

/// Finds the client's packet in the frame; `None` if the frame is not IP or is cut short.
#[inline(always)]
fn find(frame: &Frame, cfg: &NodeConfig) -> Option<Found> {
    let l2 = parse_l2(frame).ok()??;
    let (proto, l4) = ip_at(frame, l2.l3_off, l2.v6)?;
    let plain = Found {
        l3: l2.l3_off,
        v6: l2.v6,
        proto,
        l4,
        outer_l3: 0,
        outer_v6: false,
        steer: 0,
    };
    if proto != proto::UDP
        || frame.get(l4, udp::DST_PORT).map(u16::from_be) != Some(cfg.steer_port)
        || !touches_underlay(frame, cfg, l2.l3_off, l2.v6)
    {
        return Some(plain);
    }
    let steer = l4 + udp::LEN;
    let [version, flags] = frame
        .read::<u16>(steer + steer::VERSION.off())?
        .to_le_bytes();
    let l3 = match version {
        STEER_VERSION | STEER_VERSION_SEARCH => steer + steer::LEN,
        STEER_VERSION_AUTH | STEER_VERSION_SEARCH_AUTH => steer + steer::LEN + STEER_MAC_LEN,
        _ => return Some(plain),
    };
    let v6 = flags & STEER_INNER_V6 != 0;
    let (proto, l4) = ip_at(frame, l3, v6)?;
    Some(Found {
        l3,
        v6,
        proto,
        l4,
        outer_l3: l2.l3_off,
        outer_v6: l2.v6,
        steer,
    })
}

/// The flow's ports (source, destination; host order), zero for protocols without ports.
#[inline(always)]
fn ports(frame: &Frame, at: &Found) -> [u16; 2] {
    if at.proto != proto::TCP && at.proto != proto::UDP {
        return [0; 2];
    }
    let ports = frame.get(at.l4, udp::PORTS).unwrap_or(0);
    [
        u16::from_be(ports as u16),
        u16::from_be((ports >> 16) as u16),
    ]
}

/// Whether the filter wants a packet found `at` (`None`: no flow in the frame).
#[inline(always)]
fn wanted(f: &TraceFilter, frame: &Frame, at: Option<Found>) -> bool {
    if f.fields & (TRACE_MATCH_VIP | TRACE_MATCH_CLIENT | TRACE_MATCH_PORT) == 0 {
        return true;
    }
    let Some(at) = at else {
        return false;
    };
    if f.fields & (TRACE_MATCH_VIP | TRACE_MATCH_CLIENT) != 0
        && (f.fields & TRACE_MATCH_V6 != 0) != at.v6
    {
        return false;
    }
    if f.fields & TRACE_MATCH_VIP != 0
        && addr_at(frame, dst_addr_off(at.l3, at.v6), at.v6) != words(&f.vip)
    {
        return false;
    }
    if f.fields & TRACE_MATCH_CLIENT != 0
        && addr_at(frame, src_addr_off(at.l3, at.v6), at.v6) != words(&f.client)
    {
        return false;
    }
    !(f.fields & TRACE_MATCH_PORT != 0 && ports(frame, &at)[1] != f.port)
}

/// Writes the event of a traced packet if the filter wants it. A separate BPF function: its
/// stack frame and code stay off the path of a node that is not traced.
#[inline(never)]
fn emit(ctx: &XdpContext, verdict: Verdict) -> u32 {
    // The reasons were checked by the caller.
    let Some(f) = TRACE_FILTER.get(0) else {
        return 0;
    };
    let Some(cfg) = CONFIG.get(0) else {
        return 0;
    };
    let frame = Frame::new(ctx);
    let at = find(&frame, cfg);
    if !wanted(f, &frame, at) {
        return 0;
    }
    // A full ring means the reader falls behind: count what it misses.
    let Some(mut entry) = TRACE_EVENTS.reserve::<TraceEvent>(0) else {
        if let Some(lost) = TRACE_LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, and XDP runs with preemption disabled, so nobody else
            // writes it.
            unsafe { *lost += 1 };
        }
        return 0;
    };
    // Written in place: built on this function's stack, the event took most of a frame that
    // sits on top of the entry point's, which the search step (`search`) needs room beside.
    let event = entry.write(TraceEvent {
        // SAFETY: helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
        info: verdict.info(),
        ifindex: ctx.ingress_ifindex() as u32,
        target: verdict.target(),
        steer_hops: [NO_MEMBER; 2],
        reason: verdict.reason() as u8,
        action: verdict.action() as u8,
        ..TraceEvent::default()
    });
    let fib_lookup = verdict.info() & 1 << Reason::FibLookup.info_index() != 0;
    if verdict.action() == Action::Redirect as u32 && !fib_lookup {
        event.egress_ifindex = NEXT_HOPS
            .get(event.target as u32)
            .map_or(0, |nh| nh.ifindex);
    }
    if let Some(at) = at {
        describe(&frame, &at, event);
    }
    entry.submit(0);
    0
}

/// Fills in the flow and the steering header of a packet that passed the filter.
#[inline(always)]
fn describe(frame: &Frame, at: &Found, e: &mut TraceEvent) {
    e.src = bytes(addr_at(frame, src_addr_off(at.l3, at.v6), at.v6));
    e.dst = bytes(addr_at(frame, dst_addr_off(at.l3, at.v6), at.v6));
    e.proto = at.proto;
    e.flags = TRACE_EV_FLOW | if at.v6 { TRACE_EV_V6 } else { 0 };
    [e.src_port, e.dst_port] = ports(frame, at);
    if at.proto == proto::TCP {
        // Data offset, then the flags: the flags are the high half.
        e.tcp_flags = (frame.read::<u16>(at.l4 + tcp::DATA_OFF.off()).unwrap_or(0) >> 8) as u8;
    }
    if at.steer == 0 {
        return;
    }
    let (l3, v6) = (at.outer_l3, at.outer_v6);
    // Version, flags, budget and count: one read.
    let [version, _, budget, count] = frame
        .read::<u32>(at.steer + steer::VERSION.off())
        .unwrap_or(0)
        .to_le_bytes();
    let hops = frame.get(at.steer, steer::HOPS).unwrap_or([0; 2]);
    // A search header's count is a set of PoPs, and its one hop the member that started it.
    let count = if version >= STEER_VERSION_SEARCH {
        1
    } else {
        count
    };
    e.flags |= TRACE_EV_STEERED | if v6 { TRACE_EV_UNDERLAY_V6 } else { 0 };
    e.underlay_src = bytes(addr_at(frame, src_addr_off(l3, v6), v6));
    e.underlay_dst = bytes(addr_at(frame, dst_addr_off(l3, v6), v6));
    e.steer_budget = budget;
    e.steer_hops = [
        if count >= 1 {
            u16::from_be(hops[0])
        } else {
            NO_MEMBER
        },
        if count >= 2 {
            u16::from_be(hops[1])
        } else {
            NO_MEMBER
        },
    ];
}
