//! The steering tables in the kernel: one per service, each double-buffered.
//!
//! `TABLE` holds, for every service slot, two halves of M buckets. The service's LPM entries
//! (one per VIP prefix) point at the *active* half. An update writes the next table into the
//! other half and then replaces the service's LPM entries with ones pointing there. Replacing
//! an LPM trie element is atomic for the data plane (the kernel links in a new node under RCU),
//! so a packet reads either the old complete table or the new complete table, never a mixture.
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

use cdn_common::maps::{
    Bucket, MAX_SERVICE_PORTS, SERVICE_QUIC, SERVICE_TCP, SERVICE_UDP, SERVICE_UDP_LOCAL,
    SERVICE_UDP_OWNER, Service,
};
use thiserror::Error;

use crate::{
    cluster::{history, sync},
    config::{Config, Digest, Prefix, ServiceSettings, UdpMode},
    dataplane::{DataPlane, DataPlaneError},
};

/// Service slots the table map gets when it is first created: room to add services without
/// recreating the map (and losing history).
pub const DEFAULT_SERVICE_SLOTS: u32 = 8;

#[derive(Debug, Error)]
pub enum TableError {
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    #[error(
        "the pinned table map holds {capacity} buckets, too few for {services} services of \
         {size} buckets in two halves; restart with --reset-maps to recreate the maps \
         (this forgets the hop history)"
    )]
    Capacity {
        capacity: u32,
        services: usize,
        size: u32,
    },
    #[error("table has {got} buckets, expected {expected}")]
    WrongLength { got: usize, expected: u32 },
}

/// One service's table state, as the kernel holds it.
#[derive(Clone, Debug)]
pub struct ServiceTable {
    pub slot: u32,
    /// Which half (0 or 1) the LPM entries point at.
    pub active: u32,
    /// 0 until the table was first installed; then grows with every swap.
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
    /// Per service: buckets whose owner changed.
    pub owner_changes: BTreeMap<String, usize>,
    /// Bucket writes issued to the kernel.
    pub bucket_writes: usize,
    /// Services whose table was swapped.
    pub swapped: Vec<String>,
}

/// Every service's table.
pub struct Tables {
    size: u32,
    slots: u32,
    services: BTreeMap<String, ServiceTable>,
}

/// Map entries needed for `services` services of `size` buckets, with spare slots.
pub fn table_entries(size: u32, services: usize) -> u32 {
    let slots = (services as u32).max(DEFAULT_SERVICE_SLOTS);
    2 * slots * size
}

fn half_offset(slot: u32, half: u32, size: u32) -> u32 {
    (2 * slot + half) * size
}

fn service_entry(svc: &ServiceSettings, offset: u32, size: u32, generation: u32) -> Service {
    let mut tcp_ports = [0u16; MAX_SERVICE_PORTS];
    let mut udp_ports = [0u16; MAX_SERVICE_PORTS];
    for (slot, port) in tcp_ports.iter_mut().zip(&svc.tcp_ports) {
        *slot = *port;
    }
    for (slot, port) in udp_ports.iter_mut().zip(&svc.udp_ports) {
        *slot = *port;
    }
    let mut flags = 0;
    if !svc.tcp_ports.is_empty() {
        flags |= SERVICE_TCP;
    }
    if !svc.udp_ports.is_empty() {
        flags |= SERVICE_UDP;
    }
    flags |= match svc.udp_mode {
        UdpMode::Owner => SERVICE_UDP_OWNER,
        UdpMode::Local => SERVICE_UDP_LOCAL,
        UdpMode::Connected => 0,
    };
    let mut service = Service {
        table_offset: offset,
        table_size: size,
        flags,
        tcp_ports,
        udp_ports,
        generation,
        ..Service::default()
    };
    if let Some(quic) = &svc.quic {
        service.flags |= SERVICE_QUIC;
        for (slot, port) in service.quic_ports.iter_mut().zip(&quic.ports) {
            *slot = *port;
        }
        service.quic_config_id = quic.config_id;
        service.quic_server_id_len = quic.server_id_len;
        service.quic_cid_len = quic.cid_len;
    }
    service
}

