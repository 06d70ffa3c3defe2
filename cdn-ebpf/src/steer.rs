//! The two packet paths.
//!
//! *Ingress*: a client packet to a VIP. Its bucket names up to three hops (current owner first).
//! If the first hop is another member, the packet goes there encapsulated, carrying the other
//! hops. If it is this node, the owner check runs here; a flow this node does not hold goes on
//! to the next hop.
//!
//! *Owner*: a steering packet to this node's underlay address and steering port. After checking
//! that it came in on an underlay interface, from a member, with a valid header (and MAC), and
//! that its inner packet is one a client could have sent straight to the VIP, the node accepts
//! the inner packet if it owns the flow, or passes it on to the next hop it carries; the last
//! hop always accepts. A SYN another node redirected here is never redirected again (README
//! "Steering trust").
//!
//! UDP flows follow their service's placement mode (`Service::flags`): *connected* (neither
//! flag) is the owner check above, which only recognises connected sockets; *owner* sends a
//! flow to its bucket's current owner alone, which accepts it without a socket check (at most
//! one internal forward); *local* accepts it wherever it lands. TCP and ICMP ignore the mode.
//! UDP to a QUIC port of a `SERVICE_QUIC` service ignores it too: it is routed by connection
//! ID, or else like *owner* (`quic`).
//!
//! Both paths, the owner check and the encapsulation are inlined into the entry point: a call
//! between BPF functions costs about 8 ns on hosts that mitigate return-address attacks, more
//! than most of what the paths do. The compiler overlaps the paths' stack slots (one frame of
//! about 300 bytes, under the 512-byte limit together with the one call left, the next-hop
//! fallback). Loops that walk memory are avoided: once everything is one function, the
//! compiler no longer unrolls them reliably, and the verifier cannot follow them.

use aya_ebpf::programs::XdpContext;
use cdn_common::{
    counters::Reason,
    maps::{
        NO_MEMBER, NODE_DRAINING, NODE_READY, NODE_STEER_AUTH, NODE_UNDERLAY_IFACES, NodeConfig,
        SERVICE_PLACE_ELSEWHERE, SERVICE_UDP_LOCAL, SERVICE_UDP_OWNER, Service,
    },
    wire::{
        STEER_INNER_V6, STEER_MAC_LEN, STEER_MAX_REMAINING, STEER_SEARCH_POS_INDEX,
        STEER_SEARCH_POS_REDIRECTED, STEER_SYN_REDIRECTED, STEER_VERSION, STEER_VERSION_AUTH,
        STEER_VERSION_SEARCH, STEER_VERSION_SEARCH_AUTH, SteerHeader, entropy_port,
    },
};

use crate::{
    auth::verify,
    encap::{Encap, decapsulate, encap_and_send},
    learned,
    maps::{CONFIG, MEMBER_ADDRS, UNDERLAY_IFACES},
    packet::Frame,
    parse::{
        Kind, L2, dst_addr_off, member_key, parse_flow, parse_ip, parse_l2, peek_udp_dport,
        require_ip_header,
    },
    placement::{
        flow_hash, hops_in, hops_of, new_flow_bucket_of, new_flow_table, serves, service, signed,
    },
    quic::{self, is_quic},
    search,
    sockets::{Ownership, check},
    trace,
    verdict::Verdict,
    wire::{proto, steer, udp},
};

/// A path's result: its verdict, or the reason it drops the packet.
#[inline(always)]
fn settle(result: Result<Verdict, Reason>) -> Verdict {
    match result {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::drop(reason),
    }
}

/// Handles one packet: the final verdict, to be counted and returned by the caller.
#[inline(always)]
pub fn process(ctx: &XdpContext) -> Verdict {
    // The array has exactly one entry, so this cannot fail; if it ever did, the packet would
    // pass untouched, which is what "not ready" means.
    let Some(cfg) = CONFIG.get(0) else {
        return Verdict::pass(Reason::NotReady);
    };
    let mut encap = Encap::EMPTY;
    let verdict = settle(try_process(ctx, cfg, &mut encap));
    if verdict.is_encapsulate() {
        return encap_and_send::<false>(ctx, cfg, &encap, verdict).with_target(encap.target);
    }
    // Here, not in the paths: the one place the search step is called from, where little of
    // the paths' state is left for the verifier to tell apart (see `search`).
    if verdict.is_search() {
        // Cannot fail, like `CONFIG.get(0)` above; untouched is what "not ready" means.
        let Some(request) = trace::opaque(verdict) else {
            return Verdict::pass(Reason::NotReady);
        };
        let mut verdict = search::search(ctx.ctx, cfg, &mut encap, request.search_packed());
        if verdict.is_encapsulate() && cfg.flags & NODE_STEER_AUTH != 0 {
            verdict = search::sign(ctx.ctx, cfg, &encap, verdict);
        }
        if verdict.is_encapsulate() {
            return encap_and_send::<true>(ctx, cfg, &encap, verdict).with_target(encap.target);
        }
        return verdict;
    }
    verdict
}

