//! Hop-history sync with running members: taken over once at start-up, then merged from one
//! member in turn every `cluster.history_sync_ms`.

use std::time::Duration;

use super::core::{Core, Shared};
use crate::cluster::sync;

/// Takes over the hop history of a healthy member that runs already (the first one that
/// answers for every service), merged with our own. Without one (a cold start of the whole
/// cluster) our own pinned history is all there is.
pub(super) async fn sync_history(core: &mut Core) {
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
pub(super) async fn gossip(shared: Shared, every: Duration) {
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
