//! PoPs in the lab (`LabOptions::pops` >= 2): the nodes form PoPs "pop1".."popN" of
//! consecutive nodes (node1 and node2 in pop1, node3 and node4 in pop2, ... with two per PoP),
//! and every member's configuration names its PoP.
//!
//! By default the topology stays one router with ECMP over every node, so a route shift
//! *between PoPs* is the router withdrawing every node of a PoP at once: that PoP's clients land
//! in the others, as they would after a withdrawal at the PoP's border. With
//! `LabOptions::border_routers` the withdrawal is made at the PoP's border (`lab/border.rs`). The per-PoP counters add up the
//! nodes' verdict counters, and split what they forwarded to other members by the PoP of the
//! member it went to.

use std::time::Duration;

use anyhow::{Result, ensure};
use cdn_common::maps::MAX_POPS;

use super::{Lab, LabOptions, VIP_V4, VIP_V6, packets_counter};

/// Refuses a PoP layout the lab cannot build: more PoPs than the data plane has tables for,
/// or nodes that do not split evenly.
pub(super) fn check_options(opts: &LabOptions) -> Result<()> {
    if opts.pops >= 2 {
        ensure!(
            opts.pops <= MAX_POPS,
            "{} PoPs: at most {MAX_POPS}",
            opts.pops
        );
        ensure!(
            opts.nodes >= opts.pops && opts.nodes.is_multiple_of(opts.pops),
            "{} nodes do not split into {} PoPs of equal size",
            opts.nodes,
            opts.pops
        );
    }
    ensure!(
        !opts.border_routers || opts.pops >= 2,
        "border routers need at least 2 PoPs"
    );
    Ok(())
}

/// The name of PoP `p` (0-based) in the configurations: "pop1" for 0.
pub fn pop_name(p: usize) -> String {
    format!("pop{}", p + 1)
}

/// Reasons under which a node accepts a packet that it did not get through a cross-PoP search:
/// where it landed, or steered to it by a member of its own PoP.
pub const LOCAL_ACCEPTS: [&str; 9] = [
    "local_accept",
    "owner_accept",
    "last_hop_accept",
    "redirected_syn_accept",
    "udp_local_accept",
    "udp_owner_accept",
    "quic_cid_accept",
    "quic_hash_accept",
    "icmp_local",
];

/// Drops that steering between members must never cause.
const STEERING_DROPS: [&str; 8] = [
    "malformed",
    "spoofed",
    "loop_guard",
    "bad_encap",
    "no_route",
    "too_big",
    "auth_failed",
    "encap_failed",
];

/// Counters of one node, or summed over the nodes of one PoP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PopCounters {
    /// Packets accepted under [`LOCAL_ACCEPTS`].
    pub local_accepts: u64,
    /// Packets sent to members of the same PoP (`cdn_steer_member_forwarded_packets_total`).
    pub forwarded_in_pop: u64,
    /// Packets sent to members of another PoP, whatever the reason.
    pub forwarded_cross_pop: u64,
    /// Cross-PoP forwards that start a search.
    pub search_start: u64,
    pub search_pass_on: u64,
    pub search_accept: u64,
    pub search_exhausted: u64,
    /// Cross-PoP forwards of flows a claim taught the node: one hop, no search.
    pub learned_forward: u64,
    /// Learned entries added from claims (`cdn_steer_learned_added_total`).
    pub learned_added: u64,
    /// Claims refused, whatever the reason (`cdn_steer_claims_rejected_total`).
    pub claims_rejected: u64,
    /// Packets dropped under one of [`STEERING_DROPS`].
    pub dropped: u64,
    /// Searches accepted, from the `cdn_steer_search_hops` histogram: how many, their hops
    /// summed, and how many took at most each of [`SEARCH_HOPS_BOUNDS`].
    pub searches_counted: u64,
    pub search_hops_sum: u64,
    pub search_hops_upto: [u64; SEARCH_HOPS_BOUNDS.len()],
}

/// The bucket bounds of `cdn_steer_search_hops` (the controller's, in `operator/metrics/pops.rs`).
pub const SEARCH_HOPS_BOUNDS: [u8; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 42];

impl PopCounters {
    /// Adds `o`'s counts to these.
    pub fn add(&mut self, o: &Self) {
        self.local_accepts += o.local_accepts;
        self.forwarded_in_pop += o.forwarded_in_pop;
        self.forwarded_cross_pop += o.forwarded_cross_pop;
        self.search_start += o.search_start;
        self.search_pass_on += o.search_pass_on;
        self.search_accept += o.search_accept;
        self.search_exhausted += o.search_exhausted;
        self.learned_forward += o.learned_forward;
        self.learned_added += o.learned_added;
        self.claims_rejected += o.claims_rejected;
        self.dropped += o.dropped;
        self.searches_counted += o.searches_counted;
        self.search_hops_sum += o.search_hops_sum;
        for (a, b) in self.search_hops_upto.iter_mut().zip(o.search_hops_upto) {
            *a += b;
        }
    }

