//! `cdn-steer run`: the controller daemon.
//!
//! Start-up: load the configuration, mount/find the bpffs, load the program reusing pinned
//! maps, attach (replacing a running program in place after a restart), pick up the tables
//! a previous controller left, write members and node settings, wait for the first health
//! results, build the tables, mark the data plane ready, then announce.
//!
//! Running: health changes, drain/undrain and configuration reloads (SIGHUP) rebuild the
//! tables; next hops are refreshed every second; metrics and the control socket are served.
//!
//! Shutdown (SIGTERM/SIGINT): withdraw the routes and wait for BIRD to confirm, give the
//! network a grace period to move traffic elsewhere, then detach the program. Maps stay
//! pinned, so the next start keeps the hop history.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use cdn_common::{
    counters::PacketCounts,
    hash::{PROTO_TCP, PROTO_UDP, flow_hash_v4, flow_hash_v6, ports_word, v4_word, v6_words},
    maps::{MAX_MEMBERS, NO_MEMBER, NODE_DRAINING, NODE_READY, NextHop, NodeConfig},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};

use crate::{
    bgp::announce::{AnnounceStatus, Announcer},
    cluster::{
        health::{HealthMonitor, MemberHealth, Target},
        maglev::{self, MaglevMember},
        sync,
    },
    config::{self, Config},
    dataplane::{
        self, Attachment, DataPlane, LoadOptions,
        nexthop::Resolver,
        tables::{self, Tables},
    },
    operator::{
        control::{
            self, AttachmentStatus, BgpStatus, LookupReport, MemberStatus, Request, Response,
            ServiceStatus, StatusReport,
        },
        metrics,
    },
};

/// How long a next-hop entry stays valid without a refresh. Refreshes come every second; if
/// the controller stops, the data plane falls back to the FIB after this.
const NEXT_HOP_TTL: Duration = Duration::from_secs(5);
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(1);
/// Table rebuilds are at least this far apart, so that a burst of health changes makes one
/// rebuild, and a table half that went out of use is not rewritten while a packet may still
/// read it.
const REBUILD_DEBOUNCE: Duration = Duration::from_millis(200);
/// How long start-up waits for every member's first health result.
const FIRST_HEALTH_WAIT: Duration = Duration::from_secs(3);

/// Command-line options of `cdn-steer run`.
#[derive(Clone, Debug)]
pub struct Options {
    pub config_path: PathBuf,
    /// Detach the program when stopping (default). Without it a stopped controller leaves the
    /// data plane running with its last tables, as after `kill -9`.
    pub detach_on_exit: bool,
    /// Delete the pinned maps and links first: forgets the hop history.
    pub reset_maps: bool,
    /// Pause between withdrawing the routes and detaching, for the network to converge.
    pub shutdown_grace: Duration,
}

/// Everything the daemon's tasks share.
pub struct Core {
    cfg: Config,
    config_path: PathBuf,
    dp: DataPlane,
    tables: Tables,
    attachments: Vec<Attachment>,
    draining: bool,
    ready: bool,
    health: BTreeMap<u16, MemberHealth>,
    /// One announcer status per BIRD protocol.
    bgp: Vec<(String, watch::Receiver<AnnounceStatus>)>,
    reloads_ok: u64,
    reloads_failed: u64,
    started: SystemTime,
    owners: Vec<u16>,
    /// Ids written to the member maps, so removed members can be cleared.
    written_members: Vec<u16>,
}

/// One member as status and metrics show it.
struct MemberRow<'a> {
    settings: &'a config::MemberSettings,
    is_self: bool,
    health: Option<&'a MemberHealth>,
    stats: cdn_common::maps::MemberStats,
    /// Buckets it owns over every service, and their fraction of all buckets.
    buckets: u64,
    share: f64,
}

fn pin_paths(cfg: &Config) -> (PathBuf, PathBuf) {
    (cfg.node.bpffs.join("maps"), cfg.node.bpffs.join("links"))
}

