//! The data plane and the paths of `cargo xtask bench`, set up once: `cdn-bench` times them,
//! `cdn-insns` counts their instructions, and the cross-check test runs both the kernel and the
//! interpreter over the same frames and maps.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
};

use anyhow::{Context as _, Result};
use cdn_common::{
    maps::{PROGRAM_NAME, SERVICE_UDP_LOCAL, SERVICE_UDP_OWNER, Service},
    quic_lb::QuicLbConfig,
    wire::STEER_VERSION_SEARCH,
};

use super::{
    Env, Fib, KernelMaps, KernelSizes, Program, Proto, Socket, SocketTable,
    helpers::{TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN},
};
use crate::{
    netns::Netns,
    packets::{
        Flow, Tcp, Vlan, frame, ip_packet, quic_cid, quic_initial, quic_short, steering_frame,
    },
    scenario::{
        CLIENT_V4, CLIENT_V6, SEARCH_BUDGET, SELF_ID, STEER_PORT, Scenario, UNDERLAY_V4, VIP_V4,
        VIP_V6, addr, member_addr, quic_service, service, with_pops,
    },
    xdp,
};

/// The addresses the benchmark's namespace gives its loopback: the VIPs and the clients.
const ADDRESSES: [&str; 4] = [
    "192.0.2.10/32",
    "198.51.100.7/32",
    "2001:db8::10/128",
    "2001:db8:ffff::7/128",
];

/// One VIP per other UDP placement mode, inside the scenario's prefix.
const VIP_UDP_OWNER: &str = "192.0.2.20";
const VIP_UDP_LOCAL: &str = "192.0.2.30";
/// A QUIC service (UDP 443 routed by connection ID), sharing the scenario's table.
const VIP_QUIC: &str = "192.0.2.40";
const QUIC_BENCH: QuicLbConfig = QuicLbConfig {
    config_id: 1,
    server_id_len: 2,
    cid_len: 8,
};
/// Member 2's server ID.
const QUIC_SERVER: u32 = 0x0202;
/// A service that searches PoPs 1 and 2 (README "PoPs"), sharing the scenario's table as its
/// own PoP's.
const VIP_POPS: &str = "192.0.2.50";
const OTHER_POPS: u8 = 0b110;

pub struct BenchPath {
    /// The row's name in `cargo xtask bench`.
    pub name: &'static str,
    pub frame: Vec<u8>,
    /// The XDP action the benchmark expects.
    pub action: u32,
}

/// Flows whose frames other benchmarks build variants of.
pub struct BenchFlows {
    /// The established connection the socket-lookup paths find.
    pub established: Flow,
    /// A flow nobody holds (the owner passes it on).
    pub unknown: Flow,
}

/// The benchmark's data plane, its paths, and the sockets it holds open.
pub struct Bench {
    pub scenario: Scenario,
    pub paths: Vec<BenchPath>,
    /// The flows of the owner paths, for frames built from theirs (signed ones).
    pub flows: BenchFlows,
    /// The sockets above, as the interpreter's lookup helpers see them.
    pub sockets: SocketTable,
    _open: (TcpStream, TcpStream, TcpListener, UdpSocket),
}

/// Runs `f` in a fresh network namespace holding the benchmark's addresses.
pub fn in_namespace<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = Netns::new("insns")?;
    for a in ADDRESSES {
        ns.ip(&["addr", "add", a, "dev", "lo"])?;
    }
    ns.enter(f)?
}

/// Frames of a realistic size: 64 bytes of payload, rounded up to a multiple of 8.
fn padded(build: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    let len = build(64).len();
    build(64 + (8 - len % 8) % 8)
}

impl Bench {
    /// Loads and configures the data plane as `cdn-bench` does. Call inside [`in_namespace`].
    pub fn new() -> Result<Self> {
        let mut s = Scenario::new()?;
        // A real established connection for the socket-lookup paths.
        let listener = TcpListener::bind(SocketAddr::new(addr(VIP_V4), 443))?;
        let client = {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.bind(&SocketAddr::new(addr(CLIENT_V4), 41000).into())?;
            sock.connect(&SocketAddr::new(addr(VIP_V4), 443).into())?;
            TcpStream::from(sock)
        };
        let (mut server, _) = listener.accept()?;
        (&client).write_all(b"x")?;
        server.read_exact(&mut [0u8; 1])?;
        // An unconnected UDP server socket, which proves no ownership.
        let udp_server = UdpSocket::bind(SocketAddr::new(addr(VIP_V4), 443))?;
        for (vip, mode) in [
            (VIP_UDP_OWNER, SERVICE_UDP_OWNER),
            (VIP_UDP_LOCAL, SERVICE_UDP_LOCAL),
        ] {
            let base = service(0);
            let svc = Service {
                flags: base.flags | mode,
                ..base
            };
            s.dp.set_service(addr(vip), 32, &svc)?;
        }
        s.dp.set_service(addr(VIP_QUIC), 32, &quic_service(0, &QUIC_BENCH))?;
        s.dp.set_service(
            addr(VIP_POPS),
            32,
            &with_pops(service(0), false, OTHER_POPS),
        )?;
        s.update_config(|c| c.search_budget = SEARCH_BUDGET)?;
        let sock = |proto, local, remote, state| Socket {
            proto,
            local,
            remote,
            state,
        };
        let sockets = SocketTable {
            sockets: vec![
                sock(Proto::Tcp, listener.local_addr()?, None, TCP_LISTEN),
                sock(
                    Proto::Tcp,
                    server.local_addr()?,
                    Some(server.peer_addr()?),
                    TCP_ESTABLISHED,
                ),
                sock(
                    Proto::Tcp,
                    client.local_addr()?,
                    Some(client.peer_addr()?),
                    TCP_ESTABLISHED,
                ),
                sock(Proto::Udp, udp_server.local_addr()?, None, TCP_CLOSE),
            ],
            // The benchmark's ACKs carry no SYN cookie.
            syncookies_valid: false,
        };
        let (paths, flows) = paths(&mut s)?;
        Ok(Self {
            scenario: s,
            paths,
            flows,
            sockets,
            _open: (client, server, listener, udp_server),
        })
    }

