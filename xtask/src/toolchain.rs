//! The Rust side of the toolchain: a nightly with `rust-src` (the eBPF crate is built with
//! `-Z build-std` for bpfel-unknown-none) and bpf-linker (which links it, through LLVM 22).

use std::io::ErrorKind;

use anyhow::{Context as _, Result};

use crate::cmd;

/// The nightly aya-build uses (`rustup run nightly cargo ...`).
const NIGHTLY: &str = "nightly";

pub fn ensure_nightly() -> Result<()> {
    let toolchains = cmd::stdout(cmd::new("rustup").args(["toolchain", "list"]))?;
    if has_toolchain(&toolchains, NIGHTLY) {
        println!("toolchain: {NIGHTLY} ok");
    } else {
        println!("installing toolchain: {NIGHTLY}");
        cmd::run(cmd::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }

    let components = cmd::stdout(cmd::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    // rust-src is target independent, so it is listed without a target suffix; accept one anyway.
    if components
        .lines()
        .any(|line| line == "rust-src" || line.starts_with("rust-src-"))
    {
        println!("toolchain: rust-src ok");
    } else {
        println!("installing toolchain component: rust-src");
        cmd::run(cmd::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

/// Whether `rustup toolchain list` shows `name` itself: `nightly-x86_64-unknown-linux-gnu` is
/// `nightly`, while a dated `nightly-2025-01-01-...` is a different toolchain.
fn has_toolchain(list: &str, name: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|toolchain| {
            toolchain == name
                || toolchain
                    .strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        })
}

pub fn ensure_bpf_linker() -> Result<()> {
    let reinstall = match cmd::new("bpf-linker").arg("--version").output() {
        Ok(output) if output.status.success() => {
            let version = String::from_utf8_lossy(&output.stdout);
            println!("bpf-linker: ok ({})", version.trim());
            return Ok(());
        }
        Err(err) if err.kind() == ErrorKind::NotFound => false,
        // Present but broken (typically the LLVM it was built against is gone): build it again;
        // `cargo install` would otherwise say it is already installed and do nothing.
        Ok(output) => {
            println!(
                "bpf-linker: `bpf-linker --version` failed with {}; reinstalling",
                output.status
            );
            true
        }
        Err(err) => return Err(err).context("failed to start `bpf-linker --version`"),
    };
    println!("installing bpf-linker (built against LLVM 22; takes a few minutes)");
    let mut install = cmd::new("cargo");
    install
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args([
            "install",
            "bpf-linker",
            // Pinned: the version the project is built and verified with.
            "--version",
            "0.13.0",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .args(reinstall.then_some("--force"));
    cmd::run(&mut install)
}

#[cfg(test)]
mod tests {
    use super::has_toolchain;

    #[test]
    fn recognises_nightly_but_not_dated_nightlies() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-2025-01-01-x86_64-unknown-linux-gnu\n";
        assert!(!has_toolchain(list, "nightly"));
        let list = format!("{list}nightly-x86_64-unknown-linux-gnu\n");
        assert!(has_toolchain(&list, "nightly"));
        assert!(has_toolchain("nightly\n", "nightly"));
        assert!(!has_toolchain("", "nightly"));
    }
}