#[inline(always)]
fn try_process(ctx: &XdpContext, cfg: &NodeConfig, out: &mut Encap) -> Result<Verdict, Reason> {
    if cfg.flags & NODE_READY == 0 {
        return Ok(Verdict::pass(Reason::NotReady));
    }
    let frame = Frame::new(ctx);
    let Some(l2) = parse_l2(&frame)? else {
        return Ok(Verdict::pass(Reason::NonVipPass));
    };
    require_ip_header(&frame, l2)?;
    let dst_off = dst_addr_off(l2.l3_off, l2.v6);
    if is_our_underlay(&frame, cfg, dst_off, l2.v6) {
        if peek_udp_dport(&frame, l2)? == Some(cfg.steer_port) {
            return Ok(owner_path(ctx, cfg, l2, out));
        }
        return Ok(Verdict::pass(Reason::NonVipPass));
    }
    match service(&frame, dst_off, l2.v6) {
        Some(svc) => Ok(ingress(ctx, cfg, l2, svc, out)),
        None => Ok(Verdict::pass(Reason::NonVipPass)),
    }
}

#[inline(always)]
fn is_our_underlay(frame: &Frame, cfg: &NodeConfig, dst_off: usize, v6: bool) -> bool {
    if v6 {
        let Some(dst) = frame.read::<[u64; 2]>(dst_off) else {
            return false;
        };
        // SAFETY: [u8; 16] and [u64; 2] have the same size and no invalid bit patterns.
        let ours: [u64; 2] = unsafe { core::mem::transmute(cfg.underlay_v6) };
        dst == ours && ours != [0; 2]
    } else {
        let ours = u32::from_ne_bytes(cfg.underlay_v4);
        frame.read::<u32>(dst_off) == Some(ours) && ours != 0
    }
}

/// `try_owner_path`'s mark of a search header in its copy of the header's flags (a bit no
/// header defines).
const SEARCHING: u8 = 1 << 7;
const _: () = assert!(SEARCHING >> 6 == STEER_VERSION_SEARCH - STEER_VERSION);
const _: () = assert!(SEARCHING & (STEER_INNER_V6 | STEER_SYN_REDIRECTED) == 0);

#[inline(always)]
fn ingress(ctx: &XdpContext, cfg: &NodeConfig, l2: L2, svc: &Service, out: &mut Encap) -> Verdict {
    settle(try_ingress(ctx, cfg, l2, svc, out))
}

