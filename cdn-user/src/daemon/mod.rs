//! `cdn-steer run`: the controller daemon, a small orchestrator of the parts in the other
//! folders.
//!
//! Start-up ([`startup`]): load the configuration, mount/find the bpffs, load the program
//! reusing pinned maps, attach (replacing a running program in place after a restart), pick up
//! the tables a previous controller left, write members and node settings. Then wait for the
//! first health results, take over the hop history from a running member ([`gossip`]), build
//! the tables, mark the data plane ready, and announce.
//!
//! Running: health changes, drain/undrain ([`views`] answers the control socket) and
//! configuration reloads ([`reload`], on SIGHUP or `cdn-steer reload`) rebuild the tables
//! ([`core`]); next hops are refreshed every second ([`nexthops`]); metrics and the control
//! socket are served, and `cdn-steer trace` gets the program's decisions streamed
//! ([`trace`]). Under systemd ([`notify`]) the main loop reports readiness, its state and
//! reloads, and pings the watchdog.
//!
//! Shutdown (SIGTERM/SIGINT): withdraw the routes and wait for BIRD to confirm, give the
//! network a grace period to move traffic elsewhere, then detach the program. Maps stay
//! pinned, so the next start keeps the hop history.

mod claim_sender;
mod core;
mod gossip;
mod learning;
mod nexthops;
mod notify;
mod pop_drain;
mod pops;
mod reload;
mod startup;
mod trace;
mod views;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, mpsc, watch},
    time::MissedTickBehavior,
};

use self::{core::Shared, notify::Notifier};
use crate::{
    bgp::announce::Announcer,
    cluster::{health::HealthMonitor, sync},
    config::Listeners,
    dataplane::DataPlane,
    operator::{control, http},
};

