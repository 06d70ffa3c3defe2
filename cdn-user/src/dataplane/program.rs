//! The loaded XDP program and typed access to its maps.
//!
//! All map writes of the controller go through here, so the byte layouts from `cdn_common` are
//! used in exactly one place on the userspace side.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
        ring_buf::RingBuf,
        xdp::DevMapHash,
    },
    programs::{
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use cdn_common::{
    counters::{COUNTER_SLOTS, PacketCounts},
    maps::{
        self as m, Bucket, Link, MAX_MEMBERS, Member, MemberAddr, MemberStats, NextHop, NodeConfig,
        QUIC_SERVER_SET, QuicServer, Service,
    },
    trace::TraceFilter,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataPlaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no map {0}")]
    MissingMap(&'static str),
    #[error("the XDP object has no program {0}")]
    MissingProgram(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map DEVICES: {0}")]
    Device(String),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("member id {0} is out of range (max {max})", max = MAX_MEMBERS - 1)]
    MemberId(u16),
    #[error("bucket range {offset}+{len} exceeds the table ({size} buckets)")]
    TableRange { offset: u32, len: usize, size: u32 },
    #[error("attaching to {interface}: {source}")]
    Attach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("pinned link {path}: {reason}")]
    Link { path: PathBuf, reason: String },
    #[error("parsing the embedded XDP object: {0}")]
    Object(String),
    #[error("removing the stale pin {path}: {source}")]
    StalePin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(super) type Result<T> = std::result::Result<T, DataPlaneError>;

/// How to load the program.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Buckets in `TABLE` (both halves of every service's table).
    pub table_entries: u32,
    /// Directory to pin every map in (and to reuse pinned maps from); `None`: no pinning.
    pub pin_dir: Option<PathBuf>,
}

/// How the program is attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    /// `"native"` or `"generic"`.
    pub mode: &'static str,
    /// True if a running program was replaced in place (controller restart).
    pub replaced: bool,
    /// False for attachments made through netlink on kernels without XDP links; those cannot
    /// be pinned, but survive the process anyway.
    pub pinned: bool,
}

/// Every map, by name, as the program defines them (the last three optional: see
/// `learned::Learning`; a pin path for a map the object lacks is not used).
const ALL_MAPS: [&str; 18] = [
    m::MAP_CONFIG,
    m::MAP_SERVICES_V4,
    m::MAP_SERVICES_V6,
    m::MAP_TABLE,
    m::MAP_MEMBERS,
    m::MAP_MEMBER_ADDRS,
    m::MAP_NEXT_HOPS,
    m::MAP_DEVICES,
    m::MAP_COUNTERS,
    m::MAP_MEMBER_STATS,
    m::MAP_TRACE_FILTER,
    m::MAP_TRACE_EVENTS,
    m::MAP_TRACE_LOST,
    m::MAP_UNDERLAY_IFACES,
    m::MAP_QUIC_SERVERS,
    m::MAP_LEARNED,
    m::MAP_LEARNED_BUCKETS,
    m::MAP_CLAIM_EVENTS,
];

pub struct DataPlane {
    ebpf: Ebpf,
    config: Array<MapData, NodeConfig>,
    services_v4: LpmTrie<MapData, [u8; 4], Service>,
    services_v6: LpmTrie<MapData, [u8; 16], Service>,
    table: Array<MapData, Bucket>,
    pub(super) members: Array<MapData, Member>,
    pub(super) member_addrs: HashMap<MapData, MemberAddr, u16>,
    pub(super) next_hops: Array<MapData, NextHop>,
    devices: DevMapHash<MapData>,
    counters: PerCpuArray<MapData, u64>,
    member_stats: PerCpuArray<MapData, MemberStats>,
    /// The last link set for each member's next hop (see `set_next_hop`).
    pub(super) links: BTreeMap<u16, Link>,
    trace_filter: Array<MapData, TraceFilter>,
    trace_lost: PerCpuArray<MapData, u64>,
    underlay_ifaces: HashMap<MapData, u32, u8>,
    quic_servers: Array<MapData, QuicServer>,
    /// Lent to the one running trace at a time.
    trace_reader: Option<super::TraceReader>,
    /// Learned owners and claim events (PoPs only).
    learning: super::learned::Learning,
}

