//! Encapsulation towards a member, decapsulation for the local stack, and transmission.
//!
//! Next hop: the controller keeps a per-member entry (MACs, egress interface) fresh from the
//! kernel's routing and neighbour tables, because `bpf_fib_lookup` costs more than the rest of
//! the forwarding path. Only a missing or stale entry falls back to `bpf_fib_lookup`; if that
//! cannot resolve the neighbour either, the already-encapsulated packet goes to the kernel,
//! which routes it and resolves the neighbour itself. A missing neighbour therefore delays a
//! packet at worst; it never drops it and never lets the client's connection be reset.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{
        bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
    programs::XdpContext,
};
use cdn_common::{
    counters::Counter,
    maps::{FAMILY_V4, FAMILY_V6, NO_MEMBER, NodeConfig},
    wire::{
        ENCAP_LEN_V4, ENCAP_LEN_V6, ETH_HEADER_LEN, IPV4_HEADER_LEN, IPV6_HEADER_LEN, OUTER_TTL,
        STEER_INNER_V6, STEER_VERSION, UDP_HEADER_LEN,
    },
};

use crate::{
    maps::{DEVICES, MEMBERS, NEXT_HOPS, count, count_member},
    packet::Frame,
    parse::{ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP},
    steer::{Packed, packed},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// What to wrap and where to send it.
#[derive(Clone, Copy)]
pub struct Encap {
    /// Offset of the inner IP packet in the current frame.
    pub inner_off: usize,
    /// Length of the inner IP packet (from its header).
    pub inner_len: usize,
    pub inner_v6: bool,
    /// Member to send to.
    pub target: u16,
    /// Hops the receiver may pass the packet on to, in order; `NO_MEMBER` marks an empty slot.
    pub remaining: [u16; 2],
    pub budget: u8,
    /// Flow entropy: outer UDP source port (host order), and IPv6 flow label.
    pub entropy: u16,
}

impl Encap {
    pub const EMPTY: Self = Self {
        inner_off: 0,
        inner_len: 0,
        inner_v6: false,
        target: NO_MEMBER,
        remaining: [NO_MEMBER; 2],
        budget: 0,
        entropy: 0,
    };
}

/// Stores `value` at `base + offset` with full-width stores (see `Frame::read` on alignment).
#[inline(always)]
unsafe fn put<T>(base: *mut u8, offset: usize, value: T) {
    // SAFETY: callers pass offsets inside a region they bounds-checked as a whole.
    unsafe { core::ptr::write(base.add(offset).cast::<T>(), value) }
}

/// 16 address bytes of a map value as four words. The fields this is used on sit at 4-byte
/// aligned offsets of 8-byte aligned map values.
#[inline(always)]
fn words(bytes: &[u8; 16]) -> [u32; 4] {
    // SAFETY: reads 16 bytes that `bytes` owns; see above on alignment.
    unsafe { core::ptr::read(bytes.as_ptr().cast::<[u32; 4]>()) }
}

/// A MAC address (6 bytes of a map value or helper result) as three half-words.
#[inline(always)]
fn mac(bytes: &[u8; 6]) -> [u16; 3] {
    // SAFETY: reads 6 bytes that `bytes` owns; the fields used sit at even offsets.
    unsafe { core::ptr::read(bytes.as_ptr().cast::<[u16; 3]>()) }
}

/// One's-complement sum of the 16-bit big-endian words of `bytes`, not folded.
#[inline(always)]
fn sum16(bytes: &[u8; 4]) -> u32 {
    (u16::from_be_bytes([bytes[0], bytes[1]]) as u32)
        + (u16::from_be_bytes([bytes[2], bytes[3]]) as u32)
}

#[inline(always)]
fn ipv4_checksum(total_len: u16, src: &[u8; 4], dst: &[u8; 4]) -> u16 {
    let mut sum: u32 =
        0x4500 + total_len as u32 + 0x4000 + ((OUTER_TTL as u32) << 8 | IPPROTO_UDP as u32);
    sum += sum16(src) + sum16(dst);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Wraps the inner packet for `e.target` and sends it. Returns the packed verdict: the action
/// with `reason` on success, a drop with the failure's reason otherwise.
///
/// A separate BPF function (it has three call sites), so it returns a scalar: see steer.rs.
#[inline(never)]
pub fn encap_and_send(ctx: &XdpContext, cfg: &NodeConfig, e: &Encap, reason: u32) -> Packed {
    match try_encap_and_send(ctx, cfg, e) {
        Ok(action) => action as u64 | (reason as u64) << 32,
        Err(reason) => packed(xdp_action::XDP_DROP, reason),
    }
}

#[inline(always)]
fn try_encap_and_send(ctx: &XdpContext, cfg: &NodeConfig, e: &Encap) -> Result<u32, Counter> {
    let member = MEMBERS.get(e.target as u32).ok_or(Counter::NoRoute)?;
    let family = member.family;
    let dst_addr = words(&member.addr);
    let outer_v6 = match family {
        FAMILY_V4 if cfg.underlay_v4 != [0; 4] => false,
        FAMILY_V6 if cfg.underlay_v6 != [0; 16] => true,
        _ => return Err(Counter::NoRoute),
    };
    let outer_len = if outer_v6 { ENCAP_LEN_V6 } else { ENCAP_LEN_V4 };
    let frame_len = outer_len + e.inner_len;
    if cfg.max_frame != 0 && frame_len > cfg.max_frame as usize {
        return Err(Counter::TooBig);
    }
    // Our own MAC, as the sender addressed it: needed if the kernel has to route the result.
    let our_mac = Frame::new(ctx)
        .read::<[u16; 3]>(0)
        .ok_or(Counter::Malformed)?;

    let delta = e.inner_off as i32 - outer_len as i32;
    // SAFETY: plain helper call on our context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(Counter::TooBig);
    }
    let mut frame = Frame::new(ctx);
    // Bytes after the inner packet (Ethernet padding of a short frame, or junk behind a packet
    // whose length field says less) must not travel inside the tunnel.
    let excess = frame.len() as i32 - frame_len as i32;
    if excess > 0 {
        // SAFETY: plain helper call on our context; shrinks the frame by `excess` bytes.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -excess) } != 0 {
            return Err(Counter::Malformed);
        }
        frame = Frame::new(ctx);
    }
    let udp_len = (UDP_HEADER_LEN + 8 + e.inner_len) as u16;
    let steer_hops = [e.remaining[0].to_be(), e.remaining[1].to_be()];
    let hop_count = (e.remaining[0] != NO_MEMBER) as u8 + (e.remaining[1] != NO_MEMBER) as u8;
    let steer_flags = if e.inner_v6 { STEER_INNER_V6 } else { 0 };

    let udp_off = if outer_v6 {
        let base = frame
            .at::<[u8; ENCAP_LEN_V6]>(0)
            .ok_or(Counter::Malformed)?
            .cast::<u8>();
        let label = (e.entropy as u32) & 0x000f_ffff;
        // SAFETY: all offsets lie inside the ENCAP_LEN_V6 bytes checked above.
        unsafe {
            put(base, 12, ETH_P_IPV6.to_be());
            put(base, 14, (0x6000_0000u32 | label).to_be());
            put(base, 18, udp_len.to_be());
            put(base, 20, IPPROTO_UDP);
            put(base, 21, OUTER_TTL);
            put(base, 22, words(&cfg.underlay_v6));
            put(base, 38, dst_addr);
        }
        ETH_HEADER_LEN + IPV6_HEADER_LEN
    } else {
        let base = frame
            .at::<[u8; ENCAP_LEN_V4]>(0)
            .ok_or(Counter::Malformed)?
            .cast::<u8>();
        let total = (IPV4_HEADER_LEN as u16) + udp_len;
        let dst4 = dst_addr[0].to_ne_bytes();
        let csum = ipv4_checksum(total, &cfg.underlay_v4, &dst4);
        // SAFETY: all offsets lie inside the ENCAP_LEN_V4 bytes checked above.
        unsafe {
            put(base, 12, ETH_P_IP.to_be());
            put(base, 14, 0x0045u16); // version 4, IHL 5; TOS 0
            put(base, 16, total.to_be());
            put(base, 18, 0u16); // identification: DF is set, so unused
            put(base, 20, 0x4000u16.to_be()); // don't fragment
            put(base, 22, OUTER_TTL);
            put(base, 23, IPPROTO_UDP);
            put(base, 24, csum.to_be());
            put(base, 26, u32::from_ne_bytes(cfg.underlay_v4));
            put(base, 30, dst_addr[0]);
        }
        ETH_HEADER_LEN + IPV4_HEADER_LEN
    };
    let base = frame
        .at::<[u8; UDP_HEADER_LEN + 8]>(udp_off)
        .ok_or(Counter::Malformed)?
        .cast::<u8>();
    // SAFETY: inside the 16 bytes checked above.
    unsafe {
        put(base, 0, e.entropy.to_be());
        put(base, 2, cfg.steer_port.to_be());
        put(base, 4, udp_len.to_be());
        put(base, 6, 0u16); // zero checksum: see cdn_common::wire
        put(base, 8, STEER_VERSION);
        put(base, 9, steer_flags);
        put(base, 10, e.budget);
        put(base, 11, hop_count);
        put(base, 12, steer_hops);
    }
    count_member(e.target, frame_len as u64);
    Ok(send(ctx, &frame, e, outer_v6, frame_len, our_mac))
}

