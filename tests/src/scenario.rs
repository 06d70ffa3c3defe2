//! A loaded data plane in a known state: this node is member 1 of a small cluster, two
//! services (an IPv4 and an IPv6 VIP prefix), fresh next hops for every other member.
//!
//! `TABLE` has room for [`POPS`] PoPs' tables (README "PoPs"): PoP `p`'s tables of the two
//! services start at [`pop_table`]. This node is in PoP 0, whose tables are the services' own
//! (`table_offset` 0 and [`TABLE_SIZE`]). The services search no other PoP until
//! [`Scenario::set_search_pops`] says so.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use cdn_common::{
    counters::{Action, Reason},
    maps::{
        Bucket, FlowKey, Learned, Link, MAP_CLAIM_EVENTS, MAP_LEARNED, MAP_LEARNED_BUCKETS,
        NO_MEMBER, NODE_READY, NodeConfig, SERVICE_QUIC, SERVICE_TCP, SERVICE_UDP, Service,
    },
    quic_lb::QuicLbConfig,
};
use cdn_user::dataplane::{DataPlane, LoadOptions};

use crate::packets::{ExpectedEncap, Flow, NODE_MAC, Vlan, expected_encap, ip_packet};

pub const KEY: [u64; 2] = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
pub const STEER_PORT: u16 = 6080;
pub const SELF_ID: u16 = 1;
pub const TABLE_SIZE: u32 = 13;
pub const BUDGET: u8 = 3;
/// PoPs whose tables `TABLE` has room for.
pub const POPS: usize = 3;
/// The search budget of a cluster of [`POPS`] PoPs, as the controller sets it.
pub const SEARCH_BUDGET: u8 = 6 * (POPS as u8 - 1);
pub const UNDERLAY_V4: &str = "10.0.0.1";
pub const UNDERLAY_V6: &str = "fd00::1";
pub const VIP_V4: &str = "192.0.2.10";
pub const VIP_V6: &str = "2001:db8::10";
pub const CLIENT_V4: &str = "198.51.100.7";
pub const CLIENT_V6: &str = "2001:db8:ffff::7";

/// (member id, underlay address). Member 1 is this node.
pub const MEMBERS: [(u16, &str); 6] = [
    (0, "10.0.0.10"),
    (1, UNDERLAY_V4),
    (2, "10.0.0.2"),
    (3, "fd00::3"),
    (4, "10.0.0.4"),
    (5, "fd00::5"),
];

/// The MAC address this scenario's next hop entries give a member.
pub fn member_mac(id: u16) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x10, id as u8]
}

/// The next hop this scenario gives member `id`: its own MAC, out of ifindex 1 (where test
/// runs come in, so the program transmits with XDP_TX).
pub fn member_link(id: u16) -> Link {
    Link {
        ifindex: 1,
        dst_mac: member_mac(id),
        src_mac: NODE_MAC,
    }
}

