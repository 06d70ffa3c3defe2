//! `cargo xtask bench`: cost per packet of each path of the XDP program, measured with
//! BPF_PROG_TEST_RUN next to a baseline measured in the same round.
//!
//! With `repeat > 1` the kernel runs a program again and again on the same buffer, so a path
//! that rewrites the packet would see its own output from the second run on. Every path is
//! therefore timed through `bench_steer`, a wrapper in the object that saves the frame, runs
//! the real path and restores the frame, against `bench_baseline`, the same wrapper around
//! nothing: net = wrapper(path) - wrapper(nothing). Paths that leave the packet untouched are
//! also timed directly (`cdn_steer` against a bare XDP_PASS program) as a cross-check of the
//! wrapper method.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use cdn_common::{
    counters::Reason,
    maps::{
        BASELINE_PROGRAM_NAME, BENCH_BASELINE_PROGRAM_NAME, BENCH_PROGRAM_NAME, NODE_TRACE,
        PROGRAM_NAME, SERVICE_UDP_LOCAL, SERVICE_UDP_OWNER, Service,
    },
    quic_lb::QuicLbConfig,
    trace::{TRACE_MATCH_VIP, TraceFilter},
};
use cdn_tests::{
    netns::Netns,
    packets::{
        Flow, Tcp, Vlan, frame, ip_packet, quic_cid, quic_initial, quic_short,
        signed_steering_frame, steering_frame,
    },
    scenario::{
        CLIENT_V4, CLIENT_V6, KEY, SELF_ID, STEER_PORT, Scenario, UNDERLAY_V4, VIP_V4, VIP_V6,
        addr, member_addr, quic_service, service,
    },
    xdp,
};

