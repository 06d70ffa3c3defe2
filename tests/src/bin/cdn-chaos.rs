//! `cargo xtask chaos`: brings up the lab and, for `--duration` seconds, runs downloads through
//! it while faults drawn from a seeded schedule hit it (controllers, BIRD, web servers and
//! whole nodes killed and restarted, bad reloads, SYN and ACK floods, route flips). Prints
//! what happens, then a report; exits non-zero if a download broke while its owner lived, or
//! a step did not go as it must (a bad configuration taken, a cluster that did not settle).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use cdn_tests::{
    chaos::runner::{Options, Runner},
    lab::{Lab, LabOptions},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

const HELP: &str = "cdn-chaos [--duration SECONDS (600)] [--seed N (random)] [--flows N (16)] \
[--rate KiB/s (256)] [--flood-count N (20000)] [--flood-rate PPS (10000)]\n\
Runs downloads through the lab while faults hit it; Ctrl-C ends the run early and cleans up.";

fn parse_args() -> Result<Options> {
    let mut o = Options {
        duration: Duration::from_secs(600),
        seed: rand::random(),
        flows: 16,
        rate: 256 * 1024,
        flood_count: 20_000,
        flood_rate: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => {
                o.duration = Duration::from_secs(value()?.parse().context("--duration (seconds)")?)
            }
            "--seed" => o.seed = value()?.parse().context("--seed")?,
            "--flows" => o.flows = value()?.parse().context("--flows")?,
            "--rate" => o.rate = value()?.parse::<usize>().context("--rate (KiB/s)")? * 1024,
            "--flood-count" => o.flood_count = value()?.parse().context("--flood-count")?,
            "--flood-rate" => o.flood_rate = value()?.parse().context("--flood-rate")?,
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if o.flows == 0 || o.rate == 0 || o.flood_rate == 0 {
        bail!("--flows, --rate and --flood-rate must be positive");
    }
    Ok(o)
}

fn main() -> Result<()> {
    let opts = parse_args()?;
    // SAFETY: installs a handler that only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "chaos: seed {} (replay with --seed {}), {} s, {} downloads in flight at {} KiB/s",
        opts.seed,
        opts.seed,
        opts.duration.as_secs(),
        opts.flows,
        opts.rate / 1024
    );
    println!("bringing up the lab: client, router (BIRD, ECMP), 3 nodes with cdn-steer...");
    let lab = Lab::start(LabOptions {
        tag: "chaos".into(),
        ..LabOptions::default()
    })?;
    println!("lab up; logs in {}", lab.dir.display());
    let (report, lab) = Runner::new(lab, opts, &STOP).run()?;
    println!("tearing down the lab");
    drop(lab);
    println!("{report}");
    if !report.passed() {
        bail!(
            "{} download(s) broke while their owner lived, {} step(s) failed",
            report.unexplained_count(),
            report.failed_steps.len()
        );
    }
    Ok(())
}
