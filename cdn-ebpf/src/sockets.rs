//! The owner check: does this node hold state for the flow?
//!
//! - TCP SYN without ACK: a new connection; the bucket's current owner takes it (unless draining).
//! - Other TCP: a socket in the established hash (established, request or time-wait) or a SYN
//!   cookie that the listener accepts.
//! - UDP: a *connected* socket for the 4-tuple. An unconnected server socket would match every
//!   flow, so it does not prove ownership; such flows settle on the last hop.
//! - ICMP errors: a socket for the flow they quote.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, tcphdr},
    helpers::generated::{
        bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
    },
    programs::XdpContext,
};

use crate::{
    packet::Frame,
    parse::{Flow, Ip, Kind},
    wire::{ipv4, ipv6, proto, tcp},
};

/// Kernel socket states (include/net/tcp_states.h).
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;

/// Look sockets up in the namespace of the receiving device.
const CURRENT_NETNS: u64 = u64::MAX;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// This node holds the flow (or takes the new connection).
    Ours,
    /// No state here: try the next hop.
    NotOurs,
    /// A new connection that this draining node declines.
    Draining,
}

/// Decides whether this node owns `flow`. `ip` is the header of the packet itself (needed for
/// the SYN cookie check), `draining` is this node's drain state.
#[inline(always)]
pub fn check(ctx: &XdpContext, flow: &Flow, ip: &Ip, draining: bool) -> Ownership {
    // A separate BPF function: the socket tuple lives in its own stack frame.
    match check_fn(ctx, flow, ip, draining) {
        0 => Ownership::Ours,
        1 => Ownership::NotOurs,
        _ => Ownership::Draining,
    }
}

#[inline(never)]
fn check_fn(ctx: &XdpContext, flow: &Flow, ip: &Ip, draining: bool) -> u32 {
    match check_inline(ctx, &Frame::new(ctx), flow, ip, draining) {
        Ownership::Ours => 0,
        Ownership::NotOurs => 1,
        Ownership::Draining => 2,
    }
}

#[inline(always)]
fn check_inline(
    ctx: &XdpContext,
    frame: &Frame,
    flow: &Flow,
    ip: &Ip,
    draining: bool,
) -> Ownership {
    match flow.kind {
        Kind::Tcp => {
            if flow.tcp_flags & (tcp::SYN | tcp::ACK) == tcp::SYN {
                return if draining {
                    Ownership::Draining
                } else {
                    Ownership::Ours
                };
            }
            tcp_owned(ctx, frame, flow, Some(ip))
        }
        Kind::Udp => udp_owned(ctx, frame, flow),
        Kind::IcmpError => {
            if flow.proto == proto::TCP {
                tcp_owned(ctx, frame, flow, None)
            } else {
                udp_owned(ctx, frame, flow)
            }
        }
        // Never steered; the caller accepts these before asking.
        Kind::IcmpLocal => Ownership::Ours,
    }
}

/// The packet's own tuple (source = client, destination = VIP, ports in network order).
#[inline(always)]
fn tuple_of(frame: &Frame, flow: &Flow) -> Option<(bpf_sock_tuple, u32)> {
    // SAFETY: bpf_sock_tuple is a plain C union of integers; all-zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let sport = flow.ports as u16;
    let dport = (flow.ports >> 16) as u16;
    if flow.v6 {
        let saddr = frame.read::<[u32; 4]>(flow.src_off)?;
        let daddr = frame.read::<[u32; 4]>(flow.dst_off)?;
        // SAFETY: writing plain integers into the union member for this family.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        t.saddr = saddr;
        t.daddr = daddr;
        t.sport = sport;
        t.dport = dport;
        // The helper is told which family by the size of the tuple it gets.
        let size = core::mem::size_of_val(t) as u32;
        Some((tuple, size))
    } else {
        let saddr = frame.read::<u32>(flow.src_off)?;
        let daddr = frame.read::<u32>(flow.dst_off)?;
        // SAFETY: as above.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        t.saddr = saddr;
        t.daddr = daddr;
        t.sport = sport;
        t.dport = dport;
        // The helper is told which family by the size of the tuple it gets.
        let size = core::mem::size_of_val(t) as u32;
        Some((tuple, size))
    }
}

#[inline(always)]
fn tcp_owned(ctx: &XdpContext, frame: &Frame, flow: &Flow, ip: Option<&Ip>) -> Ownership {
    let Some((mut tuple, size)) = tuple_of(frame, flow) else {
        return Ownership::NotOurs;
    };
    // SAFETY: helper call with a tuple on our stack and its exact size; the returned socket is
    // checked for NULL and released on every path below.
    let sk: *mut bpf_sock =
        unsafe { bpf_skc_lookup_tcp(ctx.ctx.cast(), &mut tuple, size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return Ownership::NotOurs;
    }
    // SAFETY: `sk` is a valid socket reference until released.
    let state = unsafe { (*sk).state };
    let owned = if state != TCP_LISTEN {
        true
    } else {
        // Only a listener matched: the flow is ours if its ACK carries a SYN cookie we issued.
        match ip {
            Some(ip) => syncookie_ok(sk, frame, ip),
            None => false,
        }
    };
    // SAFETY: releases the reference taken by the lookup.
    unsafe { bpf_sk_release(sk.cast()) };
    if owned {
        Ownership::Ours
    } else {
        Ownership::NotOurs
    }
}

#[inline(always)]
fn syncookie_ok(sk: *mut bpf_sock, frame: &Frame, ip: &Ip) -> bool {
    // The helper needs the fixed TCP header (20 bytes; aya's `tcphdr` binding is opaque).
    let Some(th) = frame.at::<[u8; tcp::LEN]>(ip.l4_off) else {
        return false;
    };
    // The helper reads the fixed IP header only; check exactly the length we pass.
    let iph = if ip.v6 {
        frame
            .at::<[u8; ipv6::LEN]>(ip.l3_off)
            .map(|p| (p.cast::<u8>(), ipv6::LEN as u32))
    } else {
        frame
            .at::<[u8; ipv4::LEN]>(ip.l3_off)
            .map(|p| (p.cast::<u8>(), ipv4::LEN as u32))
    };
    let Some((iph, iph_len)) = iph else {
        return false;
    };
    // SAFETY: both pointers were bounds-checked against the packet for the lengths passed.
    let rc = unsafe {
        bpf_tcp_check_syncookie(
            sk.cast(),
            iph.cast(),
            iph_len,
            th.cast::<tcphdr>(),
            tcp::LEN as u32,
        )
    };
    rc == 0
}

#[inline(always)]
fn udp_owned(ctx: &XdpContext, frame: &Frame, flow: &Flow) -> Ownership {
    let Some((mut tuple, size)) = tuple_of(frame, flow) else {
        return Ownership::NotOurs;
    };
    // SAFETY: as in `tcp_owned`.
    let sk: *mut bpf_sock =
        unsafe { bpf_sk_lookup_udp(ctx.ctx.cast(), &mut tuple, size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return Ownership::NotOurs;
    }
    // SAFETY: `sk` is a valid full socket until released. A connected UDP socket is in state
    // ESTABLISHED and has a remote port.
    let connected = unsafe { (*sk).state == TCP_ESTABLISHED && (*sk).dst_port != 0 };
    // SAFETY: releases the reference taken by the lookup.
    unsafe { bpf_sk_release(sk.cast()) };
    if connected {
        Ownership::Ours
    } else {
        Ownership::NotOurs
    }
}