struct Args {
    rounds: usize,
    repeat: u32,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        rounds: 7,
        repeat: 1_000_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<String> {
            it.next().with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--rounds" => args.rounds = value("--rounds")?.parse().context("--rounds")?,
            "--repeat" => args.repeat = value("--repeat")?.parse().context("--repeat")?,
            "-h" | "--help" => {
                println!(
                    "cdn-bench [--rounds N (7)] [--repeat N (1000000)]\n\
                     ns/packet of every XDP path, min and median over rounds, net of a trivial\n\
                     XDP_PASS program measured in the same run."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.rounds == 0 || args.repeat == 0 {
        bail!("--rounds and --repeat must be positive");
    }
    Ok(args)
}

/// How a path is timed.
#[derive(Clone, Copy, PartialEq)]
enum Method {
    /// `bench_steer` against `bench_baseline` (save, run, restore).
    Wrapped,
    /// `cdn_steer` against a bare XDP_PASS: only for paths that do not modify the packet.
    Direct,
}

struct Path {
    name: String,
    frame: Vec<u8>,
    action: u32,
    method: Method,
    /// Timed with a live trace running (`NODE_TRACE`) with this filter; `None`: no trace.
    traced: Option<TraceFilter>,
    /// Timed with `steer_auth` on (every encapsulation signed, every one received verified).
    auth: bool,
}

/// Turns the live trace on (with `filter`) or off for the next runs.
fn set_tracing(s: &mut Scenario, filter: Option<TraceFilter>) -> Result<()> {
    if let Some(filter) = &filter {
        s.dp.set_trace_filter(filter)?;
    }
    s.update_config(|c| {
        if filter.is_some() {
            c.flags |= NODE_TRACE;
        } else {
            c.flags &= !NODE_TRACE;
        }
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (path, baseline) mean ns per run, each over `repeat` runs.
fn time_path(s: &mut Scenario, p: &Path, repeat: u32) -> Result<(f64, f64)> {
    let (program, baseline) = match p.method {
        Method::Wrapped => (BENCH_PROGRAM_NAME, BENCH_BASELINE_PROGRAM_NAME),
        Method::Direct => (PROGRAM_NAME, BASELINE_PROGRAM_NAME),
    };
    set_tracing(s, p.traced)?;
    s.set_steer_auth(p.auth)?;
    let (action, gross) = s.dp.time_run(program, &p.frame, repeat)?;
    if action != p.action {
        bail!(
            "{}: action {action} under {program}, expected {}",
            p.name,
            p.action
        );
    }
    let (_, base) = s.dp.time_run(baseline, &p.frame, repeat)?;
    Ok((gross as f64, base as f64))
}

/// Frames of a realistic size: 64 bytes of payload, rounded up to a multiple of 8.
fn padded(build: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    let len = build(64).len();
    build(64 + (8 - len % 8) % 8)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let ns = Netns::new("bench")?;
    for a in [
        "192.0.2.10/32",
        "198.51.100.7/32",
        "2001:db8::10/128",
        "2001:db8:ffff::7/128",
    ] {
        ns.ip(&["addr", "add", a, "dev", "lo"])?;
    }
    ns.enter(|| run(&args))?
}

fn run(args: &Args) -> Result<()> {
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

    // An unconnected UDP server socket: in `connected` mode it proves nothing, so the owner
    // check still passes such a flow on.
    let udp_server = UdpSocket::bind(SocketAddr::new(addr(VIP_V4), 443))?;
    // One VIP per other UDP placement mode, inside the scenario's prefix and sharing its table.
    const VIP_UDP_OWNER: &str = "192.0.2.20";
    const VIP_UDP_LOCAL: &str = "192.0.2.30";
    // A QUIC service (UDP 443 routed by connection ID), sharing the scenario's table too.
    const VIP_QUIC: &str = "192.0.2.40";
    const QUIC_BENCH: QuicLbConfig = QuicLbConfig {
        config_id: 1,
        server_id_len: 2,
        cid_len: 8,
    };
    const QUIC_SERVER: u32 = 0x0202;
    s.dp.set_service(addr(VIP_QUIC), 32, &quic_service(0, &QUIC_BENCH))?;
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

    let fwd4 = Flow::tcp(CLIENT_V4, 40000, VIP_V4, 443);
    let fwd6 = Flow::tcp(CLIENT_V6, 40000, VIP_V6, 443);
    let local_syn = Flow::tcp(CLIENT_V4, 40001, VIP_V4, 443);
    let established = Flow::tcp(CLIENT_V4, 41000, VIP_V4, 443);
    let unknown = Flow::tcp(CLIENT_V4, 41001, VIP_V4, 443);
    s.set_hops(&fwd4, &[2, 4])?;
    s.set_hops(&fwd6, &[2, 4])?;
    s.set_hops(&local_syn, &[SELF_ID, 2])?;
    s.set_hops(&established, &[SELF_ID, 2])?;
    // The scenario's table has few buckets: each UDP flow gets a source port whose bucket no
    // other flow of the benchmark uses, so that every path sees its own hop list.
    let mut used: Vec<u32> = [&fwd4, &local_syn, &established, &unknown]
        .iter()
        .map(|f| s.bucket_index(f))
        .collect();
    let mut udp_flow = |vip: &str| -> Result<Flow> {
        (42000..43000)
            .map(|sport| Flow::udp(CLIENT_V4, sport, vip, 443))
            .find(|f| {
                let b = s.bucket_index(f);
                let free = !used.contains(&b);
                if free {
                    used.push(b);
                }
                free
            })
            .context("a free bucket for a UDP flow")
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
    let plain = |flow: &Flow, tcp: Tcp| padded(|n| frame(flow, tcp, Vlan::None, &vec![0u8; n]));
    let non_vip = Flow::tcp(CLIENT_V4, 1, "203.0.113.1", 443);
    let mut paths = Vec::new();
    // Paths that leave the packet untouched are timed directly too, as a cross-check; the
    // non-VIP pass only directly, its cost being below the wrapper's noise.
    let mut add = |name: &str, frame: Vec<u8>, action: u32, methods: &[Method]| {
        for method in methods {
            paths.push(Path {
                name: match method {
                    Method::Direct => format!("{name} [direct]"),
                    Method::Wrapped => name.to_string(),
                },
                frame: frame.clone(),
                action,
                method: *method,
                traced: None,
                auth: false,
            });
        }
    };
    use Method::{Direct, Wrapped};
    add(
        "non-VIP pass",
        plain(&non_vip, Tcp::ACK),
        xdp::PASS,
        &[Direct],
    );
    add(
        "ingress forward IPv4 (established flow)",
        plain(&fwd4, Tcp::ACK),
        xdp::TX,
        &[Wrapped],
    );
    add(
        "ingress forward IPv6 (established flow)",
        plain(&fwd6, Tcp::ACK),
        xdp::TX,
        &[Wrapped],
    );
    let quic_cid = quic_cid(&QUIC_BENCH, QUIC_SERVER, 7);
    add(
        "QUIC short header, CID -> other member",
        padded(|n| {
            frame(
                &quic_cid_flow,
                Tcp::ACK,
                Vlan::None,
                &quic_short(&quic_cid, &vec![0u8; n]),
            )
        }),
        xdp::TX,
        &[Wrapped],
    );
    add(
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
        &[Wrapped],
    );
    add(
        "ingress local accept (new SYN)",
        plain(&local_syn, Tcp::SYN),
        xdp::PASS,
        &[Direct, Wrapped],
    );
    add(
        "ingress local accept (socket lookup)",
        plain(&established, Tcp::ACK),
        xdp::PASS,
        &[Direct, Wrapped],
    );
    add(
        "owner accept (socket lookup, decap)",
        steered(&established, &[4])?,
        xdp::PASS,
        &[Wrapped],
    );
    add(
        "owner pass-on to next hop",
        steered(&unknown, &[4])?,
        xdp::TX,
        &[Wrapped],
    );
    add(
        "UDP connected: first hop, unconnected sock",
        plain(&udp_connected, Tcp::ACK),
        xdp::TX,
        &[Wrapped],
    );
    add(
        "UDP owner: forward to owner",
        plain(&udp_owner_fwd, Tcp::ACK),
        xdp::TX,
        &[Wrapped],
    );
    add(
        "UDP owner: accept as owner",
        plain(&udp_owner_self, Tcp::ACK),
        xdp::PASS,
        &[Direct, Wrapped],
    );
    add(
        "UDP owner: steered, accept (decap)",
        steered(&udp_owner_fwd, &[4])?,
        xdp::PASS,
        &[Wrapped],
    );
    add(
        "UDP local: accept",
        plain(&udp_local, Tcp::ACK),
        xdp::PASS,
        &[Direct, Wrapped],
    );
    // A trace of another VIP: the filter is only decided once the frame has been read again
    // to the inner packet's destination, the most a non-matching packet costs. A trace of
    // another reason is decided before the packet is looked at.
    let other_vip = TraceFilter {
        vip: [192, 0, 2, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        fields: TRACE_MATCH_VIP,
        ..TraceFilter::default()
    };
    let other_reason = TraceFilter {
        reasons: 1 << Reason::TooBig as u32,
        ..TraceFilter::default()
    };
    for (name, frame, action, method, filter) in [
        (
            "ingress forward IPv4, trace of another VIP",
            plain(&fwd4, Tcp::ACK),
            xdp::TX,
            Wrapped,
            other_vip,
        ),
        (
            "ingress forward IPv4, trace of another reason",
            plain(&fwd4, Tcp::ACK),
            xdp::TX,
            Wrapped,
            other_reason,
        ),
        (
            "non-VIP pass, trace of another VIP [direct]",
            plain(&non_vip, Tcp::ACK),
            xdp::PASS,
            Direct,
            other_vip,
        ),
    ] {
        paths.push(Path {
            name: name.to_string(),
            frame,
            action,
            method,
            traced: Some(filter),
            auth: false,
        });
    }
    // The MAC's cost: the same paths with `steer_auth` on. The owner receives a version-2
    // header (signed as the reference model signs it) and verifies it.
    let key = cdn_user::dataplane::steer_auth_key(KEY);
    for (name, frame, action) in [
        (
            "ingress forward IPv4, steer_auth",
            plain(&fwd4, Tcp::ACK),
            xdp::TX,
        ),
        (
            "ingress forward IPv6, steer_auth",
            plain(&fwd6, Tcp::ACK),
            xdp::TX,
        ),
        (
            "owner accept (decap), steer_auth",
            signed_steering_frame(&steered(&established, &[4])?, 0, key, &established),
            xdp::PASS,
        ),
        (
            "owner pass-on to next hop, steer_auth",
            signed_steering_frame(&steered(&unknown, &[4])?, 0, key, &unknown),
            xdp::TX,
        ),
    ] {
        paths.push(Path {
            name: name.to_string(),
            frame,
            action,
            method: Wrapped,
            traced: None,
            auth: true,
        });
    }
    let mut trace_reader = s.dp.take_trace_reader().context("the trace reader")?;
    for p in &paths {
        set_tracing(&mut s, p.traced)?;
        s.set_steer_auth(p.auth)?;
        let run = s.run(&p.frame)?;
        if run.action != p.action {
            bail!(
                "{}: expected action {}, got {} ({:?})",
                p.name,
                p.action,
                run.action,
                run.counted
            );
        }
        if trace_reader.next_event().is_some() {
            bail!(
                "{}: the filter that matches nothing let an event through",
                p.name
            );
        }
    }

    println!(
        "cdn-steer XDP cost per packet: {} rounds of {} runs per path and baseline",
        args.rounds, args.repeat
    );
    let started = Instant::now();
    let mut net: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut gross: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut base: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..args.rounds {
        for (i, p) in paths.iter().enumerate() {
            let (g, b) = time_path(&mut s, p, args.repeat)?;
            net[i].push(g - b);
            gross[i].push(g);
            base[i].push(b);
        }
        eprintln!(
            "round {}/{} done ({:.1} s)",
            round + 1,
            args.rounds,
            started.elapsed().as_secs_f64()
        );
    }
    println!(
        "{:<42} {:>9} {:>9}   {:>17}   {:>17}",
        "path", "net min", "net med", "cdn_steer min/med", "baseline min/med"
    );
    for (i, p) in paths.iter().enumerate() {
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "{:<42} {:>9.1} {:>9.1}   {:>8.1}/{:<8.1}   {:>8.1}/{:<8.1}",
            p.name,
            min(&net[i]),
            median(&mut net[i].clone()),
            min(&gross[i]),
            median(&mut gross[i].clone()),
            min(&base[i]),
            median(&mut base[i].clone()),
        );
    }
    println!(
        "(ns per packet; net = path minus its baseline in the same round; [direct] rows time\n\
         cdn_steer itself against a bare XDP_PASS and cross-check the wrapper method)"
    );
    drop((client, server, listener, udp_server));
    maglev_build_time(args.rounds)?;
    Ok(())
}

/// Time of a full Maglev table build for 64 equal members at the default size (the controller
/// rebuilds on every membership change).
fn maglev_build_time(rounds: usize) -> Result<()> {
    use cdn_user::cluster::maglev::{MaglevMember, build_table_into};
    let names: Vec<String> = (0..64).map(|i| format!("member-{i:02}")).collect();
    let members: Vec<MaglevMember<'_>> = names
        .iter()
        .enumerate()
        .map(|(i, name)| MaglevMember {
            id: i as u16,
            name,
            weight: 100,
        })
        .collect();
    let mut table = Vec::new();
    let mut samples = Vec::new();
    for _ in 0..rounds.max(5) * 4 {
        let started = Instant::now();
        build_table_into(
            &members,
            [1, 2],
            cdn_common::maps::DEFAULT_TABLE_SIZE,
            &mut table,
        )?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "Maglev table build, 64 members, M = {}: min {:.2} ms, median {:.2} ms",
        cdn_common::maps::DEFAULT_TABLE_SIZE,
        min,
        median(&mut samples)
    );
    Ok(())
}
