//! `cargo xtask run`: brings up the lab (client, router with ECMP, N anycast nodes running BIRD,
//! cdn-steer and a web server) and runs a scripted demo: long downloads from the client while
//! routes move between nodes and a node is drained and undrained, with a live view and a
//! summary. With `--pops N` the nodes form N PoPs, each behind a border router of its own
//! (`--one-router`: all behind the one router), routes move between whole PoPs (withdrawn at
//! their borders) and inside one, and the live view adds per-PoP counters. Ctrl-C (or any
//! error) tears everything down.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cdn_tests::{
    content,
    download::{self, Live, Spec},
    h3,
    lab::{H3_PORT, Lab, LabOptions, PopCounters, QuicRouting, VIP_V4, packets_counter},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Args {
    nodes: usize,
    /// 0: no PoPs (one implicit PoP); N >= 2: N PoPs of `nodes_per_pop` nodes.
    pops: usize,
    nodes_per_pop: usize,
    /// With PoPs: a border router per PoP between the router and the PoP's nodes, routing the
    /// steering between PoPs; `--one-router` puts every node behind the one router instead.
    border_routers: bool,
    duration: Duration,
    flows: usize,
    steering: bool,
    rate: usize,
    /// HTTP/3 downloads kept in flight beside the TCP ones (0: no HTTP/3).
    h3_flows: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        nodes: 3,
        pops: 0,
        nodes_per_pop: 2,
        border_routers: true,
        duration: Duration::from_secs(60),
        flows: 20,
        steering: true,
        rate: 200 * 1024,
        h3_flows: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => a.nodes = value()?.parse().context("--nodes")?,
            "--pops" => a.pops = value()?.parse().context("--pops")?,
            "--nodes-per-pop" => a.nodes_per_pop = value()?.parse().context("--nodes-per-pop")?,
            "--duration" => {
                a.duration = Duration::from_secs(value()?.parse().context("--duration (seconds)")?)
            }
            "--flows" => a.flows = value()?.parse().context("--flows")?,
            "--rate" => a.rate = value()?.parse::<usize>().context("--rate (KiB/s)")? * 1024,
            "--no-steering" => a.steering = false,
            "--one-router" => a.border_routers = false,
            "--h3-flows" => a.h3_flows = value()?.parse().context("--h3-flows")?,
            "-h" | "--help" => {
                println!(
                    "cdn-lab [--nodes N (3)] [--pops N (0: none) --nodes-per-pop N (2) [--one-router]] [--duration SECONDS (60)] [--flows N (20)] [--rate KiB/s (200)]\n\
                     [--h3-flows N (10; 0: no HTTP/3)] [--no-steering]\n\
                     With PoPs, each PoP has a border router (BIRD) between its nodes and the router,\n\
                     which also routes between the PoPs; --one-router puts every node behind the router.\n\
                     Runs the anycast lab and a scripted demo (TCP and HTTP/3 downloads); Ctrl-C\n\
                     stops and cleans up."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if a.pops >= 2 {
        if !(1..=4).contains(&a.nodes_per_pop) || a.pops > cdn_common::maps::MAX_POPS {
            bail!(
                "--pops must be 2 to {} and --nodes-per-pop 1 to 4",
                cdn_common::maps::MAX_POPS
            );
        }
        a.nodes = a.pops * a.nodes_per_pop;
    } else if a.pops == 1 {
        bail!("--pops 1 is the same as no PoPs: leave it out");
    }
    if !(2..=16).contains(&a.nodes) || (a.pops == 0 && a.nodes > 9) {
        bail!("--nodes must be 2 to 9 (with PoPs, 16 nodes at most)");
    }
    if a.flows == 0 || a.rate == 0 {
        bail!("--flows and --rate must be positive");
    }
    Ok(a)
}

/// The reasons the live view adds up as accepted by a node, and as forwarded by it.
const ACCEPTED: [&str; 5] = [
    "local_accept",
    "owner_accept",
    "last_hop_accept",
    "quic_cid_accept",
    "quic_hash_accept",
];
const FORWARDED: [&str; 4] = [
    "forwarded",
    "passed_on",
    "quic_cid_forwarded",
    "quic_hash_forwarded",
];

/// What a scripted step does to the lab.
type Action = Box<dyn Fn(&Lab) -> Result<()>>;

/// One scripted step: at `at` seconds, do `action`.
struct Step {
    at: f64,
    label: String,
    action: Action,
}

fn script(lab: &Lab) -> Vec<Step> {
    let (nodes, steering) = (lab.nodes.len(), lab.opts.steering);
    if lab.opts.pops >= 2 {
        return pop_script(lab.opts.pops, steering, lab.has_borders());
    }
    let mut steps: Vec<Step> = Vec::new();
    let mut t = 4.0;
    for k in 0..nodes {
        steps.push(Step {
            at: t,
            label: format!("router withdraws node{}'s routes", k + 1),
            action: Box::new(move |lab| lab.withdraw_at_router(k)),
        });
        steps.push(Step {
            at: t + 3.0,
            label: format!("router restores node{}'s routes", k + 1),
            action: Box::new(move |lab| lab.restore_at_router(k)),
        });
        t += 7.0;
    }
    steps.extend(drain_node1(t, steering));
    steps
}

/// Routes move between PoPs: each PoP in turn is withdrawn at the router (its clients land in
/// the others) and restored; then pop1 and pop2 at once (everyone lands in the last PoP). With
/// border routers the PoPs' borders withdraw the VIP, and then pop1's border withdraws node2
/// (a shift inside a PoP).
fn pop_script(pops: usize, steering: bool, borders: bool) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut t = 4.0;
    let at = if borders {
        "their borders"
    } else {
        "the router"
    };
    let mut shift = |t: f64, away: Vec<usize>| {
        let names: Vec<String> = away.iter().map(|p| format!("pop{}", p + 1)).collect();
        let names = names.join(" and ");
        let (w, r) = (away.clone(), away);
        steps.push(Step {
            at: t,
            label: format!("{names} withdrawn at {at}"),
            action: Box::new(move |lab| w.iter().try_for_each(|&p| lab.withdraw_pop_at_router(p))),
        });
        steps.push(Step {
            at: t + 4.0,
            label: format!("{names} restored at {at}"),
            action: Box::new(move |lab| r.iter().try_for_each(|&p| lab.restore_pop_at_router(p))),
        });
    };
    for p in 0..pops {
        shift(t, vec![p]);
        t += 8.0;
    }
    shift(t, (0..pops - 1).collect());
    t += 8.0;
    if borders {
        steps.push(Step {
            at: t,
            label: "border1 withdraws node2".into(),
            action: Box::new(|lab| lab.withdraw_at_router(1)),
        });
        steps.push(Step {
            at: t + 4.0,
            label: "border1 restores node2".into(),
            action: Box::new(|lab| lab.restore_at_router(1)),
        });
        t += 8.0;
    }
    steps.extend(drain_node1(t, steering));
    steps
}

/// Drains node1 at `t` and undrains it 6 s later (nothing without steering).
fn drain_node1(t: f64, steering: bool) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    if steering {
        steps.push(Step {
            at: t,
            label: "drain node1".into(),
            action: Box::new(|lab| lab.steer(0, &["drain"]).map(drop)),
        });
        steps.push(Step {
            at: t + 6.0,
            label: "undrain node1".into(),
            action: Box::new(|lab| lab.steer(0, &["undrain"]).map(drop)),
        });
    }
    steps
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: installs a handler that only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "bringing up the lab: client, router (BIRD, ECMP), {} nodes{}{}...",
        args.nodes,
        if args.pops >= 2 {
            format!(
                " in {} PoPs of {}{}",
                args.pops,
                args.nodes_per_pop,
                if args.border_routers {
                    ", a border router per PoP"
                } else {
                    ""
                }
            )
        } else {
            String::new()
        },
        if args.steering {
            " with cdn-steer"
        } else {
            " WITHOUT steering"
        }
    );
    let lab = Lab::start(LabOptions {
        nodes: args.nodes,
        pops: args.pops,
        border_routers: args.pops >= 2 && args.border_routers,
        steering: args.steering,
        tag: "run".into(),
        // HTTP/3 on VIP:443 with QUIC-LB connection IDs, routed by them.
        h3: (args.h3_flows > 0).then_some(QuicRouting::Cid),
        ..LabOptions::default()
    })?;
    println!(
        "lab up; VIP {VIP_V4} is announced by every node. Logs in {}",
        lab.dir.display()
    );
    let result = demo(&lab, &args);
    println!("tearing down the lab");
    drop(lab);
    result
}