impl Tables {
    /// Picks up the tables a previous controller left in the (pinned) maps: for each
    /// configured service, the slot and active half its LPM entries point at, and the
    /// contents of both halves. Services found nowhere get a free slot and empty tables.
    pub fn recover(dp: &DataPlane, cfg: &Config) -> Result<Self, TableError> {
        let size = cfg.cluster.table_size;
        let capacity = dp.table_capacity();
        let slots = capacity / (2 * size);
        if (slots as usize) < cfg.services.len() {
            return Err(TableError::Capacity {
                capacity,
                services: cfg.services.len(),
                size,
            });
        }
        let mut services = BTreeMap::new();
        let mut used = vec![false; slots as usize];
        let mut fresh = Vec::new();
        for svc in &cfg.services {
            let mut found = None;
            for vip in &svc.vips {
                if let Some(entry) = dp.service(vip.addr(), vip.prefix_len())?
                    && entry.table_size == size
                    && entry.table_offset % size == 0
                {
                    let slot = entry.table_offset / (2 * size);
                    if slot < slots && !used[slot as usize] {
                        found = Some((slot, (entry.table_offset / size) % 2, entry.generation));
                        break;
                    }
                }
            }
            match found {
                Some((slot, active, generation)) => {
                    used[slot as usize] = true;
                    let halves = [
                        dp.read_buckets(half_offset(slot, 0, size), size)?,
                        dp.read_buckets(half_offset(slot, 1, size), size)?,
                    ];
                    log::info!(
                        "service {}: recovered table (slot {slot}, half {active}, generation {generation})",
                        svc.name
                    );
                    services.insert(
                        svc.name.clone(),
                        ServiceTable {
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
                None => fresh.push(svc),
            }
        }
        let mut tables = Self {
            size,
            slots,
            services,
        };
        for svc in fresh {
            let slot = tables.free_slot(&used).ok_or(TableError::Capacity {
                capacity,
                services: cfg.services.len(),
                size,
            })?;
            used[slot as usize] = true;
            tables.add_fresh(dp, svc, slot)?;
        }
        Ok(tables)
    }

    fn free_slot(&self, used: &[bool]) -> Option<u32> {
        (0..self.slots).find(|s| !used[*s as usize])
    }

    /// A service without a table yet: both halves are read back (a removed service may have
    /// left buckets there) so that updates write exactly what differs; none of it counts as
    /// history. Nothing points at the slot until the first update installs the LPM entries.
    fn add_fresh(
        &mut self,
        dp: &DataPlane,
        svc: &ServiceSettings,
        slot: u32,
    ) -> Result<(), TableError> {
        let size = self.size;
        log::info!("service {}: new table in slot {slot}", svc.name);
        self.services.insert(
            svc.name.clone(),
            ServiceTable {
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

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn services(&self) -> &BTreeMap<String, ServiceTable> {
        &self.services
    }

    /// Brings every service's table to `owners` (the Maglev table for new flows, one member id
    /// per bucket), keeping hop history, and installs the services of `cfg`: tables of
    /// services that left the configuration are withdrawn, new services get a slot.
    pub fn update(
        &mut self,
        dp: &mut DataPlane,
        cfg: &Config,
        owners: &[u16],
    ) -> Result<UpdateReport, TableError> {
        if owners.len() != self.size as usize {
            return Err(TableError::WrongLength {
                got: owners.len(),
                expected: self.size,
            });
        }
        let mut report = UpdateReport::default();
        // Services that left the configuration: their VIPs stop being steered first.
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !cfg.services.iter().any(|s| &s.name == *name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = self.services.remove(&name) {
                for vip in &old.vips {
                    dp.remove_service(vip.addr(), vip.prefix_len())?;
                }
                log::info!("service {name}: removed, its VIPs are no longer steered");
            }
        }
        for svc in &cfg.services {
            if !self.services.contains_key(&svc.name) {
                let used: Vec<bool> = (0..self.slots)
                    .map(|s| self.services.values().any(|t| t.slot == s))
                    .collect();
                let slot = self.free_slot(&used).ok_or(TableError::Capacity {
                    capacity: dp.table_capacity(),
                    services: cfg.services.len(),
                    size: self.size,
                })?;
                self.add_fresh(dp, svc, slot)?;
            }
            let Some(table) = self.services.get_mut(&svc.name) else {
                continue;
            };
            let seed = table.seed.take();
            let previous = seed.as_deref().unwrap_or(table.buckets());
            let (next, summary) = history::advance(previous, owners, cfg.known_ids());
            report
                .owner_changes
                .insert(svc.name.clone(), summary.owner_changed);
            let same_vips = table.vips == svc.vips;
            if table.generation > 0 && next == table.buckets() && same_vips {
                // Nothing changed: keep the current half; ports may still have changed.
                for vip in &svc.vips {
                    let offset = half_offset(table.slot, table.active, self.size);
                    let entry = service_entry(svc, offset, self.size, table.generation);
                    if dp.service(vip.addr(), vip.prefix_len())? != Some(entry) {
                        dp.set_service(vip.addr(), vip.prefix_len(), &entry)?;
                    }
                }
                continue;
            }
            let target = 1 - table.active;
            let base = half_offset(table.slot, target, self.size);
            let mut writes = 0;
            let standby = &table.halves[target as usize];
            for (i, new) in next.iter().enumerate() {
                if standby.get(i) != Some(new) {
                    dp.write_buckets(base + i as u32, std::slice::from_ref(new))?;
                    writes += 1;
                }
            }
            report.bucket_writes += writes;
            let generation = table.generation.wrapping_add(1).max(1);
            let entry = service_entry(svc, base, self.size, generation);
            for vip in &svc.vips {
                dp.set_service(vip.addr(), vip.prefix_len(), &entry)?;
            }
            // VIPs dropped from this service stop being steered.
            for vip in table.vips.iter().filter(|v| !svc.vips.contains(v)) {
                dp.remove_service(vip.addr(), vip.prefix_len())?;
            }
            table.halves[target as usize] = next;
            table.active = target;
            table.generation = generation;
            table.digest = OnceLock::new();
            table.vips = svc.vips.clone();
            report.swapped.push(svc.name.clone());
            // The daemon logs the swap with its cause at info.
            log::debug!(
                "service {}: table generation {generation} active ({} owner changes, {writes} bucket writes)",
                svc.name,
                summary.owner_changed
            );
        }
        Ok(report)
    }

    /// Makes `history` (a running member's table) the history the next update starts from for
    /// `service`, with our own hops added where there is room. For a starting node: the
    /// running member's view of who owned what is the better one. Returns false for an
    /// unknown service.
    pub fn seed(&mut self, service: &str, history: Vec<Bucket>) -> bool {
        match self.services.get_mut(service) {
            Some(table) => {
                let own = table.buckets().to_vec();
                table.seed = Some(history::merge(&history, &own));
                true
            }
            None => false,
        }
    }

    /// Adds the hops of `peer` (another member's table) that our history of `service` lacks,
    /// where there is room, for the next update. Returns whether anything would change.
    pub fn absorb(&mut self, service: &str, peer: &[Bucket]) -> bool {
        let Some(table) = self.services.get_mut(service) else {
            return false;
        };
        let own = table.buckets();
        let merged = history::merge(own, peer);
        if merged == own {
            return false;
        }
        table.seed = Some(merged);
        true
    }

    /// The service (by name) whose VIPs contain `addr`, with its table.
    pub fn service_for(&self, addr: IpAddr) -> Option<(&str, &ServiceTable)> {
        self.services
            .iter()
            .find(|(_, t)| t.vips.iter().any(|v| v.contains(addr)))
            .map(|(name, t)| (name.as_str(), t))
    }

    /// Buckets owned by each member (`hops[0]`), over every service.
    pub fn share(&self) -> BTreeMap<u16, u64> {
        let mut out = BTreeMap::new();
        for table in self.services.values() {
            for (id, n) in history::per_member_share(table.buckets()) {
                *out.entry(id).or_insert(0) += u64::from(n);
            }
        }
        out
    }
}