#[inline(always)]
fn try_ingress(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    l2: L2,
    svc: &Service,
    out: &mut Encap,
) -> Result<Verdict, Reason> {
    let frame = &Frame::new(ctx);
    let ip = parse_ip(frame, l2.l3_off, l2.v6)?;
    let flow = parse_flow(frame, &ip)?;
    let forwarded = match flow.kind {
        Kind::IcmpLocal => return Ok(Verdict::pass(Reason::IcmpLocal)),
        Kind::IcmpError => {
            if !serves(svc, &flow) {
                return Ok(Verdict::pass(Reason::IcmpLocal));
            }
            Reason::IcmpForwarded
        }
        Kind::Tcp | Kind::Udp => {
            if !serves(svc, &flow) {
                return Err(Reason::PortMiss);
            }
            // QUIC ports of a QUIC service are routed by connection ID (`quic`); for other
            // services this costs one flag test.
            if flow.kind == Kind::Udp && is_quic(svc, flow.dst_port()) {
                return quic::ingress(ctx, cfg, frame, &ip, &flow, svc, out);
            }
            // Before hashing: a local-mode flow needs no bucket.
            if flow.kind == Kind::Udp && svc.flags & SERVICE_UDP_LOCAL != 0 {
                return Ok(Verdict::pass(Reason::UdpLocalAccept));
            }
            Reason::Forwarded
        }
    };
    let udp_owner = flow.kind == Kind::Udp && svc.flags & SERVICE_UDP_OWNER != 0;
    let hash = flow_hash(cfg, frame, &flow)?;
    // A flow a claim taught this node goes straight to its owner in another PoP (README
    // "PoPs: learned owners"): searchable flows only, and only for marked buckets. Before the
    // table is read, so that the common path keeps nothing across the lookup's call.
    if svc.search_pops != 0
        && !udp_owner
        && flow.kind != Kind::IcmpError
        && !search::is_syn(&flow)
        && let Some(bucket) = hash.checked_rem(svc.table_size as u64)
        && learned::marked(bucket as u32)
    {
        let member = learned::member(ctx, &flow, cfg.self_member);
        if member != NO_MEMBER && member != cfg.self_member {
            let e = Encap {
                inner_off: l2.l3_off,
                inner_len: ip.ip_len,
                inner_v6: l2.v6,
                target: member,
                remaining: [NO_MEMBER; 2],
                budget: cfg.hop_budget,
                entropy: entropy_port(hash),
                flags: 0,
            };
            return signed(ctx, cfg, &flow, out, e, Reason::LearnedForward);
        }
    }
    let mut hops = hops_of(svc, hash)?;
    // While this node's PoP has no eligible member, a new connection is placed by another
    // PoP's table; everything else follows this PoP's chain. Tested in this order so that an
    // established flow pays one flag test.
    if svc.flags & SERVICE_PLACE_ELSEWHERE != 0 && (udp_owner || search::is_syn(&flow)) {
        hops = hops_in(svc, new_flow_table(svc), hash)?;
    }
    if hops[0] == NO_MEMBER {
        // This PoP's table has never named anyone for the bucket (a PoP whose members were
        // all out since this node started): an established flow may live in another PoP.
        if svc.search_pops != 0 && !udp_owner && !search::is_syn(&flow) {
            return Ok(Verdict::search(search::pack(l2.l3_off, l2.v6, 0)));
        }
        return Err(Reason::NoRoute);
    }
    let mut e = Encap {
        inner_off: l2.l3_off,
        inner_len: ip.ip_len,
        inner_v6: l2.v6,
        target: hops[0],
        remaining: [hops[1], hops[2]],
        budget: cfg.hop_budget,
        entropy: entropy_port(hash),
        flags: 0,
    };
    if hops[0] != cfg.self_member {
        if udp_owner {
            // The owner accepts without looking further: no previous owner to carry.
            e.remaining = [NO_MEMBER; 2];
        }
        return signed(ctx, cfg, &flow, out, e, forwarded);
    }
    if udp_owner {
        return Ok(Verdict::pass(Reason::UdpOwnerAccept));
    }
    // We are the first hop: the owner check runs here, on the unmodified packet.
    let next = hops[1];
    let draining = cfg.flags & NODE_DRAINING != 0 && next != NO_MEMBER;
    let reason = match check(ctx, &flow, &ip, draining) {
        Ownership::Ours => return Ok(Verdict::pass(Reason::LocalAccept)),
        Ownership::NotOurs => Reason::PassedOn,
        Ownership::Draining => Reason::DrainPassOn,
    };
    if next == NO_MEMBER {
        if svc.search_pops != 0 {
            // This PoP's chain is done: the other PoPs are searched (README "PoPs").
            return Ok(Verdict::search(search::pack(l2.l3_off, l2.v6, 0)));
        }
        return Ok(Verdict::pass(Reason::LastHopAccept));
    }
    if cfg.hop_budget == 0 {
        return Err(Reason::LoopGuard);
    }
    e.target = next;
    e.remaining = [hops[2], NO_MEMBER];
    e.budget = cfg.hop_budget - 1;
    signed(ctx, cfg, &flow, out, e, reason)
}

#[inline(always)]
fn owner_path(ctx: &XdpContext, cfg: &NodeConfig, l2: L2, out: &mut Encap) -> Verdict {
    settle(try_owner_path(ctx, cfg, l2, out))
}

