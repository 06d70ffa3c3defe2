//! A starting controller picks up the tables a previous one left in the pinned maps.

use std::{collections::BTreeMap, sync::OnceLock};

use cdn_common::maps::Service;

use super::{ServiceTable, TableError, Tables, half_offset};
use crate::{
    config::{Config, ServiceSettings, table_name},
    dataplane::DataPlane,
};

/// Where the entry says PoP `index`'s table is, if the entry was written for as many PoPs as
/// the configuration has: the map does not record PoP names, so an entry of another PoP layout
/// (PoPs added or removed since) would hand one PoP's history to another. Without PoPs the one
/// table is `table_offset`, as before PoPs existed.
fn pop_offset(entry: &Service, index: usize, pops: usize) -> Option<u32> {
    let entry_pops = entry.search_pops.count_ones() as usize + 1;
    if entry_pops != pops {
        return None;
    }
    if pops == 1 {
        return Some(entry.table_offset);
    }
    let searched = entry.search_pops & (1 << index) != 0;
    let offset = *entry.pop_tables.get(index)?;
    // Our own PoP is the one not searched; its table is `table_offset`.
    (searched || offset == entry.table_offset).then_some(offset)
}

impl Tables {
    /// Picks up the tables a previous controller left in the (pinned) maps: for each
    /// configured service and PoP, the slot and active half its LPM entries point at (a PoP's
    /// through the entry's `pop_tables`), and the contents of both halves. Tables found
    /// nowhere get a free slot and empty tables.
    pub fn recover(dp: &DataPlane, cfg: &Config) -> Result<Self, TableError> {
        let size = cfg.cluster.table_size;
        let capacity = dp.table_capacity();
        let slots = capacity / (2 * size);
        let pops = cfg.pop_slots();
        let capacity_error = TableError::Capacity {
            capacity,
            services: cfg.services.len(),
            pops: pops.len(),
            size,
        };
        if (slots as usize) < cfg.services.len() * pops.len() {
            return Err(capacity_error);
        }
        let mut tables = BTreeMap::new();
        let mut used = vec![false; slots as usize];
        let mut fresh = Vec::new();
        for svc in &cfg.services {
            let entry = installed_entry(dp, svc, size)?;
            for (index, pop) in pops.iter().enumerate() {
                let name = table_name(&svc.name, *pop);
                let offset = entry.and_then(|e| pop_offset(&e, index, pops.len()));
                let slot = offset
                    .filter(|o| o % size == 0)
                    .map(|o| o / (2 * size))
                    .filter(|s| *s < slots && !used[*s as usize]);
                let (Some(slot), Some(offset), Some(entry)) = (slot, offset, entry) else {
                    fresh.push((svc, *pop));
                    continue;
                };
                used[slot as usize] = true;
                let active = (offset / size) % 2;
                let generation = entry.generation;
                let halves = [
                    dp.read_buckets(half_offset(slot, 0, size), size)?,
                    dp.read_buckets(half_offset(slot, 1, size), size)?,
                ];
                log::info!(
                    "service {name}: recovered table (slot {slot}, half {active}, generation {generation})"
                );
                tables.insert(
                    name,
                    ServiceTable {
                        service: svc.name.clone(),
                        pop: pop.map(str::to_owned),
                        slot,
                        active,
                        generation: generation.max(1),
                        halves,
                        vips: svc.vips.clone(),
                        seed: None,
                        digest: OnceLock::new(),
                    },
                );
            }
        }
        let mut tables = Self {
            size,
            slots,
            tables,
        };
        for (svc, pop) in fresh {
            let slot = tables.free_slot(&used).ok_or(TableError::Capacity {
                capacity,
                services: cfg.services.len(),
                pops: pops.len(),
                size,
            })?;
            used[slot as usize] = true;
            tables.add_fresh(dp, svc, pop, slot)?;
        }
        Ok(tables)
    }

    /// A table without contents yet: both halves are read back (a removed service may have
    /// left buckets there) so that updates write exactly what differs; none of it counts as
    /// history. Nothing points at the slot until the first update installs the LPM entries.
    pub(super) fn add_fresh(
        &mut self,
        dp: &DataPlane,
        svc: &ServiceSettings,
        pop: Option<&str>,
        slot: u32,
    ) -> Result<(), TableError> {
        let size = self.size;
        let name = table_name(&svc.name, pop);
        log::info!("service {name}: new table in slot {slot}");
        self.tables.insert(
            name,
            ServiceTable {
                service: svc.name.clone(),
                pop: pop.map(str::to_owned),
                slot,
                // The first update writes half 0 and points the VIPs at it.
                active: 1,
                generation: 0,
                halves: [
                    dp.read_buckets(half_offset(slot, 0, size), size)?,
                    dp.read_buckets(half_offset(slot, 1, size), size)?,
                ],
                vips: Vec::new(),
                seed: None,
                digest: OnceLock::new(),
            },
        );
        Ok(())
    }
}

/// The LPM entry a previous controller installed for `svc` (through any of its VIPs), if it
/// fits tables of `size` buckets.
fn installed_entry(
    dp: &DataPlane,
    svc: &ServiceSettings,
    size: u32,
) -> Result<Option<Service>, TableError> {
    for vip in &svc.vips {
        if let Some(entry) = dp.service(vip.addr(), vip.prefix_len())?
            && entry.table_size == size
            && entry.table_offset % size == 0
        {
            return Ok(Some(entry));
        }
    }
    Ok(None)
}
