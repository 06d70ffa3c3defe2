//! The daemon's state, shared by its tasks, and what changes it: members and node settings
//! written to the data plane, and the tables rebuilt from health and drain state.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use cdn_common::maps::{
    NO_MEMBER, NODE_DRAINING, NODE_READY, NODE_STEER_AUTH, NODE_TRACE, NODE_UNDERLAY_IFACES,
    NodeConfig,
};
use tokio::sync::watch;

use crate::{
    bgp::announce::AnnounceStatus,
    cluster::{
        flap_guard::{Change, FlapGuard},
        health::{HealthMonitor, MemberHealth, Target},
        maglev::MaglevMember,
        pops,
        probe::LocalFaultCounts,
    },
    config::{Config, HealthCheck, HealthProbe},
    dataplane::{Attachment, DataPlane, steer_auth_key, tables::Tables},
    operator::report::HealthChecksReport,
};

/// Everything the daemon's tasks share.
pub(super) struct Core {
    pub(super) cfg: Config,
    pub(super) config_path: PathBuf,
    pub(super) dp: DataPlane,
    pub(super) tables: Tables,
    pub(super) attachments: Vec<Attachment>,
    pub(super) draining: bool,
    pub(super) ready: bool,
    /// A `cdn-steer trace` is running: the program reports packets to it (`NODE_TRACE`).
    /// Never true at start, so a restarted daemon always clears the flag.
    pub(super) tracing: bool,
    pub(super) health: BTreeMap<u16, MemberHealth>,
    /// One announcer status per BIRD protocol.
    pub(super) bgp: Vec<(String, watch::Receiver<AnnounceStatus>)>,
    pub(super) reloads_ok: u64,
    pub(super) reloads_failed: u64,
    pub(super) started: SystemTime,
    /// The owners of every PoP's table (by PoP index; one without PoPs), as last built.
    pub(super) owners: Vec<Vec<u16>>,
    /// Per PoP (by index): members its last table was built over.
    pub(super) pop_eligible: Vec<usize>,
    /// This node's PoP had no eligible member at the last rebuild: new connections landing
    /// here are placed by the table of the PoP of this index.
    pub(super) pop_fallback: Option<usize>,
    /// Ids written to the member maps, so removed members can be cleared.
    pub(super) written_members: Vec<u16>,
    /// QUIC-LB server IDs written to `QUIC_SERVERS`, so those no longer configured can be
    /// cleared. At start: what a previous controller left in the pinned map.
    pub(super) written_quic_servers: Vec<u32>,
    /// The mass-flap rule, local faults and this node's own service checks.
    pub(super) checks: LocalChecks,
    /// Learned owners and claims (with PoPs only).
    pub(super) learning: super::learning::Learning,
    /// PoP drains received over the peer plane.
    pub(super) pop_drains: super::pop_drain::PopDrains,
}

/// What keeps a local fault from passing for a member fault, and what makes `/ready` cover
/// this node's own service.
#[derive(Debug, Default)]
pub(super) struct LocalChecks {
    /// The mass-flap rule over the members' health ([`FlapGuard`]).
    pub(super) guard: FlapGuard,
    /// Probes that failed for a local reason (the member health monitor's counters).
    pub(super) local_faults: Arc<LocalFaultCounts>,
    /// TCP checks of this node's own services on their VIPs ([`local_service_targets`]); `None`
    /// until the daemon starts it.
    pub(super) local_service: Option<HealthMonitor>,
}

pub(super) fn pin_paths(cfg: &Config) -> (PathBuf, PathBuf) {
    (cfg.node.bpffs.join("maps"), cfg.node.bpffs.join("links"))
}

impl Core {
    pub(super) fn self_id(&self) -> u16 {
        self.cfg.self_member().map_or(NO_MEMBER, |m| m.id)
    }

    pub(super) fn node_config(&self) -> NodeConfig {
        let mut flags = 0;
        if self.ready {
            flags |= NODE_READY;
        }
        if self.draining {
            flags |= NODE_DRAINING;
        }
        if self.tracing {
            flags |= NODE_TRACE;
        }
        if !self.cfg.node.underlay_interfaces.is_empty() {
            flags |= NODE_UNDERLAY_IFACES;
        }
        if self.cfg.cluster.steer_auth {
            flags |= NODE_STEER_AUTH;
        }
        NodeConfig {
            hash_key: self.cfg.cluster.hash_key,
            underlay_v4: self.cfg.node.underlay_v4.map_or([0; 4], |a| a.octets()),
            underlay_v6: self.cfg.node.underlay_v6.map_or([0; 16], |a| a.octets()),
            steer_port: self.cfg.cluster.steer_port,
            self_member: self.self_id(),
            flags,
            hop_budget: self.cfg.cluster.hop_budget,
            self_pop: u8::try_from(self.cfg.self_pop_index()).unwrap_or(0),
            search_budget: self.search_budget(),
            max_frame: self.cfg.node.max_frame,
            auth_key: steer_auth_key(self.cfg.cluster.hash_key),
            ..NodeConfig::default()
        }
    }