impl Core {
    fn self_id(&self) -> u16 {
        self.cfg.self_member().map_or(NO_MEMBER, |m| m.id)
    }

    fn node_config(&self) -> NodeConfig {
        let mut flags = 0;
        if self.ready {
            flags |= NODE_READY;
        }
        if self.draining {
            flags |= NODE_DRAINING;
        }
        NodeConfig {
            hash_key: self.cfg.cluster.hash_key,
            underlay_v4: self.cfg.node.underlay_v4.map_or([0; 4], |a| a.octets()),
            underlay_v6: self.cfg.node.underlay_v6.map_or([0; 16], |a| a.octets()),
            steer_port: self.cfg.cluster.steer_port,
            self_member: self.self_id(),
            flags,
            hop_budget: self.cfg.cluster.hop_budget,
            max_frame: self.cfg.node.max_frame,
            ..NodeConfig::default()
        }
    }

    fn write_node_config(&mut self) -> Result<()> {
        let cfg = self.node_config();
        self.dp
            .write_config(&cfg)
            .context("writing the node configuration")
    }

    /// Members (ids and underlay addresses) into the data plane; ids no longer configured are
    /// cleared, so they can neither receive packets nor vouch for steering packets.
    fn write_members(&mut self) -> Result<()> {
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
                self.dp.set_next_hop(old, &NextHop::default())?;
            }
        }
        self.written_members = ids;
        Ok(())
    }

    /// Members that may take new flows now.
    fn eligible(&self) -> Vec<MaglevMember<'_>> {
        let self_id = self.self_id();
        self.cfg
            .cluster
            .members
            .iter()
            .filter(|m| m.weight > 0)
            .filter(|m| !(self.draining && m.id == self_id))
            .filter(|m| self.health.get(&m.id).and_then(|h| h.healthy) == Some(true))
            .map(|m| MaglevMember {
                id: m.id,
                name: &m.name,
                weight: m.weight,
            })
            .collect()
    }

    /// Rebuilds the Maglev table from the current health and drain state and installs it.
    fn rebuild(&mut self) -> Result<()> {
        let mut owners = std::mem::take(&mut self.owners);
        let members = self.eligible();
        if members.is_empty() {
            log::warn!("no member is eligible for new flows; buckets keep their last owners");
        }
        maglev::build_table_into(
            &members,
            self.cfg.cluster.hash_key,
            self.cfg.cluster.table_size,
            &mut owners,
        )
        .context("building the Maglev table")?;
        if members.is_empty() {
            owners = vec![NO_MEMBER; self.cfg.cluster.table_size as usize];
        }
        let report = self
            .tables
            .update(&mut self.dp, &self.cfg, &owners)
            .context("writing the steering tables")?;
        if !report.swapped.is_empty() {
            log::debug!("table update: {report:?}");
        }
        self.owners = owners;
        Ok(())
    }

    /// Whether this node takes new flows, for other members' health checks: a drained node
    /// answers "no", so it leaves every node's table while its own flows continue.
    fn readiness(&self) -> Result<(), String> {
        if !self.ready {
            return Err("data plane not ready".to_string());
        }
        if self.draining {
            return Err("draining".to_string());
        }
        Ok(())
    }

    /// Whether the VIP routes should be announced from this node.
    fn announce_wanted(&self) -> bool {
        let local_ok = match self.cfg.self_member() {
            Some(me) => self.health.get(&me.id).and_then(|h| h.healthy) == Some(true),
            None => true,
        };
        self.ready && !self.draining && local_ok && !self.eligible().is_empty()
    }

    /// Healthy members (other than this node) whose history can be fetched: (name, endpoint).
    fn sync_peers(&self) -> Vec<(String, SocketAddr)> {
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

    /// What status and metrics show of every member.
    fn member_rows(&self) -> Result<Vec<MemberRow<'_>>> {
        let share = self.tables.share();
        let total: u64 = share.values().sum();
        let self_id = self.self_id();
        self.cfg
            .cluster
            .members
            .iter()
            .map(|m| {
                let buckets = share.get(&m.id).copied().unwrap_or(0);
                Ok(MemberRow {
                    settings: m,
                    is_self: m.id == self_id,
                    health: self.health.get(&m.id),
                    stats: self.dp.member_stats(m.id)?,
                    buckets,
                    share: if total == 0 {
                        0.0
                    } else {
                        buckets as f64 / total as f64
                    },
                })
            })
            .collect()
    }

    fn status(&self) -> Result<StatusReport> {
        let counters = self.dp.counters()?;
        let members = self
            .member_rows()?
            .into_iter()
            .map(|r| MemberStatus {
                id: r.settings.id,
                name: r.settings.name.clone(),
                underlay: r.settings.underlay.to_string(),
                weight: r.settings.weight,
                is_self: r.is_self,
                healthy: r.health.and_then(|h| h.healthy),
                last_error: r.health.and_then(|h| h.last_error.clone()),
                last_check_ms: r
                    .health
                    .and_then(|h| h.last_latency)
                    .map(|d| d.as_secs_f64() * 1000.0),
                buckets: r.buckets,
                share: r.share,
                forwarded_packets: r.stats.packets,
                forwarded_bytes: r.stats.bytes,
            })
            .collect();
        let services = self
            .tables
            .services()
            .iter()
            .map(|(name, t)| ServiceStatus {
                name: name.clone(),
                vips: t.vips.iter().map(prefix_text).collect(),
                generation: t.generation,
                slot: t.slot,
                active_half: t.active,
            })
            .collect();
        Ok(StatusReport {
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
        })
    }

    /// The owner and hops of a flow, read from the live maps with the data plane's hash.
    fn lookup(&self, src: SocketAddr, dst: SocketAddr, udp: bool) -> Result<LookupReport> {
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
        let Some((name, table)) = self.tables.service_for(dst.ip()) else {
            bail!("{} is not in any service's VIP prefixes", dst.ip());
        };
        let vip = table
            .vips
            .iter()
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
        Ok(LookupReport {
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
        })
    }

    fn snapshot(&self) -> Result<metrics::Snapshot> {
        let counters = self.dp.counters()?;
        let members = self
            .member_rows()?
            .into_iter()
            .map(|r| metrics::MemberMetrics {
                id: r.settings.id,
                name: r.settings.name.clone(),
                healthy: r.health.and_then(|h| h.healthy),
                last_check_latency: r.health.and_then(|h| h.last_latency),
                packets: r.stats.packets,
                bytes: r.stats.bytes,
                bucket_share: r.share,
                weight: r.settings.weight,
                is_self: r.is_self,
            })
            .collect();
        Ok(metrics::Snapshot {
            counters,
            members,
            services: self
                .tables
                .services()
                .iter()
                .map(|(name, t)| metrics::ServiceMetrics {
                    name: name.clone(),
                    table_generation: u64::from(t.generation),
                    buckets: self.tables.size(),
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
            config_reloads_ok: self.reloads_ok,
            config_reloads_failed: self.reloads_failed,
            start_time: self.started,
        })
    }

    /// The announcement over every BIRD protocol: announced only if all of them are.
    fn bgp_metrics(&self) -> Option<metrics::BgpMetrics> {
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

    fn health_targets(&self) -> Vec<Target> {
        health_targets(&self.cfg)
    }

    /// Applies a new configuration after checking that it changes nothing that needs a
    /// restart. On error the running configuration stays in force, untouched.
    fn reload(&mut self, new: Config) -> Result<()> {
        let old = &self.cfg;
        let restart_only: Vec<&str> = [
            ("node.name", new.node.name != old.node.name),
            (
                "node.interfaces",
                new.node.interfaces != old.node.interfaces,
            ),
            ("node.xdp_mode", new.node.xdp_mode != old.node.xdp_mode),
            ("node.bpffs", new.node.bpffs != old.node.bpffs),
            (
                "node.control_socket",
                new.node.control_socket != old.node.control_socket,
            ),
            (
                "node.steer_only",
                new.node.steer_only != old.node.steer_only,
            ),
            (
                "cluster.table_size",
                new.cluster.table_size != old.cluster.table_size,
            ),
            ("metrics", new.metrics != old.metrics),
            ("bgp", new.bgp != old.bgp),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(field, _)| field)
        .collect();
        if !restart_only.is_empty() {
            bail!(
                "these settings only change with a restart: {}",
                restart_only.join(", ")
            );
        }
        let capacity = self.dp.table_capacity();
        if u64::from(2 * new.cluster.table_size) * new.services.len() as u64 > u64::from(capacity) {
            bail!(
                "{} services do not fit the table map ({capacity} buckets); restart with --reset-maps",
                new.services.len()
            );
        }
        if new.cluster.hash_key != old.cluster.hash_key {
            log::warn!("cluster.hash_key changed: every flow hashes anew");
        }
        let previous = std::mem::replace(&mut self.cfg, new);
        let applied = self
            .write_members()
            .and_then(|()| self.write_node_config())
            .and_then(|()| self.rebuild());
        if let Err(e) = applied {
            // Put the old configuration back as far as it goes; the maps may hold a mix,
            // which the next rebuild corrects.
            self.cfg = previous;
            let _ = self.write_members();
            let _ = self.write_node_config();
            let _ = self.rebuild();
            return Err(e);
        }
        Ok(())
    }
}

fn prefix_text(p: &config::Prefix) -> String {
    format!("{}/{}", p.addr(), p.prefix_len())
}

fn health_targets(cfg: &Config) -> Vec<Target> {
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
pub struct Shared(Arc<Mutex<Core>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves the maps as they were written so far; going
        // on is better than stopping the data plane's controller.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn handle_request(shared: &Shared, rebuild: &Notify, request: Request) -> Response {
    let mut core = shared.lock();
    let result = match request {
        Request::Status => core.status().map(|s| Response::Status(Box::new(s))),
        Request::Lookup { src, dst, udp } => core.lookup(src, dst, udp).map(Response::Lookup),
        Request::Drain | Request::Undrain => {
            let drain = matches!(request, Request::Drain);
            if core.draining == drain {
                Ok(Response::Done {
                    message: format!(
                        "already {}",
                        if drain { "draining" } else { "not draining" }
                    ),
                })
            } else {
                core.draining = drain;
                log::info!(
                    "{}: {}",
                    if drain { "drain" } else { "undrain" },
                    if drain {
                        "no new connections here; routes withdrawn; existing flows continue"
                    } else {
                        "taking new connections again"
                    }
                );
                let r = core.write_node_config().and_then(|()| core.rebuild());
                rebuild.notify_one();
                r.map(|()| Response::Done {
                    message: if drain { "draining" } else { "undrained" }.to_string(),
                })
            }
        }
    };
    result.unwrap_or_else(|e| Response::Error {
        message: format!("{e:#}"),
    })
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> Result<()> {
    let cfg = config::load(&opts.config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    log::info!(
        "cdn-steer {} starting as {} ({} members, {} services)",
        env!("CARGO_PKG_VERSION"),
        cfg.node.name,
        cfg.cluster.members.len(),
        cfg.services.len()
    );
    if let Some(mounted) = dataplane::ensure_bpffs(&cfg.node.bpffs).with_context(|| {
        format!(
            "preparing the bpf filesystem at {}",
            cfg.node.bpffs.display()
        )
    })? {
        log::info!("mounted a bpf filesystem on {}", mounted.display());
    }
    let (map_dir, link_dir) = pin_paths(&cfg);
    if opts.reset_maps {
        for dir in [&map_dir, &link_dir] {
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        log::warn!("--reset-maps: pinned maps and links removed; hop history starts empty");
    }
    std::fs::create_dir_all(&map_dir)?;
    std::fs::create_dir_all(&link_dir)?;
    let restarted = map_dir.join(cdn_common::maps::MAP_TABLE).exists();
    let dp = DataPlane::load(&LoadOptions {
        table_entries: tables::table_entries(cfg.cluster.table_size, cfg.services.len()),
        pin_dir: Some(map_dir.clone()),
    })
    .context("loading the XDP program")?;
    let tables = Tables::recover(&dp, &cfg)?;
    if restarted {
        log::info!("found pinned maps: continuing with the previous tables and hop history");
    }
    // Node settings as they were (READY stays if a previous controller set it), so a running
    // data plane keeps steering while we start.
    let previous_flags = if restarted { dp.config()?.flags } else { 0 };
    let mut core = Core {
        config_path: std::fs::canonicalize(&opts.config_path)
            .unwrap_or_else(|_| opts.config_path.clone()),
        dp,
        tables,
        attachments: Vec::new(),
        draining: previous_flags & NODE_DRAINING != 0,
        ready: previous_flags & NODE_READY != 0,
        health: BTreeMap::new(),
        bgp: Vec::new(),
        reloads_ok: 0,
        reloads_failed: 0,
        started: SystemTime::now(),
        owners: Vec::new(),
        written_members: (0..MAX_MEMBERS as u16).collect(),
        cfg,
    };
    core.write_members()?;
    core.write_node_config()?;
    let generic = core.cfg.node.xdp_mode == config::XdpMode::Generic;
    for interface in core.cfg.node.interfaces.clone() {
        let link_pin = link_dir.join(&interface);
        let a = core
            .dp
            .attach(&interface, generic, &link_pin)
            .with_context(|| format!("attaching to {interface}"))?;
        log::info!(
            "XDP {} on {} ({})",
            if a.replaced {
                "program replaced in place"
            } else {
                "attached"
            },
            a.interface,
            a.mode
        );
        if generic {
            log::warn!(
                "{}: generic XDP mode, as configured: slower than native",
                a.interface
            );
        }
        core.attachments.push(a);
    }

    let mut monitor = HealthMonitor::start(core.health_targets());
    monitor.first_results(FIRST_HEALTH_WAIT).await;
    core.health = monitor.snapshot();
    sync_history(&mut core).await;
    core.rebuild()?;
    core.ready = true;
    core.write_node_config()?;
    log::info!("data plane ready");

    let control_path = core.cfg.node.control_socket.clone();
    let metrics_addr = core.cfg.metrics.listen;
    // Announcement: one announcer per BIRD protocol, all driven by the same wish.
    let (wanted_tx, wanted_rx) = watch::channel(false);
    let announcers = match &core.cfg.bgp {
        Some(b) => Announcer::from_settings(b, &wanted_rx),
        None => Vec::new(),
    };
    core.bgp = match &core.cfg.bgp {
        Some(b) => b
            .protocols
            .iter()
            .cloned()
            .zip(announcers.iter().map(Announcer::status))
            .collect(),
        None => Vec::new(),
    };
    let shared = Shared(Arc::new(Mutex::new(core)));
    let rebuild = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);

    // Control socket.
    let listener = control::bind(&control_path).await?;
    let control_task = {
        let shared = shared.clone();
        let rebuild = rebuild.clone();
        tokio::spawn(control::serve(
            listener,
            Arc::new(move |req| handle_request(&shared, &rebuild, req)),
        ))
    };

    // Metrics.
    let metrics_listener = metrics::bind(metrics_addr).await?;
    let metrics_task = {
        let ready_shared = shared.clone();
        let table_shared = shared.clone();
        let shared = shared.clone();
        let source: metrics::SnapshotSource = Arc::new(move || {
            let core = shared.lock();
            core.snapshot().unwrap_or_else(|e| {
                log::warn!("metrics snapshot: {e:#}");
                empty_snapshot(&core)
            })
        });
        let ready: metrics::ReadySource = Arc::new(move || ready_shared.lock().readiness());
        let table: metrics::TableSource = Arc::new(move |service: &str| {
            let core = table_shared.lock();
            core.tables
                .services()
                .get(service)
                .filter(|t| t.generation > 0)
                .map(|t| (t.generation, sync::encode(t.buckets())))
        });
        tokio::spawn(metrics::serve_with_ready(
            metrics_listener,
            source,
            metrics::Extra {
                ready: Some(ready),
                table: Some(table),
            },
            stop_rx.clone(),
        ))
    };

    // History gossip.
    let gossip_task = shared
        .lock()
        .cfg
        .cluster
        .history_sync
        .map(|every| tokio::spawn(gossip(shared.clone(), every)));

    // Next hops.
    let nexthop_task = {
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        tokio::task::spawn_blocking(move || refresh_next_hops(&shared, &mut stop))
    };

    let mut health_rx = monitor.subscribe();
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut last_rebuild = Instant::now();
    let mut pending = false;

    loop {
        let wanted = shared.lock().announce_wanted();
        wanted_tx.send_if_modified(|w| std::mem::replace(w, wanted) != wanted);
        let debounce = REBUILD_DEBOUNCE.saturating_sub(last_rebuild.elapsed());
        tokio::select! {
            changed = health_rx.changed() => {
                if changed.is_err() { bail!("health monitor stopped"); }
                let snapshot = health_rx.borrow_and_update().clone();
                let mut core = shared.lock();
                let before: Vec<_> = core.health.iter().map(|(k, v)| (*k, v.healthy)).collect();
                core.health = snapshot;
                let after: Vec<_> = core.health.iter().map(|(k, v)| (*k, v.healthy)).collect();
                if before != after { pending = true; }
            }
            () = rebuild.notified() => {
                last_rebuild = Instant::now();
            }
            () = tokio::time::sleep(debounce), if pending => {
                pending = false;
                last_rebuild = Instant::now();
                let shared = shared.clone();
                let result = tokio::task::spawn_blocking(move || shared.lock().rebuild()).await;
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => log::error!("table rebuild failed: {e:#}"),
                    Err(e) => log::error!("table rebuild task failed: {e}"),
                }
            }
            _ = hup.recv() => {
                let path = shared.lock().config_path.clone();
                match config::load(&path) {
                    Err(e) => {
                        log::error!("reload of {} refused, the running configuration stays:\n{e}", path.display());
                        shared.lock().reloads_failed += 1;
                    }
                    Ok(new) => {
                        let targets = health_targets(&new);
                        let result = {
                            let mut core = shared.lock();
                            let r = core.reload(new);
                            match &r {
                                Ok(()) => core.reloads_ok += 1,
                                Err(_) => core.reloads_failed += 1,
                            }
                            r
                        };
                        match result {
                            Ok(()) => {
                                monitor.reconfigure(targets);
                                log::info!("configuration reloaded from {}", path.display());
                            }
                            Err(e) => log::error!("reload of {} refused, the running configuration stays: {e:#}", path.display()),
                        }
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    log::info!("stopping");
    wanted_tx.send_replace(false);
    for announcer in &announcers {
        match announcer.withdraw_now(Duration::from_secs(5)).await {
            Ok(()) => log::info!("routes withdrawn"),
            Err(e) => log::error!("withdrawing the routes: {e}"),
        }
    }
    let _ = stop_tx.send(true);
    if opts.detach_on_exit {
        tokio::time::sleep(opts.shutdown_grace).await;
        let mut core = shared.lock();
        core.ready = false;
        let _ = core.write_node_config();
        for a in &core.attachments {
            let pin = link_dir.join(&a.interface);
            match DataPlane::detach(&pin) {
                Ok(()) => log::info!("XDP detached from {}", a.interface),
                Err(e) => log::error!("detaching from {}: {e}", a.interface),
            }
        }
    } else {
        log::info!("leaving the data plane attached (--keep-attached)");
    }
    control_task.abort();
    metrics_task.abort();
    if let Some(task) = gossip_task {
        task.abort();
    }
    let _ = nexthop_task.await;
    let _ = std::fs::remove_file(&control_path);
    drop(monitor);
    Ok(())
}

/// Takes over the hop history of a healthy member that runs already (the first one that
/// answers for every service), merged with our own. Without one (a cold start of the whole
/// cluster) our own pinned history is all there is.
async fn sync_history(core: &mut Core) {
    let size = core.cfg.cluster.table_size;
    let peers = core.sync_peers();
    let services: Vec<String> = core.cfg.services.iter().map(|s| s.name.clone()).collect();
    'peers: for (name, addr) in peers {
        let mut fetched = Vec::new();
        for service in &services {
            match sync::fetch(addr, service, size, Duration::from_secs(3)).await {
                Ok(buckets) => fetched.push((service.clone(), buckets)),
                Err(e) => {
                    log::warn!("history sync from {name}: {e}");
                    continue 'peers;
                }
            }
        }
        for (service, buckets) in fetched {
            core.tables.seed(&service, buckets);
        }
        log::info!("hop history taken over from {name} ({addr})");
        return;
    }
    log::info!("no running member to take the hop history from: starting from our own");
}

/// Every `every`, merges one healthy member's hop history into ours (members in turn), so
/// that owners one node saw and another did not end up in both histories.
async fn gossip(shared: Shared, every: Duration) {
    let mut turn = 0usize;
    loop {
        tokio::time::sleep(every).await;
        let (peer, services, size) = {
            let core = shared.lock();
            let peers = core.sync_peers();
            if peers.is_empty() {
                continue;
            }
            turn = turn.wrapping_add(1);
            let services: Vec<String> = core.cfg.services.iter().map(|s| s.name.clone()).collect();
            (
                peers[turn % peers.len()].clone(),
                services,
                core.cfg.cluster.table_size,
            )
        };
        let mut tables = Vec::new();
        for service in services {
            match sync::fetch(peer.1, &service, size, Duration::from_secs(3)).await {
                Ok(buckets) => tables.push((service, buckets)),
                Err(e) => log::debug!("history gossip with {}: {e}", peer.0),
            }
        }
        let shared = shared.clone();
        let name = peer.0;
        let result = tokio::task::spawn_blocking(move || {
            let mut core = shared.lock();
            let mut changed = false;
            for (service, buckets) in &tables {
                changed |= core.tables.absorb(service, buckets);
            }
            if changed {
                log::info!("hop history: added owners known to {name}");
                core.rebuild()
            } else {
                Ok(())
            }
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("table rebuild after history gossip failed: {e:#}"),
            Err(e) => log::error!("history gossip task failed: {e}"),
        }
    }
}

fn empty_snapshot(core: &Core) -> metrics::Snapshot {
    metrics::Snapshot {
        counters: PacketCounts::default(),
        members: Vec::new(),
        services: Vec::new(),
        draining: core.draining,
        attach_mode: "detached".to_string(),
        interfaces: core.cfg.node.interfaces.clone(),
        bgp: None,
        config_reloads_ok: core.reloads_ok,
        config_reloads_failed: core.reloads_failed,
        start_time: core.started,
    }
}

/// Keeps the next-hop entries fresh (every second) until `stop` turns true.
fn refresh_next_hops(shared: &Shared, stop: &mut watch::Receiver<bool>) {
    let mut resolver = match Resolver::new() {
        Ok(r) => r,
        Err(e) => {
            log::error!("next-hop resolver: {e}; the data plane will use bpf_fib_lookup");
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
            Err(e) => log::warn!("next-hop refresh failed: {e}"),
            Ok(results) => {
                let expires = dataplane::monotonic_ns() + NEXT_HOP_TTL.as_nanos() as u64;
                let mut core = shared.lock();
                for ((id, name, _), (_, result)) in members.iter().zip(results) {
                    match result {
                        Ok(r) => {
                            if last_problem.remove(id).is_some() {
                                log::info!(
                                    "next hop of {name} resolved: {} via ifindex {}",
                                    r.via,
                                    r.ifindex
                                );
                            }
                            if !devices.contains(&r.ifindex) {
                                match core.dp.add_device(r.ifindex) {
                                    Ok(()) => devices.push(r.ifindex),
                                    Err(e) => {
                                        log::warn!("redirect map, ifindex {}: {e}", r.ifindex)
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
                                log::warn!("next hop of {name}: {e}");
                            }
                        }
                        Err(e) => {
                            let text = e.to_string();
                            if last_problem.get(id) != Some(&text) {
                                log::info!(
                                    "next hop of {name} unresolved ({text}); the data plane falls back to the kernel"
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

/// `cdn-steer check`: what the configuration would build, with every member healthy.
pub fn check_summary(cfg: &Config) -> Result<String> {
    use std::fmt::Write as _;
    let members: Vec<MaglevMember<'_>> = cfg
        .cluster
        .members
        .iter()
        .filter(|m| m.weight > 0)
        .map(|m| MaglevMember {
            id: m.id,
            name: &m.name,
            weight: m.weight,
        })
        .collect();
    let started = Instant::now();
    let table = maglev::build_table(&members, cfg.cluster.hash_key, cfg.cluster.table_size)?;
    let took = started.elapsed();
    let mut share: BTreeMap<u16, u32> = BTreeMap::new();
    for id in &table {
        *share.entry(*id).or_insert(0) += 1;
    }
    let mut out = String::new();
    writeln!(out, "configuration OK: node {}", cfg.node.name)?;
    writeln!(
        out,
        "table: {} buckets, built in {:.2} ms with every member healthy",
        cfg.cluster.table_size,
        took.as_secs_f64() * 1000.0
    )?;
    writeln!(
        out,
        "{:<6} {:<20} {:<40} {:>7} {:>9} {:>8}",
        "id", "member", "underlay", "weight", "buckets", "share"
    )?;
    for m in &cfg.cluster.members {
        let n = share.get(&m.id).copied().unwrap_or(0);
        writeln!(
            out,
            "{:<6} {:<20} {:<40} {:>7} {:>9} {:>7.2}%",
            m.id,
            m.name,
            m.underlay.to_string(),
            m.weight,
            n,
            100.0 * f64::from(n) / f64::from(cfg.cluster.table_size)
        )?;
    }
    for s in &cfg.services {
        writeln!(
            out,
            "service {}: VIPs {} TCP {:?} UDP {:?}",
            s.name,
            s.vips
                .iter()
                .map(prefix_text)
                .collect::<Vec<_>>()
                .join(", "),
            s.tcp_ports,
            s.udp_ports
        )?;
    }
    Ok(out)
}

/// The control socket path of a configuration file, for the CLI's client commands.
///
/// The file may have been edited into something invalid since the daemon read it (that is when
/// one wants `status` most), so only `node.control_socket` has to be readable.
pub fn control_socket_of(config: Option<&Path>) -> Result<PathBuf> {
    let Some(path) = config else {
        return Ok(PathBuf::from(config::DEFAULT_CONTROL_SOCKET));
    };
    match config::load(path) {
        Ok(cfg) => Ok(cfg.node.control_socket),
        Err(e) => {
            let text = std::fs::read_to_string(path).map_err(|_| anyhow::anyhow!("{e}"))?;
            let value: toml::Table = toml::from_str(&text).map_err(|_| anyhow::anyhow!("{e}"))?;
            match value.get("node").and_then(|n| n.get("control_socket")) {
                Some(toml::Value::String(socket)) => Ok(PathBuf::from(socket)),
                Some(_) => bail!("{e}"),
                None => Ok(PathBuf::from(config::DEFAULT_CONTROL_SOCKET)),
            }
        }
    }
}
