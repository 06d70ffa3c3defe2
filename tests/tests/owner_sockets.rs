//! The owner check against real sockets: inside a network namespace, with the VIPs on `lo`,
//! real TCP connections (established, time-wait, SYN-cookie handshakes) and UDP sockets decide
//! whether a steered packet is accepted here or passed on.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cdn_common::{counters::Reason, maps::SERVICE_UDP_OWNER};
use cdn_tests::{
    netns::Netns,
    packets::{Flow, Tcp, Vlan, decapsulated, frame, ip_packet, steering_frame},
    scenario::{
        CLIENT_V4, CLIENT_V6, SELF_ID, STEER_PORT, Scenario, TABLE_SIZE, UNDERLAY_V4, VIP_V4,
        VIP_V6, addr, member_addr, service,
    },
    xdp,
};
use socket2::{Domain, Protocol, Socket, Type};

/// A namespace with the VIPs and the client addresses on `lo`.
fn lab() -> Result<Netns> {
    let ns = Netns::new("owner")?;
    for a in [
        "192.0.2.10/32",
        "198.51.100.7/32",
        "2001:db8::10/128",
        "2001:db8:ffff::7/128",
    ] {
        ns.ip(&["addr", "add", a, "dev", "lo"])?;
    }
    ns.sh("sysctl -qw net.ipv4.tcp_syncookies=2")?;
    Ok(ns)
}

/// A TCP client connection from `client:port` to `vip:443`.
fn connect_from(client: &str, port: u16, vip: &str) -> Result<TcpStream> {
    let local = SocketAddr::new(addr(client), port);
    let remote = SocketAddr::new(addr(vip), 443);
    let s = Socket::new(
        Domain::for_address(remote),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.bind(&local.into())?;
    s.connect(&remote.into())?;
    Ok(s.into())
}

/// Runs an inner packet through the owner path: steered from member 2 with `[4]` left.
fn owner_verdict(s: &mut Scenario, inner_frame: &[u8]) -> Result<(u32, Reason, Vec<u8>)> {
    let inner = ip_packet(inner_frame, Vlan::None);
    let input = steering_frame(
        member_addr(2),
        addr(UNDERLAY_V4),
        STEER_PORT,
        2,
        &[4],
        inner,
    )?;
    let run = s.run(&input)?;
    Ok((run.action, run.verdict(), run.out))
}

#[test]
fn established_and_time_wait_connections_are_found() -> Result<()> {
    let ns = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        for (client, vip) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
            let listener = TcpListener::bind(SocketAddr::new(addr(vip), 443))?;
            let mut client_conn = connect_from(client, 40100, vip)?;
            let (mut server_conn, _) = listener.accept()?;
            client_conn.write_all(b"GET")?;
            let mut buf = [0u8; 3];
            server_conn.read_exact(&mut buf)?;

            let known = Flow::tcp(client, 40100, vip, 443);
            let inner = frame(&known, Tcp::ACK, Vlan::None, b"more");
            let (action, verdict, out) = owner_verdict(&mut s, &inner)?;
            assert_eq!(
                (action, verdict),
                (xdp::PASS, Reason::OwnerAccept),
                "{client}"
            );
            assert_eq!(out, decapsulated(ip_packet(&inner, Vlan::None)));

            // Same listener, a client port nobody connected from: not ours.
            let unknown = Flow::tcp(client, 40101, vip, 443);
            let (action, verdict, _) =
                owner_verdict(&mut s, &frame(&unknown, Tcp::ACK, Vlan::None, b"x"))?;
            assert_eq!((action, verdict), (xdp::TX, Reason::PassedOn), "{client}");

            // The ingress path finds the same socket when this node is the first hop.
            s.set_hops(&known, &[SELF_ID, 2])?;
            let run = s.run(&inner)?;
            assert_eq!(
                (run.action, run.verdict()),
                (xdp::PASS, Reason::LocalAccept)
            );

            // The server closes first, so its side ends in TIME-WAIT: still ours.
            drop(server_conn);
            let mut rest = Vec::new();
            client_conn.read_to_end(&mut rest)?;
            drop(client_conn);
            wait_for_time_wait(&ns, vip)?;
            let (action, verdict, _) = owner_verdict(&mut s, &inner)?;
            assert_eq!(
                (action, verdict),
                (xdp::PASS, Reason::OwnerAccept),
                "time-wait socket of {client}"
            );
        }
        Ok(())
    })?
}

