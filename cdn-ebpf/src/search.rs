//! The cross-PoP search (README "PoPs: the search in the data plane").
//!
//! Each PoP has its own table; a node's `Service::table_offset` is its own PoP's. A flow that
//! no member of the PoP where it landed holds (its hop chain is done) is not a new connection
//! that landed here but one that started in another PoP before a route changed. It is sent to
//! the flow's current owner in the lowest other PoP, with a version-3 header whose `hop_count`
//! is the set of PoPs still to try, and whose `hops[1]` is the walk's position in the
//! addressee's PoP chain for the bucket. Each addressee accepts it if it holds the flow, or
//! redirects it once to the member its own view names at that position, or passes it on to
//! the next member of its chain after that position, then to the owner of the next PoP left.
//!
//! The paths decide *whether* to search (a test of `Service::search_pops` where the last hop
//! used to accept, and a search header's own checks on the owner path, which also accepts a
//! search it holds), and hand the rest to [`search`], a BPF function of its own that the
//! entry point calls once the paths have returned (`Verdict::search`). Inlined, or called
//! from the paths, it took the entry point's frame past what its other calls leave, and the
//! verifier past its instruction limit: it walks a callee again for every state its callers
//! reach it with, and little of the paths' state is left where the entry point calls it. It
//! parses the packet again from offsets packed into one register (see `pack`). [`sign`] adds
//! the MAC afterwards, so that the MAC's call is never stacked on the search's frame.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use cdn_common::{
    counters::Reason,
    maps::{MAX_POPS, NO_MEMBER, NodeConfig, Service},
    wire::{
        STEER_INNER_V6, STEER_MAC_LEN, STEER_SEARCH_POS_INDEX, STEER_SEARCH_POS_REDIRECTED,
        STEER_VERSION_SEARCH, SteerHeader, entropy_port,
    },
};

use crate::{
    auth,
    encap::{Encap, decapsulate},
    maps::TABLE,
    packet::Frame,
    parse::{Flow, Kind, dst_addr_off, parse_flow, parse_ip},
    placement::{bucket_of, service},
    verdict::Verdict,
    wire::{steer, tcp, udp},
};

/// A new connection (SYN without ACK): placed by the table of the PoP it lands in, never
/// searched for.
#[inline(always)]
pub fn is_syn(flow: &Flow) -> bool {
    flow.kind == Kind::Tcp && flow.tcp_flags & (tcp::SYN | tcp::ACK) == tcp::SYN
}

/// Index of the lowest set bit of a nonzero PoP set, by halving: `trailing_zeros` may become a
/// table lookup the program has no map for.
#[inline(always)]
fn lowest_pop(mask: u8) -> usize {
    let mut m = mask;
    let mut q = 0;
    if m & 0x0f == 0 {
        q += 4;
        m >>= 4;
    }
    if m & 0x03 == 0 {
        q += 2;
        m >>= 2;
    }
    if m & 0x01 == 0 {
        q += 1;
    }
    q
}

/// The flow's bucket within each of the service's tables (as `bucket_of` finds it in its
/// own); without a panic path for an empty table, which the callers have ruled out already
/// in a way the compiler does not always see.
#[inline(always)]
fn bucket(svc: &Service, hash: u64) -> u32 {
    hash.checked_rem(svc.table_size as u64).unwrap_or(0) as u32
}

/// The current owner of `bucket` in the table of the lowest PoP of `mask` (nonzero), or
/// `NO_MEMBER` if that table has none (or lies outside `TABLE`, which a correct controller
/// never writes).
#[inline(always)]
fn owner_in_lowest(svc: &Service, mask: u8, bucket: u32) -> u16 {
    let q = lowest_pop(mask);
    // Always true for a byte's bit index; the verifier needs to see it.
    if q >= MAX_POPS {
        return NO_MEMBER;
    }
    let index = svc.pop_tables[q].wrapping_add(bucket);
    TABLE.get(index).map_or(NO_MEMBER, |b| b.hops[0])
}

