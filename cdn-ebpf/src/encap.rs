//! Encapsulation towards a member, decapsulation for the local stack, and transmission.
//!
//! Next hop: the controller keeps a per-member entry up to date from the kernel's routing and
//! neighbour tables, because `bpf_fib_lookup` costs more than the rest of the forwarding path.
//! The entry holds the egress interface and the frame's outer headers, precomputed, so the
//! fast path is one array lookup and a few word stores, and reads no clock: an entry is used
//! for as long as the controller leaves it valid. The controller invalidates what it can no
//! longer resolve; if the controller is gone, the last resolved entries stay in use (see the
//! README). Only a missing or invalid entry falls back to `bpf_fib_lookup`; if that cannot
//! resolve the neighbour either, the already-encapsulated packet goes to the kernel, which
//! routes it and resolves the neighbour itself. A missing neighbour therefore delays a packet
//! at worst; it never drops it and never lets the client's connection be reset.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams},
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use cdn_common::{
    counters::{Action, Reason},
    maps::{
        FAMILY_V4, FAMILY_V6, NEXT_HOP_V6, NEXT_HOP_VALID, NO_MEMBER, NODE_STEER_AUTH, NodeConfig,
        template,
    },
    wire::{
        ENCAP_LEN_V4, ENCAP_LEN_V6, OUTER_TTL, STEER_INNER_V6, STEER_MAC_LEN, STEER_VERSION,
        STEER_VERSION_AUTH, STEER_VERSION_SEARCH, STEER_VERSION_SEARCH_AUTH, SteerHeader,
    },
};

use crate::{
    maps::{DEVICES, MEMBERS, NEXT_HOPS, count_member},
    packet::Frame,
    verdict::Verdict,
    wire::{eth, ipv4, ipv6, load, outer, proto, steer, store, udp},
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
    /// Steering header flags besides the inner family (`STEER_SYN_REDIRECTED`).
    pub flags: u8,
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
        flags: 0,
    };

    /// The steering header this encapsulation carries (version 1; the writer sets 2 when it
    /// appends the MAC).
    #[inline(always)]
    pub fn header(&self) -> SteerHeader {
        SteerHeader {
            version: STEER_VERSION,
            flags: self.flags | if self.inner_v6 { STEER_INNER_V6 } else { 0 },
            hop_budget: self.budget,
            hop_count: (self.remaining[0] != NO_MEMBER) as u8
                + (self.remaining[1] != NO_MEMBER) as u8,
            hops: [self.remaining[0].to_be(), self.remaining[1].to_be()],
        }
    }

    /// The search header (README "PoPs"; version 3, the writer sets 4 when it appends the
    /// MAC) of a search's `Encap`, whose `remaining` holds the header's two hop slots (the
    /// member that started the search, the walk's position) and whose `flags` holds the PoPs
    /// left to search (the header's `hop_count`; its only flag, the inner family, comes from
    /// `inner_v6`). The same fields rather than new ones: the steady-state paths build and
    /// write their `Encap` exactly as before.
    #[inline(always)]
    pub fn search_header(&self) -> SteerHeader {
        SteerHeader {
            version: STEER_VERSION_SEARCH,
            flags: if self.inner_v6 { STEER_INNER_V6 } else { 0 },
            hop_budget: self.budget,
            hop_count: self.flags,
            hops: [self.remaining[0].to_be(), self.remaining[1].to_be()],
        }
    }

    /// The header `SEARCH` says this encapsulation carries.
    #[inline(always)]
    pub fn header_of<const SEARCH: bool>(&self) -> SteerHeader {
        if SEARCH {
            self.search_header()
        } else {
            self.header()
        }
    }
}

// With `steer_auth` the MAC sits right after the version-1-sized outer headers, where the
// template copy must not reach.
const _: () = assert!(template::COPY_V4 <= ENCAP_LEN_V4 && template::COPY_V6 <= ENCAP_LEN_V6);

/// Bytes the MAC adds to the encapsulation: 0, or `STEER_MAC_LEN` with `steer_auth` (computed
/// without a branch: the unauthenticated forward path stays straight).
#[inline(always)]
fn mac_len(cfg: &NodeConfig) -> usize {
    ((cfg.flags & NODE_STEER_AUTH) >> NODE_STEER_AUTH.trailing_zeros()) as usize * STEER_MAC_LEN
}

