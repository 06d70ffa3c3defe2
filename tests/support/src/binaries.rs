//! The workspace's binaries as the tests run them: built by cargo next to the test executable
//! (`target/release/deps/<test>` -> `target/release/<binary>`).

use std::path::PathBuf;

use anyhow::{Context as _, Result};

/// The `cdn-steer` controller built for this test run.
pub fn cdn_steer() -> Result<PathBuf> {
    built(
        "cdn-steer",
        "cargo build --release -p cdn-user --bin cdn-steer",
    )
}

/// The binary `name` in the test executable's directory or the one above it; `build` says how
/// to build it when it is missing.
pub fn built(name: &str, build: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not built ({build})"))
}