pub fn addr(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

pub fn member_addr(id: u16) -> IpAddr {
    let (_, a) = MEMBERS
        .iter()
        .find(|(m, _)| *m == id)
        .expect("member of the scenario");
    addr(a)
}

/// UDP port of [`quic_service`] that is not QUIC (it follows `udp_mode`).
pub const NON_QUIC_UDP_PORT: u16 = 4433;

/// [`service`] with QUIC routing on UDP 443 under `cfg`; UDP [`NON_QUIC_UDP_PORT`] is served
/// too, as plain UDP.
pub fn quic_service(offset: u32, cfg: &QuicLbConfig) -> Service {
    let mut svc = service(offset);
    svc.udp_ports[1] = NON_QUIC_UDP_PORT;
    svc.quic_ports[0] = 443;
    svc.flags |= SERVICE_QUIC;
    svc.quic_config_id = cfg.config_id;
    svc.quic_server_id_len = cfg.server_id_len;
    svc.quic_cid_len = cfg.cid_len;
    svc
}

/// TCP 80 and 443, UDP 443.
pub fn service(offset: u32) -> Service {
    let mut tcp_ports = [0u16; 8];
    tcp_ports[0] = 80;
    tcp_ports[1] = 443;
    let mut udp_ports = [0u16; 8];
    udp_ports[0] = 443;
    Service {
        table_offset: offset,
        table_size: TABLE_SIZE,
        flags: SERVICE_TCP | SERVICE_UDP,
        tcp_ports,
        udp_ports,
        generation: 1,
        ..Service::default()
    }
}

/// Offset in `TABLE` of PoP `pop`'s table of the IPv4 (or IPv6) service.
pub fn pop_table(pop: usize, v6: bool) -> u32 {
    (2 * pop as u32 + u32::from(v6)) * TABLE_SIZE
}

/// `svc` (the IPv4 or IPv6 service) with every PoP's table, searching the PoPs of
/// `search_pops` (this node's PoP, 0, is never among them).
pub fn with_pops(svc: Service, v6: bool, search_pops: u8) -> Service {
    // PoPs past the scenario's have no table (past the end of `TABLE`: nobody is named).
    let mut pop_tables = [1 << 31; cdn_common::maps::MAX_POPS];
    for (pop, slot) in pop_tables.iter_mut().enumerate().take(POPS) {
        *slot = pop_table(pop, v6);
    }
    Service {
        search_pops,
        pop_tables,
        ..svc
    }
}

pub fn node_config() -> NodeConfig {
    let v6: std::net::Ipv6Addr = UNDERLAY_V6.parse().expect("address");
    let v4: std::net::Ipv4Addr = UNDERLAY_V4.parse().expect("address");
    NodeConfig {
        hash_key: KEY,
        underlay_v4: v4.octets(),
        underlay_v6: v6.octets(),
        steer_port: STEER_PORT,
        self_member: SELF_ID,
        flags: NODE_READY,
        hop_budget: BUDGET,
        // As the controller writes it: whether or not `steer_auth` is on.
        auth_key: cdn_user::dataplane::steer_auth_key(KEY),
        ..NodeConfig::default()
    }
}

/// The outcome of one program run.
pub struct Run {
    /// The XDP action the program returned.
    pub action: u32,
    pub out: Vec<u8>,
    /// (reason, action) counters that moved, with how much.
    pub counted: Vec<(Reason, Action, u64)>,
}

impl Run {
    /// The verdict's reason. Panics unless exactly one verdict counter moved, by one, with
    /// the action the program returned (see [`Run::try_verdict`]).
    pub fn verdict(&self) -> Reason {
        match self.try_verdict() {
            Ok(reason) => reason,
            Err(e) => panic!("{e}"),
        }
    }

    /// The verdict's reason, if exactly one verdict counter moved, by one, and it was counted
    /// with the action the program returned (informational counters with that action too).
    pub fn try_verdict(&self) -> Result<Reason> {
        let verdicts: Vec<_> = self
            .counted
            .iter()
            .filter(|(r, _, _)| r.is_verdict())
            .collect();
        anyhow::ensure!(
            verdicts.len() == 1,
            "exactly one verdict counter per packet: {:?}",
            self.counted
        );
        let (reason, action, n) = *verdicts[0];
        anyhow::ensure!(n == 1, "verdict counted once: {:?}", self.counted);
        anyhow::ensure!(
            action as u32 == self.action,
            "returned action {} but counted {:?}",
            self.action,
            self.counted
        );
        anyhow::ensure!(
            reason.allows(action),
            "{} is not declared with action {}",
            reason.name(),
            action.name()
        );
        for (info, info_action, _) in self.counted.iter().filter(|(r, _, _)| !r.is_verdict()) {
            anyhow::ensure!(
                *info_action == action,
                "{} counted with another action than the packet's: {:?}",
                info.name(),
                self.counted
            );
        }
        Ok(reason)
    }

    /// How much the counters of `reason` moved, whatever the action.
    pub fn counted(&self, reason: Reason) -> u64 {
        self.counted
            .iter()
            .filter(|(r, _, _)| *r == reason)
            .map(|(_, _, n)| n)
            .sum()
    }
}

pub struct Scenario {
    pub dp: DataPlane,
    /// `Service::search_pops` of both services (0: no search, as without PoPs).
    pub search_pops: u8,
}

impl Scenario {
    /// Loads the program and writes the scenario's maps.
    pub fn new() -> Result<Self> {
        let mut dp = DataPlane::load(&LoadOptions {
            table_entries: 2 * TABLE_SIZE * POPS as u32,
            pin_dir: None,
        })
        .context("loading the XDP program")?;
        // Through the controller's own calls, so that the frames the tests expect check the
        // headers it precomputes into next-hop entries byte for byte.
        for (id, a) in MEMBERS {
            dp.set_member(id, Some(addr(a)))?;
            if id != SELF_ID {
                dp.set_next_hop(id, &member_link(id))?;
            }
        }
        dp.set_service(addr("192.0.2.0"), 24, &service(0))?;
        dp.set_service(addr("2001:db8::"), 64, &service(TABLE_SIZE))?;
        let empty = vec![Bucket::EMPTY; 2 * TABLE_SIZE as usize * POPS];
        dp.write_buckets(0, &empty)?;
        dp.write_config(&node_config())?;
        for (id, _) in MEMBERS {
            anyhow::ensure!(
                id == SELF_ID || dp.next_hop(id)?.is_valid(),
                "member {id} has no valid next hop"
            );
        }
        Ok(Self { dp, search_pops: 0 })
    }

    /// The service of prefix `v6` with this scenario's PoPs (see [`with_pops`]).
    fn pops(&self, svc: Service, v6: bool) -> Service {
        if self.search_pops == 0 {
            svc
        } else {
            with_pops(svc, v6, self.search_pops)
        }
    }

    /// Makes both services search the PoPs of `search_pops` (0: none, the services as
    /// without PoPs), keeping their flags; the node's search budget follows.
    pub fn set_search_pops(&mut self, search_pops: u8, flags: u32) -> Result<()> {
        self.search_pops = search_pops;
        self.set_service_flags(flags)?;
        self.update_config(|c| {
            c.self_pop = 0;
            c.search_budget = if search_pops == 0 { 0 } else { SEARCH_BUDGET };
        })
    }

    /// Index in `TABLE` of the bucket `flow` hashes to in PoP `pop`'s table.
    pub fn pop_bucket_index(&self, pop: usize, flow: &Flow) -> u32 {
        pop_table(pop, flow.is_v6()) + (flow.hash(&KEY) % u64::from(TABLE_SIZE)) as u32
    }

    /// Makes `hops` the hop list of `flow`'s bucket in PoP `pop`'s table.
    pub fn set_pop_hops(&mut self, pop: usize, flow: &Flow, hops: &[u16]) -> Result<()> {
        let mut bucket = Bucket::EMPTY;
        for (slot, hop) in bucket.hops.iter_mut().zip(hops) {
            *slot = *hop;
        }
        let index = self.pop_bucket_index(pop, flow);
        self.dp.write_buckets(index, &[bucket])?;
        Ok(())
    }

    /// Rewrites both services (the IPv4 and the IPv6 VIP prefix) with `flags` as their
    /// `Service::flags`, e.g. to choose a UDP placement mode.
    pub fn set_service_flags(&mut self, flags: u32) -> Result<()> {
        for (prefix, len, offset) in [("192.0.2.0", 24, 0), ("2001:db8::", 64, TABLE_SIZE)] {
            let svc = Service {
                flags,
                ..service(offset)
            };
            let svc = self.pops(svc, offset != 0);
            self.dp.set_service(addr(prefix), len, &svc)?;
        }
        Ok(())
    }

    /// Rewrites both services as [`quic_service`] under `cfg` (`None`: plain [`service`]),
    /// with `flags` added to their `Service::flags`.
    pub fn set_quic(&mut self, cfg: Option<&QuicLbConfig>, flags: u32) -> Result<()> {
        for (prefix, len, offset) in [("192.0.2.0", 24, 0), ("2001:db8::", 64, TABLE_SIZE)] {
            let mut svc = match cfg {
                Some(cfg) => quic_service(offset, cfg),
                None => service(offset),
            };
            svc.flags |= flags;
            let svc = self.pops(svc, offset != 0);
            self.dp.set_service(addr(prefix), len, &svc)?;
        }
        Ok(())
    }

    /// Index in `TABLE` of the bucket `flow` hashes to.
    pub fn bucket_index(&self, flow: &Flow) -> u32 {
        let offset = if flow.is_v6() { TABLE_SIZE } else { 0 };
        offset + (flow.hash(&KEY) % u64::from(TABLE_SIZE)) as u32
    }

    /// Makes `hops` the hop list of `flow`'s bucket.
    pub fn set_hops(&mut self, flow: &Flow, hops: &[u16]) -> Result<()> {
        let mut bucket = Bucket::EMPTY;
        for (slot, hop) in bucket.hops.iter_mut().zip(hops) {
            *slot = *hop;
        }
        let index = self.bucket_index(flow);
        self.dp.write_buckets(index, &[bucket])?;
        Ok(())
    }

    pub fn update_config(&mut self, f: impl FnOnce(&mut NodeConfig)) -> Result<()> {
        let mut cfg = self.dp.config()?;
        f(&mut cfg);
        self.dp.write_config(&cfg)?;
        Ok(())
    }

    /// Turns `steer_auth` on or off, with the key the controller derives from [`KEY`].
    pub fn set_steer_auth(&mut self, on: bool) -> Result<()> {
        self.update_config(|c| {
            c.auth_key = cdn_user::dataplane::steer_auth_key(KEY);
            if on {
                c.flags |= cdn_common::maps::NODE_STEER_AUTH;
            } else {
                c.flags &= !cdn_common::maps::NODE_STEER_AUTH;
            }
        })
    }

    pub fn run(&mut self, frame: &[u8]) -> Result<Run> {
        let before = self.dp.counters()?;
        let (action, out) = self.dp.test_run(frame)?;
        let after = self.dp.counters()?;
        let counted = after.moved_since(&before).collect();
        Ok(Run {
            action,
            out,
            counted,
        })
    }
}

/// `flow` as `LEARNED` keys it (README "PoPs: learned owners").
pub fn learned_key(flow: &Flow) -> FlowKey {
    let mapped = |a: IpAddr| match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    FlowKey {
        client: mapped(flow.src),
        vip: mapped(flow.dst),
        client_port: flow.sport.to_be(),
        vip_port: flow.dport.to_be(),
        proto: if flow.udp { 17 } else { 6 },
        _pad: [0; 3],
    }
}

/// A map of `dp`'s loaded program, opened by name: the controller's `DataPlane` does not hand
/// out the learned-owner maps.
pub fn program_map(dp: &mut DataPlane, name: &str) -> Result<aya::maps::MapData> {
    let ids = dp
        .program()?
        .info()?
        .map_ids()?
        .context("the kernel lists no maps")?;
    for id in ids {
        let data = aya::maps::MapData::from_id(id)?;
        if data.info()?.name_as_str() == Some(name) {
            return Ok(data);
        }
    }
    anyhow::bail!("the program has no map {name}")
}

/// `LEARNED` of `dp`'s program.
pub fn learned_map(
    dp: &mut DataPlane,
) -> Result<aya::maps::HashMap<aya::maps::MapData, FlowKey, Learned>> {
    let data = program_map(dp, MAP_LEARNED)?;
    Ok(aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
        data,
    ))?)
}