/// Wraps the inner packet for `e.target` and sends it, with the search header (`SEARCH`,
/// see `Encap::search_header`) or the usual one: one instance each, so that the usual one is what it
/// was before searches. Returns `pending` (the reason the path
/// gave) with the action the transmission ended in, or a drop with the reason encapsulation
/// failed: never the path's reason with a drop. Inlined into the entry point: see steer.rs.
#[inline(always)]
pub fn encap_and_send<const SEARCH: bool>(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    e: &Encap,
    pending: Verdict,
) -> Verdict {
    match try_encap_and_send::<SEARCH>(ctx, cfg, e, pending) {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::drop(reason),
    }
}

/// The fast path: one map lookup gives the egress interface and the outer headers, which are
/// copied into the frame with word stores. No clock is read: an entry is used for as long as
/// the controller leaves it valid (see `cdn_common::maps::NextHop`). The controller rewrites an
/// entry only when it changes, so a packet never meets one half-rewritten with equal bytes.
#[inline(always)]
fn try_encap_and_send<const SEARCH: bool>(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    e: &Encap,
    pending: Verdict,
) -> Result<Verdict, Reason> {
    let Some(nh) = NEXT_HOPS.get(e.target as u32) else {
        return Ok(encap_via_fib::<SEARCH>(ctx, cfg, e, pending));
    };
    if nh.flags & NEXT_HOP_VALID == 0 {
        return Ok(encap_via_fib::<SEARCH>(ctx, cfg, e, pending));
    }
    let outer_v6 = nh.flags & NEXT_HOP_V6 != 0;
    let (outer_len, frame_len) = lengths(cfg, e, outer_v6)?;
    let frame = make_room(ctx, e, outer_len, frame_len)?;
    let udp_len = udp_len(frame_len, outer_v6);
    let words = nh.header.as_ptr().cast::<u64>();
    let udp_off = if outer_v6 {
        let base = frame
            .at::<[u8; ENCAP_LEN_V6]>(0)
            .ok_or(Reason::EncapFailed)?
            .cast::<u8>();
        // SAFETY: COPY_V6 <= ENCAP_LEN_V6 bytes checked above, and as many in the template,
        // whose words are aligned (the map value is). Packet stores need no alignment (see
        // `Frame::read`).
        unsafe {
            copy_words::<{ template::COPY_V6 / 8 }>(base, words);
            store(base, outer::IPV6_FLOW_LOW, e.entropy.to_be());
            store(base, outer::IPV6_PAYLOAD_LEN, udp_len.to_be());
        }
        template::UDP_V6
    } else {
        let base = frame
            .at::<[u8; ENCAP_LEN_V4]>(0)
            .ok_or(Reason::EncapFailed)?
            .cast::<u8>();
        let total = (ipv4::LEN as u16 + udp_len).to_be();
        // The template's partial sum plus the length, folded: the checksum in network order
        // (a one's-complement sum is the same in either byte order, RFC 1071).
        let mut sum = nh.ipv4_sum + total as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        // SAFETY: as above, with COPY_V4 <= ENCAP_LEN_V4.
        unsafe {
            copy_words::<{ template::COPY_V4 / 8 }>(base, words);
            store(base, outer::IPV4_TOTAL_LEN, total);
            store(base, outer::IPV4_CHECKSUM, !(sum as u16));
        }
        template::UDP_V4
    };
    write_udp_and_steer::<SEARCH>(cfg, &frame, udp_off, e, udp_len)?;
    count_member(e.target, frame_len as u64);
    Ok(pending.with_action(transmit(ctx, nh.ifindex)))
}

/// Copies `N` words of the template to the frame.
///
/// # Safety
/// `dst` must point at `8 * N` bounds-checked packet bytes, `src` at `N` aligned words.
#[inline(always)]
unsafe fn copy_words<const N: usize>(dst: *mut u8, src: *const u64) {
    // Fixed trip count: unrolled into N loads and N stores.
    for i in 0..N {
        // SAFETY: guaranteed by the caller.
        unsafe { core::ptr::write(dst.add(8 * i).cast::<u64>(), *src.add(i)) };
    }
}

/// The outer header's length and the whole frame's, checked against the underlay's MTU.
#[inline(always)]
fn lengths(cfg: &NodeConfig, e: &Encap, outer_v6: bool) -> Result<(usize, usize), Reason> {
    let outer_len = if outer_v6 { ENCAP_LEN_V6 } else { ENCAP_LEN_V4 } + mac_len(cfg);
    let frame_len = outer_len + e.inner_len;
    if cfg.max_frame != 0 && frame_len > cfg.max_frame as usize {
        return Err(Reason::TooBig);
    }
    Ok((outer_len, frame_len))
}