/// Table rebuilds are at least this far apart, so that a burst of health changes makes one
/// rebuild, and a table half that went out of use is not rewritten while a packet may still
/// read it.
const REBUILD_DEBOUNCE: Duration = Duration::from_millis(200);
/// How long start-up waits for every member's first health result.
const FIRST_HEALTH_WAIT: Duration = Duration::from_secs(3);
/// How often the main loop wakes to refresh its STATUS when no watchdog sets the pace.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

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
    /// Run even when the pins cannot outlive the daemon (a bpffs only in a private mount
    /// namespace); see `dataplane::bpffs::pin_lifetime`.
    pub allow_ephemeral_pins: bool,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> Result<()> {
    let mut notifier = Notifier::from_env();
    let (mut core, link_dir) = startup::attach(&opts)?;
    let mut monitor = HealthMonitor::start(core.health_targets());
    let local_service = HealthMonitor::start(self::core::local_service_targets(&core.cfg));
    tokio::join!(
        monitor.first_results(FIRST_HEALTH_WAIT),
        local_service.first_results(FIRST_HEALTH_WAIT)
    );
    core.checks.local_faults = monitor.local_faults();
    core.checks.local_service = Some(local_service);
    core.observe_health(monitor.snapshot());
    gossip::sync_history(&mut core).await;
    core.rebuild("start-up")?;
    core.ready = true;
    core.write_node_config()?;
    log::info!(
        interfaces = core.cfg.node.interfaces.join(",").as_str(),
        services = core.cfg.services.len();
        "data plane ready"
    );

    let control_path = core.cfg.node.control_socket.clone();
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
    let (reload_tx, mut reload_rx) = mpsc::channel::<views::ReloadRequest>(4);

    // Control socket.
    let listener = control::bind(&control_path).await?;
    let control_task = {
        let shared = shared.clone();
        let rebuild = rebuild.clone();
        let trace = trace::handler(shared.clone(), stop_rx.clone());
        tokio::spawn(control::serve(
            listener,
            Arc::new(move |req, caller| {
                views::handle_request(&shared, &rebuild, &reload_tx, req, caller)
            }),
            trace,
        ))
    };

    // HTTP: the peer plane and metrics, on listeners of their own or on one (see
    // `config::Listeners`). Connections from member addresses get the peer plane's reserved
    // places; the set follows reloads.
    let listeners = shared.lock().cfg.listeners();
    let (members_tx, members_rx) = watch::channel(shared.lock().cfg.member_addresses());
    let endpoints = {
        let ready_shared = shared.clone();
        let table_shared = shared.clone();
        let digests_shared = shared.clone();
        let claims_shared = shared.clone();
        let drain_shared = shared.clone();
        let drain_rebuild = rebuild.clone();
        let shared = shared.clone();
        let source: http::SnapshotSource = Arc::new(move || {
            let core = shared.lock();
            core.snapshot().unwrap_or_else(|e| {
                log::warn!(error:% = format!("{e:#}"); "metrics snapshot failed");
                views::empty_snapshot(&core)
            })
        });
        let ready: http::ReadySource = Arc::new(move || ready_shared.lock().readiness());
        let table: sync::TableSource = Arc::new(move |service: &str| {
            let core = table_shared.lock();
            // By table name: "<service>@<pop>" with PoPs.
            core.tables
                .tables()
                .get(service)
                .filter(|t| t.generation > 0)
                .map(|t| (t.generation, sync::encode(t.buckets())))
        });
        http::Endpoints {
            metrics: source,
            ready: Some(ready),
            table: Some(table),
            digests: Some(Arc::new(move || digests_shared.lock().digests())),
            claims: Some(Arc::new(move |peer, body| {
                claims_shared.lock().receive_claim(peer, body)
            })),
            drain: Some(Arc::new(move |peer, drain, body| {
                pop_drain::receive(&drain_shared, &drain_rebuild, peer, drain, body)
            })),
        }
    };
    let planes = match listeners {
        Listeners::Separate { peer, metrics } => vec![
            (
                http::Plane::Peer,
                http::bind(peer)
                    .await
                    .context("the peer plane listens on this member's sync address")?,
            ),
            (http::Plane::Metrics, http::bind(metrics).await?),
        ],
        Listeners::Shared { addr, .. } => vec![(http::Plane::Shared, http::bind(addr).await?)],
    };
    for line in listeners.to_string().lines() {
        log::info!("HTTP: {line}");
    }
    let http_tasks: Vec<_> = planes
        .into_iter()
        .map(|(plane, listener)| {
            tokio::spawn(http::serve(
                listener,
                plane,
                endpoints.clone(),
                members_rx.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();

    // History gossip.
    let gossip_task = shared
        .lock()
        .cfg
        .cluster
        .history_sync
        .map(|every| tokio::spawn(gossip::gossip(shared.clone(), every)));

    // Learned owners (PoPs only): claims to send, idle entries to expire.
    let learning_tasks = if shared.lock().learns() {
        let reader = shared.lock().dp.learning().take_events()?;
        let sender = {
            let (shared, stop) = (shared.clone(), stop_rx.clone());
            tokio::spawn(async move {
                if let Err(e) = claim_sender::claim_sender(shared, reader, stop).await {
                    log::error!(error:% = format!("{e:#}"); "claim sender stopped");
                }
            })
        };
        let expiry = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(learning::EXPIRY_EVERY);
                every.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let shared = shared.clone();
                    let done =
                        tokio::task::spawn_blocking(move || shared.lock().expire_learned()).await;
                    if let Ok(Err(e)) = done {
                        log::error!(error:% = format!("{e:#}"); "expiring learned entries failed");
                    }
                }
            })
        };
        vec![sender, expiry]
    } else {
        Vec::new()
    };

    // Next hops.
    let nexthop_task = {
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        tokio::task::spawn_blocking(move || nexthops::refresh_next_hops(&shared, &mut stop))
    };

    let mut health_rx = monitor.subscribe();
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut last_rebuild = Instant::now();
    // Health changes not yet in the tables, as "member up/down" words for the rebuild's cause.
    let mut pending: Vec<String> = Vec::new();

    // Ready: the program is attached, the tables are written and the control socket answers,
    // so `systemctl start` returns when `cdn-steer status` works.
    notifier.ready(&shared.lock().summary());
    // The watchdog is pinged from this loop and nowhere else: a loop that hangs stops pinging.
    let mut ticks = tokio::time::interval(notifier.watchdog_interval().unwrap_or(STATUS_REFRESH));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let stop_signal = loop {
        let (wanted, why, status) = {
            let core = shared.lock();
            let (wanted, why) = core.announce_decision();
            (wanted, why, core.summary())
        };
        if wanted_tx.send_if_modified(|w| std::mem::replace(w, wanted) != wanted) {
            log::info!(
                reason = why.as_str();
                "{}", if wanted { "routes wanted: announce" } else { "routes wanted: withdraw" }
            );
        }
        notifier.status(&status);
        let debounce = REBUILD_DEBOUNCE.saturating_sub(last_rebuild.elapsed());
        tokio::select! {
            changed = health_rx.changed() => {
                if changed.is_err() { bail!("health monitor stopped"); }
                let snapshot = health_rx.borrow_and_update().clone();
                pending.extend(shared.lock().observe_health(snapshot));
            }
            () = rebuild.notified() => {
                last_rebuild = Instant::now();
            }
            () = tokio::time::sleep(debounce), if !pending.is_empty() => {
                let cause = format!("health: {}", std::mem::take(&mut pending).join(", "));
                last_rebuild = Instant::now();
                let shared = shared.clone();
                let result = tokio::task::spawn_blocking(move || shared.lock().rebuild(&cause)).await;
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => log::error!(error:% = format!("{e:#}"); "table rebuild failed"),
                    Err(e) => log::error!(error:% = e; "table rebuild task failed"),
                }
            }
            _ = ticks.tick() => notifier.watchdog(),
            Some((via, reply)) = reload_rx.recv() => {
                notifier.reloading();
                let result = reload::reload_from_file(&shared, &mut monitor, &via);
                reloaded_listeners(&shared, listeners, &members_tx);
                notifier.ready(&shared.lock().summary());
                let _ = reply.send(result);
            }
            _ = hup.recv() => {
                notifier.reloading();
                let _ = reload::reload_from_file(&shared, &mut monitor, "SIGHUP");
                reloaded_listeners(&shared, listeners, &members_tx);
                notifier.ready(&shared.lock().summary());
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };

    log::info!(signal = stop_signal, detach = opts.detach_on_exit; "stopping");
    notifier.stopping("stopping: withdrawing the routes");
    wanted_tx.send_replace(false);
    for announcer in &announcers {
        match announcer.withdraw_now(Duration::from_secs(5)).await {
            Ok(()) => log::info!(cause = "stopping"; "routes withdrawn"),
            Err(e) => log::error!(error:% = e; "withdrawing the routes failed"),
        }
    }
    let _ = stop_tx.send(true);
    // Running traces end with the daemon (their clients get a last line), and the program
    // must not go on looking for a reader that is gone (with --keep-attached it keeps
    // running): wait a moment for them, then clear the flag whatever happened.
    let traces_end = Instant::now() + Duration::from_secs(1);
    while shared.lock().tracing && Instant::now() < traces_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let mut core = shared.lock();
        if core.tracing {
            core.tracing = false;
            if let Err(e) = core.write_node_config() {
                log::error!("clearing the trace flag: {e:#}");
            }
        }
    }
    if opts.detach_on_exit {
        notifier.status("stopping: routes withdrawn, grace period before detaching");
        tokio::time::sleep(opts.shutdown_grace).await;
        let mut core = shared.lock();
        core.ready = false;
        let _ = core.write_node_config();
        for a in &core.attachments {
            let pin = link_dir.join(&a.interface);
            match DataPlane::detach(&pin) {
                Ok(()) => {
                    log::info!(interface = a.interface.as_str(), cause = "stopping"; "XDP detached")
                }
                Err(e) => {
                    log::error!(interface = a.interface.as_str(), error:% = e; "detaching XDP failed")
                }
            }
        }
    } else {
        log::info!(cause = "--keep-attached"; "leaving the data plane attached with its last tables");
    }
    control_task.abort();
    for task in http_tasks {
        task.abort();
    }
    if let Some(task) = gossip_task {
        task.abort();
    }
    for task in learning_tasks {
        task.abort();
    }
    let _ = nexthop_task.await;
    let _ = std::fs::remove_file(&control_path);
    drop(monitor);
    Ok(())
}

/// After a reload: the peer plane's member places follow the new member list. The listeners
/// themselves stay where they were bound (`metrics.listen` is a restart-only key; this member's
/// `sync` moving is said here).
fn reloaded_listeners(
    shared: &core::Shared,
    bound: Listeners,
    members: &watch::Sender<std::collections::BTreeSet<std::net::IpAddr>>,
) {
    let core = shared.lock();
    let wanted = core.cfg.listeners();
    if wanted != bound {
        log::warn!(
            peer:% = bound.peer(),
            wanted:% = wanted.peer();
            "this member's sync address changed: the peer plane stays where it is until a restart"
        );
    }
    let addresses = core.cfg.member_addresses();
    members.send_if_modified(|current| {
        let changed = *current != addresses;
        *current = addresses;
        changed
    });
}
