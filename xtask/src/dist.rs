//! `cargo xtask dist`: the controller as one static, stripped binary per architecture the nodes
//! run, at `target/<triple>/dist/cdn-steer`.
//!
//! Static glibc (`+crt-static` on the `-gnu` targets) rather than musl: the binary links the same
//! libc the tests exercise on the host, keeps glibc's allocator (musl's is markedly slower under
//! tokio's many small allocations), and the arm64 build needs nothing but Debian's cross gcc and
//! its static glibc (`gcc-aarch64-linux-gnu`, `libc6-dev-arm64-cross`), where musl would need a
//! second pair of Rust targets and a musl cross toolchain Debian does not ship. Name resolution is
//! the one thing static glibc does poorly (NSS modules), and the controller resolves no names: its
//! configuration holds addresses.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use crate::{cmd, toolchain};

/// One architecture the nodes run.
pub struct Arch {
    /// Rust's target triple.
    pub triple: &'static str,
    /// Debian's name for it.
    pub deb: &'static str,
    /// The C compiler that links for it when it is not the host (cargo's default is `cc`).
    cross_linker: &'static str,
}

pub const ARCHES: &[Arch] = &[
    Arch {
        triple: "x86_64-unknown-linux-gnu",
        deb: "amd64",
        cross_linker: "x86_64-linux-gnu-gcc",
    },
    Arch {
        triple: toolchain::CROSS_TARGET,
        deb: "arm64",
        cross_linker: "aarch64-linux-gnu-gcc",
    },
];

impl Arch {
    /// Where `cargo xtask dist` puts this architecture's binary.
    pub fn binary(&self) -> PathBuf {
        cmd::workspace_root()
            .join("target")
            .join(self.triple)
            .join("dist")
            .join("cdn-steer")
    }

    /// cargo's environment variable for this target's linker.
    fn linker_var(&self) -> String {
        format!(
            "CARGO_TARGET_{}_LINKER",
            self.triple.to_uppercase().replace('-', "_")
        )
    }
}

/// The host's target triple, as rustc reports it.
pub fn host() -> Result<String> {
    let out = cmd::output(cmd::new("rustc").arg("-vV"))?;
    let version = String::from_utf8_lossy(&out.stdout);
    version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` printed no host triple")
}

/// The architecture of the host, whose binary can run here (to generate the man pages).
pub fn host_arch() -> Result<&'static Arch> {
    let host = host()?;
    match ARCHES.iter().find(|arch| arch.triple == host) {
        Some(arch) => Ok(arch),
        None => bail!("the host is {host}; dist builds from one of the targets it builds"),
    }
}

/// Builds the static binaries, both targets in one cargo run so their builds share the
/// dependency graph and the two cores. cdn-user's build script runs once per target and so
/// builds the XDP object twice; aya-build compiles it for bpfel-unknown-none either way (the
/// target only sets a `bpf_target_arch` cfg, which the XDP program does not read): the two
/// objects' code is identical, only the paths in their debug information differ. Cargo keeps
/// each, so a rebuild is quick.
pub fn build() -> Result<()> {
    let host = host()?;
    let mut cargo = cmd::cargo();
    // `crt-static` goes through RUSTFLAGS with explicit `--target`s, so that it applies to the
    // binaries but not to the build's own proc-macros and build scripts.
    cargo
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--profile",
            "dist",
            "-p",
            "cdn-user",
            "--bin",
            "cdn-steer",
        ]);
    for arch in ARCHES {
        cargo.args(["--target", arch.triple]);
        if arch.triple != host {
            cargo.env(arch.linker_var(), arch.cross_linker);
        }
    }
    cmd::run(&mut cargo)?;
    for arch in ARCHES {
        let path = arch.binary();
        let size = std::fs::metadata(&path)
            .with_context(|| format!("{} after the build", path.display()))?
            .len();
        println!(
            "{}: {} bytes ({:.2} MiB), static",
            path.display(),
            size,
            size as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}