/// The UDP length field: everything behind the outer IP header (so the MAC, if any, is
/// counted without looking at the configuration again).
#[inline(always)]
fn udp_len(frame_len: usize, outer_v6: bool) -> u16 {
    let ip_len = if outer_v6 { ipv6::LEN } else { ipv4::LEN };
    (frame_len - eth::LEN - ip_len) as u16
}

/// Makes the frame exactly `outer_len` bytes of room followed by the inner packet.
#[inline(always)]
fn make_room(
    ctx: &XdpContext,
    e: &Encap,
    outer_len: usize,
    frame_len: usize,
) -> Result<Frame, Reason> {
    let delta = e.inner_off as i32 - outer_len as i32;
    // SAFETY: plain helper call on our context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(Reason::EncapFailed);
    }
    let frame = Frame::new(ctx);
    // Bytes after the inner packet (Ethernet padding of a short frame, or junk behind a packet
    // whose length field says less) must not travel inside the tunnel.
    let excess = frame.len() as i32 - frame_len as i32;
    if excess > 0 {
        // SAFETY: plain helper call on our context; shrinks the frame by `excess` bytes.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -excess) } != 0 {
            return Err(Reason::EncapFailed);
        }
        return Ok(Frame::new(ctx));
    }
    Ok(frame)
}

/// The UDP header but its destination port, and the steering header (with its MAC if
/// `steer_auth` is on).
#[inline(always)]
fn write_udp_and_steer<const SEARCH: bool>(
    cfg: &NodeConfig,
    frame: &Frame,
    udp_off: usize,
    e: &Encap,
    udp_len: u16,
) -> Result<(), Reason> {
    let base = frame
        .at::<[u8; udp::LEN + steer::LEN]>(udp_off)
        .ok_or(Reason::EncapFailed)?
        .cast::<u8>();
    let mut sh = e.header_of::<SEARCH>();
    // With `steer_auth`, version 2 or 4 (without a branch). The MAC behind the header is in place
    // already: `steer::sign` wrote it in front of the inner packet, and nothing here or in
    // the outer headers covers those bytes.
    const _: () = assert!(STEER_VERSION_AUTH == STEER_VERSION + 1);
    const _: () = assert!(STEER_VERSION_SEARCH_AUTH == STEER_VERSION_SEARCH + 1);
    sh.version += ((cfg.flags & NODE_STEER_AUTH) >> NODE_STEER_AUTH.trailing_zeros()) as u8;
    // SAFETY: every field lies inside the UDP and steering headers checked above. The
    // steering header goes out as one word (same size, any bit pattern is a u64).
    unsafe {
        store(base, udp::SRC_PORT, e.entropy.to_be());
        store(base, udp::LENGTH, udp_len.to_be());
        store(base, udp::CHECKSUM, 0); // zero checksum: see cdn_common::wire
        store(
            base.add(udp::LEN),
            steer::WORD,
            core::mem::transmute::<SteerHeader, u64>(sh),
        );
    }
    Ok(())
}

/// Slow path for a member without a valid next-hop entry: the headers from the member's
/// address and the node's configuration, field by field, and the MACs from `bpf_fib_lookup`,
/// or from the kernel if that cannot resolve them either. A separate BPF function: the hot
/// path keeps its stack small and straight.
#[inline(never)]
fn encap_via_fib<const SEARCH: bool>(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    e: &Encap,
    pending: Verdict,
) -> Verdict {
    match try_encap_via_fib::<SEARCH>(ctx, cfg, e, pending) {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::drop(reason),
    }
}

/// 16 address bytes of a map value as four words. The fields this is used on sit at 4-byte
/// aligned offsets of 8-byte aligned map values.
#[inline(always)]
fn words(bytes: &[u8; 16]) -> [u32; 4] {
    // SAFETY: reads 16 bytes that `bytes` owns; see above on alignment.
    unsafe { core::ptr::read(bytes.as_ptr().cast::<[u32; 4]>()) }
}

/// A MAC address (6 bytes of a helper result) as three half-words.
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

/// Version 4, header length 5 words, type of service 0: the first two bytes of our IPv4 header.
const IPV4_VER_IHL_TOS: u16 = 0x4500;

