//! `cargo xtask bench --rate`: packets per second through real veth links in native XDP, for
//! the main paths of `cdn_steer`, each beside a bare program doing only the path's action,
//! measured in the same round. See `cdn_tests::rate`.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cdn_tests::rate::{Budget, FRAME_LEN, Measured, RateLab, Subject, topology::Topology};

struct Args {
    rounds: usize,
    seconds: f64,
    /// Generator CPUs of each section: a section with n CPUs uses CPUs 0..n.
    sections: Vec<usize>,
    /// Only the paths whose name contains one of these (all if empty).
    paths: Vec<String>,
}

const USAGE: &str = "cdn-rate [--rounds N (5)] [--seconds S (1.0)] [--cpus LIST (1,2)] [--paths LIST]\n\
     Mpps of cdn_steer's main paths through veth pairs in native XDP, each beside a bare\n\
     program measured in the same round; min and median over rounds. One section per entry\n\
     of --cpus: n generator threads pinned to CPUs 0..n. --paths: only the paths whose name\n\
     contains one of the comma-separated words (e.g. `XDP_TX,redirect`).";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        rounds: 5,
        seconds: 1.0,
        sections: vec![1, 2],
        paths: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<String> {
            it.next().with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--rounds" => args.rounds = value("--rounds")?.parse().context("--rounds")?,
            "--seconds" => args.seconds = value("--seconds")?.parse().context("--seconds")?,
            "--cpus" => {
                args.sections = value("--cpus")?
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--cpus: a comma-separated list of CPU counts")?;
            }
            "--paths" => {
                args.paths = value("--paths")?
                    .split(',')
                    .map(|p| p.trim().to_owned())
                    .collect();
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.rounds == 0 || !args.seconds.is_finite() || args.seconds <= 0.0 {
        bail!("--rounds and --seconds must be positive");
    }
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(n) = args.sections.iter().find(|&&n| n == 0 || n > online) {
        bail!("--cpus: {n} generator CPUs on a machine with {online}");
    }
    Ok(args)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // Ctrl-C or a TERM ends the measurement under way with an error instead of the process,
    // so the namespaces, links and programs are removed on the way out.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("signal handler")?;
    }
    let topo = Topology::new()?;
    topo.dut.enter(|| run(&args, &topo, stop))?
}

fn run(args: &Args, topo: &Topology, stop: Arc<AtomicBool>) -> Result<()> {
    let mut lab = RateLab::new(topo)?;
    if !args.paths.is_empty() {
        lab.rows
            .retain(|row| args.paths.iter().any(|p| row.name.contains(p.as_str())));
        if lab.rows.is_empty() {
            bail!("--paths {:?} matches no path", args.paths);
        }
    }
    let budget = Budget {
        duration: Duration::from_secs_f64(args.seconds),
        frames: u64::MAX,
        stop,
    };
    let started = Instant::now();
    for &n in &args.sections {
        let cpus: Vec<usize> = (0..n).collect();
        let rows = lab.rows.len();
        // [row][subject] -> Mpps per round
        let mut mpps = vec![[Vec::new(), Vec::new()]; rows];
        let mut delivered = vec![0.0f64; rows];
        for round in 0..args.rounds {
            for (row, samples) in mpps.iter_mut().enumerate() {
                // Alternate which program goes first, so neither always runs on a warmer or
                // colder machine.
                let order = if round % 2 == 0 {
                    [Subject::Steer, Subject::Bare]
                } else {
                    [Subject::Bare, Subject::Steer]
                };
                for subject in order {
                    let m: Measured = lab.measure(row, subject, &cpus, &budget)?;
                    if subject == Subject::Steer {
                        delivered[row] = m.handled as f64 / m.generated as f64;
                    }
                    samples[subject as usize].push(m.mpps());
                }
            }
            eprintln!(
                "{n} CPU(s): round {}/{} done ({:.0} s)",
                round + 1,
                args.rounds,
                started.elapsed().as_secs_f64()
            );
        }
        println!(
            "\nPacket rate, {n} generator CPU(s) (0..{n}), {FRAME_LEN}-byte frames, {} rounds of \
             {:.1} s per program (Mpps)",
            args.rounds, args.seconds
        );
        println!(
            "{:<40} {:>15} {:>15} {:>7}  {:<14} {:>9}",
            "path", "cdn_steer", "bare", "ratio", "bare program", "delivered"
        );
        println!(
            "{:<40} {:>15} {:>15} {:>7}",
            "", "min / median", "min / median", "median"
        );
        for (i, row) in lab.rows.iter().enumerate() {
            let [steer, bare] = &mpps[i];
            println!(
                "{:<40} {:>6.2} / {:<6.2} {:>6.2} / {:<6.2} {:>6.2}x  {:<14} {:>8.0}%",
                row.name,
                min(steer),
                median(steer),
                min(bare),
                median(bare),
                median(steer) / median(bare),
                row.bare.name(),
                delivered[i] * 100.0,
            );
        }
    }
    println!(
        "(Mpps: packets the measured program handled, by its own counters, over the wall time of \
         the run; delivered: cdn_steer's packets per generated frame in the last round)"
    );
    Ok(())
}
