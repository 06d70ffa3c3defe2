//! The Rust side of the toolchain: the pinned nightly with `rust-src` (the eBPF crate is built
//! with `-Z build-std` for bpfel-unknown-none) and clippy (which lints it), and bpf-linker
//! (which links it, through LLVM 22).

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// The eBPF crate's toolchain file: the one place that says which nightly builds it.
const TOOLCHAIN_FILE: &str = include_str!("../../cdn-ebpf/rust-toolchain.toml");

/// The pinned nightly, as the toolchain file gives it.
#[derive(Debug, PartialEq, Eq)]
pub struct Pin {
    /// The toolchain name the build uses (a link that setup makes).
    pub name: String,
    /// The dated nightly it stands for, e.g. `nightly-2026-05-20`.
    pub dated: String,
    /// The commit its rustc is built from (`rustc -vV`'s `commit-hash`).
    pub commit: String,
}

/// The pinned nightly. The file is compiled in, so a broken one fails xtask's own tests.
pub fn pin() -> Result<Pin> {
    parse_pin(TOOLCHAIN_FILE).context("cdn-ebpf/rust-toolchain.toml")
}

/// Reads `channel = "..."` and the `# pinned-nightly = "..."` and `# pinned-commit-hash = "..."`
/// lines (comments, since rustup allows no keys of ours in the file).
fn parse_pin(text: &str) -> Result<Pin> {
    let value = |key: &str| -> Result<String> {
        text.lines()
            .find_map(|line| {
                let (k, v) = line.trim_start_matches(['#', ' ']).split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
            })
            .with_context(|| format!("no {key} in the toolchain file"))
    };
    Ok(Pin {
        name: value("channel")?,
        dated: value("pinned-nightly")?,
        commit: value("pinned-commit-hash")?,
    })
}

/// The components the eBPF crate needs of the pinned nightly: the standard library's source,
/// which `-Z build-std` compiles, and clippy, which `cargo xtask test` runs on it. Each with a
/// file that shows it is there, relative to the toolchain's directory.
const COMPONENTS: &[(&str, &str)] = &[
    ("rust-src", "lib/rustlib/src/rust/library/core/Cargo.toml"),
    ("clippy", "bin/cargo-clippy"),
];

/// Makes the pinned nightly available under its name: already there with the right rustc and
/// components, it only checks (one `rustc -vV`); otherwise it links the name to the dated nightly,
/// installing that first where it can, or to an installed plain `nightly` built from the very
/// same commit (for machines that cannot download toolchains).
pub fn ensure_nightly() -> Result<()> {
    let pin = pin()?;
    match probe(&pin.name) {
        Some(found) if found.matches(&pin) => {
            println!("toolchain: {} ok (rustc {})", pin.name, short(&pin.commit));
            return Ok(());
        }
        // Typically `rustup update nightly` changed the toolchain the name links to.
        Some(found) => println!(
            "toolchain: {} is rustc {}{}, not rustc {} with [{}]; linking it again",
            pin.name,
            short(&found.commit),
            if found.missing.is_empty() {
                String::new()
            } else {
                format!(" without [{}]", found.missing.join(", "))
            },
            short(&pin.commit),
            COMPONENTS
                .iter()
                .map(|(c, _)| *c)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => println!("toolchain: {} missing; linking it", pin.name),
    }

    let mut tried = Vec::new();
    if probe(&pin.dated).is_none() {
        println!("installing toolchain: {}", pin.dated);
        let install = cmd::run(cmd::new("rustup").args([
            "toolchain",
            "install",
            &pin.dated,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--component",
            "clippy",
        ]));
        if let Err(e) = install {
            println!("toolchain: cannot install {}: {e:#}", pin.dated);
        }
    }
    for candidate in [pin.dated.as_str(), "nightly"] {
        let Some(mut found) = probe(candidate) else {
            tried.push(format!("{candidate}: not installed"));
            continue;
        };
        if found.commit != pin.commit {
            tried.push(format!("{candidate}: rustc {}", short(&found.commit)));
            continue;
        }
        for component in &found.missing {
            println!("installing toolchain component: {component} ({candidate})");
            cmd::run(cmd::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                candidate,
            ]))?;
        }
        if !found.missing.is_empty() {
            found = probe(candidate).context("toolchain gone after adding components")?;
        }
        cmd::run(
            cmd::new("rustup")
                .args(["toolchain", "link", &pin.name])
                .arg(&found.sysroot),
        )?;
        match probe(&pin.name) {
            Some(linked) if linked.matches(&pin) => {
                println!("toolchain: {} ok (linked to {candidate})", pin.name);
                return Ok(());
            }
            _ => bail!(
                "{} does not check out after linking it to {candidate}",
                pin.name
            ),
        }
    }
    bail!(
        "the pinned nightly {} (rustc commit {}) is not available: {}. Install it with \
         `rustup toolchain install {} --component rust-src --component clippy`, or change the pin in \
         cdn-ebpf/rust-toolchain.toml",
        pin.dated,
        pin.commit,
        tried.join("; "),
        pin.dated
    )
}

