//! Configuration reloads (SIGHUP or `cdn-steer reload`): a new file is applied only if it
//! changes nothing that needs a restart, and a failed apply puts the running configuration
//! back.

use anyhow::{Result, bail};

use super::core::{Core, Shared, health_targets};
use crate::{
    cluster::health::HealthMonitor,
    config::{self, Config},
};

/// Re-reads the daemon's configuration file and applies it; `via` says who asked (logged).
/// Returns what to tell the caller: the accepted message, or why it was refused (the running
/// configuration then stays).
pub(super) fn reload_from_file(
    shared: &Shared,
    monitor: &mut HealthMonitor,
    via: &str,
) -> Result<String, String> {
    let path = shared.lock().config_path.clone();
    let file = path.display().to_string();
    let result = config::load(&path)
        .map_err(|e| e.to_string())
        .and_then(|new| {
            let targets = health_targets(&new);
            shared
                .lock()
                .reload(new)
                .map(|()| targets)
                .map_err(|e| format!("{e:#}"))
        });
    let mut core = shared.lock();
    match result {
        Ok(targets) => {
            core.reloads_ok += 1;
            drop(core);
            monitor.reconfigure(targets);
            log::info!(file = file.as_str(), via; "reload accepted");
            Ok(format!("configuration reloaded from {file}"))
        }
        Err(reason) => {
            core.reloads_failed += 1;
            log::error!(file = file.as_str(), via, reason = reason.as_str(); "reload refused, the running configuration stays");
            Err(format!(
                "reload of {file} refused, the running configuration stays: {reason}"
            ))
        }
    }
}

impl Core {
    /// Applies a new configuration after checking that it changes nothing that needs a
    /// restart. On error the running configuration stays in force, untouched.
    pub(super) fn reload(&mut self, new: Config) -> Result<()> {
        let old = &self.cfg;
        let restart_only = config::restart_only_changes(old, &new);
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
            log::warn!(cause = "configuration reload"; "cluster.hash_key changed: every flow hashes anew");
        }
        let previous = std::mem::replace(&mut self.cfg, new);
        let applied = self
            .write_members()
            .and_then(|()| self.write_node_config())
            .and_then(|()| self.rebuild("configuration reload"));
        if let Err(e) = applied {
            // Put the old configuration back as far as it goes; the maps may hold a mix,
            // which the next rebuild corrects.
            self.cfg = previous;
            let _ = self.write_members();
            let _ = self.write_node_config();
            let _ = self.rebuild("configuration reload undone");
            return Err(e);
        }
        Ok(())
    }
}
