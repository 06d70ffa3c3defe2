//! The steering tables in the kernel: one per service and PoP, each double-buffered.
//!
//! `TABLE` holds, for every slot (one per service and PoP; one per service without PoPs), two
//! halves of M buckets. The service's LPM entries (one per VIP prefix) point at the *active*
//! half of each of its PoP tables: `table_offset` at this node's own PoP's, `pop_tables` at
//! every PoP's. An update writes the next table of each PoP that changed into the other half
//! and then replaces the service's LPM entries with ones pointing there, all PoPs at once.
//! Replacing an LPM trie element is atomic for the data plane (the kernel links in a new node
//! under RCU), so a packet reads either the old complete tables or the new complete tables,
//! never a mixture.
//!
//! Why double buffering rather than a map of maps: the layout is one plain array the program
//! indexes with one lookup, it needs no map creation at run time, and a restarted controller
//! finds both halves in the pinned map, which is how the hop history survives restarts.
//!
//! The half that just went out of use is rewritten at the next update only. XDP programs run
//! to completion in microseconds under RCU, and updates come at most a few times per second
//! (see the daemon's debounce), so no packet is still reading it by then.
//!
//! Writes are minimal: the controller keeps what each half holds and writes only buckets that
//! differ, so a membership change of 1/N costs about 2M/N map updates.

use std::{collections::BTreeMap, net::IpAddr, sync::OnceLock};

use cdn_common::maps::Bucket;
use thiserror::Error;

use crate::{
    cluster::{history, sync},
    config::{Config, Digest, Prefix, ServiceSettings, table_name},
    dataplane::{DataPlane, DataPlaneError},
};

use entry::{PopOffsets, half_offset, service_entry};

mod entry;
mod recover;

/// Table slots the table map gets at least when it is first created: room to add services
/// without recreating the map (and losing history).
pub const DEFAULT_SERVICE_SLOTS: u32 = 8;

#[derive(Debug, Error)]
pub enum TableError {
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    #[error(
        "the pinned table map holds {capacity} buckets, too few for {} of {size} buckets in \
         two halves; restart with --reset-maps to recreate the maps (this forgets the hop \
         history)",
        tables_text(*services, *pops)
    )]
    Capacity {
        capacity: u32,
        services: usize,
        /// PoPs per service (1 without PoPs).
        pops: usize,
        size: u32,
    },
    #[error("table has {got} buckets, expected {expected}")]
    WrongLength { got: usize, expected: u32 },
    #[error("{got} PoP tables of owners given, the configuration has {expected} PoPs")]
    WrongPops { got: usize, expected: usize },
}

fn tables_text(services: usize, pops: usize) -> String {
    if pops > 1 {
        format!("{services} services in {pops} PoPs")
    } else {
        format!("{services} services")
    }
}

/// One table's state (a service in one PoP), as the kernel holds it.
#[derive(Clone, Debug)]
pub struct ServiceTable {
    /// The service it steers.
    pub service: String,
    /// The PoP it places new connections in; `None` without PoPs.
    pub pop: Option<String>,
    pub slot: u32,
    /// Which half (0 or 1) the LPM entries point at.
    pub active: u32,
    /// 0 until the table was first installed; then grows with every swap of the service (all
    /// of a service's PoP tables share it, as they share the LPM entry).
    pub generation: u32,
    /// What each half of the slot holds in the kernel, so updates write only what differs.
    /// Before the first installation they hold whatever an earlier user of the slot left.
    pub halves: [Vec<Bucket>; 2],
    /// The VIP prefixes whose LPM entries point at this table.
    pub vips: Vec<Prefix>,
    /// History to start the next update from instead of the active half (see
    /// [`Tables::seed`]).
    pub seed: Option<Vec<Bucket>>,
    /// [`sync::table_digest`] of the live table, computed when first asked for after each
    /// swap: every scrape and every `status` shows it, and it is a SHA-256 over the whole
    /// table (393 KB for 65,537 buckets), while the table changes only at a swap.
    digest: OnceLock<Digest>,
}

