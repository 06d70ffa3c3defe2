//! `cargo xtask test`: setup, formatting, clippy, then the workspace tests, in that order and
//! stopping at the first failure, with the time each stage took.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::{cmd, deb, disk, dist, setup, toolchain};

/// The machines this runs on have two cores. The integration tests build network namespaces,
/// veths and BIRD instances and measure packet rates; running more at once only adds noise and
/// timeouts.
const TEST_THREADS: &str = "--test-threads=2";

pub struct Options {
    /// Skip the fmt and clippy stages.
    pub skip_lint: bool,
    /// Extra arguments for `cargo test`; those after a `--` are for the test binaries.
    pub args: Vec<String>,
}

pub fn run(options: &Options) -> Result<()> {
    let mut stages = Stages::default();
    disk::ensure_room_for_build(&cmd::target_dir())?;
    stages.run("setup", setup::run)?;
    if !options.skip_lint {
        stages.run("fmt", || {
            cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
        stages.run("clippy", || {
            // The XDP program only builds for the BPF target (no_std, no_main), so it is
            // linted on its own, with the toolchain and target it is built with.
            cmd::run(cmd::cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "cdn-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            let pinned = format!("+{}", toolchain::pin()?.name);
            cmd::run(
                cmd::cargo()
                    .current_dir(cmd::workspace_root().join("cdn-ebpf"))
                    .args([
                        pinned.as_str(),
                        "clippy",
                        "--release",
                        "--target",
                        "bpfel-unknown-none",
                        "-Z",
                        "build-std=core",
                        "--bins",
                        "--",
                        "-D",
                        "warnings",
                    ]),
            )
        })?;
    }
    // The lab tests run the binaries (cdn-steer, the lab's web server) as processes.
    stages.run("build", || {
        cmd::run(cmd::cargo().args([
            "build",
            "--release",
            "--workspace",
            "--exclude",
            "cdn-ebpf",
            "--bins",
        ]))
    })?;
    // The static binaries and the Debian packages take minutes to build (fat LTO, two
    // architectures): built once here, tested by tests/tests/packaging.rs.
    stages.run("package", || {
        dist::build()?;
        deb::build().map(drop)
    })?;
    stages.run("test", || cmd::run(&mut test_command(&options.args)))?;
    stages.report();
    Ok(())
}

/// `cargo test --workspace --release [cargo args] -- --test-threads=2 [harness args]`: release
/// because the benchmark-like and packet tests run much faster optimised.
fn test_command(args: &[String]) -> std::process::Command {
    let (cargo_args, harness_args) = match args.iter().position(|arg| arg == "--") {
        Some(split) => (&args[..split], &args[split + 1..]),
        None => (args, &[][..]),
    };
    let mut command = cmd::cargo();
    command
        .args(["test", "--workspace", "--release"])
        .args(cargo_args)
        .arg("--");
    // libtest rejects an option given twice, so the caller's own thread count wins.
    if !harness_args
        .iter()
        .any(|arg| arg.starts_with("--test-threads"))
    {
        command.arg(TEST_THREADS);
    }
    command.args(harness_args);
    command
}

/// Timings of the stages run so far, printed at the end, or when a stage fails.
#[derive(Default)]
struct Stages {
    done: Vec<(&'static str, Duration)>,
    start: Option<Instant>,
}

impl Stages {
    fn run(&mut self, name: &'static str, stage: impl FnOnce() -> Result<()>) -> Result<()> {
        self.start.get_or_insert_with(Instant::now);
        println!("==> {name}");
        let start = Instant::now();
        let result = stage();
        let elapsed = start.elapsed();
        match result {
            Ok(()) => {
                println!("==> {name}: ok in {}", seconds(elapsed));
                self.done.push((name, elapsed));
                Ok(())
            }
            Err(err) => {
                println!("==> {name}: FAILED after {}", seconds(elapsed));
                self.report();
                Err(err).with_context(|| format!("stage `{name}` failed"))
            }
        }
    }

    fn report(&self) {
        println!("stage timings:");
        for (name, elapsed) in &self.done {
            println!("  {name:<8}{:>10}", seconds(*elapsed));
        }
        let total = self.start.map(|start| start.elapsed()).unwrap_or_default();
        println!("  {:<8}{:>10}", "total", seconds(total));
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.2}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::test_command;
    use crate::cmd;

    fn described(args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(ToString::to_string).collect();
        cmd::describe(&test_command(&args))
    }

    #[test]
    fn splits_cargo_and_harness_arguments() {
        assert_eq!(
            described(&[]),
            "cargo test --workspace --release -- --test-threads=2"
        );
        assert_eq!(
            described(&["owner_path"]),
            "cargo test --workspace --release owner_path -- --test-threads=2"
        );
        assert_eq!(
            described(&["owner_path", "--", "--nocapture"]),
            "cargo test --workspace --release owner_path -- --test-threads=2 --nocapture"
        );
        assert_eq!(
            described(&["--", "--test-threads=1"]),
            "cargo test --workspace --release -- --test-threads=1"
        );
    }
}
