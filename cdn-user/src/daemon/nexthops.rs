//! Keeps the data plane's next-hop entries in step with the kernel's routing and neighbour
//! tables, once a second, on a blocking thread (the resolver is synchronous).
//!
//! The program reads no clock: an entry stays in use until this loop changes it. A member
//! whose next hop cannot be resolved has its entry invalidated at once (its packets then take
//! `bpf_fib_lookup`, or the kernel), and so does every member's if resolving keeps failing as
//! a whole. If the controller stops, the entries stay as they were last resolved (pinned
//! maps); a controller that starts again resolves and rewrites them in its first round.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::core::Shared;
use crate::dataplane::nexthop::Resolver;

const NEXT_HOP_REFRESH: Duration = Duration::from_secs(1);
/// How long resolution may fail as a whole (the netlink socket, the neighbour dump) before
/// every next hop is invalidated: until then the last resolved ones are very likely still
/// right, and the fallback costs a FIB lookup per packet.
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);

/// Keeps the next-hop entries up to date (every second) until `stop` turns true.
pub(super) fn refresh_next_hops(shared: &Shared, stop: &mut watch::Receiver<bool>) {
    let mut resolver = match Resolver::new() {
        Ok(r) => r,
        Err(e) => {
            log::error!(error:% = e; "no next-hop resolver: the data plane will use bpf_fib_lookup");
            invalidate_all(shared);
            return;
        }
    };
    let mut last_problem: BTreeMap<u16, String> = BTreeMap::new();
    let mut devices = Vec::new();
    let mut failing_since: Option<Instant> = None;
    while !*stop.borrow() {
        let members: Vec<(u16, String, IpAddr)> = {
            let core = shared.lock();
            let self_id = core.self_id();
            core.cfg
                .cluster
                .members
                .iter()
                .filter(|m| m.id != self_id)
                .map(|m| (m.id, m.name.clone(), m.underlay))
                .collect()
        };
        let addrs: Vec<IpAddr> = members.iter().map(|m| m.2).collect();
        match resolver.resolve(&addrs) {
            Err(e) => {
                log::warn!(error:% = e; "next-hop refresh failed");
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= GIVE_UP_AFTER {
                    invalidate_all(shared);
                }
            }
            Ok(results) => {
                failing_since = None;
                let mut core = shared.lock();
                for ((id, name, _), (_, result)) in members.iter().zip(results) {
                    match result {
                        Ok(r) => {
                            if last_problem.remove(id).is_some() {
                                log::info!(
                                    member = name.as_str(), via:% = r.via, ifindex = r.ifindex;
                                    "next hop resolved"
                                );
                            }
                            if !devices.contains(&r.ifindex) {
                                match core.dp.add_device(r.ifindex) {
                                    Ok(()) => devices.push(r.ifindex),
                                    Err(e) => {
                                        log::warn!(ifindex = r.ifindex, error:% = e; "adding a device to the redirect map failed")
                                    }
                                }
                            }
                            if let Err(e) = core.dp.set_next_hop(*id, &r.link()) {
                                log::warn!(member = name.as_str(), error:% = e; "writing the next hop failed");
                            }
                        }
                        Err(e) => {
                            if let Err(e) = core.dp.clear_next_hop(*id) {
                                log::warn!(member = name.as_str(), error:% = e; "invalidating the next hop failed");
                            }
                            let text = e.to_string();
                            if last_problem.get(id) != Some(&text) {
                                log::info!(
                                    member = name.as_str(), reason = text.as_str();
                                    "next hop unresolved: the data plane falls back to the kernel"
                                );
                                last_problem.insert(*id, text);
                            }
                        }
                    }
                }
            }
        }
        std::thread::sleep(NEXT_HOP_REFRESH);
    }
}

/// Every member's packets take the fallback (`bpf_fib_lookup`, then the kernel).
fn invalidate_all(shared: &Shared) {
    let mut core = shared.lock();
    let ids: Vec<u16> = core.cfg.cluster.members.iter().map(|m| m.id).collect();
    for id in ids {
        if let Err(e) = core.dp.clear_next_hop(id) {
            log::warn!(member = id, error:% = e; "invalidating the next hop failed");
        }
    }
}