/// Header checksum of the outer IPv4 header `try_encap_via_fib` writes: every field but the
/// length and the addresses is a constant.
#[inline(always)]
fn ipv4_checksum(total_len: u16, src: &[u8; 4], dst: &[u8; 4]) -> u16 {
    let mut sum: u32 = IPV4_VER_IHL_TOS as u32
        + total_len as u32
        + ipv4::DONT_FRAGMENT as u32
        + ((OUTER_TTL as u32) << 8 | proto::UDP as u32);
    sum += sum16(src) + sum16(dst);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn try_encap_via_fib<const SEARCH: bool>(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    e: &Encap,
    pending: Verdict,
) -> Result<Verdict, Reason> {
    let member = MEMBERS.get(e.target as u32).ok_or(Reason::NoRoute)?;
    let family = member.family;
    let dst_addr = words(&member.addr);
    let outer_v6 = match family {
        FAMILY_V4 if cfg.underlay_v4 != [0; 4] => false,
        FAMILY_V6 if cfg.underlay_v6 != [0; 16] => true,
        _ => return Err(Reason::NoRoute),
    };
    let (outer_len, frame_len) = lengths(cfg, e, outer_v6)?;
    // Our own MAC, as the sender addressed it: needed if the kernel has to route the result.
    let our_mac = Frame::new(ctx).get(0, eth::DST).ok_or(Reason::Malformed)?;
    let frame = make_room(ctx, e, outer_len, frame_len)?;
    let udp_len = udp_len(frame_len, outer_v6);

    let udp_off = if outer_v6 {
        let base = frame
            .at::<[u8; ENCAP_LEN_V6]>(0)
            .ok_or(Reason::EncapFailed)?
            .cast::<u8>();
        let label = (e.entropy as u32) & 0x000f_ffff;
        // SAFETY: every field lies inside the ENCAP_LEN_V6 bytes checked above.
        unsafe {
            store(base, eth::ETHERTYPE, eth::TYPE_IPV6.to_be());
            let ip = base.add(eth::LEN);
            store(ip, ipv6::VER_TC_FLOW, (0x6000_0000u32 | label).to_be());
            store(ip, ipv6::PAYLOAD_LEN, udp_len.to_be());
            store(ip, ipv6::NEXT_HEADER, proto::UDP);
            store(ip, ipv6::HOP_LIMIT, OUTER_TTL);
            store(ip, ipv6::SRC, words(&cfg.underlay_v6));
            store(ip, ipv6::DST, dst_addr);
        }
        eth::LEN + ipv6::LEN
    } else {
        let base = frame
            .at::<[u8; ENCAP_LEN_V4]>(0)
            .ok_or(Reason::EncapFailed)?
            .cast::<u8>();
        let total = (ipv4::LEN as u16) + udp_len;
        let dst4 = dst_addr[0].to_ne_bytes();
        let csum = ipv4_checksum(total, &cfg.underlay_v4, &dst4);
        // SAFETY: every field lies inside the ENCAP_LEN_V4 bytes checked above.
        unsafe {
            store(base, eth::ETHERTYPE, eth::TYPE_IPV4.to_be());
            let ip = base.add(eth::LEN);
            store(ip, ipv4::VER_IHL_TOS, IPV4_VER_IHL_TOS.to_be());
            store(ip, ipv4::TOTAL_LEN, total.to_be());
            store(ip, ipv4::IDENT, 0); // DF is set, so unused
            store(ip, ipv4::FLAGS_FRAG, ipv4::DONT_FRAGMENT.to_be());
            store(ip, ipv4::TTL, OUTER_TTL);
            store(ip, ipv4::PROTO, proto::UDP);
            store(ip, ipv4::CHECKSUM, csum.to_be());
            store(ip, ipv4::SRC, u32::from_ne_bytes(cfg.underlay_v4));
            store(ip, ipv4::DST, dst_addr[0]);
        }
        eth::LEN + ipv4::LEN
    };
    write_udp_and_steer::<SEARCH>(cfg, &frame, udp_off, e, udp_len)?;
    let port = frame
        .at::<[u8; udp::LEN]>(udp_off)
        .ok_or(Reason::EncapFailed)?
        .cast::<u8>();
    // SAFETY: inside the UDP header checked above.
    unsafe { store(port, udp::DST_PORT, cfg.steer_port.to_be()) };
    count_member(e.target, frame_len as u64);
    route(ctx, &frame, outer_v6, frame_len, our_mac, pending)
}

/// Fills in the Ethernet addresses from the FIB and transmits: `pending` with the action the
/// transmission took.
#[inline(always)]
fn route(
    ctx: &XdpContext,
    frame: &Frame,
    outer_v6: bool,
    frame_len: usize,
    our_mac: [u16; 3],
    pending: Verdict,
) -> Result<Verdict, Reason> {
    let macs = frame
        .at::<[u8; 12]>(0)
        .ok_or(Reason::EncapFailed)?
        .cast::<u8>();
    let pending = pending.with_info(Reason::FibLookup);
    // SAFETY: bpf_fib_lookup is a plain C struct of integers; all-zero is valid.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = proto::UDP;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_1.tot_len = (frame_len - eth::LEN) as u16;
    let Some(ip) = frame.at::<[u8; ipv6::LEN]>(eth::LEN) else {
        return Ok(pass_to_kernel(macs, our_mac, pending));
    };
    let ip = ip.cast::<u8>();
    // SAFETY: the addresses lie inside the 40 bytes checked above (IPv4's end at 20).
    unsafe {
        if outer_v6 {
            params.family = AF_INET6;
            params.__bindgen_anon_3.ipv6_src = load(ip, ipv6::SRC);
            params.__bindgen_anon_4.ipv6_dst = load(ip, ipv6::DST);
        } else {
            params.family = AF_INET;
            params.__bindgen_anon_3.ipv4_src = load(ip, ipv4::SRC);
            params.__bindgen_anon_4.ipv4_dst = load(ip, ipv4::DST);
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
        return Ok(pass_to_kernel(macs, our_mac, pending));
    }
    // SAFETY: inside the 12 bytes checked above.
    unsafe {
        store(macs, eth::DST, mac(&params.dmac));
        store(macs, eth::SRC, mac(&params.smac));
    }
    Ok(pending.with_action(transmit(ctx, params.ifindex)))
}

/// The kernel routes the encapsulated packet and resolves the neighbour itself. The frame must
/// be addressed to our own MAC, or the stack would discard it as "for another host".
#[inline(always)]
fn pass_to_kernel(macs: *mut u8, our_mac: [u16; 3], pending: Verdict) -> Verdict {
    // SAFETY: `macs` points at 12 bounds-checked bytes.
    unsafe {
        store(macs, eth::DST, our_mac);
        store(macs, eth::SRC, our_mac);
    }
    pending.with_info(Reason::FibMiss).with_action(Action::Pass)
}

#[inline(always)]
fn transmit(ctx: &XdpContext, ifindex: u32) -> Action {
    if ifindex == ctx.ingress_ifindex() as u32 {
        return Action::Tx;
    }
    match DEVICES.redirect(ifindex, 0) {
        // The helper returns XDP_REDIRECT exactly on success.
        Ok(_) => Action::Redirect,
        // Not in the device map (e.g. an interface the controller has not seen yet).
        // SAFETY: plain helper call; XDP_REDIRECT, or XDP_ABORTED for flags it rejects.
        Err(_) => Action::from_xdp(unsafe { bpf_redirect(ifindex, 0) } as u32),
    }
}

/// Strips everything in front of the inner IP packet and gives it an Ethernet header with the
/// outer frame's addresses, so the local stack accepts it as addressed to this host.
#[inline(always)]
pub fn decapsulate(ctx: &XdpContext, inner_off: usize, inner_v6: bool) -> Result<(), Reason> {
    let macs = Frame::new(ctx)
        .get(0, eth::ADDRS)
        .ok_or(Reason::Malformed)?;
    let delta = inner_off as i32 - eth::LEN as i32;
    // SAFETY: plain helper call on our context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(Reason::Malformed);
    }
    let frame = Frame::new(ctx);
    let hdr = frame
        .at::<[u8; eth::LEN]>(0)
        .ok_or(Reason::Malformed)?
        .cast::<u8>();
    let ethertype = if inner_v6 {
        eth::TYPE_IPV6
    } else {
        eth::TYPE_IPV4
    };
    // SAFETY: inside the 14 bytes checked above.
    unsafe {
        store(hdr, eth::ADDRS, macs);
        store(hdr, eth::ETHERTYPE, ethertype.to_be());
    }
    Ok(())
}
