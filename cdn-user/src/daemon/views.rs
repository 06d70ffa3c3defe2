//! What the daemon shows: the status report and lookups for the control socket, and the
//! snapshot the metrics are encoded from. Both read one member report.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cdn_common::{
    counters::PacketCounts,
    hash::{PROTO_TCP, PROTO_UDP, flow_hash_v4, flow_hash_v6, ports_word, v4_word, v6_words},
    maps::NO_MEMBER,
};
use tokio::{
    sync::{Notify, mpsc, oneshot},
    task::JoinSet,
};

use super::core::{Core, Shared};
use crate::{
    bgp::announce::AnnounceStatus,
    cluster::sync::{self, NodeDigests},
    config::{UdpMode, cluster_digest},
    operator::{
        control::{
            AttachmentStatus, BgpStatus, Caller, LookupReport, MemberReport, Request, Response,
            ServiceStatus, StatusReport,
        },
        lookup::Source,
        metrics,
        quic::{self, CidDocument, QuicServerStatus, QuicStatus},
        report::{DriftReport, PeerDigests},
    },
};

/// Time `status` gives each peer to answer for its digests; all are asked at once.
const DIGEST_TIMEOUT: Duration = Duration::from_secs(2);

impl Core {
    /// The UDP placement of the service named `name` (the default for an unknown name, which
    /// only a table of a service removed from the configuration can have).
    fn udp_mode_of(&self, name: &str) -> UdpMode {
        self.cfg
            .services
            .iter()
            .find(|s| s.name == name)
            .map_or(UdpMode::default(), |s| s.udp_mode)
    }