pub(super) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { map, source }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataPlaneError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl DataPlane {
    /// Loads the embedded object and the program into the kernel (not attached anywhere).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(m::MAP_TABLE, opts.table_entries.max(1));
        let pins: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => ALL_MAPS
                .iter()
                .map(|name| (*name, dir.join(name)))
                .collect(),
            None => Vec::new(),
        };
        super::stale_pins::drop_stale_pins(&pins, opts.table_entries.max(1))?;
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(super::object::bytes())?;
        let program: &mut Xdp = ebpf
            .program_mut(m::PROGRAM_NAME)
            .ok_or(DataPlaneError::MissingProgram(m::PROGRAM_NAME))?
            .try_into()?;
        program.load()?;
        Ok(Self {
            config: take(&mut ebpf, m::MAP_CONFIG)?,
            services_v4: take(&mut ebpf, m::MAP_SERVICES_V4)?,
            services_v6: take(&mut ebpf, m::MAP_SERVICES_V6)?,
            table: take(&mut ebpf, m::MAP_TABLE)?,
            members: take(&mut ebpf, m::MAP_MEMBERS)?,
            member_addrs: take(&mut ebpf, m::MAP_MEMBER_ADDRS)?,
            next_hops: take(&mut ebpf, m::MAP_NEXT_HOPS)?,
            devices: take(&mut ebpf, m::MAP_DEVICES)?,
            counters: take(&mut ebpf, m::MAP_COUNTERS)?,
            member_stats: take(&mut ebpf, m::MAP_MEMBER_STATS)?,
            links: BTreeMap::new(),
            trace_filter: take(&mut ebpf, m::MAP_TRACE_FILTER)?,
            trace_lost: take(&mut ebpf, m::MAP_TRACE_LOST)?,
            underlay_ifaces: take(&mut ebpf, m::MAP_UNDERLAY_IFACES)?,
            quic_servers: take(&mut ebpf, m::MAP_QUIC_SERVERS)?,
            trace_reader: Some(super::TraceReader::new(take::<RingBuf<MapData>>(
                &mut ebpf,
                m::MAP_TRACE_EVENTS,
            )?)),
            learning: super::learned::Learning::take(&mut ebpf)?,
            ebpf,
        })
    }

    /// The learned owners' maps and the claim events.
    pub fn learning(&mut self) -> &mut super::learned::Learning {
        &mut self.learning
    }

    /// Attaches the program to `interface`, or, if a link pinned at `link_pin` exists (left by
    /// a previous controller), atomically replaces the program behind it: packets never see
    /// the interface without a program. New links are pinned there, so the program stays
    /// attached if this process dies.
    pub fn attach(
        &mut self,
        interface: &str,
        generic: bool,
        link_pin: &Path,
    ) -> Result<Attachment> {
        let mode_name = if generic { "generic" } else { "native" };
        let attach_err = |source| DataPlaneError::Attach {
            interface: interface.to_string(),
            source,
        };
        let link_err = |reason: String| DataPlaneError::Link {
            path: link_pin.to_path_buf(),
            reason,
        };
        let program = self.program()?;
        if link_pin.exists() {
            let pinned = PinnedLink::from_pin(link_pin).map_err(|e| link_err(e.to_string()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| link_err(format!("not an XDP link: {e}")))?;
            program.attach_to_link(link).map_err(attach_err)?;
            return Ok(Attachment {
                interface: interface.to_string(),
                mode: mode_name,
                replaced: true,
                pinned: true,
            });
        }
        let mode = if generic {
            XdpMode::Skb
        } else {
            XdpMode::Driver
        };
        let id = program.attach(interface, mode).map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let pinned = match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link.pin(link_pin).map_err(|e| link_err(e.to_string()))?;
                true
            }
            // Netlink attachment (no XDP links in this kernel): it outlives us by itself.
            Err(_) => false,
        };
        Ok(Attachment {
            interface: interface.to_string(),
            mode: mode_name,
            replaced: false,
            pinned,
        })
    }

    /// Removes the pinned link of an interface: the program is detached once nothing else
    /// holds the link.
    pub fn detach(link_pin: &Path) -> Result<()> {
        let pinned = PinnedLink::from_pin(link_pin).map_err(|e| DataPlaneError::Link {
            path: link_pin.to_path_buf(),
            reason: e.to_string(),
        })?;
        let link = pinned.unpin().map_err(|e| DataPlaneError::Link {
            path: link_pin.to_path_buf(),
            reason: e.to_string(),
        })?;
        drop(link);
        Ok(())
    }

    /// The XDP program, for attaching and test runs.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(m::PROGRAM_NAME)
            .ok_or(DataPlaneError::MissingProgram(m::PROGRAM_NAME))?
            .try_into()?)
    }

    pub fn config(&self) -> Result<NodeConfig> {
        self.config.get(&0, 0).map_err(map_err(m::MAP_CONFIG))
    }

    /// Writes the node's configuration. If this changes what next-hop templates are made of
    /// (underlay addresses, steering port), every next hop is rebuilt for it right after, and
    /// left invalid if it cannot be built.
    pub fn write_config(&mut self, config: &NodeConfig) -> Result<()> {
        let old = self.config()?;
        self.config
            .set(0, config, 0)
            .map_err(map_err(m::MAP_CONFIG))?;
        let same_templates = (old.underlay_v4, old.underlay_v6, old.steer_port)
            == (config.underlay_v4, config.underlay_v6, config.steer_port);
        if !same_templates {
            // Every id, not only those set through this handle: entries left in pinned maps
            // by a previous controller must not keep the old addresses either.
            for id in 0..MAX_MEMBERS as u16 {
                let link = match self.links.get(&id) {
                    Some(link) => Some(*link),
                    None => self.next_hop(id)?.link(),
                };
                if let Some(link) = link {
                    self.set_next_hop(id, &link)?;
                }
            }
        }
        Ok(())
    }

    /// Makes `ifindexes` the interfaces steering packets are accepted on (`[node]
    /// underlay_interfaces`): entries are added before stale ones are removed, so a packet on
    /// an interface in both the old and new list is never refused. The program reads the map
    /// only while the configuration has `NODE_UNDERLAY_IFACES`, which the caller sets after.
    pub fn set_underlay_ifaces(&mut self, ifindexes: &[u32]) -> Result<()> {
        let name = m::MAP_UNDERLAY_IFACES;
        for &ifindex in ifindexes {
            self.underlay_ifaces
                .insert(ifindex, 1, 0)
                .map_err(map_err(name))?;
        }
        let stale: Vec<u32> = self
            .underlay_ifaces
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !ifindexes.contains(k))
            .collect();
        for ifindex in stale {
            self.underlay_ifaces
                .remove(&ifindex)
                .map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Adds or replaces the service for a VIP prefix. Replacing is atomic for the data plane:
    /// the trie swaps in a new node, so a packet sees the old or the new entry.
    pub fn set_service(&mut self, addr: IpAddr, prefix_len: u8, service: &Service) -> Result<()> {
        match addr {
            IpAddr::V4(a) => self
                .services_v4
                .insert(&Key::new(prefix_len.into(), a.octets()), service, 0)
                .map_err(map_err(m::MAP_SERVICES_V4)),
            IpAddr::V6(a) => self
                .services_v6
                .insert(&Key::new(prefix_len.into(), a.octets()), service, 0)
                .map_err(map_err(m::MAP_SERVICES_V6)),
        }
    }

    pub fn service(&self, addr: IpAddr, prefix_len: u8) -> Result<Option<Service>> {
        let found = match addr {
            IpAddr::V4(a) => self
                .services_v4
                .get(&Key::new(prefix_len.into(), a.octets()), 0),
            IpAddr::V6(a) => self
                .services_v6
                .get(&Key::new(prefix_len.into(), a.octets()), 0),
        };
        match found {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(m::MAP_SERVICES_V4)(e)),
        }
    }

    pub fn remove_service(&mut self, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let result = match addr {
            IpAddr::V4(a) => self
                .services_v4
                .remove(&Key::new(prefix_len.into(), a.octets())),
            IpAddr::V6(a) => self
                .services_v6
                .remove(&Key::new(prefix_len.into(), a.octets())),
        };
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(m::MAP_SERVICES_V4)(e)),
        }
    }

    /// Number of buckets the table map holds.
    pub fn table_capacity(&self) -> u32 {
        self.table.len()
    }

    /// Writes `buckets` starting at bucket `offset`.
    pub fn write_buckets(&mut self, offset: u32, buckets: &[Bucket]) -> Result<()> {
        let size = self.table.len();
        if offset as usize + buckets.len() > size as usize {
            return Err(DataPlaneError::TableRange {
                offset,
                len: buckets.len(),
                size,
            });
        }
        for (i, bucket) in (offset..).zip(buckets) {
            self.table
                .set(i, bucket, 0)
                .map_err(map_err(m::MAP_TABLE))?;
        }
        Ok(())
    }

    /// Reads `len` buckets starting at `offset`.
    pub fn read_buckets(&self, offset: u32, len: u32) -> Result<Vec<Bucket>> {
        (offset..offset + len)
            .map(|i| self.table.get(&i, 0).map_err(map_err(m::MAP_TABLE)))
            .collect()
    }

    /// Routes QUIC-LB server ID `server_id` to `member` (or, with `None`, to nobody: such
    /// connection IDs are placed by flow hash). Writes only what changed.
    pub fn set_quic_server(&mut self, server_id: u32, member: Option<u16>) -> Result<()> {
        let entry = match member {
            Some(id) => {
                Self::check_id(id)?;
                QuicServer {
                    member: id,
                    flags: QUIC_SERVER_SET,
                }
            }
            None => QuicServer::default(),
        };
        if self.quic_servers_entry(server_id)? != entry {
            self.quic_servers
                .set(server_id, entry, 0)
                .map_err(map_err(m::MAP_QUIC_SERVERS))?;
        }
        Ok(())
    }

    /// The member QUIC-LB server ID `server_id` routes to, if any.
    pub fn quic_server(&self, server_id: u32) -> Result<Option<u16>> {
        let entry = self.quic_servers_entry(server_id)?;
        Ok((entry.flags & QUIC_SERVER_SET != 0).then_some(entry.member))
    }

    /// Every server ID that routes somewhere, with its member: one pass over the array (a
    /// restarted controller finds what a previous one left in the pinned map).
    pub fn quic_servers(&self) -> Result<Vec<(u32, u16)>> {
        let mut out = Vec::new();
        for server_id in 0..cdn_common::quic_lb::QUIC_SERVER_IDS {
            if let Some(member) = self.quic_server(server_id)? {
                out.push((server_id, member));
            }
        }
        Ok(out)
    }

    fn quic_servers_entry(&self, server_id: u32) -> Result<QuicServer> {
        self.quic_servers
            .get(&server_id, 0)
            .map_err(map_err(m::MAP_QUIC_SERVERS))
    }

    /// Makes `ifindex` a target for XDP_REDIRECT.
    pub fn add_device(&mut self, ifindex: u32) -> Result<()> {
        self.devices
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| DataPlaneError::Device(e.to_string()))
    }

    /// Every (reason, action) counter, summed over CPUs.
    pub fn counters(&self) -> Result<PacketCounts> {
        let mut out = PacketCounts::default();
        for (i, slot) in (0..COUNTER_SLOTS).zip(out.slots.iter_mut()) {
            let per_cpu: PerCpuValues<u64> =
                self.counters.get(&i, 0).map_err(map_err(m::MAP_COUNTERS))?;
            // Wrapping: a counter that wrapped on one CPU must not make the scrape fail.
            *slot = per_cpu.iter().fold(0u64, |sum, n| sum.wrapping_add(*n));
        }
        Ok(out)
    }

    /// Packets and bytes sent to a member, summed over CPUs.
    pub fn member_stats(&self, id: u16) -> Result<MemberStats> {
        Self::check_id(id)?;
        let per_cpu = self
            .member_stats
            .get(&u32::from(id), 0)
            .map_err(map_err(m::MAP_MEMBER_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(MemberStats::default(), |acc, s| MemberStats {
                packets: acc.packets + s.packets,
                bytes: acc.bytes + s.bytes,
            }))
    }

    /// Sets what the live trace reports; the program reads it only while `NODE_TRACE` is set.
    pub fn set_trace_filter(&mut self, filter: &TraceFilter) -> Result<()> {
        self.trace_filter
            .set(0, filter, 0)
            .map_err(map_err(m::MAP_TRACE_FILTER))
    }

    /// Trace events lost so far because the ring was full, summed over CPUs (wrapping).
    pub fn trace_lost(&self) -> Result<u64> {
        let per_cpu = self
            .trace_lost
            .get(&0, 0)
            .map_err(map_err(m::MAP_TRACE_LOST))?;
        Ok(per_cpu.iter().fold(0u64, |sum, n| sum.wrapping_add(*n)))
    }

    /// Takes the reader of the trace events; `None` while a trace has it.
    pub fn take_trace_reader(&mut self) -> Option<super::TraceReader> {
        self.trace_reader.take()
    }

    /// Gives the reader back when a trace ends.
    pub fn return_trace_reader(&mut self, reader: super::TraceReader) {
        self.trace_reader = Some(reader);
    }

    /// Runs the program once on `frame` with BPF_PROG_TEST_RUN; returns the action and the
    /// frame as the program left it.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        // Room for the largest encapsulation in front of a full frame.
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = self.program()?.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs `program` (`PROGRAM_NAME` or `BASELINE_PROGRAM_NAME`) `repeat` times on `frame`;
    /// returns the action and the kernel's mean nanoseconds per run. Loads the program first
    /// if needed.
    pub fn time_run(
        &mut self,
        program: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, u64)> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(program)
            .ok_or(DataPlaneError::MissingProgram(program))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        let result = prog.test_run(opts)?;
        Ok((result.return_value, result.duration.as_nanos() as u64))
    }
}