/// What an installed toolchain is.
struct Found {
    commit: String,
    sysroot: PathBuf,
    /// Components of [`COMPONENTS`] it lacks.
    missing: Vec<&'static str>,
}

impl Found {
    fn matches(&self, pin: &Pin) -> bool {
        self.commit == pin.commit && self.missing.is_empty()
    }
}

/// Looks at `toolchain` through `rustup run` (which never installs anything); `None` when it is
/// not installed or its rustc does not run.
fn probe(toolchain: &str) -> Option<Found> {
    let rustc = |args: &[&str]| -> Option<String> {
        let output = cmd::output(
            cmd::new("rustup")
                // A probe must not download: a missing toolchain is an answer.
                .env("RUSTUP_AUTO_INSTALL", "0")
                .args(["run", toolchain, "rustc"])
                .args(args),
        );
        match output {
            Ok(out) if out.status.success() => {
                Some(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            _ => None,
        }
    };
    let commit = commit_hash(&rustc(&["-vV"])?)?.to_owned();
    let sysroot = PathBuf::from(rustc(&["--print", "sysroot"])?.trim());
    let missing = missing_components(&sysroot);
    Some(Found {
        commit,
        sysroot,
        missing,
    })
}

/// The `commit-hash:` line of `rustc -vV`.
fn commit_hash(version: &str) -> Option<&str> {
    version
        .lines()
        .find_map(|line| line.strip_prefix("commit-hash:"))
        .map(str::trim)
}

/// The components of [`COMPONENTS`] the toolchain at `sysroot` lacks. Checked on disk: rustup
/// cannot list the components of a linked toolchain.
fn missing_components(sysroot: &Path) -> Vec<&'static str> {
    COMPONENTS
        .iter()
        .filter(|(_, file)| !sysroot.join(file).is_file())
        .map(|(component, _)| *component)
        .collect()
}

fn short(commit: &str) -> &str {
    commit.get(..9).unwrap_or(commit)
}

/// The second architecture `cargo xtask dist` and `deb` build for (arm64 PoP boxes).
pub const CROSS_TARGET: &str = "aarch64-unknown-linux-gnu";

/// Adds the standard library for `target` to the toolchain that builds the controller (the one
/// cargo picks in the workspace root, `RUSTUP_TOOLCHAIN` included), unless it is there already.
pub fn ensure_target(target: &str) -> Result<()> {
    let installed = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|line| line.trim() == target)
    };
    let list = || {
        cmd::output(cmd::new("rustup").current_dir(cmd::workspace_root()).args([
            "target",
            "list",
            "--installed",
        ]))
    };
    if installed(&list()?) {
        println!("rust target: {target} ok");
        return Ok(());
    }
    println!("installing rust target: {target}");
    cmd::run(
        cmd::new("rustup")
            .current_dir(cmd::workspace_root())
            .args(["target", "add", target]),
    )?;
    if !installed(&list()?) {
        bail!("`rustup target add {target}` succeeded but the target is still not installed");
    }
    Ok(())
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
    use super::*;

    #[test]
    fn the_toolchain_file_pins_one_nightly() -> Result<()> {
        let pin = pin()?;
        assert!(pin.dated.starts_with("nightly-20"), "{pin:?}");
        // rustup refuses dated names for linked toolchains; ours says which nightly it is.
        assert_eq!(pin.name, format!("cdn-{}", pin.dated));
        assert_eq!(pin.commit.len(), 40, "{pin:?}");
        assert!(pin.commit.bytes().all(|b| b.is_ascii_hexdigit()), "{pin:?}");
        Ok(())
    }

    #[test]
    fn pins_and_versions_are_read() -> Result<()> {
        let text = "# pinned-nightly = \"nightly-2030-01-02\"\n\
                    #pinned-commit-hash = \"abc\"\n[toolchain]\nchannel = \"x\"\n";
        assert_eq!(
            parse_pin(text)?,
            Pin {
                name: "x".into(),
                dated: "nightly-2030-01-02".into(),
                commit: "abc".into()
            }
        );
        let e = parse_pin("[toolchain]\nchannel = \"x\"\n").expect_err("no pin");
        assert!(e.to_string().contains("pinned-nightly"), "{e}");

        let version = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                       commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\nhost: x\n";
        assert_eq!(
            commit_hash(version),
            Some("e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a")
        );
        assert_eq!(commit_hash("rustc 1.0\n"), None);
        assert_eq!(short("e50aa6fba4e63ab3"), "e50aa6fba");
        Ok(())
    }
}