impl ServiceTable {
    /// The live table: the active half, once installed.
    pub fn buckets(&self) -> &[Bucket] {
        if self.generation == 0 {
            &[]
        } else {
            &self.halves[self.active as usize]
        }
    }

    /// The digest of the live table ([`sync::table_digest`]).
    pub fn digest(&self) -> Digest {
        *self
            .digest
            .get_or_init(|| sync::table_digest(self.buckets()))
    }
}

/// What an update did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateReport {
    /// Per table (by table name): buckets whose owner changed.
    pub owner_changes: BTreeMap<String, usize>,
    /// Bucket writes issued to the kernel.
    pub bucket_writes: usize,
    /// Tables (by name) whose active half was swapped.
    pub swapped: Vec<String>,
}

/// Every table, by table name ([`table_name`]: the service's name without PoPs).
pub struct Tables {
    size: u32,
    slots: u32,
    tables: BTreeMap<String, ServiceTable>,
}

/// Map entries needed for `tables` tables (services times PoPs) of `size` buckets, with spare
/// slots.
pub fn table_entries(size: u32, tables: usize) -> u32 {
    let slots = u32::try_from(tables)
        .unwrap_or(u32::MAX)
        .max(DEFAULT_SERVICE_SLOTS);
    2 * slots * size
}

