//! The cross-PoP search (README "PoPs: the search in the data plane"): where the last hop of
//! a PoP's chain sends a flow it does not hold, and what a node asked by a search does.

use cdn_common::{counters::Reason, maps::NO_MEMBER, maps::Service};

use super::{
    Env, Expect, Rules,
    frame::Flow,
    output::{Encap, decapsulated, encap_and_send},
    steer::{Step, bucket, entropy_port},
};

/// A search header's position field: the chain index it asks the addressee as, and whether
/// the search was redirected at that index already; `None` for any other bit or index 3.
pub fn search_position(field: u16) -> Option<(usize, bool)> {
    const REDIRECTED: u16 = 0x8000;
    let index = usize::from(field & 0x3);
    (field & !(REDIRECTED | 0x3) == 0 && index <= 2).then_some((index, field & REDIRECTED != 0))
}

/// The header field for position `index`, redirected there or not.
pub fn search_position_field(index: usize, redirected: bool) -> u16 {
    index as u16 | if redirected { 0x8000 } else { 0 }
}

/// The owner of `fl`'s bucket in the first PoP of `pops` (lowest index first) that names one
/// other than this node, looking at two PoPs at most; and the PoPs left after it.
fn next_pop(env: &Env, svc: &Service, pops: u8, bucket: u32) -> (u16, u8) {
    let mut pops = pops;
    for _ in 0..2 {
        if pops == 0 {
            return (NO_MEMBER, 0);
        }
        let q = pops.trailing_zeros() as usize;
        pops &= !(1 << q);
        let owner = env
            .table
            .get(svc.pop_tables[q].wrapping_add(bucket) as usize)
            .map_or(NO_MEMBER, |b| b.hops[0]);
        if owner != NO_MEMBER && owner != env.cfg.self_member {
            return (owner, pops);
        }
    }
    (NO_MEMBER, pops)
}

/// Where the last hop of this node's PoP accepted before there were PoPs: a flow that is not
/// a new connection goes to its owner in the first other PoP that names one, in a search
/// header; else it is accepted (decapsulated if it came steered).
#[allow(clippy::too_many_arguments)]
pub(super) fn search_start(
    env: &Env,
    rules: &Rules,
    f: &[u8],
    ifindex: u32,
    svc: &Service,
    fl: &Flow,
    mut e: Encap,
    steered: bool,
) -> Step {
    let accept = || {
        Ok(if steered {
            decapsulated(f, e.inner_off, e.inner_v6, Reason::LastHopAccept)
        } else {
            Expect::pass(Reason::LastHopAccept)
        })
    };
    if fl.is_syn() || svc.table_size == 0 {
        return accept();
    }
    let (hash, _) = bucket(env, svc, fl)?;
    let (target, pops) = next_pop(
        env,
        svc,
        svc.search_pops,
        (hash % u64::from(svc.table_size)) as u32,
    );
    if target == NO_MEMBER {
        return accept();
    }
    e.target = target;
    e.remaining = [env.cfg.self_member, search_position_field(0, false)];
    e.budget = env.cfg.search_budget;
    e.extra_flags = 0;
    e.search = Some(pops);
    if !steered {
        e.entropy = entropy_port(hash);
    }
    Ok(encap_and_send(
        env,
        rules,
        f,
        ifindex,
        &e,
        Reason::SearchStart,
    ))
}

/// A search this node does not hold, asked as index `i` of its PoP's chain for the bucket
/// (the header's position): redirected once to whom this node's view names at `i` if that is
/// someone else; else on to the next member of the chain after `i` that is neither missing
/// nor this node; then to the first other PoP left that names an owner (at index 0); with
/// nobody left, accepted.
#[allow(clippy::too_many_arguments)]
pub(super) fn search_pass_on(
    env: &Env,
    rules: &Rules,
    f: &[u8],
    ifindex: u32,
    svc: &Service,
    fl: &Flow,
    mut e: Encap,
    header_budget: u8,
    hops: [u16; 2],
    pops: u8,
) -> Step {
    let (hash, own) = bucket(env, svc, fl)?;
    let me = env.cfg.self_member;
    let other = |m: u16| m != NO_MEMBER && m != me;
    let (at, redirected) = search_position(hops[1]).ok_or(Reason::BadEncap)?;
    let (target, pops, position) = if other(own[at]) && !redirected {
        (own[at], pops, search_position_field(at, true))
    } else if let Some(j) = (at + 1..3).find(|&j| other(own[j])) {
        (own[j], pops, search_position_field(j, false))
    } else {
        let (target, pops) = next_pop(env, svc, pops, (hash % u64::from(svc.table_size)) as u32);
        (target, pops, search_position_field(0, false))
    };
    if target == NO_MEMBER {
        return Ok(decapsulated(
            f,
            e.inner_off,
            e.inner_v6,
            Reason::SearchExhausted,
        ));
    }
    let budget = header_budget.min(env.cfg.search_budget);
    if budget == 0 {
        return Err(Reason::LoopGuard.into());
    }
    e.target = target;
    e.remaining = [hops[0], position];
    e.budget = budget - 1;
    e.extra_flags = 0;
    e.search = Some(pops);
    Ok(encap_and_send(
        env,
        rules,
        f,
        ifindex,
        &e,
        Reason::SearchPassOn,
    ))
}