/// Fills in the Ethernet addresses and transmits towards `e.target`.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    frame: &Frame,
    e: &Encap,
    outer_v6: bool,
    frame_len: usize,
    our_mac: [u16; 3],
) -> u32 {
    let Some(eth) = frame.at::<[u8; 12]>(0) else {
        return xdp_action::XDP_DROP;
    };
    let eth = eth.cast::<u8>();
    // The coarse clock (a tick's resolution, same epoch as CLOCK_MONOTONIC) is plenty for
    // expiry times seconds away, and costs a fraction of `bpf_ktime_get_ns` (measured: the
    // precise clock added 20-40 ns to every forwarded packet in a VM).
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(nh) = NEXT_HOPS.get(e.target as u32)
        && nh.ifindex != 0
        && nh.expires_ns > now
    {
        let (dst, src, ifindex) = (mac(&nh.dst_mac), mac(&nh.src_mac), nh.ifindex);
        // SAFETY: inside the 12 bytes checked above.
        unsafe {
            put(eth, 0, dst);
            put(eth, 6, src);
        }
        return transmit(ctx, ifindex);
    }
    count(Counter::FibLookup);
    // SAFETY: bpf_fib_lookup is a plain C struct of integers; all-zero is valid.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = IPPROTO_UDP;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_1.tot_len = (frame_len - ETH_HEADER_LEN) as u16;
    let Some(ip) = frame.at::<[u8; 40]>(ETH_HEADER_LEN) else {
        return pass_to_kernel(eth, our_mac);
    };
    let ip = ip.cast::<u8>();
    // SAFETY: the addresses lie inside the 40 bytes checked above (IPv4: 12..20).
    unsafe {
        if outer_v6 {
            params.family = AF_INET6;
            params.__bindgen_anon_3.ipv6_src = core::ptr::read(ip.add(8).cast());
            params.__bindgen_anon_4.ipv6_dst = core::ptr::read(ip.add(24).cast());
        } else {
            params.family = AF_INET;
            params.__bindgen_anon_3.ipv4_src = core::ptr::read(ip.add(12).cast());
            params.__bindgen_anon_4.ipv4_dst = core::ptr::read(ip.add(16).cast());
        }
    }
    // SAFETY: params lives on our stack and the size passed is its size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return pass_to_kernel(eth, our_mac);
    }
    // SAFETY: inside the 12 bytes checked above.
    unsafe {
        put(eth, 0, mac(&params.dmac));
        put(eth, 6, mac(&params.smac));
    }
    transmit(ctx, params.ifindex)
}