    /// The QUIC settings of the service named `name`, if it has any.
    fn quic_of(&self, name: &str) -> Option<QuicStatus> {
        self.cfg
            .services
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.quic.as_ref())
            .map(QuicStatus::from)
    }

    /// Every member's server ID with what the live map holds for it.
    fn quic_server_reports(&self) -> Result<Vec<QuicServerStatus>> {
        self.cfg
            .cluster
            .members
            .iter()
            .map(|m| {
                Ok(QuicServerStatus {
                    server_id: m.quic_server_id,
                    member: m.name.clone(),
                    mapped_to: self.dp.quic_server(m.quic_server_id)?,
                })
            })
            .collect()
    }

    /// A connection ID decoded for every QUIC service, resolved through the live map.
    pub(super) fn cid(&self, cid: &str) -> Result<CidDocument> {
        let bytes = quic::parse_cid(cid)?;
        Ok(quic::decode(&self.cfg, Source::Live, &bytes, |sid| {
            // A map read that fails leaves the server ID unresolved; the answer says "by
            // hash", and the daemon's log has the map error from elsewhere.
            self.dp.quic_server(sid).ok().flatten()
        }))
    }

    /// Every member as status and metrics show it: the one member report.
    fn member_reports(&self) -> Result<Vec<MemberReport>> {
        // Per PoP (one without PoPs): each member's buckets over the tables of its own PoP.
        let shares: Vec<(Option<&str>, BTreeMap<u16, u64>)> = self
            .cfg
            .pop_slots()
            .into_iter()
            .map(|pop| (pop, self.tables.share(pop)))
            .collect();
        let self_id = self.self_id();
        self.cfg
            .cluster
            .members
            .iter()
            .map(|m| {
                let share = shares
                    .iter()
                    .find(|(pop, _)| *pop == m.pop.as_deref())
                    .map(|(_, share)| share);
                let total: u64 = share.map_or(0, |s| s.values().sum());
                let buckets = share.and_then(|s| s.get(&m.id)).copied().unwrap_or(0);
                let health = self.health.get(&m.id);
                let stats = self.dp.member_stats(m.id)?;
                Ok(MemberReport {
                    id: m.id,
                    name: m.name.clone(),
                    underlay: m.underlay.to_string(),
                    weight: m.weight,
                    is_self: m.id == self_id,
                    healthy: health.and_then(|h| h.healthy),
                    last_error: health.and_then(|h| h.last_error.clone()),
                    last_check_ms: health
                        .and_then(|h| h.last_latency)
                        .map(|d| d.as_secs_f64() * 1000.0),
                    buckets,
                    share: if total == 0 {
                        0.0
                    } else {
                        buckets as f64 / total as f64
                    },
                    forwarded_packets: stats.packets,
                    forwarded_bytes: stats.bytes,
                    pop: m.pop.clone(),
                })
            })
            .collect()
    }

    pub(super) fn status(&self) -> Result<StatusReport> {
        let counters = self.dp.counters()?;
        let members = self.member_reports()?;
        let services = self
            .tables
            .tables()
            .iter()
            .map(|(name, t)| ServiceStatus {
                name: name.clone(),
                vips: t.vips.iter().map(ToString::to_string).collect(),
                generation: t.generation,
                slot: t.slot,
                active_half: t.active,
                udp_mode: self.udp_mode_of(&t.service).name().to_string(),
                quic: self.quic_of(&t.service),
            })
            .collect();
        let quic_servers = self.quic_server_reports()?;
        Ok(StatusReport {
            quic_servers,
            node: self.cfg.node.name.clone(),
            config_path: self.config_path.display().to_string(),
            attachments: self
                .attachments
                .iter()
                .map(|a| AttachmentStatus {
                    interface: a.interface.clone(),
                    mode: a.mode.to_string(),
                    replaced: a.replaced,
                })
                .collect(),
            ready: self.ready,
            draining: self.draining,
            table_size: self.tables.size(),
            members,
            services,
            counters: counters
                .series()
                .map(|(reason, action, n)| (format!("{}/{}", reason.name(), action.name()), n))
                .collect(),
            bgp: self
                .bgp
                .iter()
                .map(|(protocol, rx)| {
                    let s = rx.borrow();
                    BgpStatus {
                        protocol: protocol.clone(),
                        bird_reachable: s.bird_reachable,
                        announced: s.announced,
                        wanted: s.wanted,
                        last_error: s.last_error.clone(),
                    }
                })
                .collect(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            health_checks: self.health_checks_report(),
            pops: self.pop_reports(),
            learned: self.learned_report(),
            // Filled in by `status_with_drift`, once the lock is released.
            drift: None,
        })
    }

    /// This node's digests, as `/digests` serves them; a table's digest is computed once per
    /// swap (`ServiceTable::digest`).
    pub(super) fn digests(&self) -> NodeDigests {
        NodeDigests {
            node: self.cfg.node.name.clone(),
            config: cluster_digest(&self.cfg),
            tables: self
                .tables
                .tables()
                .iter()
                .filter(|(_, t)| t.generation > 0)
                .map(|(name, t)| (name.clone(), t.digest()))
                .collect(),
        }
    }

    /// Every other member whose digests can be asked for: (name, `sync` endpoint), whatever
    /// its health (a member that cannot answer is shown as such).
    fn digest_peers(&self) -> Vec<(String, SocketAddr)> {
        let self_id = self.self_id();
        self.cfg
            .cluster
            .members
            .iter()
            .filter(|m| m.id != self_id)
            .filter_map(|m| m.sync.map(|addr| (m.name.clone(), addr)))
            .collect()
    }

    /// The owner and hops of a flow, read from the live maps with the data plane's hash.
    pub(super) fn lookup(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        udp: bool,
    ) -> Result<LookupReport> {
        let proto = if udp { PROTO_UDP } else { PROTO_TCP };
        let ports = ports_word(src.port(), dst.port());
        let key = self.cfg.cluster.hash_key;
        let hash = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                flow_hash_v4(&key, v4_word(s.octets()), v4_word(d.octets()), ports, proto)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => flow_hash_v6(
                &key,
                v6_words(s.octets()),
                v6_words(d.octets()),
                ports,
                proto,
            ),
            _ => bail!("source and destination must be of the same address family"),
        };
        let Some((name, tables)) = self.tables.service_for(dst.ip()) else {
            bail!("{} is not in any service's VIP prefixes", dst.ip());
        };
        let vip = tables
            .iter()
            .flat_map(|t| t.vips.iter())
            .find(|v| v.contains(dst.ip()))
            .context("service without the VIP")?;
        let entry = self
            .dp
            .service(vip.addr(), vip.prefix_len())?
            .context("the data plane has no entry for this VIP yet")?;
        let bucket = (hash % u64::from(entry.table_size)) as u32;
        let hops = self
            .dp
            .read_buckets(entry.table_offset + bucket, 1)?
            .first()
            .map(|b| b.hops)
            .unwrap_or([NO_MEMBER; 3]);
        let pops = self.pop_chains(&entry, bucket)?;
        let owner = hops
            .first()
            .filter(|h| **h != NO_MEMBER)
            .map(|h| self.cfg.member(*h).map_or("(unknown)", |m| &m.name));
        let accepted_by = match (udp, self.udp_mode_of(name), owner) {
            (true, UdpMode::Local, _) => "the node the packet lands on (udp_mode local)".into(),
            (_, _, None) => "nobody: the bucket is empty".into(),
            (true, UdpMode::Owner, Some(owner)) => format!("{owner}, the owner (udp_mode owner)"),
            (true, UdpMode::Connected, Some(_)) => "the first hop with a connected socket for \
                 the flow, else the last hop (udp_mode connected)"
                .into(),
            (false, _, Some(owner)) => format!(
                "a new connection: {owner}, the owner; an established one: the hop whose socket \
                 holds it"
            ),
        };
        Ok(LookupReport {
            quic: self.quic_of(name),
            accepted_by,
            service: name.to_string(),
            hash,
            bucket,
            table_generation: entry.generation,
            hops: hops
                .iter()
                .filter(|h| **h != NO_MEMBER)
                .map(|h| {
                    let name = self.cfg.member(*h).map_or("(unknown)", |m| &m.name);
                    (*h, name.to_string())
                })
                .collect(),
            pops,
            learned: self.learned_of(src, dst, udp),
        })
    }

    pub(super) fn snapshot(&self) -> Result<metrics::Snapshot> {
        let counters = self.dp.counters()?;
        let members = self.member_reports()?;
        Ok(metrics::Snapshot {
            counters,
            members,
            services: self
                .tables
                .tables()
                .iter()
                .map(|(name, t)| metrics::ServiceMetrics {
                    name: name.clone(),
                    table_generation: u64::from(t.generation),
                    buckets: self.tables.size(),
                    udp_mode: self.udp_mode_of(&t.service).name().to_string(),
                    table_digest: t.digest(),
                    quic: self.quic_of(&t.service),
                })
                .collect(),
            draining: self.draining,
            attach_mode: self
                .attachments
                .first()
                .map_or("detached", |a| a.mode)
                .to_string(),
            interfaces: self.cfg.node.interfaces.clone(),
            bgp: self.bgp_metrics(),
            config_digest: cluster_digest(&self.cfg),
            config_reloads_ok: self.reloads_ok,
            config_reloads_failed: self.reloads_failed,
            start_time: self.started,
            health_checks: self.health_checks_report(),
            pops: self.pop_reports(),
            learned: self.learned_report(),
        })
    }

    /// The announcement over every BIRD protocol: announced only if all of them are.
    pub(super) fn bgp_metrics(&self) -> Option<metrics::BgpMetrics> {
        if self.bgp.is_empty() {
            return None;
        }
        let all: Vec<AnnounceStatus> = self.bgp.iter().map(|(_, rx)| rx.borrow().clone()).collect();
        let announced = all
            .iter()
            .map(|s| s.announced)
            .collect::<Option<Vec<bool>>>()
            .map(|v| v.iter().all(|a| *a));
        Some(metrics::BgpMetrics {
            bird_reachable: all.iter().all(|s| s.bird_reachable),
            announced,
            wanted: all.iter().all(|s| s.wanted),
            transitions: all.iter().map(|s| s.transitions).sum(),
        })
    }
}

