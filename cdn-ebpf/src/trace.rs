//! The live trace (`cdn-steer trace`): one event per packet that passes the controller's
//! filter, sent through the `TRACE_EVENTS` ring buffer.
//!
//! Cost when off: [`trace`] tests `NODE_TRACE` on the configuration entry (an array lookup the
//! verifier inlines into a few instructions). Everything else lives in [`emit`], a separate BPF
//! function that only a traced node calls, and that the verifier checks only once (see
//! [`traced`]). It checks the reason filter first (no packet
//! access), then re-reads the frame as the packet path left it, and writes an event only for
//! a packet that matches the whole filter.
//!
//! The frame may have been encapsulated (this node sent it on), decapsulated (accepted from a
//! steering packet) or left alone. A frame that carries a steering header is recognised the
//! way the program itself does: UDP to the steering port, from or to this node's underlay
//! address. The client's flow is then read from the inner packet. The walk is bounded: at most
//! one encapsulation, no IPv6 extension headers (a flow behind them shows no ports).

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, programs::XdpContext};
use cdn_common::{
    counters::{Action, Reason},
    maps::{NO_MEMBER, NODE_TRACE, NodeConfig},
    trace::{
        TRACE_EV_FLOW, TRACE_EV_STEERED, TRACE_EV_UNDERLAY_V6, TRACE_EV_V6, TRACE_MATCH_CLIENT,
        TRACE_MATCH_PORT, TRACE_MATCH_V6, TRACE_MATCH_VIP, TraceEvent, TraceFilter,
    },
    wire::{STEER_INNER_V6, STEER_VERSION},
};

use crate::{
    maps::{CONFIG, NEXT_HOPS, TRACE_EVENTS, TRACE_FILTER, TRACE_LOST, TRACE_SCRATCH},
    packet::Frame,
    parse::parse_l2,
    verdict::Verdict,
    wire::{ipv4, ipv6, proto, steer, tcp, udp},
};

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

/// An IP header's addresses (as loaded: network-order bytes), protocol, and where its payload
/// starts.
#[derive(Clone, Copy)]
struct Ip {
    src: [u32; 4],
    dst: [u32; 4],
    proto: u8,
    l4: usize,
}

/// What the frame shows, before the filter decides whether to write an event.
#[derive(Clone, Copy)]
struct Seen {
    flow: Ip,
    ports: [u16; 2],
    tcp_flags: u8,
    flags: u8,
    underlay: [[u32; 4]; 2],
    steer_hops: [u16; 2],
    steer_budget: u8,
}

const NOTHING: Ip = Ip {
    src: [0; 4],
    dst: [0; 4],
    proto: 0,
    l4: 0,
};