impl Tables {
    fn free_slot(&self, used: &[bool]) -> Option<u32> {
        (0..self.slots).find(|s| !used[*s as usize])
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Every table, by table name.
    pub fn tables(&self) -> &BTreeMap<String, ServiceTable> {
        &self.tables
    }

    /// Brings every table to `owners` (a configuration without PoPs: one table per service);
    /// see [`Tables::update_pops`].
    pub fn update(
        &mut self,
        dp: &mut DataPlane,
        cfg: &Config,
        owners: &[u16],
    ) -> Result<UpdateReport, TableError> {
        self.update_pops(dp, cfg, &[owners], None)
    }

    /// Brings every service's table of PoP `i` to `per_pop[i]` (the Maglev table for new flows
    /// placed in that PoP, one member id per bucket), keeping hop history, and installs the
    /// services of `cfg`: tables of services (or PoPs) that left the configuration are
    /// withdrawn, new ones get a slot. A service whose tables changed gets one LPM replace.
    ///
    /// `fallback`: the PoP whose table places new connections landing here while this node's
    /// own PoP has no eligible member ([`crate::cluster::pops::PopOwners::fallback`]).
    pub fn update_pops<O: AsRef<[u16]>>(
        &mut self,
        dp: &mut DataPlane,
        cfg: &Config,
        per_pop: &[O],
        fallback: Option<usize>,
    ) -> Result<UpdateReport, TableError> {
        let pops = cfg.pop_slots();
        if per_pop.len() != pops.len() {
            return Err(TableError::WrongPops {
                got: per_pop.len(),
                expected: pops.len(),
            });
        }
        if let Some(wrong) = per_pop
            .iter()
            .find(|o| o.as_ref().len() != self.size as usize)
        {
            return Err(TableError::WrongLength {
                got: wrong.as_ref().len(),
                expected: self.size,
            });
        }
        let mut report = UpdateReport::default();
        self.withdraw_gone(dp, cfg)?;
        for svc in &cfg.services {
            let names: Vec<String> = pops.iter().map(|p| table_name(&svc.name, *p)).collect();
            for (name, pop) in names.iter().zip(&pops) {
                if !self.tables.contains_key(name) {
                    let used: Vec<bool> = (0..self.slots)
                        .map(|s| self.tables.values().any(|t| t.slot == s))
                        .collect();
                    let slot = self.free_slot(&used).ok_or(TableError::Capacity {
                        capacity: dp.table_capacity(),
                        services: cfg.services.len(),
                        pops: pops.len(),
                        size: self.size,
                    })?;
                    self.add_fresh(dp, svc, *pop, slot)?;
                }
            }
            self.update_service(dp, cfg, svc, per_pop, fallback, &mut report)?;
        }
        Ok(report)
    }

    /// Tables no longer configured are dropped; services that left the configuration stop
    /// being steered first.
    fn withdraw_gone(&mut self, dp: &mut DataPlane, cfg: &Config) -> Result<(), TableError> {
        let wanted = cfg.table_names();
        let gone: Vec<String> = self
            .tables
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for name in gone {
            let Some(old) = self.tables.remove(&name) else {
                continue;
            };
            let service_left = !cfg.services.iter().any(|s| s.name == old.service);
            let last_of_it = !self.tables.values().any(|t| t.service == old.service);
            if service_left && last_of_it {
                for vip in &old.vips {
                    dp.remove_service(vip.addr(), vip.prefix_len())?;
                }
                log::info!(
                    "service {}: removed, its VIPs are no longer steered",
                    old.service
                );
            } else if !service_left {
                log::info!("table {name}: removed, its PoP is no longer configured");
            }
        }
        Ok(())
    }

    /// One service's tables (one per PoP, by PoP index) to their next state, swapped with one
    /// LPM replace per VIP if any changed.
    fn update_service<O: AsRef<[u16]>>(
        &mut self,
        dp: &mut DataPlane,
        cfg: &Config,
        svc: &ServiceSettings,
        per_pop: &[O],
        fallback: Option<usize>,
        report: &mut UpdateReport,
    ) -> Result<(), TableError> {
        let names: Vec<String> = cfg
            .pop_slots()
            .iter()
            .map(|p| table_name(&svc.name, *p))
            .collect();
        let names = names.as_slice();
        let size = self.size;
        let own = cfg.self_pop_index();
        // The service's LPM value for the active halves `active`.
        let entry_for = |active: &[u32], generation| {
            service_entry(
                svc,
                &PopOffsets {
                    active,
                    own,
                    fallback,
                },
                size,
                generation,
            )
        };
        let mut nexts = Vec::with_capacity(names.len());
        for (index, (name, owners)) in names.iter().zip(per_pop).enumerate() {
            let Some(table) = self.tables.get_mut(name) else {
                return Ok(());
            };
            let seed = table.seed.take();
            let previous = seed.as_deref().unwrap_or(table.buckets());
            let known = cfg.pop_member_ids(index);
            let (next, summary) = history::advance(previous, owners.as_ref(), &known);
            report
                .owner_changes
                .insert(name.clone(), summary.owner_changed);
            nexts.push((next, summary.owner_changed));
        }
        let tables: Vec<&ServiceTable> = names.iter().filter_map(|n| self.tables.get(n)).collect();
        let same_vips = tables.iter().all(|t| t.vips == svc.vips);
        let old_vips = tables.first().map(|t| t.vips.clone()).unwrap_or_default();
        let generation = tables.iter().map(|t| t.generation).max().unwrap_or(0);
        // A VIP change swaps every table, as a content change does.
        let changed: Vec<bool> = tables
            .iter()
            .zip(&nexts)
            .map(|(t, (next, _))| !same_vips || t.generation == 0 || next != t.buckets())
            .collect();
        if !changed.iter().any(|c| *c) {
            // Nothing changed: keep the current halves; ports may still have changed.
            let active: Vec<u32> = tables
                .iter()
                .map(|t| half_offset(t.slot, t.active, size))
                .collect();
            let entry = entry_for(&active, generation);
            for vip in &svc.vips {
                if dp.service(vip.addr(), vip.prefix_len())? != Some(entry) {
                    dp.set_service(vip.addr(), vip.prefix_len(), &entry)?;
                }
            }
            return Ok(());
        }
        let mut active = Vec::with_capacity(names.len());
        for ((table, (next, _)), changed) in tables.iter().zip(&nexts).zip(&changed) {
            if !changed {
                active.push(half_offset(table.slot, table.active, size));
                continue;
            }
            let target = 1 - table.active;
            let base = half_offset(table.slot, target, size);
            let standby = &table.halves[target as usize];
            for (i, new) in next.iter().enumerate() {
                if standby.get(i) != Some(new) {
                    dp.write_buckets(base + i as u32, std::slice::from_ref(new))?;
                    report.bucket_writes += 1;
                }
            }
            active.push(base);
        }
        let generation = generation.wrapping_add(1).max(1);
        let entry = entry_for(&active, generation);
        for vip in &svc.vips {
            dp.set_service(vip.addr(), vip.prefix_len(), &entry)?;
        }
        // VIPs dropped from this service stop being steered.
        for vip in old_vips.iter().filter(|v| !svc.vips.contains(v)) {
            dp.remove_service(vip.addr(), vip.prefix_len())?;
        }
        for ((name, (next, owner_changes)), changed) in names.iter().zip(nexts).zip(changed) {
            let Some(table) = self.tables.get_mut(name) else {
                continue;
            };
            table.generation = generation;
            table.vips = svc.vips.clone();
            if !changed {
                continue;
            }
            table.active = 1 - table.active;
            table.halves[table.active as usize] = next;
            table.digest = OnceLock::new();
            report.swapped.push(name.clone());
            // The daemon logs the swap with its cause at info.
            log::debug!(
                "service {name}: table generation {generation} active ({owner_changes} owner changes)"
            );
        }
        Ok(())
    }

    /// Makes `history` (a running member's table) the history the next update starts from for
    /// the table named `table`, with our own hops added where there is room. For a starting
    /// node: the running member's view of who owned what is the better one. Returns false for
    /// an unknown table.
    pub fn seed(&mut self, table: &str, history: Vec<Bucket>) -> bool {
        match self.tables.get_mut(table) {
            Some(t) => {
                let own = t.buckets().to_vec();
                t.seed = Some(history::merge(&history, &own));
                true
            }
            None => false,
        }
    }

    /// Adds the hops of `peer` (another member's table) that our history of the table named
    /// `table` lacks, where there is room, for the next update. Returns whether anything
    /// would change.
    pub fn absorb(&mut self, table: &str, peer: &[Bucket]) -> bool {
        let Some(t) = self.tables.get_mut(table) else {
            return false;
        };
        let own = t.buckets();
        let merged = history::merge(own, peer);
        if merged == own {
            return false;
        }
        t.seed = Some(merged);
        true
    }

    /// The tables of the service whose VIPs contain `addr`: its name, and its tables by PoP
    /// index (one without PoPs).
    pub fn service_for(&self, addr: IpAddr) -> Option<(&str, Vec<&ServiceTable>)> {
        let first = self
            .tables
            .values()
            .find(|t| t.vips.iter().any(|v| v.contains(addr)))?;
        let mut of_service: Vec<&ServiceTable> = self
            .tables
            .values()
            .filter(|t| t.service == first.service)
            .collect();
        // PoP indices follow the sorted names, as the table names do.
        of_service.sort_by(|a, b| a.pop.cmp(&b.pop));
        Some((first.service.as_str(), of_service))
    }

    /// Buckets owned by each member (`hops[0]`), over every service's table of the PoP
    /// `pop` (`None`: the tables without PoPs).
    pub fn share(&self, pop: Option<&str>) -> BTreeMap<u16, u64> {
        let mut out = BTreeMap::new();
        for table in self.tables.values().filter(|t| t.pop.as_deref() == pop) {
            for (id, n) in history::per_member_share(table.buckets()) {
                *out.entry(id).or_insert(0) += u64::from(n);
            }
        }
        out
    }
}
