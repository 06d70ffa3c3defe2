//! `cdn-difftest [--seed N] [--frames N] [--rules RULES]`: the differential test
//! (see `tests/tests/differential.rs`) as a program, for `cargo xtask chaos` (random seed) and
//! to replay a failure. Prints the seed first; exits 1 on any disagreement.

use anyhow::{Context as _, Result, bail};
use cdn_tests::{
    difftest::{self, Options},
    model::{PROGRAM_RULES, Rules},
};

fn parse_u64(v: &str) -> Result<u64> {
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    }
    .with_context(|| format!("not a number: {v}"))
}

fn main() -> Result<()> {
    let mut opts = Options {
        seed: rand::random(),
        frames: 1_000_000,
        rules: PROGRAM_RULES,
        max_failures: 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seed" => opts.seed = parse_u64(&value()?)?,
            "--frames" => opts.frames = parse_u64(&value()?)?,
            "--rules" => {
                let v = value()?;
                opts.rules = Rules::parse(&v).with_context(|| {
                    format!("unknown rules {v:?}: before-trust, trust, or a list of rules")
                })?;
            }
            "-h" | "--help" => {
                println!(
                    "usage: cdn-difftest [--seed N] [--frames N] [--rules before-trust|trust]"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    println!(
        "cdn-difftest: seed {} ({:#x}), {} frames",
        opts.seed, opts.seed, opts.frames
    );
    let report = difftest::run(&opts)?;
    println!("{}", report.summary());
    if !report.failures.is_empty() {
        eprintln!("{}", report.failure_text());
        eprintln!(
            "replay: cdn-difftest --seed {} --frames {}",
            opts.seed, opts.frames
        );
        std::process::exit(1);
    }
    Ok(())
}
