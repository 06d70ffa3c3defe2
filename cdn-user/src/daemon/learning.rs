//! Learned owners, wired to the daemon (README "PoPs: learned owners"): claims received on the
//! peer plane become `LEARNED` entries and bucket bits; idle ones expire; searches this node
//! accepted become claims to the PoP where they started ([`claim_sender`]). Only with PoPs:
//! without them none of this runs and nothing is counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use cdn_common::maps::{CLAIM_BUDGET_UNKNOWN, FlowKey};
use hyper::StatusCode;
use hyper::body::Bytes;

use super::core::Core;
use cdn_common::hash::{PROTO_TCP, PROTO_UDP};

use crate::cluster::claims::{ClaimGate, Rejection, flow_bucket, flow_key};
use crate::dataplane::learned::bucket_bit;
use crate::operator::control::LearnedFlow;
use crate::operator::http::{self, BodyError, Response};
use crate::operator::report::LearnedReport;

/// How often idle learned entries are looked for.
pub(super) const EXPIRY_EVERY: Duration = Duration::from_secs(2);
/// Rejected claims are logged at most this often (a flood must not flood the log).
const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The daemon's side of learned owners.
#[derive(Debug, Default)]
pub(super) struct Learning {
    gate: ClaimGate,
    /// The nonzero words of `LEARNED_BUCKETS` as last written (read once at start-up).
    words: BTreeMap<u32, u32>,
    /// Per entry: its packet count when last seen to change, and when.
    activity: HashMap<FlowKey, (u64, Instant)>,
    pub(super) stats: LearnStats,
    last_reject_log: Option<Instant>,
    unlogged_rejects: u64,
    last_send_warning: Option<Instant>,
    unwarned_send_failures: u64,
}

impl Learning {
    /// Counts claims that could not be delivered; warns at most every [`REJECT_LOG_EVERY`].
    pub(super) fn send_failed(&mut self, failed: u64) {
        self.unwarned_send_failures += failed;
        let due = self
            .last_send_warning
            .is_none_or(|at| at.elapsed() >= REJECT_LOG_EVERY);
        if self.unwarned_send_failures > 0 && due {
            log::warn!(
                failed = self.unwarned_send_failures;
                "claims not delivered to PoP peers (details at debug level)"
            );
            self.last_send_warning = Some(Instant::now());
            self.unwarned_send_failures = 0;
        }
    }
}

/// Counters of learned owners and claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct LearnStats {
    pub(super) entries: u64,
    pub(super) added: u64,
    pub(super) expired: u64,
    pub(super) claims_sent: u64,
    pub(super) claims_received: u64,
    /// By [`Rejection::ALL`]'s order.
    pub(super) rejected: [u64; Rejection::ALL.len()],
    /// Searches this node accepted, by the hops they took (index: hops).
    pub(super) search_hops: BTreeMap<u8, u64>,
    /// Searches accepted whose hop count the program could not read.
    pub(super) search_hops_unknown: u64,
}

impl LearnStats {
    /// Counts an accepted search whose header arrived with `budget_left` of `budget`.
    pub(super) fn count_search(&mut self, budget: u8, budget_left: u8) {
        if budget_left == CLAIM_BUDGET_UNKNOWN || budget_left > budget {
            self.search_hops_unknown += 1;
        } else {
            // The start, and a pass-on for every hop of budget spent.
            *self
                .search_hops
                .entry(budget - budget_left + 1)
                .or_default() += 1;
        }
    }
}

impl Core {
    /// The learned owners' counters for status and metrics; `None` without PoPs.
    pub(super) fn learned_report(&self) -> Option<LearnedReport> {
        if !self.learns() {
            return None;
        }
        let s = &self.learning.stats;
        Some(LearnedReport {
            entries: s.entries,
            added: s.added,
            expired: s.expired,
            claims_sent: s.claims_sent,
            claims_received: s.claims_received,
            rejected: Rejection::ALL
                .iter()
                .zip(s.rejected)
                .map(|(r, n)| (r.reason().to_owned(), n))
                .collect(),
            pop_drains_received: self.pop_drains.received,
            pop_drains_rejected: self.pop_drains.rejected_by_reason(),
            search_hops: s.search_hops.iter().map(|(h, n)| (*h, *n)).collect(),
            search_hops_unknown: s.search_hops_unknown,
        })
    }
}

