//! `cargo xtask setup`: makes sure everything the build, the tests and the lab need is installed.
//! Every step checks before it installs, so a run on a ready machine only spawns a few cheap
//! queries; every task calls this first.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::{apt, toolchain};

/// Debian packages the project needs:
/// - llvm-22-dev and libpolly-22-dev: bpf-linker is built against LLVM 22, whose link flags
///   (`llvm-config --link-static --libs`) include Polly;
/// - bpftool, iproute2, ethtool, xdp-tools: loading, inspecting and tuning XDP programs and veths;
/// - bird2: the BGP speakers of the lab;
/// - prometheus: `promtool`, which checks the metrics the controller exports;
/// - curl, iputils-ping: traffic and reachability checks in the lab;
/// - gcc-aarch64-linux-gnu, libc6-dev-arm64-cross: the linker and the static glibc of the arm64
///   build (`cargo xtask dist`);
/// - qemu-user: runs that arm64 build in the tests; lintian: checks the Debian packages.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "bird2",
    "iproute2",
    "ethtool",
    "xdp-tools",
    "prometheus",
    "curl",
    "iputils-ping",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user",
    "lintian",
];

pub fn run() -> Result<()> {
    let start = Instant::now();
    ensure_root()?;
    toolchain::ensure_nightly()?;
    // Before bpf-linker: building it needs LLVM's development files.
    apt::ensure(PACKAGES)?;
    toolchain::ensure_bpf_linker()?;
    toolchain::ensure_target(toolchain::CROSS_TARGET)?;
    println!("setup: done in {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Installing packages, and everything after (attaching XDP programs, creating namespaces,
/// running BIRD), needs root; failing here is clearer than failing halfway through `apt-get`.
fn ensure_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "cargo xtask must run as root (effective uid is {euid}): it installs packages and \
             its tests attach XDP programs and create network namespaces; try `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}
