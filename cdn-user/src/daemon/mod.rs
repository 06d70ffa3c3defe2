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
//! configuration reloads ([`reload`], on SIGHUP) rebuild the tables ([`core`]); next hops are
//! refreshed every second ([`nexthops`]); metrics and the control socket are served, and
//! `cdn-steer trace` gets the program's decisions streamed ([`trace`]).
//!
//! Shutdown (SIGTERM/SIGINT): withdraw the routes and wait for BIRD to confirm, give the
//! network a grace period to move traffic elsewhere, then detach the program. Maps stay
//! pinned, so the next start keeps the hop history.

mod core;
mod gossip;
mod nexthops;
mod reload;
mod startup;
mod trace;
mod views;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};

use self::core::{Shared, health_targets};
use crate::{
    bgp::announce::Announcer,
    cluster::{health::HealthMonitor, sync},
    config,
    dataplane::DataPlane,
    operator::{control, http},
};

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

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> Result<()> {
    let (mut core, link_dir) = startup::attach(&opts)?;
    let mut monitor = HealthMonitor::start(core.health_targets());
    monitor.first_results(FIRST_HEALTH_WAIT).await;
    core.health = monitor.snapshot();
    gossip::sync_history(&mut core).await;
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
        let trace = trace::handler(shared.clone(), stop_rx.clone());
        tokio::spawn(control::serve(
            listener,
            Arc::new(move |req| views::handle_request(&shared, &rebuild, req)),
            trace,
        ))
    };

    // Metrics.
    let metrics_listener = http::bind(metrics_addr).await?;
    let metrics_task = {
        let ready_shared = shared.clone();
        let table_shared = shared.clone();
        let shared = shared.clone();
        let source: http::SnapshotSource = Arc::new(move || {
            let core = shared.lock();
            core.snapshot().unwrap_or_else(|e| {
                log::warn!("metrics snapshot: {e:#}");
                views::empty_snapshot(&core)
            })
        });
        let ready: http::ReadySource = Arc::new(move || ready_shared.lock().readiness());
        let table: sync::TableSource = Arc::new(move |service: &str| {
            let core = table_shared.lock();
            core.tables
                .services()
                .get(service)
                .filter(|t| t.generation > 0)
                .map(|t| (t.generation, sync::encode(t.buckets())))
        });
        tokio::spawn(http::serve(
            metrics_listener,
            http::Endpoints {
                metrics: source,
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
        .map(|every| tokio::spawn(gossip::gossip(shared.clone(), every)));

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