pub(super) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Core {
    /// Whether this node learns owners and sends claims: a cluster with PoPs.
    pub(super) fn learns(&self) -> bool {
        !self.cfg.pops().is_empty()
    }

    /// At start-up with PoPs: the program must have the maps, and the bucket bits a previous
    /// controller left are taken as they are (the next expiry pass recomputes them).
    pub(super) fn start_learning(&mut self) -> Result<()> {
        if !self.learns() {
            return Ok(());
        }
        let learning = self.dp.learning();
        anyhow::ensure!(
            learning.present(),
            "the cluster has PoPs, but the XDP program lacks the learned-owner maps (LEARNED, \
             LEARNED_BUCKETS, CLAIM_EVENTS): a program of another build?"
        );
        let maps = learning.get()?;
        self.learning.words = maps.nonzero_words().context("reading LEARNED_BUCKETS")?;
        let now = Instant::now();
        self.learning.activity = maps
            .entries()
            .context("reading LEARNED")?
            .into_iter()
            .map(|(k, v)| (k, (v.packets, now)))
            .collect();
        self.learning.stats.entries = self.learning.activity.len() as u64;
        Ok(())
    }

    /// The learned entry of a flow (`lookup`), if this node learns and has one.
    pub(super) fn learned_of(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        udp: bool,
    ) -> Option<LearnedFlow> {
        if !self.learns() {
            return None;
        }
        let proto = if udp { PROTO_UDP } else { PROTO_TCP };
        let key = flow_key(src.ip(), src.port(), dst.ip(), dst.port(), proto);
        let entry = match self.dp.learning().get().and_then(|m| m.get(&key)) {
            Ok(entry) => entry?,
            Err(e) => {
                log::warn!(error:% = e; "lookup: reading LEARNED failed");
                return None;
            }
        };
        let name = self
            .cfg
            .member(entry.member)
            .map_or_else(|| "(unknown)".to_owned(), |m| m.name.clone());
        Some(LearnedFlow {
            member: entry.member,
            name,
            packets: entry.packets,
        })
    }

    /// `POST /claims` from `peer`.
    pub(super) fn receive_claim(
        &mut self,
        peer: SocketAddr,
        body: std::result::Result<Bytes, BodyError>,
    ) -> Response {
        if !self.learns() {
            return http::text(StatusCode::NOT_FOUND, "not found");
        }
        let admitted = match body {
            Ok(body) => self.learning.gate.admit(
                &body,
                peer.ip(),
                now_unix_ms(),
                self.cfg.cluster.hash_key,
                &self.cfg.cluster.members,
            ),
            Err(BodyError::TooLarge(_)) => Err(Rejection::TooLarge),
            Err(BodyError::Timeout | BodyError::Broken) => Err(Rejection::Malformed),
        };
        let claim = match admitted {
            Ok(claim) => claim,
            Err(rejection) => return self.reject(peer, rejection),
        };
        let table_size = self.cfg.cluster.table_size;
        let hash_key = self.cfg.cluster.hash_key;
        let now = Instant::now();
        let result = (|| -> Result<()> {
            let maps = self.dp.learning().get()?;
            for key in &claim.entries {
                maps.learn(key, claim.sender)?;
                let (word, bit) = bucket_bit(flow_bucket(&hash_key, key, table_size));
                let bits = self.learning.words.get(&word).copied().unwrap_or(0);
                if bits & bit == 0 {
                    maps.set_word(word, bits | bit)?;
                    self.learning.words.insert(word, bits | bit);
                }
                if self.learning.activity.insert(*key, (0, now)).is_none() {
                    self.learning.stats.entries += 1;
                }
                self.learning.stats.added += 1;
            }
            Ok(())
        })();
        self.learning.stats.claims_received += 1;
        match result {
            Ok(()) => {
                log::debug!(peer:% = peer, sender = claim.sender, entries = claim.entries.len(); "claim accepted");
                http::text(StatusCode::OK, "learned")
            }
            Err(e) => {
                log::error!(peer:% = peer, error:% = format!("{e:#}"); "writing a claim's entries failed");
                http::text(StatusCode::INTERNAL_SERVER_ERROR, "learning failed")
            }
        }
    }

    fn reject(&mut self, peer: SocketAddr, rejection: Rejection) -> Response {
        if let Some(i) = Rejection::ALL.iter().position(|r| *r == rejection) {
            self.learning.stats.rejected[i] += 1;
        }
        let l = &mut self.learning;
        let due = l
            .last_reject_log
            .is_none_or(|at| at.elapsed() >= REJECT_LOG_EVERY);
        if due {
            log::warn!(
                peer:% = peer,
                reason = rejection.reason(),
                unlogged = l.unlogged_rejects;
                "claim rejected"
            );
            l.last_reject_log = Some(Instant::now());
            l.unlogged_rejects = 0;
        } else {
            l.unlogged_rejects += 1;
        }
        http::text(rejection.status(), &rejection.to_string())
    }

    /// Deletes learned entries whose packet count did not change for `learned_idle_ms`, and
    /// those naming a member no longer configured; recomputes the bucket bits from the rest.
    pub(super) fn expire_learned(&mut self) -> Result<()> {
        if !self.learns() {
            return Ok(());
        }
        let idle = self.cfg.cluster.learned_idle;
        let table_size = self.cfg.cluster.table_size;
        let hash_key = self.cfg.cluster.hash_key;
        let members: HashSet<u16> = self.cfg.cluster.members.iter().map(|m| m.id).collect();
        let now = Instant::now();
        let maps = self.dp.learning().get()?;
        let mut activity = HashMap::new();
        let mut words: BTreeMap<u32, u32> = BTreeMap::new();
        let mut expired = 0;
        for (key, value) in maps.entries()? {
            let since = match self.learning.activity.get(&key) {
                Some(&(packets, since)) if packets == value.packets => since,
                _ => now,
            };
            if !members.contains(&value.member) || now.duration_since(since) >= idle {
                maps.remove(&key)?;
                expired += 1;
                continue;
            }
            activity.insert(key, (value.packets, since));
            let (word, bit) = bucket_bit(flow_bucket(&hash_key, &key, table_size));
            *words.entry(word).or_default() |= bit;
        }
        maps.sync_words(&self.learning.words, &words)?;
        self.learning.words = words;
        self.learning.stats.entries = activity.len() as u64;
        self.learning.stats.expired += expired;
        self.learning.activity = activity;
        if expired > 0 {
            log::debug!(expired; "learned entries expired");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_counts_its_start_and_every_pass_on() {
        let mut s = LearnStats::default();
        // Arrived with the whole budget: found at the first member asked.
        s.count_search(12, 12);
        s.count_search(12, 10);
        // The last hop the budget allows.
        s.count_search(12, 0);
        // Not readable, or more than this node would ever start with.
        s.count_search(12, CLAIM_BUDGET_UNKNOWN);
        s.count_search(12, 13);
        assert_eq!(
            s.search_hops.into_iter().collect::<Vec<_>>(),
            [(1, 1), (3, 1), (13, 1)]
        );
        assert_eq!(s.search_hops_unknown, 2);
    }
}
