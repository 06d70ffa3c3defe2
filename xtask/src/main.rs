//! `cargo xtask`: cdn-steer's single entry point. Every task first makes sure the toolchain is
//! present (`setup`), so a clean clone on a fresh machine needs nothing but `cargo xtask ...`.

mod apt;
mod cmd;
mod deb;
mod disk;
mod dist;
mod setup;
mod test;
mod toolchain;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
#[command(about = "cdn-steer's build, test and lab entry point")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install whatever the toolchain is missing (idempotent, and quick when nothing is).
    Setup,
    /// Set up, then build the controller (its build script builds and embeds the XDP object).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, then check formatting, run clippy and run the workspace tests in release mode.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        skip_lint: bool,
        /// Passed to `cargo test`; anything after a second `--` goes to the test binaries,
        /// e.g. `cargo xtask test -- owner_path -- --nocapture`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then run the cdn-bench benchmark; all arguments are passed through. With
    /// `--rate`, run the packet-rate benchmark cdn-rate instead (through veth pairs in native
    /// XDP), e.g. `cargo xtask bench --rate --cpus 1`; with `--insns`, run cdn-insns: BPF
    /// instructions executed per path and the program's size after the verifier. The other
    /// arguments go to the binary that runs.
    Bench {
        /// Arguments for cdn-bench (or cdn-rate with `--rate`, cdn-insns with `--insns`).
        // Hyphenated values are accepted so `cargo xtask bench --rounds 5` works without `--`
        // (only `-h`/`--help` as the first argument is taken by xtask; put `--` before it).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then build the controller for the nodes: one static, stripped binary per
    /// architecture, at `target/{x86_64,aarch64}-unknown-linux-gnu/dist/cdn-steer`.
    Dist,
    /// Set up, build the static binaries, then one Debian package per architecture under
    /// `target/deb/`, checked with lintian.
    Deb,
    /// Set up, build the controller, then run the cdn-lab; all arguments are passed through,
    /// e.g. `cargo xtask run --duration 60 --nodes 3`.
    Run {
        /// Arguments for cdn-lab.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build the controller and the lab, then run cdn-chaos: downloads through the lab
    /// while controllers, BIRD, web servers and whole nodes are killed, bad configurations
    /// reloaded, SYNs and ACKs flooded and routes flipped (10 minutes unless `--duration
    /// SECONDS`; `--seed N` replays a run), after the 1M-frame differential test with a random
    /// seed. Not part of `cargo xtask test`.
    Chaos {
        /// Arguments for cdn-chaos.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The whole chain on one line, and no backtrace even with RUST_BACKTRACE set: the
            // error already says which command failed and how, and what failed is not xtask.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            cmd::run(
                cmd::cargo()
                    .arg("build")
                    .args(release.then_some("--release"))
                    .args(["-p", "cdn-user"]),
            )
        }
        Task::Test { skip_lint, args } => test::run(&test::Options { skip_lint, args }),
        Task::Bench { mut args } => {
            setup::run()?;
            let rate = args.iter().any(|a| a == "--rate");
            let insns = args.iter().any(|a| a == "--insns");
            if rate && insns {
                anyhow::bail!("--rate and --insns are separate benchmarks: pick one");
            }
            args.retain(|a| a != "--rate" && a != "--insns");
            let bin = match (rate, insns) {
                (true, _) => "cdn-rate",
                (_, true) => "cdn-insns",
                _ => "cdn-bench",
            };
            run_tests_bin(bin, &args)
        }
        Task::Run { args } => {
            setup::run()?;
            build_lab()?;
            run_tests_bin("cdn-lab", &args)
        }
        Task::Chaos { args } => {
            setup::run()?;
            build_lab()?;
            // First the differential test with a random seed (it prints the seed, so a
            // disagreement can be replayed); the CI run always uses the same one.
            run_tests_bin("cdn-difftest", &[])?;
            run_tests_bin("cdn-chaos", &args)
        }
        Task::Dist => {
            setup::run()?;
            dist::build()
        }
        Task::Deb => {
            setup::run()?;
            dist::build()?;
            deb::lintian(&deb::build()?)
        }
    }
}

/// Builds the binaries the lab runs. The lab starts the controller and the lab's web server as
/// processes, and `cargo run --bin cdn-lab` builds only cdn-lab itself.
fn build_lab() -> Result<()> {
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "cdn-user",
        "-p",
        "cdn-tests",
        "--bins",
    ]))
}

/// Runs a binary of the cdn-tests package, where the benchmark and the lab live, in release mode
/// (they measure packet paths), passing `args` through.
fn run_tests_bin(bin: &str, args: &[String]) -> Result<()> {
    cmd::run(
        cmd::cargo()
            .args(["run", "--release", "-p", "cdn-tests", "--bin", bin, "--"])
            .args(args),
    )
}