    /// The hop budget a search starts with: enough for every hop of every other PoP's chain,
    /// each index of it asked twice at most (once more after a redirect, README "PoPs"), and
    /// the hops between PoPs.
    pub(super) fn search_budget(&self) -> u8 {
        let other_pops = self.cfg.pop_count().saturating_sub(1);
        u8::try_from(6 * other_pops).unwrap_or(u8::MAX)
    }

    pub(super) fn write_node_config(&mut self) -> Result<()> {
        let cfg = self.node_config();
        self.dp
            .write_config(&cfg)
            .context("writing the node configuration")
    }

    /// Members (ids and underlay addresses) into the data plane; ids no longer configured are
    /// cleared, so they can neither receive packets nor vouch for steering packets.
    pub(super) fn write_members(&mut self) -> Result<()> {
        let mut ids = Vec::new();
        for m in &self.cfg.cluster.members {
            self.dp
                .set_member(m.id, Some(m.underlay))
                .with_context(|| format!("writing member {}", m.name))?;
            ids.push(m.id);
        }
        for old in std::mem::take(&mut self.written_members) {
            if !ids.contains(&old) {
                self.dp.set_member(old, None)?;
                self.dp.clear_next_hop(old)?;
            }
        }
        self.written_members = ids;
        self.write_quic_servers()
    }

    /// Every configured member's QUIC-LB server ID into `QUIC_SERVERS`, whatever its health:
    /// the connections whose IDs carry it live on that member, healthy or not. Server IDs no
    /// longer configured are cleared, so their CIDs fall back to the flow hash.
    fn write_quic_servers(&mut self) -> Result<()> {
        // `written_quic_servers` follows every single write, so that a failure half-way (the
        // call returns it; the next reload or restart tries again) never loses track of an
        // entry that would then stay in the map.
        let mut wanted = Vec::with_capacity(self.cfg.cluster.members.len());
        for m in &self.cfg.cluster.members {
            self.dp
                .set_quic_server(m.quic_server_id, Some(m.id))
                .with_context(|| format!("writing the QUIC server ID of member {}", m.name))?;
            if !self.written_quic_servers.contains(&m.quic_server_id) {
                self.written_quic_servers.push(m.quic_server_id);
            }
            wanted.push(m.quic_server_id);
        }
        let stale: Vec<u32> = self
            .written_quic_servers
            .iter()
            .copied()
            .filter(|id| !wanted.contains(id))
            .collect();
        for old in stale {
            self.dp
                .set_quic_server(old, None)
                .with_context(|| format!("clearing QUIC server ID {old}"))?;
            self.written_quic_servers.retain(|id| *id != old);
            log::info!(server_id = old; "QUIC server ID no longer configured: cleared");
        }
        Ok(())
    }