    /// The path named `name`.
    pub fn path(&self, name: &str) -> Result<&BenchPath> {
        self.paths
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no benchmark path {name:?}"))
    }

    /// The loaded `cdn_steer` program, linked and decoded from the embedded object, with its
    /// kernel maps and the kernel's view of its size.
    pub fn interpreter(&mut self) -> Result<(Program, KernelMaps, KernelSizes)> {
        let program = Program::from_object(cdn_user::dataplane::object::bytes(), PROGRAM_NAME)?;
        let info = self.scenario.dp.program()?.info()?;
        let maps = KernelMaps::of_program(&info, &program)?;
        Ok((program, maps, KernelSizes::of(&info)))
    }

    /// The surroundings of a run: the test run's loopback (ifindex 1 in a fresh namespace) and
    /// no route to any member, as in the benchmark's namespace.
    pub fn env<'a>(&'a self, maps: &'a KernelMaps) -> Env<'a> {
        Env {
            maps,
            sockets: &self.sockets,
            fib: Fib::Miss,
            ingress_ifindex: 1,
        }
    }
}

fn paths(s: &mut Scenario) -> Result<(Vec<BenchPath>, BenchFlows)> {
    let fwd4 = Flow::tcp(CLIENT_V4, 40000, VIP_V4, 443);
    let fwd6 = Flow::tcp(CLIENT_V6, 40000, VIP_V6, 443);
    let local_syn = Flow::tcp(CLIENT_V4, 40001, VIP_V4, 443);
    let established = Flow::tcp(CLIENT_V4, 41000, VIP_V4, 443);
    let unknown = Flow::tcp(CLIENT_V4, 41001, VIP_V4, 443);
    s.set_hops(&fwd4, &[2, 4])?;
    s.set_hops(&fwd6, &[2, 4])?;
    s.set_hops(&local_syn, &[SELF_ID, 2])?;
    s.set_hops(&established, &[SELF_ID, 2])?;
    // Each UDP flow gets a source port whose bucket no other flow uses, so every path sees its
    // own hop list.
    let mut used: Vec<u32> = [&fwd4, &local_syn, &established, &unknown]
        .iter()
        .map(|f| s.bucket_index(f))
        .collect();
    // A flow made by `make` from a port of `ports` whose bucket no other path's flow uses.
    let mut free_flow =
        |ports: std::ops::Range<u16>, make: &dyn Fn(u16) -> Flow, what: &str| -> Result<Flow> {
            ports
                .map(make)
                .find(|f| {
                    let b = s.bucket_index(f);
                    let free = !used.contains(&b);
                    if free {
                        used.push(b);
                    }
                    free
                })
                .with_context(|| format!("a free bucket for {what}"))
        };
    // The search paths' flow (nobody holds it): this node ends its PoP's chain, PoP 1's
    // owner is member 2, PoP 2's member 4.
    let tcp_pops = |sport| Flow::tcp(CLIENT_V4, sport, VIP_POPS, 443);
    let searched = free_flow(43000..44000, &tcp_pops, "the search paths")?;
    // A flow a claim taught this node (README "PoPs: learned owners"): member 4 holds it,
    // while this PoP's table names member 2; its bucket's bit is set, and no other path's
    // flow shares the bucket.
    let learned = free_flow(44000..45000, &tcp_pops, "the learned flow")?;
    let mut udp_flow = |vip: &str| -> Result<Flow> {
        free_flow(
            42000..43000,
            &|sport| Flow::udp(CLIENT_V4, sport, vip, 443),
            "a UDP flow",
        )
    };
    let udp_connected = udp_flow(VIP_V4)?;
    let udp_owner_fwd = udp_flow(VIP_UDP_OWNER)?;
    let udp_owner_self = udp_flow(VIP_UDP_OWNER)?;
    let udp_local = udp_flow(VIP_UDP_LOCAL)?;
    let quic_cid_flow = udp_flow(VIP_QUIC)?;
    let quic_initial_flow = udp_flow(VIP_QUIC)?;
    s.set_hops(&udp_connected, &[SELF_ID, 2, 4])?;
    s.set_hops(&udp_owner_fwd, &[2, 4])?;
    s.set_hops(&udp_owner_self, &[SELF_ID, 2])?;
    s.set_hops(&udp_local, &[2, 4])?;
    // QUIC: the CID names member 2 while the bucket names this node; the Initial hashes to 2.
    s.set_hops(&quic_cid_flow, &[SELF_ID, 4])?;
    s.set_hops(&quic_initial_flow, &[2, 4])?;
    s.dp.set_quic_server(QUIC_SERVER, Some(2))?;
    s.set_hops(&searched, &[SELF_ID])?;
    s.set_pop_hops(1, &searched, &[2])?;
    s.set_pop_hops(2, &searched, &[4])?;
    s.set_hops(&learned, &[2, 5])?;
    s.set_learned(&learned, Some(4))?;
    s.set_learned_bit(&learned, true)?;
    let cid = quic_cid(&QUIC_BENCH, QUIC_SERVER, 7);
    let steered = |flow: &Flow, hops: &[u16]| -> Result<Vec<u8>> {
        let inner = padded(|n| {
            let f = frame(flow, Tcp::ACK, Vlan::None, &vec![0u8; n]);
            let mut framed = vec![0u8; 50];
            framed.extend_from_slice(ip_packet(&f, Vlan::None));
            framed
        });
        steering_frame(
            member_addr(2),
            addr(UNDERLAY_V4),
            STEER_PORT,
            2,
            hops,
            &inner[50..],
        )
    };
    // A search from member 2, started by member 4, with PoP 2 left.
    let search = |flow: &Flow| -> Result<Vec<u8>> {
        let mut f = steered(flow, &[4, 0])?;
        f[14 + 20 + 8] = STEER_VERSION_SEARCH;
        f[14 + 20 + 8 + 3] = 0b100;
        Ok(f)
    };
    let plain = |flow: &Flow, tcp: Tcp| padded(|n| frame(flow, tcp, Vlan::None, &vec![0u8; n]));
    let non_vip = Flow::tcp(CLIENT_V4, 1, "203.0.113.1", 443);
    let path = |name, frame, action| BenchPath {
        name,
        frame,
        action,
    };
    let paths = vec![
        path("non-VIP pass", plain(&non_vip, Tcp::ACK), xdp::PASS),
        path(
            "ingress forward IPv4 (established flow)",
            plain(&fwd4, Tcp::ACK),
            xdp::TX,
        ),
        path(
            "ingress forward IPv6 (established flow)",
            plain(&fwd6, Tcp::ACK),
            xdp::TX,
        ),
        path(
            "ingress local accept (new SYN)",
            plain(&local_syn, Tcp::SYN),
            xdp::PASS,
        ),
        path(
            "ingress local accept (socket lookup)",
            plain(&established, Tcp::ACK),
            xdp::PASS,
        ),
        path(
            "owner accept (socket lookup, decap)",
            steered(&established, &[4])?,
            xdp::PASS,
        ),
        path(
            "owner pass-on to next hop",
            steered(&unknown, &[4])?,
            xdp::TX,
        ),
        path(
            "UDP connected: first hop, unconnected sock",
            plain(&udp_connected, Tcp::ACK),
            xdp::TX,
        ),
        path(
            "UDP owner: forward to owner",
            plain(&udp_owner_fwd, Tcp::ACK),
            xdp::TX,
        ),
        path(
            "UDP owner: accept as owner",
            plain(&udp_owner_self, Tcp::ACK),
            xdp::PASS,
        ),
        path(
            "UDP owner: steered, accept (decap)",
            steered(&udp_owner_fwd, &[4])?,
            xdp::PASS,
        ),
        path("UDP local: accept", plain(&udp_local, Tcp::ACK), xdp::PASS),
        path(
            "search start (chain end -> other PoP)",
            plain(&searched, Tcp::ACK),
            xdp::TX,
        ),
        path(
            "search receive, pass on to next PoP",
            search(&searched)?,
            xdp::TX,
        ),
        path(
            "search accept (socket lookup, decap)",
            search(&established)?,
            xdp::PASS,
        ),
        path(
            "learned forward (claimed flow -> its PoP)",
            plain(&learned, Tcp::ACK),
            xdp::TX,
        ),
        path(
            "QUIC short header, CID -> other member",
            padded(|n| {
                frame(
                    &quic_cid_flow,
                    Tcp::ACK,
                    Vlan::None,
                    &quic_short(&cid, &vec![0u8; n]),
                )
            }),
            xdp::TX,
        ),
        path(
            "QUIC Initial (hash)",
            padded(|n| {
                frame(
                    &quic_initial_flow,
                    Tcp::ACK,
                    Vlan::None,
                    &quic_initial(&[0xe5; 8], n),
                )
            }),
            xdp::TX,
        ),
    ];
    Ok((
        paths,
        BenchFlows {
            established,
            unknown,
        },
    ))
}
