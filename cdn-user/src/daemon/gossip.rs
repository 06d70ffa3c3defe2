//! Hop-history sync with running members, wired to the daemon's state: taken over once at
//! start-up, then merged from one member in turn every `cluster.history_sync_ms`. The protocol
//! and the schedule are in [`crate::cluster::sync`].

use std::time::Duration;

use super::core::{Core, Shared};
use crate::cluster::sync::{self, SyncPlan};

impl Core {
    /// Whom and what to sync with now.
    fn sync_plan(&self) -> SyncPlan {
        SyncPlan {
            peers: self.sync_peers(),
            // Keyed by table name: every PoP's table, since every node computes all of them.
            services: self.cfg.table_names(),
            table_size: self.cfg.cluster.table_size,
        }
    }
}

/// Takes over the hop history of a healthy member that runs already, merged with our own.
pub(super) async fn sync_history(core: &mut Core) {
    if let Some((_, tables)) = sync::take_over(&core.sync_plan()).await {
        for (service, buckets) in tables {
            core.tables.seed(&service, buckets);
        }
    }
}

/// Merges one member's history into ours every `every`, rebuilding when it adds owners.
pub(super) async fn gossip(shared: Shared, every: Duration) {
    let plan = {
        let shared = shared.clone();
        move || shared.lock().sync_plan()
    };
    let absorb = move |peer: &str, tables: &[(String, Vec<cdn_common::maps::Bucket>)]| {
        let mut core = shared.lock();
        let mut changed = false;
        for (service, buckets) in tables {
            changed |= core.tables.absorb(service, buckets);
        }
        if changed {
            log::info!(peer; "hop history: added owners known to a peer");
            if let Err(e) = core.rebuild(&format!("hop history gossip from {peer}")) {
                log::error!(peer, error:% = format!("{e:#}"); "table rebuild after history gossip failed");
            }
        }
    };
    sync::gossip(every, plan, absorb).await;
}
