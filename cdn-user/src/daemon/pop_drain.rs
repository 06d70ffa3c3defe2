//! PoP drains (README "PoPs"): `drain --pop` drains this node and asks every other member of
//! its PoP, over the peer plane, to drain too; the peers' side checks and obeys such requests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hyper::StatusCode;
use hyper::body::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::core::{Core, Shared};
use super::learning::now_unix_ms;
use super::views::change_draining;
use crate::cluster::peer_auth::{Envelope, Rejection};
use crate::cluster::peer_control::{self, CHANGED, DrainGate, DrainMessage, UNCHANGED};
use crate::cluster::peer_http;
use crate::operator::control::Caller;
use crate::operator::http::{self, BodyError, Response};
use crate::operator::pop_drain::{PopDrainMember, PopDrainOutcome, PopDrainReport};

/// Time each peer gets to answer a drain; all are asked at once.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Rejected drains are logged at most this often.
const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The receiving side's state: the nonce memory and the counters.
#[derive(Debug, Default)]
pub(super) struct PopDrains {
    gate: DrainGate,
    /// Drains and undrains accepted from peers.
    pub(super) received: u64,
    /// By [`Rejection::ALL`]'s order.
    pub(super) rejected: [u64; Rejection::ALL.len()],
    last_reject_log: Option<Instant>,
}

impl PopDrains {
    /// The rejections by reason label, for status and metrics.
    pub(super) fn rejected_by_reason(&self) -> Vec<(String, u64)> {
        Rejection::ALL
            .iter()
            .zip(self.rejected)
            .map(|(r, n)| (r.reason().to_owned(), n))
            .collect()
    }
}

/// Who asked, in the log line of a drain received over the peer plane.
struct FromPeer<'a> {
    name: &'a str,
    id: u16,
    peer: SocketAddr,
}

impl std::fmt::Display for FromPeer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PoP drain from member {} (id {}) at {}",
            self.name, self.id, self.peer
        )
    }
}

/// `POST /drain` (`drain` true) or `POST /undrain` from `peer`.
pub(super) fn receive(
    shared: &Shared,
    rebuild: &Notify,
    peer: SocketAddr,
    drain: bool,
    body: std::result::Result<Bytes, BodyError>,
) -> Response {
    let mut guard = shared.lock();
    let core = &mut *guard;
    if !core.learns() {
        return http::text(
            StatusCode::NOT_FOUND,
            "not found (this cluster has no PoPs)",
        );
    }
    let admitted = match body {
        Ok(body) => core
            .pop_drains
            .gate
            .admit(
                &body,
                drain,
                peer.ip(),
                now_unix_ms(),
                core.cfg.cluster.hash_key,
                &core.cfg.cluster.members,
            )
            .and_then(|(_, sender)| {
                // `drain --pop` drains the sender's own PoP: a member of another PoP (whose
                // own `--pop` never asks us) has no business draining this node.
                if sender.pop.as_deref() == core.cfg.self_pop() {
                    Ok((sender.name.clone(), sender.id))
                } else {
                    Err(Rejection::OtherPop)
                }
            }),
        Err(BodyError::TooLarge(_)) => Err(Rejection::TooLarge),
        Err(BodyError::Timeout | BodyError::Broken) => Err(Rejection::Malformed),
    };
    let (name, id) = match admitted {
        Ok(sender) => sender,
        Err(rejection) => return reject(&mut core.pop_drains, peer, rejection),
    };
    core.pop_drains.received += 1;
    let by = FromPeer {
        name: &name,
        id,
        peer,
    };
    match change_draining(core, rebuild, drain, &by) {
        Ok(true) => http::text(StatusCode::OK, CHANGED),
        Ok(false) => http::text(StatusCode::OK, UNCHANGED),
        Err(e) => {
            log::error!(by:% = by, error:% = format!("{e:#}"); "PoP drain failed");
            http::text(StatusCode::INTERNAL_SERVER_ERROR, "drain failed")
        }
    }
}

fn reject(state: &mut PopDrains, peer: SocketAddr, rejection: Rejection) -> Response {
    state.rejected[rejection.index()] += 1;
    let due = state
        .last_reject_log
        .is_none_or(|at| at.elapsed() >= REJECT_LOG_EVERY);
    if due {
        log::warn!(peer:% = peer, reason = rejection.reason(); "PoP drain request rejected");
        state.last_reject_log = Some(Instant::now());
    }
    http::text(rejection.status(), &rejection.to_string())
}

/// One peer to ask: its row of the report, and where to send (`None`: no sync address).
type Target = (PopDrainMember, Option<SocketAddr>);

