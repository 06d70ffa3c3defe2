//! The steering MAC (`[cluster] steer_auth`, README "Steering trust"): signing what this
//! node encapsulates and verifying the version-2 headers it receives. SipHash-2-4 over the
//! message `cdn_common::hash::steer_mac_message` lays out.
//!
//! Signing and verifying are BPF functions of their own, called only with `steer_auth` on (or
//! for a version-2 header): their message and state would otherwise take stack from the entry
//! point's frame, which has none to spare next to the trace's call, and inlined at every site
//! they would cost the verifier more than it allows. Their arguments are packed into
//! registers for the same reason.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use cdn_common::{
    counters::Reason,
    hash::{siphash24_words, steer_mac_message, v4_mapped_words},
    maps::{FAMILY_V4, FAMILY_V6, NODE_STEER_AUTH, NodeConfig},
    wire::{STEER_MAC_LEN, SteerHeader},
};

use crate::{
    encap::Encap,
    maps::MEMBERS,
    packet::Frame,
    parse::{Flow, member_key, parse_flow, parse_ip},
    wire::steer,
};

/// The two words of a flow address (IPv4-mapped for IPv4), for the steering MAC.
#[inline(always)]
fn addr_words(frame: &Frame, off: usize, v6: bool) -> Result<[u64; 2], Reason> {
    if v6 {
        frame.read::<[u64; 2]>(off).ok_or(Reason::Malformed)
    } else {
        let addr = frame.read::<u32>(off).ok_or(Reason::Malformed)?;
        Ok(v4_mapped_words(addr))
    }
}

/// What the MAC needs of a flow, packed into one word so that the BPF functions below take it in a register: the entry point's stack has
/// no room for the copies a pointer argument would force.
#[inline(always)]
fn mac_flow(flow: &Flow) -> u64 {
    flow.src_off as u64
        | (flow.dst_off as u64) << 16
        | (flow.proto as u64) << 32
        | (flow.v6 as u64) << 40
}

/// The steering MAC of `header` (as one little-endian word) on a packet from `outer_src`
/// whose flow `packed` describes (see `mac_flow`, `cdn_common::hash::steer_mac_message`).
#[inline(always)]
fn flow_mac(
    cfg: &NodeConfig,
    frame: &Frame,
    packed: u64,
    ports: u32,
    outer_src: [u64; 2],
    header: u64,
) -> Result<u64, Reason> {
    let v6 = packed & 1 << 40 != 0;
    let msg = steer_mac_message(
        outer_src,
        addr_words(frame, (packed & 0xffff) as usize, v6)?,
        addr_words(frame, (packed >> 16 & 0xffff) as usize, v6)?,
        ports,
        (packed >> 32) as u8,
        header,
    );
    Ok(siphash24_words(&cfg.auth_key, &msg))
}

/// With `steer_auth`: the MAC of the header `out` will be written with, into the frame where
/// the writer expects it.
#[inline(always)]
pub fn sign(ctx: &XdpContext, cfg: &NodeConfig, flow: &Flow, out: &Encap) -> Result<(), Reason> {
    if cfg.flags & NODE_STEER_AUTH == 0 {
        return Ok(());
    }
    sign_header(ctx, cfg, flow, out, out.header())
}

/// `sign` for the header `header` (version 1 or 3, as `Encap` builds them: the MAC covers
/// the version the writer will make of it).
#[inline(always)]
pub fn sign_header(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    flow: &Flow,
    out: &Encap,
    header: SteerHeader,
) -> Result<(), Reason> {
    // SAFETY: SteerHeader is 8 bytes of plain integers, any bit pattern is a u64.
    let header = unsafe { core::mem::transmute::<SteerHeader, u64>(header) };
    // Where the MAC ends up: right in front of the inner packet, which the encapsulation
    // leaves in place and wraps. What it overwrites (the client frame's Ethernet source and
    // type, or the steering header already read) is replaced by the outer headers. Computed
    // here: subtracted in `sign_slow`, the compiler folds the bounds check into one the
    // verifier cannot follow.
    let mac_off = out.inner_off.wrapping_sub(STEER_MAC_LEN) as u64 & 0xffff;
    let target = out.target as u64 | mac_off << 16 | (flow.ports as u64) << 32;
    if sign_slow(ctx.ctx, cfg, header, mac_flow(flow), target) {
        Ok(())
    } else {
        Err(Reason::NoRoute)
    }
}

/// `sign`'s work: false if the target has no address (the encapsulation would fail for the
/// same reason). `target` packs the member (bits 0..16), the MAC's offset (16..32) and the
/// flow's ports (32..64). The outer source is this node's underlay address of the target's
/// family, as the writer picks it.
#[inline(never)]
fn sign_slow(ctx: *mut xdp_md, cfg: &NodeConfig, header: u64, packed: u64, target: u64) -> bool {
    let Some(member) = MEMBERS.get(target as u16 as u32) else {
        return false;
    };
    let src = match member.family {
        FAMILY_V4 => v4_mapped_words(u32::from_ne_bytes(cfg.underlay_v4)),
        // SAFETY: [u8; 16] and [u64; 2] have the same size and no invalid bit patterns.
        FAMILY_V6 => unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(cfg.underlay_v6) },
        _ => return false,
    };
    let frame = Frame::new(&XdpContext::new(ctx));
    let Ok(mac) = flow_mac(cfg, &frame, packed, (target >> 32) as u32, src, header) else {
        return false;
    };
    let Some(at) = frame.at::<u64>((target >> 16 & 0xffff) as usize) else {
        return false;
    };
    // SAFETY: 8 bounds-checked packet bytes; packet stores need no alignment (see
    // `Frame::read`).
    unsafe { core::ptr::write(at, mac.to_le()) };
    true
}

/// Whether the MAC of the version-2 header at `steer_off` verifies. The inner packet behind
/// it is parsed here again (a packet it cannot parse fails the check, and the caller's own
/// parse reports why first), so that the caller can ask before its parse: the values its
/// parse produces would all need stack slots across the call, and the entry point has none
/// to spare.
#[inline(never)]
pub fn verify(
    ctx: *mut xdp_md,
    cfg: &NodeConfig,
    steer_off: usize,
    outer_src_off: usize,
    families: u32,
) -> bool {
    let outer_v6 = families & 1 != 0;
    let inner_v6 = families & 2 != 0;
    let frame = Frame::new(&XdpContext::new(ctx));
    let (Some(header), Some(got), Some(source)) = (
        frame.read::<u64>(steer_off),
        frame.read::<u64>(steer_off + steer::LEN),
        member_key(&frame, outer_src_off, outer_v6),
    ) else {
        return false;
    };
    let Ok(ip) = parse_ip(&frame, steer_off + steer::LEN + STEER_MAC_LEN, inner_v6) else {
        return false;
    };
    let Ok(flow) = parse_flow(&frame, &ip) else {
        return false;
    };
    // SAFETY: [u8; 16] and [u64; 2] have the same size and no invalid bit patterns.
    let src = unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(source.addr) };
    let packed = mac_flow(&flow);
    flow_mac(cfg, &frame, packed, flow.ports, src, header) == Ok(u64::from_le(got))
}