/// The IP header at `l3`. One- and two-byte fields are read two bytes at a time (see
/// `Frame::at`); BPF is little-endian, so the first byte is the low half.
#[inline(always)]
fn ip_at(frame: &Frame, l3: usize, v6: bool) -> Option<Ip> {
    if v6 {
        let next_and_hop_limit = frame.read::<u16>(l3 + ipv6::NEXT_HEADER.off())?;
        Some(Ip {
            src: frame.read(l3 + ipv6::SRC.off())?,
            dst: frame.read(l3 + ipv6::DST.off())?,
            proto: next_and_hop_limit as u8,
            l4: l3 + ipv6::LEN,
        })
    } else {
        let ver_ihl = frame.read::<u16>(l3 + ipv4::VER_IHL.off())? as u8;
        let ttl_and_proto = frame.read::<u16>(l3 + ipv4::TTL.off())?;
        let ihl = (ver_ihl & 0x0f) as usize * 4;
        if ihl < ipv4::LEN {
            return None;
        }
        Some(Ip {
            src: [frame.read(l3 + ipv4::SRC.off())?, 0, 0, 0],
            dst: [frame.read(l3 + ipv4::DST.off())?, 0, 0, 0],
            proto: (ttl_and_proto >> 8) as u8,
            l4: l3 + ihl,
        })
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

#[inline(always)]
fn is_underlay(cfg: &NodeConfig, addr: [u32; 4], v6: bool) -> bool {
    if v6 {
        let ours = words(&cfg.underlay_v6);
        ours == addr && ours != [0; 4]
    } else {
        let ours = u32::from_ne_bytes(cfg.underlay_v4);
        ours == addr[0] && ours != 0
    }
}

/// Reads the client's flow from the frame; `None` if the frame is not IP or too short, in
/// which case `seen` keeps what was found so far.
#[inline(always)]
fn look(frame: &Frame, cfg: &NodeConfig, seen: &mut Seen) -> Option<()> {
    let l2 = parse_l2(frame).ok()??;
    let mut v6 = l2.v6;
    let mut ip = ip_at(frame, l2.l3_off, v6)?;
    if ip.proto == proto::UDP
        && frame.get(ip.l4, udp::DST_PORT).map(u16::from_be) == Some(cfg.steer_port)
        && (is_underlay(cfg, ip.src, v6) || is_underlay(cfg, ip.dst, v6))
    {
        let steer_off = ip.l4 + udp::LEN;
        // Version and flags, then budget and hop count, then the hops.
        let [version, flags] = frame
            .read::<u16>(steer_off + steer::VERSION.off())?
            .to_le_bytes();
        let [budget, count] = frame
            .read::<u16>(steer_off + steer::HOP_BUDGET.off())?
            .to_le_bytes();
        let hops = frame.get(steer_off, steer::HOPS)?;
        if version == STEER_VERSION {
            seen.flags |= TRACE_EV_STEERED | if v6 { TRACE_EV_UNDERLAY_V6 } else { 0 };
            seen.underlay = [ip.src, ip.dst];
            seen.steer_budget = budget;
            seen.steer_hops = [
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
            v6 = flags & STEER_INNER_V6 != 0;
            ip = ip_at(frame, steer_off + steer::LEN, v6)?;
        }
    }
    seen.flow = ip;
    seen.flags |= TRACE_EV_FLOW | if v6 { TRACE_EV_V6 } else { 0 };
    if ip.proto == proto::TCP || ip.proto == proto::UDP {
        let ports = frame.get(ip.l4, udp::PORTS)?;
        seen.ports = [
            u16::from_be(ports as u16),
            u16::from_be((ports >> 16) as u16),
        ];
    }
    if ip.proto == proto::TCP {
        // Data offset, then the flags: the flags are the high half.
        seen.tcp_flags = (frame.read::<u16>(ip.l4 + tcp::DATA_OFF.off())? >> 8) as u8;
    }
    Some(())
}

/// Whether the filter wants a packet that shows `seen`.
#[inline(always)]
fn wanted(f: &TraceFilter, seen: &Seen) -> bool {
    let by_flow = TRACE_MATCH_VIP | TRACE_MATCH_CLIENT | TRACE_MATCH_PORT;
    if f.fields & by_flow != 0 && seen.flags & TRACE_EV_FLOW == 0 {
        return false;
    }
    let by_addr = TRACE_MATCH_VIP | TRACE_MATCH_CLIENT;
    let v6 = seen.flags & TRACE_EV_V6 != 0;
    if f.fields & by_addr != 0 && (f.fields & TRACE_MATCH_V6 != 0) != v6 {
        return false;
    }
    if f.fields & TRACE_MATCH_VIP != 0 && words(&f.vip) != seen.flow.dst {
        return false;
    }
    if f.fields & TRACE_MATCH_CLIENT != 0 && words(&f.client) != seen.flow.src {
        return false;
    }
    !(f.fields & TRACE_MATCH_PORT != 0 && f.port != seen.ports[1])
}

/// Writes the event of a traced packet if the filter wants it. A separate BPF function: its
/// stack frame and code stay off the path of a node that is not traced.
#[inline(never)]
fn emit(ctx: &XdpContext, verdict: Verdict) -> u32 {
    let Some(f) = TRACE_FILTER.get(0) else {
        return 0;
    };
    // Cheapest first: the reason needs no look at the packet. Reasons fit in 32 bits.
    if f.reasons != 0 && f.reasons & (1 << (verdict.reason() & 31)) == 0 {
        return 0;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return 0;
    };
    let mut seen = Seen {
        flow: NOTHING,
        ports: [0; 2],
        tcp_flags: 0,
        flags: 0,
        underlay: [[0; 4]; 2],
        steer_hops: [NO_MEMBER; 2],
        steer_budget: 0,
    };
    // A frame that cannot be read to the end still gets an event with what was found.
    let _ = look(&Frame::new(ctx), cfg, &mut seen);
    if !wanted(f, &seen) {
        return 0;
    }
    let target = verdict.target();
    let fib_lookup = verdict.info() & 1 << Reason::FibLookup as u32 != 0;
    let egress_ifindex = if verdict.action() == Action::Redirect as u32 && !fib_lookup {
        NEXT_HOPS.get(target as u32).map_or(0, |nh| nh.ifindex)
    } else {
        0
    };
    let event = TraceEvent {
        // SAFETY: helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
        src: bytes(seen.flow.src),
        dst: bytes(seen.flow.dst),
        underlay_src: bytes(seen.underlay[0]),
        underlay_dst: bytes(seen.underlay[1]),
        info: verdict.info(),
        ifindex: ctx.ingress_ifindex() as u32,
        egress_ifindex,
        src_port: seen.ports[0],
        dst_port: seen.ports[1],
        target,
        steer_hops: seen.steer_hops,
        reason: verdict.reason() as u8,
        action: verdict.action() as u8,
        proto: seen.flow.proto,
        tcp_flags: seen.tcp_flags,
        flags: seen.flags,
        steer_budget: seen.steer_budget,
        _pad: [0; 4],
    };
    // A full ring means the reader falls behind: count what it misses.
    if TRACE_EVENTS.output::<TraceEvent>(&event, 0).is_err()
        && let Some(lost) = TRACE_LOST.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, and XDP runs with preemption disabled, so nobody else
        // writes it.
        unsafe { *lost += 1 };
    }
    0
}