#[inline(always)]
fn try_owner_path(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    l2: L2,
    out: &mut Encap,
) -> Result<Verdict, Reason> {
    let frame = &Frame::new(ctx);
    let outer = parse_ip(frame, l2.l3_off, l2.v6)?;
    if outer.proto != proto::UDP {
        return Ok(Verdict::pass(Reason::NonVipPass));
    }
    // Steering comes in on the underlay only: a forged source address on the uplink stops here.
    if cfg.flags & NODE_UNDERLAY_IFACES != 0
        && UNDERLAY_IFACES
            .get_ptr(ctx.ingress_ifindex() as u32)
            .is_none()
    {
        return Err(Reason::NotUnderlay);
    }
    // No open relay: only members may hand us packets to accept or pass on.
    let source = member_key(frame, outer.src_off(), l2.v6).ok_or(Reason::Malformed)?;
    let Some(from) = MEMBER_ADDRS.get_ptr(source) else {
        return Err(Reason::Spoofed);
    };
    // SAFETY: a non-NULL lookup result points at the map's u16 value.
    let from = unsafe { *from };
    let udp_off = outer.l4_off;
    let steer_off = udp_off + udp::LEN;
    let mut sh = frame
        .read::<SteerHeader>(steer_off)
        .ok_or(Reason::Malformed)?;
    // A search header (versions 3 and 4, README "PoPs") gets the checks of the version (1
    // or 2) it extends, marked as a search in this copy's flags; `search::search` reads its
    // own fields again.
    if sh.version == STEER_VERSION_SEARCH || sh.version == STEER_VERSION_SEARCH_AUTH {
        // The walk's position: an index 0..=2 and the redirected bit, nothing else.
        let pos = u16::from_be(sh.hops[1]);
        if pos & !(STEER_SEARCH_POS_INDEX | STEER_SEARCH_POS_REDIRECTED) != 0
            || pos & STEER_SEARCH_POS_INDEX == STEER_SEARCH_POS_INDEX
        {
            return Err(Reason::BadEncap);
        }
        sh.version -= STEER_VERSION_SEARCH - STEER_VERSION;
        sh.hop_count = 0;
        sh.flags |= SEARCHING;
    } else {
        sh.flags &= !SEARCHING;
    }
    let header_len = match sh.version {
        STEER_VERSION => steer::LEN,
        STEER_VERSION_AUTH => steer::LEN + STEER_MAC_LEN,
        _ => return Err(Reason::BadEncap),
    };
    if sh.hop_count as usize > STEER_MAX_REMAINING {
        return Err(Reason::BadEncap);
    }
    if sh.version == STEER_VERSION && cfg.flags & NODE_STEER_AUTH != 0 {
        return Err(Reason::AuthFailed);
    }
    let inner_off = steer_off + header_len;
    let inner_v6 = sh.flags & STEER_INNER_V6 != 0;
    // Checked here, reported after the inner packet's own errors (see `verify`). A failure
    // is remembered as version 0 (refused above), not in a variable of its own: the entry
    // point's frame has no stack slot to spare.
    if sh.version == STEER_VERSION_AUTH
        && !verify(
            ctx.ctx,
            cfg,
            steer_off,
            outer.src_off(),
            l2.v6 as u32 | (inner_v6 as u32) << 1,
        )
    {
        sh.version = 0;
    }
    let ip = parse_ip(frame, inner_off, inner_v6)?;
    if ip.l3_off + ip.ip_len > outer.l3_off + outer.ip_len {
        return Err(Reason::Malformed);
    }
    let flow = parse_flow(frame, &ip)?;
    // The inner packet must be for one of our VIPs: we never deliver anything else.
    let Some(svc) = service(frame, ip.dst_off(), inner_v6) else {
        return Err(Reason::BadEncap);
    };
    if sh.version == 0 {
        return Err(Reason::AuthFailed);
    }
    // The inner packet gets the checks a direct one gets: a member forwards only what a
    // service serves, so anything else is forged (or a member's configuration is not ours).
    match flow.kind {
        Kind::IcmpLocal => return Err(Reason::BadEncap),
        _ if !serves(svc, &flow) => return Err(Reason::PortMiss),
        _ => {}
    }
    // A header never spends more than this node would have given it.
    let budget = sh.hop_budget.min(cfg.hop_budget);
    // UDP placement other than `connected`: whoever receives the flow keeps it, whatever
    // hops the header still lists. An `owner` sender only ever sends to the owner in its
    // table; a `local` flow arrives only while configurations disagree (a rollout), and
    // accepting it is what `local` means.
    if flow.kind == Kind::Udp {
        let reason = if is_quic(svc, flow.dst_port()) {
            // Decoded before decapsulating: the inner packet's offsets are those of now.
            Some(quic::owner_reason(cfg, frame, &ip, svc))
        } else if svc.flags & SERVICE_UDP_LOCAL != 0 {
            Some(Reason::UdpLocalAccept)
        } else if svc.flags & SERVICE_UDP_OWNER != 0 {
            Some(Reason::UdpOwnerAccept)
        } else {
            None
        };
        if let Some(reason) = reason {
            decapsulate(ctx, inner_off, inner_v6)?;
            return Ok(Verdict::pass(reason));
        }
    }
    let next = if sh.hop_count >= 1 {
        u16::from_be(sh.hops[0])
    } else {
        NO_MEMBER
    };
    let after = if sh.hop_count >= 2 {
        u16::from_be(sh.hops[1])
    } else {
        NO_MEMBER
    };
    let draining = cfg.flags & NODE_DRAINING != 0 && next != NO_MEMBER;
    // Read this late: kept from the start, it would take a stack slot across the calls above.
    // Through a frame read anew from the context, so that the compiler repeats the bounds
    // check instead of borrowing the steering header's, which the verifier cannot connect
    // to this access.
    let entropy = Frame::new(ctx)
        .get(udp_off, udp::SRC_PORT)
        .ok_or(Reason::Malformed)?;
    let entropy = u16::from_be(entropy);
    let mut e = Encap {
        inner_off,
        inner_len: ip.ip_len,
        inner_v6,
        target: next,
        remaining: [after, NO_MEMBER],
        budget: budget.wrapping_sub(1),
        entropy,
        flags: 0,
    };
    let syn = search::is_syn(&flow);
    // A search is for a flow that exists; a new connection never starts one.
    if syn && sh.flags & SEARCHING != 0 {
        return Err(Reason::BadEncap);
    }
    // A redirected SYN is never redirected again, so tables that disagree cannot bounce it:
    // it is accepted here, or, by a draining node, passed on along its hops but never back.
    if syn && sh.flags & STEER_SYN_REDIRECTED != 0 {
        if draining && budget > 0 && next != from {
            e.flags = STEER_SYN_REDIRECTED;
            return signed(ctx, cfg, &flow, out, e, Reason::DrainPassOn);
        }
        decapsulate(ctx, inner_off, inner_v6)?;
        return Ok(Verdict::pass(Reason::RedirectedSynAccept));
    }
    // A new connection is taken only by the member that this node's own table names as the
    // owner. Nodes whose health views differ for a moment (one saw a member flap, one just
    // started) then still agree on where connections are made: the acceptor is always the
    // owner in its own table, so every table later lists it as owner or previous owner.
    if syn {
        let (_, own) = new_flow_bucket_of(cfg, frame, &flow, svc)?;
        if own[0] != NO_MEMBER && own[0] != cfg.self_member {
            if budget == 0 {
                return Err(Reason::LoopGuard);
            }
            e.target = own[0];
            e.remaining = [own[1], own[2]];
            e.flags = STEER_SYN_REDIRECTED;
            return signed(ctx, cfg, &flow, out, e, Reason::SynRedirect);
        }
    }
    let reason = match check(ctx, &flow, &ip, draining) {
        Ownership::Ours => {
            if sh.flags & SEARCHING != 0 {
                // The PoP where the search started learns the owner (README "PoPs: learned
                // owners"); reported before decapsulating, while the flow's offsets hold.
                let claimed = learned::claim(ctx, &flow, u16::from_be(sh.hops[0]), inner_off);
                decapsulate(ctx, inner_off, inner_v6)?;
                let verdict = Verdict::pass(Reason::SearchAccept);
                return Ok(if claimed {
                    verdict
                } else {
                    verdict.with_info(Reason::ClaimLost)
                });
            }
            decapsulate(ctx, inner_off, inner_v6)?;
            return Ok(Verdict::pass(Reason::OwnerAccept));
        }
        Ownership::NotOurs => Reason::PassedOn,
        Ownership::Draining => Reason::DrainPassOn,
    };
    if next == NO_MEMBER {
        // This PoP's chain is done: the other PoPs are searched, or a search goes on (README
        // "PoPs"). A search header got here with no hops: not drained, not passed on above.
        if svc.search_pops != 0 || sh.flags & SEARCHING != 0 {
            // The version on the wire: a search is 2 more than its checks' version.
            let version = sh.version + ((sh.flags & SEARCHING) >> 6);
            return Ok(Verdict::search(search::pack(inner_off, inner_v6, version)));
        }
        decapsulate(ctx, inner_off, inner_v6)?;
        return Ok(Verdict::pass(Reason::LastHopAccept));
    }
    if budget == 0 {
        return Err(Reason::LoopGuard);
    }
    signed(ctx, cfg, &flow, out, e, reason)
}