    /// What was counted since `before` (counters only grow while their node runs).
    pub fn since(&self, before: &Self) -> Self {
        Self {
            local_accepts: self.local_accepts.saturating_sub(before.local_accepts),
            forwarded_in_pop: self
                .forwarded_in_pop
                .saturating_sub(before.forwarded_in_pop),
            forwarded_cross_pop: self
                .forwarded_cross_pop
                .saturating_sub(before.forwarded_cross_pop),
            search_start: self.search_start.saturating_sub(before.search_start),
            search_pass_on: self.search_pass_on.saturating_sub(before.search_pass_on),
            search_accept: self.search_accept.saturating_sub(before.search_accept),
            search_exhausted: self
                .search_exhausted
                .saturating_sub(before.search_exhausted),
            learned_forward: self.learned_forward.saturating_sub(before.learned_forward),
            learned_added: self.learned_added.saturating_sub(before.learned_added),
            claims_rejected: self.claims_rejected.saturating_sub(before.claims_rejected),
            dropped: self.dropped.saturating_sub(before.dropped),
            searches_counted: self
                .searches_counted
                .saturating_sub(before.searches_counted),
            search_hops_sum: self.search_hops_sum.saturating_sub(before.search_hops_sum),
            search_hops_upto: std::array::from_fn(|i| {
                self.search_hops_upto[i].saturating_sub(before.search_hops_upto[i])
            }),
        }
    }

    /// The bound of the lowest `cdn_steer_search_hops` bucket that holds every counted
    /// search: the most hops a search took (exact up to 8 hops); `None` without searches.
    pub fn search_hops_max(&self) -> Option<u8> {
        if self.searches_counted == 0 {
            return None;
        }
        SEARCH_HOPS_BOUNDS
            .iter()
            .zip(self.search_hops_upto)
            .find(|(_, n)| *n == self.searches_counted)
            .map(|(b, _)| *b)
    }

    /// Hops per counted search, on average.
    pub fn search_hops_mean(&self) -> f64 {
        self.search_hops_sum as f64 / self.searches_counted.max(1) as f64
    }

    /// The sum over `all`.
    pub fn total(all: &[Self]) -> Self {
        let mut sum = Self::default();
        for c in all {
            sum.add(c);
        }
        sum
    }
}

impl std::fmt::Display for PopCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accepted {} fwd in-PoP {} cross-PoP {} search start/pass-on/accept/exhausted {}/{}/{}/{}",
            self.local_accepts,
            self.forwarded_in_pop,
            self.forwarded_cross_pop,
            self.search_start,
            self.search_pass_on,
            self.search_accept,
            self.search_exhausted
        )?;
        write!(
            f,
            " learned fwd/added {}/{}",
            self.learned_forward, self.learned_added
        )?;
        if let Some(max) = self.search_hops_max() {
            write!(
                f,
                " search hops mean/max {:.2}/{max}",
                self.search_hops_mean()
            )?;
        }
        if self.claims_rejected > 0 {
            write!(f, " CLAIMS REJECTED {}", self.claims_rejected)?;
        }
        if self.dropped > 0 {
            write!(f, " DROPPED {}", self.dropped)?;
        }
        Ok(())
    }
}