fn wait_for_time_wait(ns: &Netns, vip: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let pattern = if vip.contains(':') {
        format!("[{vip}]:443")
    } else {
        format!("{vip}:443")
    };
    while Instant::now() < deadline {
        let out = ns.sh("ss -Htan state time-wait")?;
        if out.contains(&pattern) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no TIME-WAIT socket for {vip} appeared")
}

#[test]
fn only_connected_udp_sockets_claim_a_flow() -> Result<()> {
    let ns = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        // UDP 80 served too: an inner packet to a port no service serves is dropped before
        // any socket is looked at.
        for (prefix, len, offset) in [("192.0.2.0", 24, 0), ("2001:db8::", 64, TABLE_SIZE)] {
            let mut svc = service(offset);
            svc.udp_ports[1] = 80;
            s.dp.set_service(addr(prefix), len, &svc)?;
        }
        for (client, vip) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
            let connected = UdpSocket::bind(SocketAddr::new(addr(vip), 443))?;
            connected.connect(SocketAddr::new(addr(client), 5000))?;
            let unconnected = UdpSocket::bind(SocketAddr::new(addr(vip), 80))?;

            let f = Flow::udp(client, 5000, vip, 443);
            let (action, verdict, _) =
                owner_verdict(&mut s, &frame(&f, Tcp::ACK, Vlan::None, b"q"))?;
            assert_eq!(
                (action, verdict),
                (xdp::PASS, Reason::OwnerAccept),
                "{client}"
            );

            let f = Flow::udp(client, 5000, vip, 80);
            let (action, verdict, _) =
                owner_verdict(&mut s, &frame(&f, Tcp::ACK, Vlan::None, b"q"))?;
            assert_eq!((action, verdict), (xdp::TX, Reason::PassedOn), "{client}");
            drop((connected, unconnected));
        }
        Ok(())
    })?
}

/// Issue #13: a server with an unconnected UDP socket. In `connected` mode the flow is passed on
/// (and settles on the last hop, whichever that is); in `owner` mode the node the header
/// brings it to keeps it, although more hops are listed.
#[test]
fn owner_mode_keeps_flows_of_unconnected_udp_sockets() -> Result<()> {
    let ns = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        for (client, vip) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
            let server = UdpSocket::bind(SocketAddr::new(addr(vip), 443))?;
            let f = Flow::udp(client, 5001, vip, 443);
            let inner_frame = frame(&f, Tcp::ACK, Vlan::None, b"quic");

            s.set_service_flags(service(0).flags)?;
            let (action, verdict, _) = owner_verdict(&mut s, &inner_frame)?;
            assert_eq!((action, verdict), (xdp::TX, Reason::PassedOn), "{client}");

            s.set_service_flags(service(0).flags | SERVICE_UDP_OWNER)?;
            let (action, verdict, out) = owner_verdict(&mut s, &inner_frame)?;
            assert_eq!(
                (action, verdict),
                (xdp::PASS, Reason::UdpOwnerAccept),
                "{client}"
            );
            assert_eq!(
                out,
                decapsulated(ip_packet(&inner_frame, Vlan::None)),
                "{client}"
            );
            drop(server);
        }
        Ok(())
    })?
}

/// Sends a raw IPv4 SYN from `client:port` to `vip:443` and returns the SYN-ACK's sequence
/// number: with `tcp_syncookies=2` the listener answers every SYN with a cookie and keeps no
/// state, so only the cookie check can recognise the handshake's final ACK.
fn syn_cookie_handshake(client: &str, port: u16, vip: &str) -> Result<u32> {
    let sniffer = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
    sniffer.set_read_timeout(Some(Duration::from_secs(2)))?;
    let sender = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    let c: std::net::Ipv4Addr = client.parse()?;
    let v: std::net::Ipv4Addr = vip.parse()?;
    let mut syn = Vec::new();
    etherparse::PacketBuilder::ipv4(c.octets(), v.octets(), 64)
        .tcp(port, 443, 7_000_000, 64000)
        .syn()
        .write(&mut syn, &[])?;
    sender.send_to(&syn, &SocketAddr::new(IpAddr::V4(v), 0).into())?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    while Instant::now() < deadline {
        let n = sniffer.recv(&mut buf)?;
        // SAFETY: recv initialised the first n bytes.
        let bytes: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let Ok(pkt) = etherparse::SlicedPacket::from_ip(&bytes) else {
            continue;
        };
        if let Some(etherparse::TransportSlice::Tcp(tcp)) = pkt.transport
            && tcp.source_port() == 443
            && tcp.destination_port() == port
            && tcp.syn()
            && tcp.ack()
        {
            return Ok(tcp.sequence_number());
        }
    }
    let _ = sniffer.as_raw_fd();
    bail!("no SYN-ACK from the listener")
}

#[test]
fn syn_cookie_handshakes_are_recognised() -> Result<()> {
    let ns = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        let _listener = TcpListener::bind(SocketAddr::new(addr(VIP_V4), 443))?;
        let cookie = syn_cookie_handshake(CLIENT_V4, 40200, VIP_V4).context("handshake")?;
        let f = Flow::tcp(CLIENT_V4, 40200, VIP_V4, 443);
        let ack = Tcp {
            syn: false,
            ack: true,
            fin: false,
            seq: 7_000_001,
            ack_no: cookie.wrapping_add(1),
        };
        let (action, verdict, _) = owner_verdict(&mut s, &frame(&f, ack, Vlan::None, &[]))?;
        assert_eq!(
            (action, verdict),
            (xdp::PASS, Reason::OwnerAccept),
            "valid cookie"
        );

        let forged = Tcp {
            ack_no: cookie.wrapping_add(12345),
            ..ack
        };
        let (action, verdict, _) = owner_verdict(&mut s, &frame(&f, forged, Vlan::None, &[]))?;
        assert_eq!(
            (action, verdict),
            (xdp::TX, Reason::PassedOn),
            "invalid cookie"
        );
        Ok(())
    })?
}