/// The next PoP's owner to search at, and the PoPs left after it. A PoP whose owner is missing
/// or this node is skipped, once: at most two PoPs are looked at, without a loop. `NO_MEMBER`
/// when neither gives a target.
#[inline(always)]
fn next_pop(cfg: &NodeConfig, svc: &Service, mask: u8, bucket: u32) -> (u16, u8) {
    let mut mask = mask;
    if mask == 0 {
        return (NO_MEMBER, 0);
    }
    let target = owner_in_lowest(svc, mask, bucket);
    // Clears the lowest set bit: the PoP just looked at.
    mask &= mask - 1;
    if target != NO_MEMBER && target != cfg.self_member {
        return (target, mask);
    }
    if mask == 0 {
        return (NO_MEMBER, 0);
    }
    let target = owner_in_lowest(svc, mask, bucket);
    mask &= mask - 1;
    if target != NO_MEMBER && target != cfg.self_member {
        return (target, mask);
    }
    (NO_MEMBER, mask)
}

/// Where [`search`] finds its packet, in one register: the offset of the IP packet to steer
/// (bits 0..16), whether it is IPv6 (bit 16), and the steering header's version (bits 24..32;
/// 0 for a client packet on the ingress path).
#[inline(always)]
pub fn pack(inner_off: usize, inner_v6: bool, version: u8) -> u64 {
    (inner_off as u64 & 0xffff) | (inner_v6 as u64) << 16 | (version as u64) << 24
}

/// The search step for the packet `packed` describes, with `out` filled in if the verdict
/// encapsulates (the caller signs it then):
///
/// - a client packet (version 0) or a version-1/2 steering packet this node's PoP does not
///   hold: a search is started (`SearchStart`), or, for a new connection or with no other
///   PoP naming an owner, it is accepted as before (`LastHopAccept`);
/// - a search header (version 3/4, checked and verified by the caller): accepted here if
///   this node holds the flow (`SearchAccept`), else passed on (`SearchPassOn`: to whom this
///   node's view names at the header's position, once; along this PoP's chain after that
///   position; then to the next PoP), else accepted as the end of the search
///   (`SearchExhausted`).
#[inline(never)]
pub fn search(ctx: *mut xdp_md, cfg: &NodeConfig, out: &mut Encap, packed: u64) -> Verdict {
    match try_search(&XdpContext::new(ctx), cfg, out, packed) {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::drop(reason),
    }
}

/// With `steer_auth`: the MAC of the search header `out` describes, written where the
/// encapsulation expects it (`auth::sign`), for the flow of the inner packet, parsed again.
/// A BPF function of its own, called after [`search`] returns, so that the MAC's call is
/// never stacked on top of the search's frame.
#[inline(never)]
pub fn sign(ctx: *mut xdp_md, cfg: &NodeConfig, out: &Encap, verdict: Verdict) -> Verdict {
    let ctx = XdpContext::new(ctx);
    let frame = Frame::new(&ctx);
    let signed = parse_ip(&frame, out.inner_off, out.inner_v6)
        .and_then(|ip| parse_flow(&frame, &ip))
        .and_then(|flow| auth::sign_header(&ctx, cfg, &flow, out, out.search_header()));
    match signed {
        Ok(()) => verdict,
        Err(reason) => Verdict::drop(reason),
    }
}

