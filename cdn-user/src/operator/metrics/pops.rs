//! The PoP series (README "PoPs"): members and fallback per PoP, learned owners, claims and
//! the hops of accepted searches. Written only with PoPs: a cluster without them shows none.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{LearnedReport, PopReport, Snapshot, family, single};

/// The `cdn_steer_pop_*` families, then the learned owners' and the claims'.
pub(super) fn pop_families(enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let pop = |p: &PopReport| [("pop", p.name.clone())];
    let count = |n: usize| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
    family(
        enc,
        "cdn_steer_pop_members",
        "Configured members of the PoP.",
        None,
        s.pops.iter().map(|p| (pop(p), count(p.members))),
    )?;
    family(
        enc,
        "cdn_steer_pop_healthy_members",
        "Members of the PoP whose last health check passed.",
        None,
        s.pops.iter().map(|p| (pop(p), count(p.healthy))),
    )?;
    family(
        enc,
        "cdn_steer_pop_fallback",
        "1 while no member of this node's PoP is eligible and new connections landing here \
         are placed by the next PoP's table; 0 otherwise (always 0 for the other PoPs).",
        None,
        s.pops
            .iter()
            .map(|p| (pop(p), ConstGauge::new(i64::from(p.fallback)))),
    )?;
    if let Some(l) = &s.learned {
        learned_families(enc, l)?;
    }
    Ok(())
}

/// Upper bounds of `cdn_steer_search_hops`'s buckets: every count a search with 3 PoPs can
/// take (budget 12), then coarser up to the budget of 8 PoPs (42).
const SEARCH_HOPS_BUCKETS: [u8; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 42];

/// A histogram whose counts are known when the scrape is encoded (prometheus-client has
/// constant counters and gauges, but no constant histogram).
struct ConstHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, observations in this bucket only); the encoder sums them up.
    buckets: Vec<(f64, u64)>,
}

impl ConstHistogram {
    /// From (value, observations) pairs, into buckets with upper bounds `bounds` and +Inf.
    fn new(observed: &[(u8, u64)], bounds: &[u8]) -> Self {
        let mut buckets: Vec<(f64, u64)> = bounds
            .iter()
            .map(|b| (f64::from(*b), 0))
            .chain([(f64::INFINITY, 0)])
            .collect();
        let (mut sum, mut count) = (0.0, 0);
        for (value, n) in observed {
            let v = f64::from(*value);
            if let Some(bucket) = buckets.iter_mut().find(|(le, _)| v <= *le) {
                bucket.1 += n;
            }
            sum += v * *n as f64;
            count += n;
        }
        Self {
            sum,
            count,
            buckets,
        }
    }
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The `cdn_steer_learned_*` and `cdn_steer_claims_*` series (with PoPs only).
fn learned_families(enc: &mut DescriptorEncoder, l: &LearnedReport) -> fmt::Result {
    single(
        enc,
        "cdn_steer_search_hops",
        "Searches this node accepted (it held the flow), by the hops they took: the start and \
         every pass-on.",
        None,
        ConstHistogram::new(&l.search_hops, &SEARCH_HOPS_BUCKETS),
    )?;
    single(
        enc,
        "cdn_steer_search_hops_unknown",
        "Searches accepted here whose hop count could not be read.",
        None,
        ConstCounter::new(l.search_hops_unknown),
    )?;
    single(
        enc,
        "cdn_steer_learned_entries",
        "Flows a claim taught this node, in the learned map.",
        None,
        ConstGauge::new(i64::try_from(l.entries).unwrap_or(i64::MAX)),
    )?;
    for (name, help, value) in [
        (
            "cdn_steer_learned_added",
            "Learned entries written from accepted claims.",
            l.added,
        ),
        (
            "cdn_steer_learned_expired",
            "Learned entries deleted: idle for learned_idle_ms, or naming a removed member.",
            l.expired,
        ),
        (
            "cdn_steer_claims_sent",
            "Claim messages sent to PoP peers and accepted by them.",
            l.claims_sent,
        ),
        (
            "cdn_steer_claims_received",
            "Claim messages accepted from PoP peers.",
            l.claims_received,
        ),
    ] {
        single(enc, name, help, None, ConstCounter::new(value))?;
    }
    family(
        enc,
        "cdn_steer_claims_rejected",
        "Claim messages refused (nothing learned), by reason: malformed, too_large, bad_mac \
         (wrong key or tampered), not_member, wrong_source, stale, replay, busy.",
        None,
        l.rejected
            .iter()
            .map(|(reason, n)| ([("reason", reason.clone())], ConstCounter::new(*n))),
    )?;
    single(
        enc,
        "cdn_steer_pop_drains_received",
        "PoP drains and undrains accepted from PoP peers (drain --pop on another member).",
        None,
        ConstCounter::new(l.pop_drains_received),
    )?;
    family(
        enc,
        "cdn_steer_pop_drains_rejected",
        "PoP drain and undrain requests refused (state unchanged), by reason: as \
         cdn_steer_claims_rejected_total.",
        None,
        l.pop_drains_rejected
            .iter()
            .map(|(reason, n)| ([("reason", reason.clone())], ConstCounter::new(*n))),
    )
}
