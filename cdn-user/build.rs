//! Builds the XDP program (the pinned nightly, bpfel-unknown-none) so the controller can embed
//! it.
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};

/// The eBPF crate's toolchain file, which names the pinned nightly.
const TOOLCHAIN_FILE: &str = include_str!("../cdn-ebpf/rust-toolchain.toml");

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../cdn-ebpf/rust-toolchain.toml");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("cdn-user has no parent directory"))?
        .join("cdn-ebpf");
    let root = root.to_str().context("non UTF-8 path to cdn-ebpf")?;
    let toolchain = pinned_value("channel")?;
    check_toolchain(toolchain, pinned_value("pinned-commit-hash")?)?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "cdn-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain),
    )
}

/// `key = "value"` from the toolchain file (the pin's own keys sit in comments).
fn pinned_value(key: &str) -> anyhow::Result<&'static str> {
    TOOLCHAIN_FILE
        .lines()
        .find_map(|line| {
            let (k, v) = line.trim_start_matches(['#', ' ']).split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"'))
        })
        .with_context(|| format!("no {key} in cdn-ebpf/rust-toolchain.toml"))
}

/// Fails with what to do when the pinned toolchain is missing or is not the pinned rustc (the
/// link `cargo xtask setup` makes points at a `nightly` that has since been updated).
fn check_toolchain(toolchain: &str, commit: &str) -> anyhow::Result<()> {
    let output = match Command::new("rustup")
        .env("RUSTUP_AUTO_INSTALL", "0")
        .args(["run", toolchain, "rustc", "-vV"])
        .output()
    {
        Ok(output) => output,
        // aya-build goes on with the current toolchain then, and says so.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context("running rustup"),
    };
    let version = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "the pinned nightly {toolchain} is not available ({}); run `cargo xtask setup`",
            // rustup's first line says what is wrong; a backtrace may follow.
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
        );
    }
    if !version
        .lines()
        .any(|l| l.strip_prefix("commit-hash:").map(str::trim) == Some(commit))
    {
        bail!("{toolchain} is not the pinned rustc {commit}:\n{version}run `cargo xtask setup`");
    }
    Ok(())
}
