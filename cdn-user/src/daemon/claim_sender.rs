//! Turns the searches this node accepted (`CLAIM_EVENTS`) into claims to the members of the
//! PoP where each search started (README "PoPs: learned owners"), batched: what arrives within
//! [`BATCH_WAIT`], at most [`BATCH_MAX`] entries per message.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use cdn_common::maps::FlowKey;
use hyper::body::Bytes;
use tokio::io::{Interest, unix::AsyncFd};
use tokio::sync::watch;

use super::core::{Core, Shared};
use super::learning::now_unix_ms;
use crate::cluster::claims::{CLAIMS_PATH, Claim, claim_key};
use crate::cluster::peer_http;
use crate::dataplane::learned::ClaimReader;

/// How long events are gathered before they are sent.
const BATCH_WAIT: Duration = Duration::from_millis(50);
/// Most entries per claim message.
const BATCH_MAX: usize = 256;
/// The same flow is claimed at most once per this long.
const DEDUP: Duration = Duration::from_secs(1);
/// Time a claim's exchange may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Whom a batch goes to: the members of the starter's PoP other than this node, by sync
/// address (members without one cannot be reached, and are skipped).
impl Core {
    fn claim_targets(&self, starter: u16) -> Vec<SocketAddr> {
        let members = &self.cfg.cluster.members;
        let Some(pop) = members
            .iter()
            .find(|m| m.id == starter)
            .and_then(|m| m.pop.as_deref())
        else {
            return Vec::new();
        };
        let self_id = self.self_id();
        members
            .iter()
            .filter(|m| m.id != self_id && m.pop.as_deref() == Some(pop))
            .filter_map(|m| m.sync)
            .collect()
    }
}

/// Reads the claim events and sends claims until `stop`.
pub(super) async fn claim_sender(
    shared: Shared,
    reader: ClaimReader,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    // SAFETY: the reader owns the ring buffer map's fd; it stays open and is never replaced
    // while the AsyncFd owns the reader (the map lives as long as the reader).
    let mut fd = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching CLAIM_EVENTS")?;
    let mut recent: HashMap<FlowKey, Instant> = HashMap::new();
    // By starter: the flows to claim, and when the first of them arrived.
    let mut pending: BTreeMap<u16, Vec<FlowKey>> = BTreeMap::new();
    let mut first_at: Option<Instant> = None;
    loop {
        let flush_in = first_at.map(|at| BATCH_WAIT.saturating_sub(at.elapsed()));
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = ready.context("waiting for CLAIM_EVENTS")?;
                let now = Instant::now();
                let mut events = Vec::new();
                while let Some(event) = guard.get_inner_mut().next_event() {
                    events.push(event);
                }
                guard.clear_ready();
                {
                    // Every accepted search counts, also those of a flow claimed just now.
                    let mut core = shared.lock();
                    let budget = core.search_budget();
                    for event in &events {
                        core.learning.stats.count_search(budget, event.budget_left);
                    }
                }
                for event in events {
                    if recent.get(&event.key).is_some_and(|at| now.duration_since(*at) < DEDUP) {
                        continue;
                    }
                    recent.insert(event.key, now);
                    pending.entry(event.starter).or_default().push(event.key);
                    first_at.get_or_insert(now);
                }
            }
            () = async {
                match flush_in {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let full = pending.values().any(|v| v.len() >= BATCH_MAX);
        if full || first_at.is_some_and(|at| at.elapsed() >= BATCH_WAIT) {
            send_all(&shared, std::mem::take(&mut pending)).await;
            first_at = None;
            let now = Instant::now();
            recent.retain(|_, at| now.duration_since(*at) < DEDUP);
        }
    }
}

async fn send_all(shared: &Shared, pending: BTreeMap<u16, Vec<FlowKey>>) {
    let mut sends = Vec::new();
    {
        let core = shared.lock();
        let key = claim_key(core.cfg.cluster.hash_key);
        let sender = core.self_id();
        for (starter, flows) in pending {
            let targets = core.claim_targets(starter);
            if targets.is_empty() {
                log::debug!(starter; "claim events for a starter with no reachable PoP peer");
                continue;
            }
            for chunk in flows.chunks(BATCH_MAX) {
                let body = Bytes::from(
                    Claim {
                        sender,
                        sent_unix_ms: now_unix_ms(),
                        nonce: rand::random(),
                        entries: chunk.to_vec(),
                    }
                    .encode(key),
                );
                for &addr in &targets {
                    sends.push((addr, body.clone()));
                }
            }
        }
    }
    let results = futures_join(sends).await;
    let sent = results.iter().filter(|ok| **ok).count() as u64;
    let failed = results.len() as u64 - sent;
    let mut core = shared.lock();
    core.learning.stats.claims_sent += sent;
    core.learning.send_failed(failed);
}

/// Sends every (address, body) at once; whether each was accepted (2xx).
async fn futures_join(sends: Vec<(SocketAddr, Bytes)>) -> Vec<bool> {
    let mut set = tokio::task::JoinSet::new();
    for (addr, body) in sends {
        set.spawn(async move {
            match peer_http::post(addr, CLAIMS_PATH, body, "cdn-steer-claims", SEND_TIMEOUT).await {
                Ok(answer) if answer.status.is_success() => true,
                Ok(answer) => {
                    log::debug!(peer:% = addr, status = answer.status.as_u16(); "claim refused by peer");
                    false
                }
                Err(e) => {
                    log::debug!(peer:% = addr, error:% = e; "sending a claim failed");
                    false
                }
            }
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap_or(false));
    }
    out
}