/// The kernel routes the encapsulated packet and resolves the neighbour itself. The frame must
/// be addressed to our own MAC, or the stack would discard it as "for another host".
#[inline(always)]
fn pass_to_kernel(eth: *mut u8, our_mac: [u16; 3]) -> u32 {
    count(Counter::FibMiss);
    // SAFETY: `eth` points at 12 bounds-checked bytes.
    unsafe {
        put(eth, 0, our_mac);
        put(eth, 6, our_mac);
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    match DEVICES.redirect(ifindex, 0) {
        Ok(action) => action,
        // Not in the device map (e.g. an interface the controller has not seen yet).
        // SAFETY: plain helper call.
        Err(_) => unsafe { bpf_redirect(ifindex, 0) as u32 },
    }
}

/// Strips everything in front of the inner IP packet and gives it an Ethernet header with the
/// outer frame's addresses, so the local stack accepts it as addressed to this host.
#[inline(always)]
pub fn decapsulate(ctx: &XdpContext, inner_off: usize, inner_v6: bool) -> Result<(), Counter> {
    let macs = Frame::new(ctx)
        .read::<[u16; 6]>(0)
        .ok_or(Counter::Malformed)?;
    let delta = inner_off as i32 - ETH_HEADER_LEN as i32;
    // SAFETY: plain helper call on our context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(Counter::Malformed);
    }
    let frame = Frame::new(ctx);
    let eth = frame
        .at::<[u8; 14]>(0)
        .ok_or(Counter::Malformed)?
        .cast::<u8>();
    let ethertype = if inner_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    // SAFETY: inside the 14 bytes checked above.
    unsafe {
        put(eth, 0, macs);
        put(eth, 12, ethertype.to_be());
    }
    Ok(())
}