pub(super) fn empty_snapshot(core: &Core) -> metrics::Snapshot {
    metrics::Snapshot {
        counters: PacketCounts::default(),
        members: Vec::new(),
        services: Vec::new(),
        draining: core.draining,
        attach_mode: "detached".to_string(),
        interfaces: core.cfg.node.interfaces.clone(),
        bgp: None,
        config_digest: cluster_digest(&core.cfg),
        config_reloads_ok: core.reloads_ok,
        config_reloads_failed: core.reloads_failed,
        start_time: core.started,
        health_checks: core.health_checks_report(),
        pops: Vec::new(),
        learned: None,
    }
}

/// Asks every peer for its digests, all at once, and compares them with `ours`. Runs on the
/// blocking pool (the control socket's handlers do) without the core lock, so peers asking us
/// in turn are answered meanwhile.
fn drift_report(ours: NodeDigests, peers: Vec<(String, SocketAddr)>) -> DriftReport {
    let count = peers.len();
    let addrs: Vec<SocketAddr> = peers.iter().map(|(_, addr)| *addr).collect();
    let ask = async move {
        let mut asked = JoinSet::new();
        for (index, addr) in addrs.into_iter().enumerate() {
            asked.spawn(async move { (index, sync::fetch_digests(addr, DIGEST_TIMEOUT).await) });
        }
        let mut answers: Vec<Option<Result<NodeDigests, String>>> = vec![None; count];
        while let Some(joined) = asked.join_next().await {
            match joined {
                Ok((index, answer)) => {
                    if let Some(slot) = answers.get_mut(index) {
                        *slot = Some(answer.map_err(|e| e.to_string()));
                    }
                }
                Err(e) => log::warn!("digest fetch task failed: {e}"),
            }
        }
        answers
    };
    let answers = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime.block_on(ask),
        Err(e) => vec![Some(Err(format!("no runtime to ask with: {e}"))); count],
    };
    let mut report = DriftReport {
        ours,
        peers: Vec::with_capacity(peers.len()),
        disagreements: Vec::new(),
    };
    for ((member, addr), answer) in peers.into_iter().zip(answers) {
        let answer = answer.unwrap_or_else(|| Err("the fetch task failed".to_owned()));
        if let Ok(theirs) = &answer {
            report
                .disagreements
                .extend(sync::compare(&member, &report.ours, theirs));
        }
        let (digests, error) = match answer {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e)),
        };
        report.peers.push(PeerDigests {
            member,
            address: addr.to_string(),
            digests,
            error,
        });
    }
    report
}

