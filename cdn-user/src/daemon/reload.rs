//! Configuration reloads (SIGHUP): a new file is applied only if it changes nothing that
//! needs a restart, and a failed apply puts the running configuration back.

use anyhow::{Result, bail};

use super::core::Core;
use crate::config::{self, Config};

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
