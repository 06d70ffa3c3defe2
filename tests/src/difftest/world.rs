//! The node the differential test runs against: its maps (written through `DataPlane`), the
//! namespace's interfaces and sockets, and the same state as the model's [`Env`].

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
};

use anyhow::{Context as _, Result};
use cdn_common::{
    maps::{
        Bucket, Link, MAX_POPS, NO_MEMBER, NODE_READY, NODE_STEER_AUTH, NODE_UNDERLAY_IFACES,
        NodeConfig, SERVICE_ALL_PORTS, SERVICE_PLACE_ELSEWHERE, SERVICE_PLACE_POP_SHIFT,
        SERVICE_QUIC, SERVICE_TCP, SERVICE_UDP, SERVICE_UDP_LOCAL, SERVICE_UDP_OWNER, Service,
    },
    quic_lb::QuicLbConfig,
};
use cdn_user::dataplane::{DataPlane, LoadOptions};
use rand::{Rng, rngs::StdRng};

use crate::{
    model::{
        Env, Hop, Rules, auth,
        frame::{Flow, Kind, PROTO_TCP, PROTO_UDP},
    },
    netns::Netns,
};

pub const KEY: [u64; 2] = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
pub const STEER_PORT: u16 = 6080;
pub const SELF_ID: u16 = 1;
pub const BUDGET: u8 = 3;
/// Buckets per table (prime, small: every bucket is hit many times).
pub const TABLE: u32 = 31;
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];

pub const UNDERLAY_V4: [u8; 4] = [10, 0, 0, 1];
pub const UNDERLAY_V6: &str = "fd00::1";
pub const CLIENT_V4: &str = "198.51.100.7";
pub const CLIENT_V6: &str = "2001:db8:ffff::7";
/// Live sockets: TCP client port, UDP client port, both to VIP port 443.
pub const LIVE_TCP_PORT: u16 = 41000;
pub const LIVE_UDP_PORT: u16 = 42000;

/// (id, underlay address). 1 is this node; 6 has no next hop, 7 a stale one (both go
/// through the FIB, which has no route to them here).
pub const MEMBERS: [(u16, &str); 8] = [
    (0, "10.0.0.10"),
    (1, "10.0.0.1"),
    (2, "10.0.0.2"),
    (3, "fd00::3"),
    (4, "10.0.0.4"),
    (5, "fd00::5"),
    (6, "10.0.0.6"),
    (7, "fd00::7"),
];
/// Underlay-looking addresses of nobody.
pub const STRANGERS: [&str; 3] = ["10.0.0.99", "fd00::99", "203.0.113.5"];

/// One VIP prefix: (prefix, length, service flags, table slot; `None`: no table).
pub struct Vip {
    pub prefix: &'static str,
    pub len: u8,
    pub flags: u32,
    pub table: Option<u32>,
}

const CONNECTED: u32 = SERVICE_TCP | SERVICE_UDP;
pub const VIPS: [Vip; 10] = [
    Vip {
        prefix: "192.0.2.0",
        len: 24,
        flags: CONNECTED,
        table: Some(0),
    },
    Vip {
        prefix: "192.0.2.20",
        len: 32,
        flags: CONNECTED | SERVICE_UDP_OWNER,
        table: Some(1),
    },
    Vip {
        prefix: "192.0.2.30",
        len: 32,
        flags: CONNECTED | SERVICE_UDP_LOCAL,
        table: Some(1),
    },
    Vip {
        prefix: "192.0.2.40",
        len: 32,
        flags: SERVICE_TCP | SERVICE_ALL_PORTS,
        table: Some(2),
    },
    Vip {
        prefix: "192.0.2.50",
        len: 32,
        flags: CONNECTED,
        table: None,
    },
    Vip {
        prefix: "2001:db8::",
        len: 64,
        flags: CONNECTED,
        table: Some(3),
    },
    Vip {
        prefix: "2001:db8::20",
        len: 128,
        flags: CONNECTED | SERVICE_UDP_OWNER,
        table: Some(1),
    },
    Vip {
        prefix: "2001:db8::30",
        len: 128,
        flags: CONNECTED | SERVICE_UDP_LOCAL,
        table: Some(2),
    },
    Vip {
        prefix: "2001:db8::40",
        len: 128,
        flags: SERVICE_UDP | SERVICE_ALL_PORTS,
        table: Some(0),
    },
    Vip {
        prefix: "2001:db8::50",
        len: 128,
        flags: CONNECTED,
        table: None,
    },
];
const TABLES: u32 = 4;