/// The status report with the comparison of digests: the report and our digests are taken
/// under the lock, the peers are asked after it is released.
fn status_with_drift(shared: &Shared) -> anyhow::Result<StatusReport> {
    let (status, ours, peers) = {
        let core = shared.lock();
        (core.status(), core.digests(), core.digest_peers())
    };
    let mut status = status?;
    status.drift = Some(drift_report(ours, peers));
    Ok(status)
}

/// A reload asked for over the control socket: who asked, and where the answer goes. The main
/// loop runs it, as it runs a SIGHUP's, since it owns the health monitor a reload
/// reconfigures.
pub(super) type ReloadRequest = (String, oneshot::Sender<Result<String, String>>);

/// Answers one control-socket request (on a blocking thread: it may wait for the main loop).
pub(super) fn handle_request(
    shared: &Shared,
    rebuild: &Notify,
    reloads: &mpsc::Sender<ReloadRequest>,
    request: Request,
    caller: Caller,
) -> Response {
    let result = match request {
        // The report and our digests under the lock, the peers asked after it is released.
        Request::Status => status_with_drift(shared).map(|s| Response::Status(Box::new(s))),
        Request::Lookup { src, dst, udp } => {
            shared.lock().lookup(src, dst, udp).map(Response::Lookup)
        }
        Request::Cid { cid } => shared
            .lock()
            .cid(&cid)
            .map(|doc| Response::Cid(Box::new(doc))),
        Request::Drain => set_draining(&mut shared.lock(), rebuild, true, caller),
        Request::Undrain => set_draining(&mut shared.lock(), rebuild, false, caller),
        // Without the lock while the peers are asked.
        Request::DrainPop { drain } => {
            super::pop_drain::drain_pop(shared, rebuild, drain, caller).map(Response::PopDrain)
        }
        // Without the lock: the main loop takes it to reload.
        Request::Reload => return ask_for_reload(reloads, caller),
        // Streamed: the control socket hands it to `trace::handler` instead.
        Request::Trace(_) => Err(anyhow::anyhow!("trace is answered as a stream")),
    };
    result.unwrap_or_else(|e| Response::Error {
        message: format!("{e:#}"),
    })
}

/// Hands a reload to the main loop and waits for its outcome.
fn ask_for_reload(reloads: &mpsc::Sender<ReloadRequest>, caller: Caller) -> Response {
    let (tx, rx) = oneshot::channel();
    let answer = reloads
        .blocking_send((caller.to_string(), tx))
        .ok()
        .and_then(|()| rx.blocking_recv().ok());
    match answer {
        Some(Ok(message)) => Response::Done { message },
        Some(Err(message)) => Response::Error { message },
        None => Response::Error {
            message: "the daemon is stopping; no reload".to_string(),
        },
    }
}

/// Drain (`drain` true) or undrain, as `caller` asked.
fn set_draining(
    core: &mut Core,
    rebuild: &Notify,
    drain: bool,
    caller: Caller,
) -> Result<Response> {
    let changed = change_draining(core, rebuild, drain, &caller)?;
    let message = match (changed, drain) {
        (true, true) => "draining",
        (true, false) => "undrained",
        (false, true) => "already draining",
        (false, false) => "already not draining",
    };
    Ok(Response::Done {
        message: message.to_string(),
    })
}

/// Drain (`drain` true) or undrain, as `by` asked (logged); whether the state changed.
pub(super) fn change_draining(
    core: &mut Core,
    rebuild: &Notify,
    drain: bool,
    by: &dyn std::fmt::Display,
) -> Result<bool> {
    let what = if drain { "drain" } else { "undrain" };
    if core.draining == drain {
        log::info!(by:% = by; "{what} asked for: nothing to do, already in that state");
        return Ok(false);
    }
    core.draining = drain;
    log::info!(
        by:% = by,
        effect = if drain {
            "no new connections here; routes withdrawn; existing flows continue"
        } else {
            "taking new connections again"
        };
        "{what}"
    );
    let r = core
        .write_node_config()
        .and_then(|()| core.rebuild(&format!("{what} ({by})")));
    rebuild.notify_one();
    r.map(|()| true)
}