    /// Members that may take new flows now.
    pub(super) fn eligible(&self) -> Vec<MaglevMember<'_>> {
        let self_id = self.self_id();
        self.cfg
            .cluster
            .members
            .iter()
            .filter(|m| m.weight > 0)
            .filter(|m| !(self.draining && m.id == self_id))
            .filter(|m| self.checks.guard.is_up(m.id, &self.health))
            .map(|m| MaglevMember {
                id: m.id,
                name: &m.name,
                weight: m.weight,
            })
            .collect()
    }

    /// Rebuilds the Maglev table from the current health and drain state and installs it.
    /// `cause` (why the inputs changed) goes into the log line of every table swapped.
    pub(super) fn rebuild(&mut self, cause: &str) -> Result<()> {
        // A reload may have changed the services or this node's check: a no-op otherwise.
        if let Some(local) = &mut self.checks.local_service {
            local.reconfigure(local_service_targets(&self.cfg));
        }
        let previous = std::mem::take(&mut self.owners);
        let members = self.eligible();
        if members.is_empty() {
            log::warn!(cause; "no member is eligible for new flows; buckets keep their last owners");
        }
        let eligible = members.len();
        let built =
            pops::build(&self.cfg, &members, previous).context("building the Maglev tables")?;
        let own_has_members = built
            .eligible
            .get(self.cfg.self_pop_index())
            .is_some_and(|n| *n > 0);
        self.note_pop_fallback(built.fallback, own_has_members, cause);
        self.pop_eligible = built.eligible;
        let owners = built.owners;
        let report = self
            .tables
            .update_pops(&mut self.dp, &self.cfg, &owners, built.fallback)
            .context("writing the steering tables")?;
        for service in &report.swapped {
            let generation = self
                .tables
                .tables()
                .get(service)
                .map_or(0, |t| t.generation);
            let owner_changes = report.owner_changes.get(service).copied().unwrap_or(0);
            log::info!(
                service = service.as_str(), generation, owner_changes,
                eligible, cause;
                "table swapped"
            );
        }
        self.owners = owners;
        Ok(())
    }

    /// Logs when this node's own PoP starts or stops having no eligible member of its own,
    /// and where new connections landing here go meanwhile. (With no eligible member in any
    /// PoP there is no fallback either; `rebuild` warns about that.)
    fn note_pop_fallback(&mut self, fallback: Option<usize>, own_has_members: bool, cause: &str) {
        if fallback != self.pop_fallback {
            let pop = self.cfg.self_pop().unwrap_or_default();
            match fallback.and_then(|index| self.cfg.pops().get(index).copied()) {
                Some(to) => {
                    log::warn!(pop, to, cause; "no member of this node's PoP is eligible: new connections landing here go to another PoP; its open flows stay where they are");
                }
                None if own_has_members => {
                    log::info!(pop, cause; "this node's PoP has eligible members again: new connections stay in it");
                }
                None => {}
            }
        }
        self.pop_fallback = fallback;
    }

    /// Whether this node takes new flows, for other members' health checks: a drained node
    /// answers "no", so it leaves every node's table while its own flows continue.
    pub(super) fn readiness(&self) -> Result<(), String> {
        if !self.ready {
            return Err("data plane not ready".to_string());
        }
        if self.draining {
            return Err("draining".to_string());
        }
        // This node's own service: a dead web server behind a live controller must not look
        // ready to the peers that ask here. Unknown (not yet checked) is no evidence.
        if let Some(local) = &self.checks.local_service {
            let targets = local_service_targets(&self.cfg);
            for (id, health) in local.snapshot() {
                if health.healthy == Some(false) {
                    let name = targets
                        .iter()
                        .find(|t| t.member_id == id)
                        .map_or("local service", |t| t.name.as_str());
                    let why = health.last_error.as_deref().unwrap_or("check failed");
                    return Err(format!("{name} down: {why}"));
                }
            }
        }
        Ok(())
    }

    /// The health checker's own state, for `status` and the metrics.
    pub(super) fn health_checks_report(&self) -> HealthChecksReport {
        let hold = self.checks.guard.hold();
        HealthChecksReport {
            local_errors: self
                .checks
                .local_faults
                .read()
                .into_iter()
                .map(|(reason, n)| (reason.to_owned(), n))
                .collect(),
            held_members: hold
                .iter()
                .flat_map(|h| h.members.iter())
                .filter_map(|id| self.cfg.member(*id).map(|m| m.name.clone()))
                .collect(),
            held_since: hold
                .and_then(|h| h.since.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
        }
    }

    /// Takes in a new health view from the monitor: applies the mass-flap rule and returns
    /// what changed for the table, as words for the rebuild's cause (empty: no rebuild).
    pub(super) fn observe_health(&mut self, snapshot: BTreeMap<u16, MemberHealth>) -> Vec<String> {
        let mut changes = Vec::new();
        for (id, health) in &snapshot {
            let before = self.health.get(id).and_then(|h| h.healthy);
            if before != health.healthy {
                let name = self.cfg.member(*id).map_or("?", |m| m.name.as_str());
                let state = match health.healthy {
                    Some(true) => "up",
                    Some(false) => "down",
                    None => "unknown",
                };
                changes.push(format!("{name} {state}"));
            }
        }
        self.health = snapshot;
        let round = check_round(&self.cfg);
        match self
            .checks
            .guard
            .observe(&self.health, round, SystemTime::now())
        {
            Some(Change::Held(members)) => {
                let names: Vec<&str> = members
                    .iter()
                    .filter_map(|id| self.cfg.member(*id).map(|m| m.name.as_str()))
                    .collect();
                let members = names.join(",");
                let round_ms = u64::try_from(round.as_millis()).unwrap_or(u64::MAX);
                log::warn!(members = members.as_str(), round_ms;
                    "every member that was up went down within one check round: the cause is \
                     this node, not the members; keeping the last table until checks work again");
                changes.push("mass flap: table held".into());
            }
            Some(Change::Confirmed(members)) => {
                for id in members {
                    let name = self.cfg.member(id).map_or("?", |m| m.name.as_str());
                    changes.push(format!("{name} down (the others pass again)"));
                }
            }
            Some(Change::Released) => {
                log::info!("health checks work again: members are judged by their own health");
                changes.push("mass flap over".into());
            }
            None => {}
        }
        changes
    }

    /// Whether the VIP routes should be announced from this node, and why.
    pub(super) fn announce_decision(&self) -> (bool, String) {
        if !self.ready {
            return (false, "data plane not ready".into());
        }
        if self.draining {
            return (false, "draining".into());
        }
        if let Some(me) = self.cfg.self_member()
            && self.health.get(&me.id).and_then(|h| h.healthy) != Some(true)
        {
            return (
                false,
                format!("this node's member {} is not healthy", me.name),
            );
        }
        if self.eligible().is_empty() {
            return (false, "no member is eligible for new flows".into());
        }
        (true, "ready, healthy and not draining".into())
    }

    /// A short state for the service manager's STATUS line: `ready, announcing 2 VIPs, 3/3
    /// members up`, `draining, ...`.
    pub(super) fn summary(&self) -> String {
        let members = self.cfg.cluster.members.len();
        let up = self
            .cfg
            .cluster
            .members
            .iter()
            .filter(|m| self.health.get(&m.id).and_then(|h| h.healthy) == Some(true))
            .count();
        let vips: usize = self.cfg.services.iter().map(|s| s.vips.len()).sum();
        let vips = format!("{vips} VIP{}", if vips == 1 { "" } else { "s" });
        let state = if !self.ready {
            "starting".to_string()
        } else if self.draining {
            "draining (no new connections), routes withdrawn".to_string()
        } else {
            let (wanted, why) = self.announce_decision();
            let statuses: Vec<_> = self.bgp.iter().map(|(_, rx)| rx.borrow().clone()).collect();
            if statuses.is_empty() {
                format!("ready, {vips} (no BGP)")
            } else if !wanted {
                format!("ready, {vips} withdrawn: {why}")
            } else if statuses.iter().all(|s| s.announced == Some(true)) {
                format!("ready, announcing {vips}")
            } else if statuses.iter().any(|s| !s.bird_reachable) {
                format!("ready, {vips} not announced: BIRD unreachable")
            } else {
                format!("ready, announcing {vips} (waiting for BIRD)")
            }
        };
        format!("{state}, {up}/{members} members up")
    }

    /// Healthy members (other than this node) whose history can be fetched: (name, endpoint).
    pub(super) fn sync_peers(&self) -> Vec<(String, SocketAddr)> {
        let self_id = self.self_id();
        self.cfg
            .cluster
            .members
            .iter()
            .filter(|m| m.id != self_id)
            .filter(|m| self.health.get(&m.id).and_then(|h| h.healthy) == Some(true))
            .filter_map(|m| m.sync.map(|addr| (m.name.clone(), addr)))
            .collect()
    }

    pub(super) fn health_targets(&self) -> Vec<Target> {
        health_targets(&self.cfg)
    }
}

