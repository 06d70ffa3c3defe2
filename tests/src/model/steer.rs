//! The steering decision: which path a frame takes and what happens on it (README "Packet
//! path"; reasons as in `cdn_common::counters`).

use std::{hash::Hasher, net::IpAddr};

use cdn_common::{
    counters::Reason,
    maps::{
        NO_MEMBER, NODE_DRAINING, NODE_READY, SERVICE_ALL_PORTS, SERVICE_PLACE_ELSEWHERE,
        SERVICE_PLACE_POP_MASK, SERVICE_PLACE_POP_SHIFT, SERVICE_TCP, SERVICE_UDP,
        SERVICE_UDP_LOCAL, SERVICE_UDP_OWNER, Service,
    },
};
use siphasher::sip::SipHasher13;

use super::{
    Env, Expect, Rules, Why, auth,
    frame::{self, Flow, Kind, PROTO_TCP, PROTO_UDP},
    output::{
        Encap, FLAG_SYN_REDIRECTED, VERSION_SEARCH, VERSION_SEARCH_AUTH, decapsulated,
        encap_and_send,
    },
    quic,
    search::{search_pass_on, search_position, search_start},
};

pub(super) type Step = Result<Expect, Why>;

pub fn decide(env: &Env, rules: &Rules, f: &[u8], ifindex: u32) -> Expect {
    top(env, rules, f, ifindex).unwrap_or_else(Expect::drop)
}

fn top(env: &Env, rules: &Rules, f: &[u8], ifindex: u32) -> Step {
    if env.cfg.flags & NODE_READY == 0 {
        return Ok(Expect::pass(Reason::NotReady));
    }
    let Some((l3, v6)) = frame::l2(f, rules.max_vlan_tags)? else {
        return Ok(Expect::pass(Reason::NonVipPass));
    };
    frame::bytes(f, l3, if v6 { 40 } else { 20 })?;
    let dst = frame::addr_at(f, frame::dst_off(l3, v6), v6)?;
    if is_our_underlay(env, dst) {
        if frame::peek_udp_dport(f, l3, v6)? == Some(env.cfg.steer_port) {
            return owner(env, rules, f, l3, v6, ifindex);
        }
        return Ok(Expect::pass(Reason::NonVipPass));
    }
    match service(env, dst) {
        Some(svc) => ingress(env, rules, f, l3, v6, ifindex, &svc),
        None => Ok(Expect::pass(Reason::NonVipPass)),
    }
}

fn is_our_underlay(env: &Env, dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => env.cfg.underlay_v4 != [0; 4] && a.octets() == env.cfg.underlay_v4,
        IpAddr::V6(a) => env.cfg.underlay_v6 != [0; 16] && a.octets() == env.cfg.underlay_v6,
    }
}

/// Longest-prefix match over the VIP prefixes of the address's family.
fn service(env: &Env, addr: IpAddr) -> Option<Service> {
    let bits = |a: IpAddr| match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    };
    env.services
        .iter()
        .filter(|(p, len, _)| {
            p.is_ipv6() == addr.is_ipv6()
                && (*len == 0 || (bits(*p) ^ bits(addr)) >> (128 - u32::from(*len)) == 0)
        })
        .max_by_key(|(_, len, _)| *len)
        .map(|(_, _, s)| *s)
}

fn serves(svc: &Service, fl: &Flow) -> bool {
    let (flag, ports) = if fl.proto == PROTO_UDP {
        (SERVICE_UDP, &svc.udp_ports)
    } else {
        (SERVICE_TCP, &svc.tcp_ports)
    };
    svc.flags & flag != 0
        && (svc.flags & SERVICE_ALL_PORTS != 0 || (fl.dport != 0 && ports.contains(&fl.dport)))
}

/// SipHash-1-3 over the documented message: addresses, ports, protocol, family.
pub fn flow_hash(key: [u64; 2], fl: &Flow) -> u64 {
    let mut h = SipHasher13::new_with_keys(key[0], key[1]);
    let (family, src, dst) = match (fl.src, fl.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (4, s.octets().to_vec(), d.octets().to_vec()),
        (IpAddr::V6(s), IpAddr::V6(d)) => (6, s.octets().to_vec(), d.octets().to_vec()),
        _ => unreachable!("one family per packet"),
    };
    h.write(&src);
    h.write(&dst);
    h.write(&fl.sport.to_be_bytes());
    h.write(&fl.dport.to_be_bytes());
    h.write(&[fl.proto, family, 0, 0]);
    h.finish()
}