pub fn addr(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Interfaces the frames come in on: (name, ifindex). The first is the underlay.
pub struct Links {
    pub underlay: u32,
    pub uplink: u32,
    pub lo: u32,
}

/// Creates the namespace with the addresses the sockets need and two veth pairs (underlay, uplink).
pub fn namespace() -> Result<(Netns, Links)> {
    let ns = Netns::new("difftest")?;
    let mut batch = String::new();
    for a in [
        "192.0.2.10/32",
        "198.51.100.7/32",
        "2001:db8::10/128",
        "2001:db8:ffff::7/128",
    ] {
        batch += &format!("addr add {a} dev lo\n");
    }
    batch += "link add ul0 type veth peer name ul1\nlink add up0 type veth peer name up1\n";
    batch += "link set ul0 up\nlink set ul1 up\nlink set up0 up\nlink set up1 up\n";
    ns.ip_batch(&batch)?;
    let links = Links {
        underlay: ns.ifindex("ul0")?,
        uplink: ns.ifindex("up0")?,
        lo: ns.ifindex("lo")?,
    };
    Ok((ns, links))
}

/// The live sockets; kept open for the whole run.
pub struct Sockets {
    _held: Vec<Box<dyn std::any::Any>>,
}

/// An established TCP connection client:LIVE_TCP_PORT -> vip:443 with its listener, a
/// connected UDP pair client:LIVE_UDP_PORT <-> vip:443 and an unconnected UDP socket on
/// vip:4433, for each family. Call from inside the namespace.
pub fn sockets(env: &mut Env) -> Result<Sockets> {
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
    for (client, vip) in [(CLIENT_V4, "192.0.2.10"), (CLIENT_V6, "2001:db8::10")] {
        let (client, vip) = (addr(client), addr(vip));
        let listener = TcpListener::bind(SocketAddr::new(vip, 443)).context("TCP listener")?;
        let domain = if vip.is_ipv6() {
            socket2::Domain::IPV6
        } else {
            socket2::Domain::IPV4
        };
        let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        sock.bind(&SocketAddr::new(client, LIVE_TCP_PORT).into())?;
        sock.connect(&SocketAddr::new(vip, 443).into())?;
        let stream = TcpStream::from(sock);
        let (mut server, _) = listener.accept()?;
        (&stream).write_all(b"x")?;
        server.read_exact(&mut [0u8; 1])?;
        env.tcp_established
            .insert((client, LIVE_TCP_PORT, vip, 443));
        env.tcp_established
            .insert((vip, 443, client, LIVE_TCP_PORT));
        let udp_server = UdpSocket::bind(SocketAddr::new(vip, 443))?;
        udp_server.connect(SocketAddr::new(client, LIVE_UDP_PORT))?;
        let udp_client = UdpSocket::bind(SocketAddr::new(client, LIVE_UDP_PORT))?;
        udp_client.connect(SocketAddr::new(vip, 443))?;
        env.udp_connected.insert((client, LIVE_UDP_PORT, vip, 443));
        env.udp_connected.insert((vip, 443, client, LIVE_UDP_PORT));
        let unconnected = UdpSocket::bind(SocketAddr::new(vip, 4433))?;
        held.extend([
            Box::new(listener) as Box<dyn std::any::Any>,
            Box::new(stream),
            Box::new(server),
            Box::new(udp_server),
            Box::new(udp_client),
            Box::new(unconnected),
        ]);
    }
    Ok(Sockets { _held: held })
}

/// The flows of the live sockets (TCP and UDP, IPv4 and IPv6), client -> VIP.
fn live_flows() -> Vec<Flow> {
    let mut out = Vec::new();
    for (client, vip) in [(CLIENT_V4, "192.0.2.10"), (CLIENT_V6, "2001:db8::10")] {
        for (kind, proto, port) in [
            (Kind::Tcp, PROTO_TCP, LIVE_TCP_PORT),
            (Kind::Udp, PROTO_UDP, LIVE_UDP_PORT),
        ] {
            out.push(Flow {
                kind,
                v6: vip.contains(':'),
                proto,
                tcp_flags: 0,
                src: addr(client),
                dst: addr(vip),
                sport: port,
                dport: 443,
            });
        }
    }
    out
}

/// Writes the node's configuration as `env` has it, with the steering-trust settings (spec
/// §1 and §5) when `rules` has them: the underlay interface map and its flag, `steer_auth`
/// and the auth key.
pub fn write_config(dp: &mut DataPlane, env: &Env, rules: &Rules) -> Result<()> {
    let mut cfg = env.cfg;
    if rules.underlay_ifaces && !env.underlay_ifindexes.is_empty() {
        dp.set_underlay_ifaces(&env.underlay_ifindexes)?;
        cfg.flags |= NODE_UNDERLAY_IFACES;
    }
    if rules.mac {
        cfg.auth_key = env.auth_key;
        if env.steer_auth {
            cfg.flags |= NODE_STEER_AUTH;
        }
    }
    Ok(dp.write_config(&cfg)?)
}

pub fn node_config(draining: bool, max_frame: u32, hop_budget: u8) -> NodeConfig {
    let v6: std::net::Ipv6Addr = UNDERLAY_V6.parse().expect("address");
    NodeConfig {
        hash_key: KEY,
        underlay_v4: UNDERLAY_V4,
        underlay_v6: v6.octets(),
        steer_port: STEER_PORT,
        self_member: SELF_ID,
        flags: NODE_READY
            | if draining {
                cdn_common::maps::NODE_DRAINING
            } else {
                0
            },
        hop_budget,
        max_frame,
        // PoP 0 of three, as the controller sets it for the services that search
        // (`with_pops`); none without a hop budget.
        self_pop: 0,
        search_budget: 2 * hop_budget,
        ..NodeConfig::default()
    }
}

/// VIPs whose UDP 443 is QUIC (4433 stays plain UDP), and their QUIC-LB configurations: a
/// `connected` and an `owner` service, two server ID lengths.
pub const QUIC_VIPS: [(&str, QuicLbConfig); 3] = [
    (
        "192.0.2.0",
        QuicLbConfig {
            config_id: 2,
            server_id_len: 1,
            cid_len: 8,
        },
    ),
    (
        "192.0.2.20",
        QuicLbConfig {
            config_id: 0,
            server_id_len: 2,
            cid_len: 20,
        },
    ),
    (
        "2001:db8::",
        QuicLbConfig {
            config_id: 6,
            server_id_len: 2,
            cid_len: 7,
        },
    ),
];

/// Server IDs the frames' connection IDs use (small, so that they often name a member).
pub const QUIC_SERVER_IDS: u32 = 12;

fn service(vip: &Vip) -> Service {
    let mut tcp_ports = [0u16; 8];
    tcp_ports[..2].copy_from_slice(&[80, 443]);
    let mut udp_ports = [0u16; 8];
    udp_ports[..2].copy_from_slice(&[443, 4433]);
    let (mut quic_ports, mut flags, mut q) = ([0u16; 8], vip.flags, None);
    if let Some((_, cfg)) = QUIC_VIPS.iter().find(|(p, _)| *p == vip.prefix) {
        quic_ports[0] = 443;
        flags |= SERVICE_QUIC;
        q = Some(*cfg);
    }
    let q = q.unwrap_or(QuicLbConfig {
        config_id: 0,
        server_id_len: 0,
        cid_len: 0,
    });
    Service {
        quic_ports,
        quic_config_id: q.config_id,
        quic_server_id_len: q.server_id_len,
        quic_cid_len: q.cid_len,
        flags,
        table_offset: vip.table.unwrap_or(0) * TABLE,
        table_size: if vip.table.is_some() { TABLE } else { 0 },
        tcp_ports,
        udp_ports,
        generation: 1,
        ..Service::default()
    }
}

/// Other PoPs for a service (README "PoPs"): PoP 0, this node's, has the service's own table;
/// the others one of the world's tables each, or now and then an offset past `TABLE`. The PoPs
/// searched: a random set without PoP 0 (PoPs up to the eighth). Now and then another PoP
/// places new connections.
fn with_pops(svc: &mut Service, rng: &mut StdRng) {
    let own = svc.table_offset;
    for (pop, slot) in svc.pop_tables.iter_mut().enumerate() {
        *slot = match (pop, rng.random_range(0..10)) {
            (0, _) => own,
            (_, 0) => TABLES * TABLE + 7,
            _ => rng.random_range(0..TABLES) * TABLE,
        };
    }
    svc.search_pops = rng.random::<u8>() & !1 | 0b10;
    // Now and then this node's PoP has no eligible member: new connections are placed by
    // another PoP's table (README "PoPs: fallback").
    if rng.random_range(0..4) == 0 {
        let pop = rng.random_range(1..MAX_POPS as u32);
        svc.flags |= SERVICE_PLACE_ELSEWHERE | pop << SERVICE_PLACE_POP_SHIFT;
    }
}

/// A random hop list: owner first, then previous owners; ids include this node, members
/// without a next hop, an id with no address and one beyond the member array.
fn random_bucket(rng: &mut StdRng) -> Bucket {
    let pick = |rng: &mut StdRng| match rng.random_range(0..20) {
        0 => 9,
        1 => 1500,
        2 => NO_MEMBER,
        3..7 => SELF_ID,
        n => n % 8,
    };
    let mut b = Bucket::EMPTY;
    let n = rng.random_range(0..=3);
    for slot in b.hops.iter_mut().take(n) {
        *slot = pick(rng);
    }
    b
}

/// Loads the program, writes every map and returns the model's view of the same state.
pub fn load(rng: &mut StdRng, links: &Links) -> Result<(DataPlane, Env)> {
    let mut dp = DataPlane::load(&LoadOptions {
        table_entries: TABLES * TABLE,
        pin_dir: None,
    })
    .context("loading the XDP program")?;
    let mut env = Env {
        cfg: node_config(false, 0, BUDGET),
        services: Vec::new(),
        table: Vec::new(),
        members: BTreeMap::new(),
        next_hops: BTreeMap::new(),
        tcp_established: HashSet::new(),
        udp_connected: HashSet::new(),
        underlay_ifindexes: vec![links.underlay],
        steer_auth: false,
        auth_key: auth::derive_key(KEY),
        quic_servers: BTreeMap::new(),
        learned: BTreeMap::new(),
        learned_buckets: BTreeSet::new(),
    };
    // Some server IDs name members (this node, members without a next hop or address
    // among them), the others nobody.
    for id in 0..QUIC_SERVER_IDS {
        if id == 1 || rng.random_range(0..3) > 0 {
            // Server ID 1 is always this node's own.
            let member = if id == 1 {
                SELF_ID
            } else {
                [SELF_ID, 0, 2, 3, 4, 6, 7, 9][rng.random_range(0..8)]
            };
            dp.set_quic_server(id, Some(member))?;
            env.quic_servers.insert(id, member);
        }
    }
    for (id, a) in MEMBERS {
        dp.set_member(id, Some(addr(a)))?;
        env.members.insert(id, addr(a));
        let ifindex = if id % 2 == 0 {
            links.underlay
        } else {
            links.uplink
        };
        let hop = match id {
            1 | 6 => continue,
            7 => Hop {
                dst_mac: [2, 0, 0, 0, 0x10, 7],
                src_mac: NODE_MAC,
                ifindex,
                fresh: false,
            },
            _ => Hop {
                dst_mac: [2, 0, 0, 0, 0x10, id as u8],
                src_mac: NODE_MAC,
                ifindex,
                fresh: true,
            },
        };
        // A stale entry is one the controller invalidated: the program asks the FIB.
        if hop.fresh {
            dp.set_next_hop(
                id,
                &Link {
                    ifindex: hop.ifindex,
                    dst_mac: hop.dst_mac,
                    src_mac: hop.src_mac,
                },
            )?;
        } else {
            dp.clear_next_hop(id)?;
        }
        env.next_hops.insert(id, hop);
    }
    for vip in &VIPS {
        let mut svc = service(vip);
        if vip.table.is_some() && rng.random_range(0..4) > 0 {
            with_pops(&mut svc, rng);
        }
        dp.set_service(addr(vip.prefix), vip.len, &svc)?;
        env.services.push((addr(vip.prefix), vip.len, svc));
    }
    env.table = (0..TABLES * TABLE).map(|_| random_bucket(rng)).collect();
    // The live flows' buckets name this node first, so that direct packets of those flows
    // reach the socket check here (and their ICMP errors too: same bucket).
    for (flow, hops) in live_flows().into_iter().zip([
        [SELF_ID, 2, 4],
        [SELF_ID, 3, NO_MEMBER],
        [SELF_ID, 0, NO_MEMBER],
        [SELF_ID, NO_MEMBER, NO_MEMBER],
    ]) {
        let (index, _) = env
            .bucket_index(&flow)
            .context("live flow without a table")?;
        env.table[index] = Bucket { hops, _pad: 0 };
    }
    dp.write_buckets(0, &env.table)?;
    learn(&mut dp, &mut env, rng)?;
    dp.write_config(&env.cfg)?;
    Ok((dp, env))
}

/// Learned owners (README "PoPs: learned owners"): the live flows (the ones packets hit
/// most) and a variant of each get a `LEARNED` entry, naming members with a fresh next hop on
/// either interface, one with a stale one, this node, nobody and member 0. A random half of
/// the bucket bits is set; the bits of the entries naming members 2 and 3 always, those of
/// members 0 and 6 never (unless shared with the former), so that entries without their bit,
/// bits without an entry and learned forwards all occur.
fn learn(dp: &mut DataPlane, env: &mut Env, rng: &mut StdRng) -> Result<()> {
    const OWNERS: [u16; 8] = [2, 3, 7, SELF_ID, 0, NO_MEMBER, 6, 4];
    let mut learned = crate::scenario::learned_map(dp)?;
    let mut word = 0u32;
    for bucket in 0..TABLE {
        if rng.random_range(0..2) == 0 {
            word |= 1 << bucket;
        }
    }
    // Bits always set (learned forwards) and always clear (entries the bit hides).
    let (mut set, mut clear) = (0u32, 0u32);
    let flows = live_flows()
        .into_iter()
        .flat_map(|f| [443, 80].map(|dport| Flow { dport, ..f }));
    for (flow, member) in flows.zip(OWNERS) {
        let mapped = |a: IpAddr| match a {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        let key = cdn_common::maps::FlowKey {
            client: mapped(flow.src),
            vip: mapped(flow.dst),
            client_port: flow.sport.to_be(),
            vip_port: flow.dport.to_be(),
            proto: flow.proto,
            _pad: [0; 3],
        };
        let value = cdn_common::maps::Learned {
            member,
            ..Default::default()
        };
        learned.insert(key, value, 0)?;
        env.learned.insert(
            (flow.src, flow.dst, flow.sport, flow.dport, flow.proto),
            member,
        );
        let (_, hash) = env
            .bucket_index(&flow)
            .context("live flow without a table")?;
        let bit = 1 << (hash % u64::from(TABLE));
        match member {
            2 | 3 => set |= bit,
            0 | 6 => clear |= bit,
            _ => {}
        }
    }
    word = (word & !clear) | set;
    env.learned_buckets = (0..TABLE).filter(|b| word & 1 << b != 0).collect();
    let mut words = crate::scenario::learned_buckets_map(dp)?;
    words.set(0, word, 0)?;
    Ok(())
}