#[inline(always)]
fn try_search(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    out: &mut Encap,
    packed: u64,
) -> Result<Verdict, Reason> {
    let frame = Frame::new(ctx);
    let inner_off = (packed & 0xffff) as usize;
    let inner_v6 = packed & 1 << 16 != 0;
    let version = (packed >> 24) as u8;
    // The caller found it; looked up again rather than kept across the call. First, while
    // little else is live: its key takes stack.
    let svc =
        service(&frame, dst_addr_off(inner_off, inner_v6), inner_v6).ok_or(Reason::BadEncap)?;
    let ip = parse_ip(&frame, inner_off, inner_v6)?;
    let flow = parse_flow(&frame, &ip)?;
    // The UDP header and the steering header in front of the inner packet (and the MAC, for
    // an even version), in one read: one bounds check that the verifier follows.
    let (sh, entropy) = if version == 0 {
        (SteerHeader::default(), None)
    } else {
        let header_len = steer::LEN + ((version & 1 == 0) as usize) * STEER_MAC_LEN;
        let udp_off = inner_off.wrapping_sub(header_len + udp::LEN);
        let words = frame.read::<[u64; 2]>(udp_off).ok_or(Reason::Malformed)?;
        // SAFETY: SteerHeader is 8 bytes of plain integers, any bit pattern is valid.
        let sh = unsafe { core::mem::transmute::<u64, SteerHeader>(words[1]) };
        // The source port: the UDP header's first two bytes (a little-endian load).
        (sh, Some(u16::from_be(words[0] as u16)))
    };
    let searching = version >= STEER_VERSION_SEARCH;
    if searching {
        if sh.version != version || (sh.flags & STEER_INNER_V6 != 0) != inner_v6 {
            // Not what the caller read: cannot happen, but nothing here trusts the packing.
            return Err(Reason::BadEncap);
        }
    } else if is_syn(&flow) || svc.table_size == 0 {
        return last_hop_accept(ctx, version, inner_off, inner_v6);
    }
    let (hash, own) = bucket_of(cfg, &frame, &flow, svc)?;
    let bucket = bucket(svc, hash);
    let me = cfg.self_member;
    let (target, pops, pos, budget, reason) = if searching {
        // The index of this PoP's chain the sender asked this node as, from the header (the
        // caller checked it): not found again in this node's view, which may order the chain
        // differently for a moment, so that the walk neither skips a member nor turns back.
        let pos = u16::from_be(sh.hops[1]);
        let at = pos & STEER_SEARCH_POS_INDEX;
        let other = |m: u16| m != NO_MEMBER && m != me;
        let asked = if at == 0 {
            own[0]
        } else if at == 1 {
            own[1]
        } else {
            own[2]
        };
        let (target, pops, pos) = if other(asked) && pos & STEER_SEARCH_POS_REDIRECTED == 0 {
            // This view names someone else at that index: they are asked, once.
            (asked, sh.hop_count, at | STEER_SEARCH_POS_REDIRECTED)
        } else if at == 0 && other(own[1]) {
            (own[1], sh.hop_count, 1)
        } else if at <= 1 && other(own[2]) {
            (own[2], sh.hop_count, 2)
        } else {
            let (target, pops) = next_pop(cfg, svc, sh.hop_count, bucket);
            (target, pops, 0)
        };
        if target == NO_MEMBER {
            // Nobody else to ask: a live flow is held by a member of some PoP's chain, so
            // this is a stray, which the stack answers with a reset.
            decapsulate(ctx, inner_off, inner_v6)?;
            return Ok(Verdict::pass(Reason::SearchExhausted));
        }
        let budget = sh.hop_budget.min(cfg.search_budget);
        if budget == 0 {
            return Err(Reason::LoopGuard);
        }
        (target, pops, pos, budget - 1, Reason::SearchPassOn)
    } else {
        let (target, pops) = next_pop(cfg, svc, svc.search_pops, bucket);
        if target == NO_MEMBER {
            return last_hop_accept(ctx, version, inner_off, inner_v6);
        }
        (target, pops, 0, cfg.search_budget, Reason::SearchStart)
    };
    let starter = if searching {
        u16::from_be(sh.hops[0])
    } else {
        me
    };
    // Field by field: the caller's `Encap` is still `Encap::EMPTY` but for these. The
    // layout is `Encap::search_header`'s.
    out.inner_off = inner_off;
    out.inner_len = ip.ip_len;
    out.inner_v6 = inner_v6;
    out.target = target;
    out.remaining = [starter, pos];
    out.budget = budget;
    out.entropy = entropy.unwrap_or(entropy_port(hash));
    out.flags = pops;
    Ok(Verdict::encapsulate(reason))
}

/// What the last hop did before there were PoPs: it accepts the packet (decapsulated if it
/// came steered).
#[inline(always)]
fn last_hop_accept(
    ctx: &XdpContext,
    version: u8,
    inner_off: usize,
    inner_v6: bool,
) -> Result<Verdict, Reason> {
    if version != 0 {
        decapsulate(ctx, inner_off, inner_v6)?;
    }
    Ok(Verdict::pass(Reason::LastHopAccept))
}