pub(super) fn entropy_port(hash: u64) -> u16 {
    0xc000 | ((hash >> 50) as u16 & 0x3fff)
}

impl Env {
    /// The index in `TABLE` of `fl`'s bucket, and its hash.
    pub fn bucket_index(&self, fl: &Flow) -> Option<(usize, u64)> {
        let svc = service(self, fl.dst)?;
        (svc.table_size != 0).then(|| {
            let hash = flow_hash(self.cfg.hash_key, fl);
            let index = svc.table_offset as u64 + hash % u64::from(svc.table_size);
            (index as usize, hash)
        })
    }
}

pub(super) fn bucket(env: &Env, svc: &Service, fl: &Flow) -> Result<(u64, [u16; 3]), Why> {
    bucket_in(env, svc, fl, svc.table_offset)
}

/// The table that places new connections: this node's own PoP's, or the one the flags name
/// while its PoP has no eligible member (README "PoPs: fallback").
fn new_flow_table(svc: &Service) -> u32 {
    if svc.flags & SERVICE_PLACE_ELSEWHERE == 0 {
        return svc.table_offset;
    }
    svc.pop_tables[((svc.flags >> SERVICE_PLACE_POP_SHIFT) & SERVICE_PLACE_POP_MASK) as usize]
}

/// `bucket` in the table that places new connections.
fn new_flow_bucket(env: &Env, svc: &Service, fl: &Flow) -> Result<(u64, [u16; 3]), Why> {
    bucket_in(env, svc, fl, new_flow_table(svc))
}

fn bucket_in(env: &Env, svc: &Service, fl: &Flow, table: u32) -> Result<(u64, [u16; 3]), Why> {
    if svc.table_size == 0 {
        return Err(Reason::NoRoute.into());
    }
    let hash = flow_hash(env.cfg.hash_key, fl);
    let index = u64::from(table) + hash % u64::from(svc.table_size);
    let b = env
        .table
        .get(index as usize)
        .ok_or(Why::Is(Reason::NoRoute))?;
    Ok((hash, b.hops))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Ours,
    NotOurs,
    Draining,
}

/// Does this node hold the flow (a socket for it, or a new connection it takes)?
fn owned(env: &Env, fl: &Flow, draining: bool) -> Owner {
    let tuple = (fl.src, fl.sport, fl.dst, fl.dport);
    let held = match fl.kind {
        Kind::Tcp if fl.is_syn() => !draining,
        Kind::Tcp => env.tcp_established.contains(&tuple),
        Kind::IcmpError if fl.proto == PROTO_TCP => env.tcp_established.contains(&tuple),
        Kind::Udp | Kind::IcmpError => env.udp_connected.contains(&tuple),
        Kind::IcmpLocal => true,
    };
    match (held, fl.is_syn()) {
        (true, _) => Owner::Ours,
        (false, true) => Owner::Draining,
        (false, false) => Owner::NotOurs,
    }
}

fn flow_fields(fl: &Flow) -> (IpAddr, IpAddr, u16, u16, u8) {
    (fl.src, fl.dst, fl.sport, fl.dport, fl.proto)
}

/// The member `LEARNED` names for a searchable flow of a service with PoPs whose bucket bit
/// is set, unless that is nobody or this node.
fn learned_owner(env: &Env, svc: &Service, fl: &Flow, udp_owner: bool) -> Option<u16> {
    if svc.search_pops == 0
        || svc.table_size == 0
        || udp_owner
        || fl.kind == Kind::IcmpError
        || fl.is_syn()
    {
        return None;
    }
    let bucket = flow_hash(env.cfg.hash_key, fl) % u64::from(svc.table_size);
    if !env.learned_buckets.contains(&(bucket as u32)) {
        return None;
    }
    let member = *env.learned.get(&flow_fields(fl))?;
    (member != NO_MEMBER && member != env.cfg.self_member).then_some(member)
}