/// The sum of every series of the metric `name` (0 when it is absent: a node without PoPs).
fn series_sum(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// `(member name, packets)` of every `cdn_steer_member_forwarded_packets_total` series.
fn member_forwards(metrics: &str) -> impl Iterator<Item = (&str, u64)> {
    metrics.lines().filter_map(|l| {
        let rest = l.strip_prefix("cdn_steer_member_forwarded_packets_total{member=\"")?;
        let (member, rest) = rest.split_once('"')?;
        let value = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
        Some((member, value as u64))
    })
}

impl Lab {
    /// The number of PoPs: 1 without `LabOptions::pops`.
    pub fn pop_count(&self) -> usize {
        self.opts.pops.max(1)
    }

    /// The PoP (0-based) of node `i` (index into `nodes`); `None` without PoPs.
    pub fn pop_of(&self, i: usize) -> Option<usize> {
        (self.opts.pops >= 2).then(|| i / (self.opts.nodes / self.opts.pops))
    }

    /// The nodes (indices into `nodes`) of PoP `p`; every node without PoPs.
    pub fn pop_nodes(&self, p: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.pop_of(i).unwrap_or(0) == p)
            .collect()
    }

    /// Withdraws the routes of every node of PoP `p` at the router; with border routers, the
    /// PoP's border withdraws the VIPs from the router.
    pub fn withdraw_pop_at_router(&self, p: usize) -> Result<()> {
        if self.has_borders() {
            return self.border_vip_sessions(p, false);
        }
        self.pop_nodes(p)
            .into_iter()
            .try_for_each(|i| self.withdraw_at_router(i))
    }

    /// Restores the routes of every node of PoP `p` at the router.
    pub fn restore_pop_at_router(&self, p: usize) -> Result<()> {
        if self.has_borders() {
            return self.border_vip_sessions(p, true);
        }
        self.pop_nodes(p)
            .into_iter()
            .try_for_each(|i| self.restore_at_router(i))
    }

    /// Waits until the router's routes to both VIPs go over exactly `want` (indices into
    /// `nodes`, ascending).
    pub fn wait_for_route_nodes(&self, want: &[usize], limit: Duration) -> Result<()> {
        self.wait_until(limit, &format!("routes over nodes {want:?}"), || {
            Ok(self.route_nodes(VIP_V4)? == want && self.route_nodes(VIP_V6)? == want)
        })
    }

    /// Moves the routes so that exactly the PoPs `away` are withdrawn at the router (their
    /// clients land in the other PoPs) and every other PoP is announced (their clients come
    /// back); returns 700 ms after the router's routes follow.
    pub fn route_pops_away(&self, away: &[usize]) -> Result<()> {
        // Enabling a session that is up is a no-op for BIRD: no need to know the state before.
        for p in (0..self.pop_count()).filter(|p| !away.contains(p)) {
            self.restore_pop_at_router(p)?;
        }
        for &p in away {
            self.withdraw_pop_at_router(p)?;
        }
        let announced: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !away.contains(&self.pop_of(i).unwrap_or(0)))
            .collect();
        self.wait_for_route_nodes(&announced, Duration::from_secs(15))?;
        std::thread::sleep(Duration::from_millis(700));
        Ok(())
    }

    /// Checks node `i`'s view of the PoPs (`status --json`, its `pops`): every PoP of the lab,
    /// by name and index, with all its members configured and healthy, no fallback, and the
    /// node's own PoP marked. Without PoPs: no `pops` at all.
    pub fn check_pop_status(&self, i: usize) -> Result<()> {
        let status = self.status(i)?;
        let Some(pops) = status["pops"].as_array() else {
            ensure!(
                self.opts.pops < 2,
                "node{}'s status shows no PoPs: {status}",
                i + 1
            );
            return Ok(());
        };
        ensure!(
            pops.len() == self.opts.pops,
            "node{} shows {} PoPs, the lab has {}: {pops:?}",
            i + 1,
            pops.len(),
            self.opts.pops
        );
        let per_pop = self.opts.nodes / self.opts.pops;
        for (p, pop) in pops.iter().enumerate() {
            let own = self.pop_of(i) == Some(p);
            ensure!(
                pop["name"] == pop_name(p).as_str()
                    && pop["index"] == p
                    && pop["members"] == per_pop
                    && pop["healthy"] == per_pop
                    && pop["own"] == own
                    && pop["fallback"] == false,
                "node{}'s view of {}: {pop} (expected index {p}, {per_pop} members all healthy, \
                 own {own}, no fallback)",
                i + 1,
                pop_name(p)
            );
        }
        Ok(())
    }

    /// Node `i`'s counters, from its metrics text.
    pub fn node_counters(&self, i: usize, metrics: &str) -> PopCounters {
        let c = |reason: &str| packets_counter(metrics, reason);
        let own = self.pop_of(i);
        let mut counters = PopCounters {
            local_accepts: LOCAL_ACCEPTS.iter().map(|r| c(r)).sum(),
            search_start: c("search_start"),
            search_pass_on: c("search_pass_on"),
            search_accept: c("search_accept"),
            search_exhausted: c("search_exhausted"),
            learned_forward: c("learned_forward"),
            learned_added: series_sum(metrics, "cdn_steer_learned_added_total"),
            claims_rejected: series_sum(metrics, "cdn_steer_claims_rejected_total"),
            dropped: STEERING_DROPS.iter().map(|r| c(r)).sum(),
            searches_counted: series_sum(metrics, "cdn_steer_search_hops_count"),
            search_hops_sum: series_sum(metrics, "cdn_steer_search_hops_sum"),
            search_hops_upto: SEARCH_HOPS_BOUNDS.map(|b| {
                series_sum(
                    metrics,
                    &format!("cdn_steer_search_hops_bucket{{le=\"{b}.0\"}}"),
                )
            }),
            ..PopCounters::default()
        };
        for (member, packets) in member_forwards(metrics) {
            let to = self.nodes.iter().position(|n| n.name == member);
            if to.and_then(|t| self.pop_of(t)) == own {
                counters.forwarded_in_pop += packets;
            } else {
                counters.forwarded_cross_pop += packets;
            }
        }
        counters
    }

    /// Every PoP's counters, summed over its nodes (scraped over HTTP); one entry without PoPs.
    pub fn pop_counters(&self) -> Result<Vec<PopCounters>> {
        let mut pops = vec![PopCounters::default(); self.pop_count()];
        for i in 0..self.nodes.len() {
            let metrics = self.scrape(i)?;
            pops[self.pop_of(i).unwrap_or(0)].add(&self.node_counters(i, &metrics));
        }
        Ok(pops)
    }
}
