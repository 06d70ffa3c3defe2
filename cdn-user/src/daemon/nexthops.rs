//! Keeps the data plane's next-hop entries fresh from the kernel's routing and neighbour
//! tables, once a second, on a blocking thread (the resolver is synchronous).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use cdn_common::maps::NextHop;
use tokio::sync::watch;

use super::core::Shared;
use crate::dataplane::{self, nexthop::Resolver};

/// How long a next-hop entry stays valid without a refresh. Refreshes come every second; if
/// the controller stops, the data plane falls back to the FIB after this.
const NEXT_HOP_TTL: Duration = Duration::from_secs(5);
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(1);

/// Keeps the next-hop entries fresh (every second) until `stop` turns true.
pub(super) fn refresh_next_hops(shared: &Shared, stop: &mut watch::Receiver<bool>) {
    let mut resolver = match Resolver::new() {
        Ok(r) => r,
        Err(e) => {
            log::error!(error:% = e; "no next-hop resolver: the data plane will use bpf_fib_lookup");
            return;
        }
    };
    let mut last_problem: BTreeMap<u16, String> = BTreeMap::new();
    let mut devices = Vec::new();
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
            Err(e) => log::warn!(error:% = e; "next-hop refresh failed"),
            Ok(results) => {
                let expires = dataplane::monotonic_ns() + NEXT_HOP_TTL.as_nanos() as u64;
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
                            let hop = NextHop {
                                dst_mac: r.dst_mac,
                                src_mac: r.src_mac,
                                ifindex: r.ifindex,
                                expires_ns: expires,
                            };
                            if let Err(e) = core.dp.set_next_hop(*id, &hop) {
                                log::warn!(member = name.as_str(), error:% = e; "writing the next hop failed");
                            }
                        }
                        Err(e) => {
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