/// A client packet to a VIP.
fn ingress(
    env: &Env,
    rules: &Rules,
    f: &[u8],
    l3: usize,
    v6: bool,
    ifindex: u32,
    svc: &Service,
) -> Step {
    let ip = frame::ip(f, l3, v6)?;
    let fl = frame::flow(f, &ip)?;
    let forwarded = match fl.kind {
        Kind::IcmpLocal => return Ok(Expect::pass(Reason::IcmpLocal)),
        // An error about a flow no service serves is the local stack's business.
        Kind::IcmpError if !serves(svc, &fl) => return Ok(Expect::pass(Reason::IcmpLocal)),
        Kind::IcmpError => Reason::IcmpForwarded,
        _ if !serves(svc, &fl) => return Err(Reason::PortMiss.into()),
        Kind::Udp if quic::is_quic(svc, fl.dport) => {
            let e = Encap {
                inner_off: l3,
                inner_len: ip.len,
                inner_v6: v6,
                target: NO_MEMBER,
                remaining: [NO_MEMBER; 2],
                budget: env.cfg.hop_budget,
                entropy: 0,
                extra_flags: 0,
                flow: flow_fields(&fl),
                search: None,
            };
            let owner = || {
                let (hash, hops) = new_flow_bucket(env, svc, &fl)?;
                Ok((hops[0], entropy_port(hash)))
            };
            return quic::ingress(env, rules, f, ifindex, &ip, &fl, svc, e, owner);
        }
        Kind::Udp if svc.flags & SERVICE_UDP_LOCAL != 0 => {
            return Ok(Expect::pass(Reason::UdpLocalAccept));
        }
        _ => Reason::Forwarded,
    };
    let udp_owner = fl.kind == Kind::Udp && svc.flags & SERVICE_UDP_OWNER != 0;
    // README "PoPs: learned owners": a searchable flow of a marked bucket with an entry naming
    // another member goes straight there, carrying no hops, whatever the table says.
    if let Some(member) = learned_owner(env, svc, &fl, udp_owner) {
        let hash = flow_hash(env.cfg.hash_key, &fl);
        let e = Encap {
            inner_off: l3,
            inner_len: ip.len,
            inner_v6: v6,
            target: member,
            remaining: [NO_MEMBER; 2],
            budget: env.cfg.hop_budget,
            entropy: entropy_port(hash),
            extra_flags: 0,
            flow: flow_fields(&fl),
            search: None,
        };
        return Ok(encap_and_send(
            env,
            rules,
            f,
            ifindex,
            &e,
            Reason::LearnedForward,
        ));
    }
    let (hash, hops) = if udp_owner || fl.is_syn() {
        new_flow_bucket(env, svc, &fl)?
    } else {
        bucket(env, svc, &fl)?
    };
    let cfg = &env.cfg;
    let mut e = Encap {
        inner_off: l3,
        inner_len: ip.len,
        inner_v6: v6,
        target: hops[0],
        remaining: [hops[1], hops[2]],
        budget: cfg.hop_budget,
        entropy: entropy_port(hash),
        extra_flags: 0,
        flow: flow_fields(&fl),
        search: None,
    };
    if hops[0] == NO_MEMBER {
        // README "PoPs", Fallback: a bucket this PoP's table never named anyone for; an
        // established flow is searched for in the other PoPs.
        if svc.search_pops != 0 && !udp_owner && !fl.is_syn() {
            return search_start(env, rules, f, ifindex, svc, &fl, e, false);
        }
        return Err(Reason::NoRoute.into());
    }
    if hops[0] != cfg.self_member {
        if udp_owner {
            e.remaining = [NO_MEMBER; 2];
        }
        return Ok(encap_and_send(env, rules, f, ifindex, &e, forwarded));
    }
    if udp_owner {
        return Ok(Expect::pass(Reason::UdpOwnerAccept));
    }
    let next = hops[1];
    let draining = cfg.flags & NODE_DRAINING != 0 && next != NO_MEMBER;
    let reason = match owned(env, &fl, draining) {
        Owner::Ours => return Ok(Expect::pass(Reason::LocalAccept)),
        Owner::NotOurs => Reason::PassedOn,
        Owner::Draining => Reason::DrainPassOn,
    };
    if next == NO_MEMBER {
        if svc.search_pops != 0 {
            // This PoP's chain is done: the flow is searched for in the other PoPs.
            return search_start(env, rules, f, ifindex, svc, &fl, e, false);
        }
        return Ok(Expect::pass(Reason::LastHopAccept));
    }
    if cfg.hop_budget == 0 {
        return Err(Reason::LoopGuard.into());
    }
    e.target = next;
    e.remaining = [hops[2], NO_MEMBER];
    e.budget = cfg.hop_budget - 1;
    Ok(encap_and_send(env, rules, f, ifindex, &e, reason))
}