impl Core {
    /// The PoP's name and the other members to ask, in id order; refuses without PoPs or on
    /// a node that is no member (it could not sign as one).
    fn pop_drain_targets(&self) -> Result<(String, Vec<Target>)> {
        if !self.learns() {
            bail!(
                "this cluster has no PoPs (no member has a `pop`): use drain without --pop to \
                 drain this node"
            );
        }
        let Some(me) = self.cfg.self_member() else {
            bail!("a steering-only node is no member: run drain --pop on a member of the PoP");
        };
        let pop = me.pop.clone().unwrap_or_default();
        let mut peers: Vec<_> = self
            .cfg
            .cluster
            .members
            .iter()
            .filter(|m| m.id != me.id && m.pop.as_deref() == Some(pop.as_str()))
            .collect();
        peers.sort_by_key(|m| m.id);
        let targets = peers
            .into_iter()
            .map(|m| {
                let row = PopDrainMember {
                    id: m.id,
                    name: m.name.clone(),
                    outcome: PopDrainOutcome::NoSyncAddress,
                    detail: None,
                };
                (row, m.sync)
            })
            .collect();
        Ok((pop, targets))
    }
}

/// `drain --pop` / `undrain --pop`, asked by `caller`: this node first, then every other
/// member of its PoP at once. Runs on a blocking thread (the control socket's handler).
pub(super) fn drain_pop(
    shared: &Shared,
    rebuild: &Notify,
    drain: bool,
    caller: Caller,
) -> Result<PopDrainReport> {
    let (pop, targets, me, key) = {
        let mut guard = shared.lock();
        let core = &mut *guard;
        let (pop, targets) = core.pop_drain_targets()?;
        let by = format!("{caller}, for PoP {pop}");
        let changed = change_draining(core, rebuild, drain, &by)?;
        let me = PopDrainMember {
            id: core.self_id(),
            name: core.cfg.node.name.clone(),
            outcome: if changed {
                PopDrainOutcome::Changed
            } else {
                PopDrainOutcome::Unchanged
            },
            detail: None,
        };
        let key = peer_control::control_key(core.cfg.cluster.hash_key);
        (pop, targets, me, key)
    };
    let sender = me.id;
    // The control socket's handler runs on the blocking pool, where waiting for async work
    // on the daemon's runtime is allowed (its main thread drives the I/O).
    let peers = tokio::runtime::Handle::current().block_on(ask_peers(targets, sender, drain, key));
    let mut members = vec![me];
    members.extend(peers);
    let report = PopDrainReport {
        pop,
        drain,
        members,
    };
    log::info!(
        by:% = caller,
        pop = report.pop.as_str(),
        complete = report.complete();
        "PoP {} done", if drain { "drain" } else { "undrain" }
    );
    Ok(report)
}

/// Sends the signed request to every target with a sync address, at once; their rows.
async fn ask_peers(
    targets: Vec<Target>,
    sender: u16,
    drain: bool,
    key: [u64; 2],
) -> Vec<PopDrainMember> {
    let mut set = JoinSet::new();
    let count = targets.len();
    for (index, (mut row, addr)) in targets.into_iter().enumerate() {
        let body = Bytes::from(
            DrainMessage {
                envelope: Envelope {
                    sender,
                    sent_unix_ms: now_unix_ms(),
                    nonce: rand::random(),
                },
                drain,
            }
            .encode(key),
        );
        set.spawn(async move {
            if let Some(addr) = addr {
                (row.outcome, row.detail) = ask_peer(addr, drain, body).await;
            }
            (index, row)
        });
    }
    let mut rows: Vec<Option<PopDrainMember>> = vec![None; count];
    while let Some(done) = set.join_next().await {
        if let Ok((index, row)) = done {
            rows[index] = Some(row);
        }
    }
    rows.into_iter().flatten().collect()
}

async fn ask_peer(addr: SocketAddr, drain: bool, body: Bytes) -> (PopDrainOutcome, Option<String>) {
    let path = peer_control::path(drain);
    match peer_http::post(addr, path, body, "cdn-steer-pop-drain", PEER_TIMEOUT).await {
        Err(e) => (PopDrainOutcome::Unreachable, Some(e.failure.to_string())),
        Ok(answer) => {
            let text = answer
                .body
                .ok()
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                .unwrap_or_default();
            match (answer.status.is_success(), text.as_str()) {
                (true, CHANGED) => (PopDrainOutcome::Changed, None),
                (true, UNCHANGED) => (PopDrainOutcome::Unchanged, None),
                _ => (
                    PopDrainOutcome::Refused,
                    Some(format!("{} {text}", answer.status.as_u16())),
                ),
            }
        }
    }
}