fn demo(lab: &Lab, args: &Args) -> Result<()> {
    let spec = Spec {
        vip: lab.vip(false),
        port: 80,
        size: lab.opts.file_size,
        seed: lab.opts.file_seed,
        rate: args.rate,
        timeout: Duration::from_secs(120),
    };
    let expected = content::sha256_hex(&content::generate(spec.size, spec.seed));
    let live = Arc::new(Live::default());
    let started = Instant::now();
    let next_id = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    // Keep `flows` downloads in flight until the end.
    for _ in 0..args.flows {
        let (spec, expected, live, path, next_id, ok) = (
            spec.clone(),
            expected.clone(),
            live.clone(),
            lab.client_netns_path(),
            next_id.clone(),
            ok.clone(),
        );
        let deadline = args.duration;
        workers.push(std::thread::spawn(move || {
            // Downloads only ever go to the VIP inside the lab: without the client
            // namespace, this worker does nothing.
            if let Err(e) = cdn_tests::netns::join(&path) {
                println!("    download worker cannot join the client namespace: {e}");
                live.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            while started.elapsed() < deadline && !STOP.load(Ordering::SeqCst) {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                live.running.fetch_add(1, Ordering::Relaxed);
                let o = download::download(id, &spec, &expected, &live);
                live.running.fetch_sub(1, Ordering::Relaxed);
                live.done.fetch_add(1, Ordering::Relaxed);
                if o.ok {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    live.failed.fetch_add(1, Ordering::Relaxed);
                    if o.reset {
                        live.resets.fetch_add(1, Ordering::Relaxed);
                    }
                    println!(
                        "    download {id} (client port {}) failed after {:.1} s: {}",
                        o.client_port,
                        o.elapsed.as_secs_f64(),
                        o.error.unwrap_or_default()
                    );
                }
            }
        }));
    }
    let h3 = H3Demo::start(lab, args, started);
    let steps = script(lab);
    let mut next_step = 0;
    let mut last_view = Instant::now() - Duration::from_secs(2);
    println!(
        "{:>6}  {:<24} {:>8} {:>8} {:>6} {:>6}  per node: accepted/forwarded",
        "time", "router uses", "running", "done", "failed", "resets"
    );
    while started.elapsed() < args.duration && !STOP.load(Ordering::SeqCst) {
        let now = started.elapsed().as_secs_f64();
        if let Some(step) = steps.get(next_step)
            && now >= step.at
        {
            println!("  >> {:.1}s: {}", now, step.label);
            if let Err(e) = (step.action)(lab) {
                println!("  !! {}: {e:#}", step.label);
            }
            next_step += 1;
        }
        if last_view.elapsed() >= Duration::from_secs(1) {
            last_view = Instant::now();
            let routes = lab
                .route_nodes(VIP_V4)
                .map(|r| {
                    r.iter()
                        .map(|i| format!("node{}", i + 1))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|e| format!("? ({e})"));
            let mut per_node = Vec::new();
            let mut per_pop = vec![PopCounters::default(); lab.pop_count()];
            for i in 0..lab.nodes.len() {
                let metrics = lab.scrape(i);
                if let Ok(t) = &metrics {
                    per_pop[lab.pop_of(i).unwrap_or(0)].add(&lab.node_counters(i, t));
                }
                per_node.push(match metrics {
                    Ok(t) => format!(
                        "{}/{}",
                        ACCEPTED.iter().map(|r| packets_counter(&t, r)).sum::<u64>(),
                        FORWARDED
                            .iter()
                            .map(|r| packets_counter(&t, r))
                            .sum::<u64>()
                    ),
                    Err(_) => "-".into(),
                });
            }
            println!(
                "{:>5.0}s  {:<24} {:>8} {:>8} {:>6} {:>6}  {}",
                now,
                routes,
                live.running.load(Ordering::Relaxed),
                live.done.load(Ordering::Relaxed),
                live.failed.load(Ordering::Relaxed),
                live.resets.load(Ordering::Relaxed),
                per_node.join("  ")
            );
            if lab.opts.pops >= 2 {
                println!("        {}", pop_view(&per_pop));
            }
            if let Some(h3) = &h3 {
                println!("        HTTP/3: {}", h3.view());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if STOP.load(Ordering::SeqCst) {
        println!("interrupted: stopping the downloads in flight");
        live.abort.store(true, Ordering::SeqCst);
        if let Some(h3) = &h3 {
            h3.live.abort.store(true, Ordering::SeqCst);
        }
    } else {
        println!("time is up: letting the downloads in flight finish");
    }
    for w in workers {
        let _ = w.join();
    }
    let h3_summary = h3.map(H3Demo::finish);
    println!(
        "summary: {} downloads, {} complete with the right sha256, {} failed, {} reset, {} route/drain events, {:.0} s",
        live.done.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed),
        live.failed.load(Ordering::Relaxed),
        live.resets.load(Ordering::Relaxed),
        next_step,
        started.elapsed().as_secs_f64()
    );
    if let Some(summary) = h3_summary {
        println!("summary, HTTP/3: {summary}");
    }
    if lab.opts.pops >= 2 {
        for (p, c) in lab.pop_counters()?.iter().enumerate() {
            println!("summary, pop{}: {c}", p + 1);
        }
    }
    Ok(())
}

/// One line of per-PoP counters, summed over each PoP's nodes: packets accepted without a
/// search, forwarded to another PoP, and the search's starts/pass-ons/accepts/exhausted.
fn pop_view(per_pop: &[PopCounters]) -> String {
    let mut line = String::from("per PoP: accepted x-PoP search s/p/a/x:");
    for (p, c) in per_pop.iter().enumerate() {
        line.push_str(&format!(
            "  pop{} {} {} {}/{}/{}/{}",
            p + 1,
            c.local_accepts,
            c.forwarded_cross_pop,
            c.search_start,
            c.search_pass_on,
            c.search_accept,
            c.search_exhausted
        ));
        if c.dropped > 0 {
            line.push_str(&format!(" DROPPED {}", c.dropped));
        }
    }
    line
}

/// HTTP/3 downloads beside the TCP ones: batches of `--h3-flows` downloads from the VIP's
/// UDP 443, one after another until the demo's time is up.
struct H3Demo {
    live: Arc<Live>,
    ok: Arc<AtomicUsize>,
    worker: std::thread::JoinHandle<()>,
}

impl H3Demo {
    fn start(lab: &Lab, args: &Args, started: Instant) -> Option<Self> {
        let identity = lab.h3_identity.as_ref()?;
        let spec = h3::client::Spec {
            target: std::net::SocketAddr::new(lab.vip(false), H3_PORT),
            size: lab.opts.file_size,
            seed: lab.opts.file_seed,
            rate: args.rate,
            timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(10),
            cert: identity.cert.clone(),
        };
        let live = Arc::new(Live::default());
        let ok = Arc::new(AtomicUsize::new(0));
        let (l, o, path, count, deadline) = (
            live.clone(),
            ok.clone(),
            lab.client_netns_path(),
            args.h3_flows,
            args.duration,
        );
        let worker = std::thread::spawn(move || {
            while started.elapsed() < deadline && !STOP.load(Ordering::SeqCst) {
                match h3::client::run_all(Some(&path), count, &spec, None, l.clone()) {
                    Ok(outcomes) => {
                        o.fetch_add(outcomes.iter().filter(|x| x.ok).count(), Ordering::Relaxed);
                        for x in outcomes.iter().filter(|x| !x.ok) {
                            println!(
                                "    HTTP/3 download (client port {}) failed after {:.1} s: {:?} {}",
                                x.client_port,
                                x.elapsed.as_secs_f64(),
                                x.failure,
                                x.error.clone().unwrap_or_default()
                            );
                        }
                    }
                    Err(e) => {
                        println!("    HTTP/3 downloads cannot run: {e:#}");
                        return;
                    }
                }
            }
        });
        Some(Self { live, ok, worker })
    }

    fn view(&self) -> String {
        format!(
            "running {}, done {}, failed {}, stateless resets {}",
            self.live.running.load(Ordering::Relaxed),
            self.live.done.load(Ordering::Relaxed),
            self.live.failed.load(Ordering::Relaxed),
            self.live.resets.load(Ordering::Relaxed)
        )
    }

    fn finish(self) -> String {
        let _ = self.worker.join();
        format!(
            "{} downloads, {} complete with the right sha256, {} failed, {} stateless resets",
            self.live.done.load(Ordering::Relaxed),
            self.ok.load(Ordering::Relaxed),
            self.live.failed.load(Ordering::Relaxed),
            self.live.resets.load(Ordering::Relaxed)
        )
    }
}