/// The member an underlay address belongs to (the reverse map holds IPv4 addresses
/// IPv4-mapped, so an IPv4 member never matches an IPv6 source and vice versa).
fn member_of(env: &Env, addr: IpAddr) -> Option<u16> {
    env.members
        .iter()
        .find(|(_, a)| **a == addr)
        .map(|(id, _)| *id)
}

/// A steering packet to our underlay address and steering port.
fn owner(env: &Env, rules: &Rules, f: &[u8], l3: usize, v6: bool, ifindex: u32) -> Step {
    let cfg = &env.cfg;
    let outer = frame::ip(f, l3, v6)?;
    if outer.proto != PROTO_UDP {
        return Ok(Expect::pass(Reason::NonVipPass));
    }
    if rules.underlay_ifaces
        && !env.underlay_ifindexes.is_empty()
        && !env.underlay_ifindexes.contains(&ifindex)
    {
        return Err(Why::NOT_UNDERLAY);
    }
    let from = member_of(env, outer.src(f)?).ok_or(Why::Is(Reason::Spoofed))?;
    let entropy = frame::be16(f, outer.l4)?;
    let sh = frame::bytes(f, outer.l4 + 8, 8)?;
    let (version, flags, header_budget, hop_count) = (sh[0], sh[1], sh[2], sh[3]);
    let hops = [
        u16::from_be_bytes([sh[4], sh[5]]),
        u16::from_be_bytes([sh[6], sh[7]]),
    ];
    let header_len = match version {
        1 | VERSION_SEARCH => 8,
        auth::VERSION_AUTH | VERSION_SEARCH_AUTH if rules.mac => auth::HEADER_LEN_AUTH,
        _ => return Err(Reason::BadEncap.into()),
    };
    // A search header (README "PoPs"): its hop count is a PoP set, its second hop the walk's
    // position (an index 0..=2, and the redirected bit).
    let searching = version == VERSION_SEARCH || version == VERSION_SEARCH_AUTH;
    if searching {
        if search_position(hops[1]).is_none() {
            return Err(Reason::BadEncap.into());
        }
    } else if hop_count > 2 {
        return Err(Reason::BadEncap.into());
    }
    if rules.mac && (version == 1 || version == VERSION_SEARCH) && env.steer_auth {
        return Err(Why::AUTH_FAILED);
    }
    let mac_field = frame::bytes(f, outer.l4 + 8, header_len)?[8..].to_vec();
    let inner_off = outer.l4 + 8 + header_len;
    let inner_v6 = flags & output_inner_v6() != 0;
    let ip = frame::ip(f, inner_off, inner_v6)?;
    if ip.end() > outer.end() {
        return Err(Reason::Malformed.into());
    }
    let fl = frame::flow(f, &ip)?;
    let svc = service(env, ip.dst(f)?).ok_or(Why::Is(Reason::BadEncap))?;
    if header_len == auth::HEADER_LEN_AUTH {
        let want = auth::mac(
            env.auth_key,
            &auth::Signed {
                outer_src: outer.src(f)?,
                client: fl.src,
                vip: fl.dst,
                sport: fl.sport,
                dport: fl.dport,
                proto: fl.proto,
                flags,
                budget: header_budget,
                hop_count,
                hops,
                search: version == VERSION_SEARCH_AUTH,
            },
        );
        if mac_field != want.to_le_bytes() {
            return Err(Why::AUTH_FAILED);
        }
    }
    if rules.inner_checks {
        match fl.kind {
            Kind::IcmpLocal => return Err(Reason::BadEncap.into()),
            _ if !serves(&svc, &fl) => return Err(Reason::PortMiss.into()),
            _ => {}
        }
    }
    let budget = if rules.hop_cap {
        header_budget.min(cfg.hop_budget)
    } else {
        header_budget
    };
    if fl.kind == Kind::Udp {
        if quic::is_quic(&svc, fl.dport) {
            let reason = quic::owner_reason(env, f, &ip, &svc);
            return Ok(decapsulated(f, inner_off, inner_v6, reason));
        }
        if svc.flags & SERVICE_UDP_LOCAL != 0 {
            return Ok(decapsulated(f, inner_off, inner_v6, Reason::UdpLocalAccept));
        }
        if svc.flags & SERVICE_UDP_OWNER != 0 {
            return Ok(decapsulated(f, inner_off, inner_v6, Reason::UdpOwnerAccept));
        }
    }
    // A search lists no hops to pass on to: its own are read below.
    let listed = if searching { 0 } else { hop_count };
    let next = if listed >= 1 { hops[0] } else { NO_MEMBER };
    let after = if listed >= 2 { hops[1] } else { NO_MEMBER };
    let draining = cfg.flags & NODE_DRAINING != 0 && next != NO_MEMBER;
    let mut e = Encap {
        inner_off,
        inner_len: ip.len,
        inner_v6,
        target: next,
        remaining: [after, NO_MEMBER],
        budget: budget.wrapping_sub(1),
        entropy,
        extra_flags: 0,
        flow: flow_fields(&fl),
        search: None,
    };
    if searching && fl.is_syn() {
        // A new connection is never searched for.
        return Err(Reason::BadEncap.into());
    }
    let marked = rules.syn_mark && flags & FLAG_SYN_REDIRECTED != 0;
    if fl.is_syn() && marked {
        // Never redirected again; passed on only by a draining node, never back.
        if draining && budget > 0 && next != from {
            e.extra_flags = FLAG_SYN_REDIRECTED;
            return Ok(encap_and_send(
                env,
                rules,
                f,
                ifindex,
                &e,
                Reason::DrainPassOn,
            ));
        }
        return Ok(decapsulated(
            f,
            inner_off,
            inner_v6,
            Why::REDIRECTED_SYN_ACCEPT,
        ));
    }
    if fl.is_syn() {
        // A new connection is taken only by the owner this node's own table names.
        let (_, own) = new_flow_bucket(env, &svc, &fl)?;
        if own[0] != NO_MEMBER && own[0] != cfg.self_member {
            if budget == 0 {
                return Err(Reason::LoopGuard.into());
            }
            e.target = own[0];
            e.remaining = [own[1], own[2]];
            if rules.syn_mark {
                e.extra_flags = FLAG_SYN_REDIRECTED;
            }
            return Ok(encap_and_send(
                env,
                rules,
                f,
                ifindex,
                &e,
                Reason::SynRedirect,
            ));
        }
    }
    let reason = match owned(env, &fl, draining) {
        Owner::Ours if searching => {
            return Ok(decapsulated(f, inner_off, inner_v6, Reason::SearchAccept));
        }
        Owner::Ours => return Ok(decapsulated(f, inner_off, inner_v6, Reason::OwnerAccept)),
        Owner::NotOurs => Reason::PassedOn,
        Owner::Draining => Reason::DrainPassOn,
    };
    if next == NO_MEMBER {
        if searching {
            return search_pass_on(
                env,
                rules,
                f,
                ifindex,
                &svc,
                &fl,
                e,
                header_budget,
                hops,
                hop_count,
            );
        }
        if svc.search_pops != 0 {
            return search_start(env, rules, f, ifindex, &svc, &fl, e, true);
        }
        return Ok(decapsulated(f, inner_off, inner_v6, Reason::LastHopAccept));
    }
    if budget == 0 {
        return Err(Reason::LoopGuard.into());
    }
    Ok(encap_and_send(env, rules, f, ifindex, &e, reason))
}

fn output_inner_v6() -> u8 {
    super::output::FLAG_INNER_V6
}
