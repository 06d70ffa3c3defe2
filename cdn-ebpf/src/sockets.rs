//! The owner check: does this node hold state for the flow?
//!
//! - TCP SYN without ACK: a new connection; the bucket's current owner takes it (unless draining).
//! - Other TCP: a socket in the established hash (established, request or time-wait) or a SYN
//!   cookie that the listener accepts.
//! - UDP: a *connected* socket for the 4-tuple. An unconnected server socket would match every
//!   flow, so it does not prove ownership; such flows settle on the last hop.
//! - ICMP errors: a socket for the flow they quote.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6, tcphdr,
    },
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
    // Inlined like the paths that call it: a BPF-to-BPF call costs more than the lookup's
    // own work around the helper.
    check_inline(ctx, &Frame::new(ctx), flow, ip, draining)
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

/// Writes the packet's own tuple (source = client, destination = VIP, ports in network
/// order) into `tuple` and returns the size to pass to the lookup helper.
///
/// Only the member of the family is written: the helper reads exactly the size it is given.
/// Zeroing the whole union would cost a byte-wise `memset` call per lookup, and a union
/// *value* with one member set lets the compiler fill the rest with whatever a register
/// holds, a pointer included, which the verifier rejects; hence writes through a pointer.
#[inline(always)]
fn write_tuple(frame: &Frame, flow: &Flow, tuple: &mut MaybeUninit<bpf_sock_tuple>) -> Option<u32> {
    let sport = flow.ports as u16;
    let dport = (flow.ports >> 16) as u16;
    let at = tuple.as_mut_ptr();
    if flow.v6 {
        let t = Tuple6 {
            saddr: frame.read::<[u32; 4]>(flow.src_off)?,
            daddr: frame.read::<[u32; 4]>(flow.dst_off)?,
            sport,
            dport,
        };
        // SAFETY: the union member is at the start of the tuple, which is large enough.
        unsafe { at.cast::<Tuple6>().write(t) };
        // The helper is told which family by the size of the tuple it gets.
        Some(core::mem::size_of::<Tuple6>() as u32)
    } else {
        let t = Tuple4 {
            saddr: frame.read::<u32>(flow.src_off)?,
            daddr: frame.read::<u32>(flow.dst_off)?,
            sport,
            dport,
        };
        // SAFETY: as above.
        unsafe { at.cast::<Tuple4>().write(t) };
        Some(core::mem::size_of::<Tuple4>() as u32)
    }
}

#[inline(always)]
fn tcp_owned(ctx: &XdpContext, frame: &Frame, flow: &Flow, ip: Option<&Ip>) -> Ownership {
    let mut tuple = MaybeUninit::uninit();
    let Some(size) = write_tuple(frame, flow, &mut tuple) else {
        return Ownership::NotOurs;
    };
    // SAFETY: helper call with a tuple on our stack and its exact size; the returned socket is
    // checked for NULL and released on every path below.
    let sk: *mut bpf_sock =
        unsafe { bpf_skc_lookup_tcp(ctx.ctx.cast(), tuple.as_mut_ptr(), size, CURRENT_NETNS, 0) };
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
    let mut tuple = MaybeUninit::uninit();
    let Some(size) = write_tuple(frame, flow, &mut tuple) else {
        return Ownership::NotOurs;
    };
    // SAFETY: as in `tcp_owned`.
    let sk: *mut bpf_sock =
        unsafe { bpf_sk_lookup_udp(ctx.ctx.cast(), tuple.as_mut_ptr(), size, CURRENT_NETNS, 0) };
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
