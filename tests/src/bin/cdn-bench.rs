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

use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use cdn_common::{
    counters::Reason,
    maps::{
        BASELINE_PROGRAM_NAME, BENCH_BASELINE_PROGRAM_NAME, BENCH_PROGRAM_NAME, NODE_TRACE,
        PROGRAM_NAME,
    },
    trace::{TRACE_MATCH_VIP, TraceFilter},
};
use cdn_tests::{
    bpf_interp::paths::{Bench, in_namespace},
    packets::signed_steering_frame,
    scenario::{KEY, Scenario},
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

/// Paths (of `Bench`) that leave the packet untouched, timed directly as well as wrapped.
const TIMED_DIRECTLY_TOO: [&str; 4] = [
    "ingress local accept (new SYN)",
    "ingress local accept (socket lookup)",
    "UDP owner: accept as owner",
    "UDP local: accept",
];

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

fn main() -> Result<()> {
    let args = parse_args()?;
    in_namespace(|| run(&args))
}

fn run(args: &Args) -> Result<()> {
    // The data plane, the sockets and the paths `cdn-insns` counts, set up once for both.
    let mut bench = Bench::new()?;
    let mut paths = Vec::new();
    for p in &bench.paths {
        // Paths that leave the packet untouched are timed directly too, as a cross-check; the
        // non-VIP pass only directly, its cost being below the wrapper's noise.
        let methods: &[Method] = if p.name == "non-VIP pass" {
            &[Method::Direct]
        } else if TIMED_DIRECTLY_TOO.contains(&p.name) {
            &[Method::Direct, Method::Wrapped]
        } else {
            &[Method::Wrapped]
        };
        for method in methods {
            paths.push(Path {
                name: match method {
                    Method::Direct => format!("{} [direct]", p.name),
                    Method::Wrapped => p.name.to_string(),
                },
                frame: p.frame.clone(),
                action: p.action,
                method: *method,
                traced: None,
                auth: false,
            });
        }
    }
    use Method::{Direct, Wrapped};
    let fwd4 = bench
        .path("ingress forward IPv4 (established flow)")?
        .frame
        .clone();
    let fwd6 = bench
        .path("ingress forward IPv6 (established flow)")?
        .frame
        .clone();
    let non_vip = bench.path("non-VIP pass")?.frame.clone();
    let owner_accept = bench
        .path("owner accept (socket lookup, decap)")?
        .frame
        .clone();
    let owner_pass_on = bench.path("owner pass-on to next hop")?.frame.clone();
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
            fwd4.clone(),
            xdp::TX,
            Wrapped,
            other_vip,
        ),
        (
            "ingress forward IPv4, trace of another reason",
            fwd4.clone(),
            xdp::TX,
            Wrapped,
            other_reason,
        ),
        (
            "non-VIP pass, trace of another VIP [direct]",
            non_vip,
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
        ("ingress forward IPv4, steer_auth", fwd4, xdp::TX),
        ("ingress forward IPv6, steer_auth", fwd6, xdp::TX),
        (
            "owner accept (decap), steer_auth",
            signed_steering_frame(&owner_accept, 0, key, &bench.flows.established),
            xdp::PASS,
        ),
        (
            "owner pass-on to next hop, steer_auth",
            signed_steering_frame(&owner_pass_on, 0, key, &bench.flows.unknown),
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
    let s = &mut bench.scenario;
    let mut trace_reader = s.dp.take_trace_reader().context("the trace reader")?;
    for p in &paths {
        set_tracing(s, p.traced)?;
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
            let (g, b) = time_path(s, p, args.repeat)?;
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
    drop(bench);
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