/// One check round of the members: the longest interval plus the longest timeout. Members
/// that fail for one shared cause go down within it.
fn check_round(cfg: &Config) -> Duration {
    let members = &cfg.cluster.members;
    let interval = members.iter().map(|m| m.health.interval).max();
    let timeout = members.iter().map(|m| m.health.timeout).max();
    interval.unwrap_or_default() + timeout.unwrap_or_default()
}

/// This node's own service checks: for every service with a TCP port and a single-address VIP
/// (`/32`, `/128`), a TCP connect to the first such VIP on the first TCP port, paced like this
/// node's member check (and closing the same way). A wider VIP prefix does not say which
/// address the service answers on, so it is not checked. None without a member of our own.
pub(super) fn local_service_targets(cfg: &Config) -> Vec<Target> {
    let Some(me) = cfg.self_member() else {
        return Vec::new();
    };
    cfg.services
        .iter()
        .filter_map(|s| {
            let port = *s.tcp_ports.first()?;
            let vip = s.vips.iter().find(|v| {
                let host = if v.is_ipv4() { 32 } else { 128 };
                v.prefix_len() == host
            })?;
            Some((s, vip.addr(), port))
        })
        .enumerate()
        .map(|(i, (s, addr, port))| Target {
            member_id: u16::try_from(i).unwrap_or(u16::MAX),
            name: format!("service {} ({})", s.name, SocketAddr::new(addr, port)),
            addr,
            check: HealthCheck {
                probe: HealthProbe::Tcp,
                port,
                ..me.health.clone()
            },
        })
        .collect()
}

pub(super) fn health_targets(cfg: &Config) -> Vec<Target> {
    cfg.cluster
        .members
        .iter()
        .map(|m| Target {
            member_id: m.id,
            name: m.name.clone(),
            addr: m.underlay,
            check: m.health.clone(),
        })
        .collect()
}

/// The daemon's shared state.
#[derive(Clone)]
pub(super) struct Shared(pub(super) Arc<Mutex<Core>>);

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves the maps as they were written so far; going
        // on is better than stopping the data plane's controller.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