/// `LEARNED_BUCKETS` of `dp`'s program.
pub fn learned_buckets_map(
    dp: &mut DataPlane,
) -> Result<aya::maps::Array<aya::maps::MapData, u32>> {
    let data = program_map(dp, MAP_LEARNED_BUCKETS)?;
    Ok(aya::maps::Array::try_from(aya::maps::Map::Array(data))?)
}

impl Scenario {
    fn program_map(&mut self, name: &str) -> Result<aya::maps::MapData> {
        program_map(&mut self.dp, name)
    }

    fn learned_map(&mut self) -> Result<aya::maps::HashMap<aya::maps::MapData, FlowKey, Learned>> {
        learned_map(&mut self.dp)
    }

    /// Teaches the data plane that `member` holds `flow` (`None`: forgets the flow). The
    /// bucket bit is left alone: see [`Scenario::set_learned_bit`].
    pub fn set_learned(&mut self, flow: &Flow, member: Option<u16>) -> Result<()> {
        let mut map = self.learned_map()?;
        let key = learned_key(flow);
        match member {
            Some(member) => map.insert(
                key,
                Learned {
                    member,
                    ..Learned::default()
                },
                0,
            )?,
            None => match map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }

    /// The `LEARNED` entry of `flow`, if there is one.
    pub fn learned(&mut self, flow: &Flow) -> Result<Option<Learned>> {
        match self.learned_map()?.get(&learned_key(flow), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets (or clears) the `LEARNED_BUCKETS` bit of `flow`'s bucket index.
    pub fn set_learned_bit(&mut self, flow: &Flow, on: bool) -> Result<()> {
        let mut words = learned_buckets_map(&mut self.dp)?;
        let bucket = (flow.hash(&KEY) % u64::from(TABLE_SIZE)) as u32;
        let word = words.get(&(bucket / 32), 0)?;
        let bit = 1 << (bucket % 32);
        words.set(bucket / 32, if on { word | bit } else { word & !bit }, 0)?;
        Ok(())
    }

    /// The claim ring (`CLAIM_EVENTS`), for a test to read its events.
    pub fn claim_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let data = self.program_map(MAP_CLAIM_EVENTS)?;
        Ok(aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(data))?)
    }
}

/// Convenience: a hop list with [`NO_MEMBER`] padding, as the table stores it.
pub fn hops(list: &[u16]) -> [u16; 3] {
    let mut h = [NO_MEMBER; 3];
    for (slot, v) in h.iter_mut().zip(list) {
        *slot = *v;
    }
    h
}

/// The version-1 frame this node sends the untagged client frame `input` of `flow` with to
/// `target`, carrying `hops`, with the scenario's hop budget.
pub fn forwarded_frame(target: u16, flow: &Flow, input: &[u8], hops: &[u16]) -> Result<Vec<u8>> {
    encap_frame(
        target,
        cdn_common::wire::entropy_port(flow.hash(&KEY)),
        input,
        hops,
    )
}

/// [`forwarded_frame`] with the outer source port `entropy`.
pub fn encap_frame(target: u16, entropy: u16, input: &[u8], hops: &[u16]) -> Result<Vec<u8>> {
    encap_to(target, entropy, BUDGET, hops, ip_packet(input, Vlan::None))
}

/// The version-1 frame this node sends the IP packet `inner` with to `target`: outer headers
/// from this scenario's addresses (of `target`'s family) and next hops, source port `entropy`,
/// `budget` and `hops` in the steering header.
pub fn encap_to(
    target: u16,
    entropy: u16,
    budget: u8,
    hops: &[u16],
    inner: &[u8],
) -> Result<Vec<u8>> {
    let outer_src = if member_addr(target).is_ipv6() {
        addr(UNDERLAY_V6)
    } else {
        addr(UNDERLAY_V4)
    };
    expected_encap(&ExpectedEncap {
        dst_mac: member_mac(target),
        src_mac: NODE_MAC,
        outer_src,
        outer_dst: member_addr(target),
        entropy,
        steer_port: STEER_PORT,
        budget,
        hops,
        inner,
    })
}

/// The two ends of a real TCP connection of `flow` (its listener too), open as long as the
/// caller keeps them: an established flow the program's socket lookup finds.
pub struct Established {
    pub client: std::net::TcpStream,
    pub server: std::net::TcpStream,
    pub listener: std::net::TcpListener,
}

/// Opens `flow` (a TCP flow from a client address to a VIP, both local to the namespace) as a
/// real connection and exchanges one byte over it.
pub fn establish(flow: &Flow) -> Result<Established> {
    use std::io::{Read as _, Write as _};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    let listener = TcpListener::bind(SocketAddr::new(flow.dst, flow.dport))?;
    let domain = if flow.dst.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(flow.src, flow.sport).into())?;
    sock.connect(&SocketAddr::new(flow.dst, flow.dport).into())?;
    let client = TcpStream::from(sock);
    let (mut server, _) = listener.accept()?;
    (&client).write_all(b"x")?;
    server.read_exact(&mut [0u8; 1])?;
    Ok(Established {
        client,
        server,
        listener,
    })
}
