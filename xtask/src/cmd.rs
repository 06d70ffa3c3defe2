//! Spawning commands: every command is echoed (`+ cargo test ...`) before it runs, so logs show
//! exactly what was executed, and every failure names the command and its exit status.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::LazyLock,
};

use anyhow::{Context as _, Result, bail};

/// Where `cargo install` puts binaries (`$CARGO_HOME/bin`, by default `~/.cargo/bin`).
fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::home_dir().map(|home| home.join(".cargo")))
        .map(|cargo_home| cargo_home.join("bin"))
}

/// `PATH` for every child: ours, plus the cargo bin directory when it is missing. bpf-linker is
/// installed there, and aya-build (in cdn-user's build script) must find it and `rustup` even
/// when xtask was started from a shell that never sourced `~/.cargo/env`. Setting it per command
/// instead of in our own environment avoids the `unsafe` `env::set_var`.
static PATH: LazyLock<OsString> = LazyLock::new(|| {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect())
        .unwrap_or_default();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.insert(0, bin);
    }
    // Joining only fails on a directory containing ':', which cannot have come from PATH; the
    // cargo bin directory could in theory, in which case the inherited PATH is the best we have.
    env::join_paths(dirs).unwrap_or_else(|_| env::var_os("PATH").unwrap_or_default())
});

/// The workspace root: cargo commands run from there whatever directory xtask was started in.
pub fn workspace_root() -> &'static Path {
    // xtask/ sits directly under the root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set (relative to the workspace root, as
/// cargo takes it), else `target/` in the workspace root.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// A command for `program`, with the cargo bin directory on its `PATH`. Since `PATH` is set on
/// the command, std also uses it to find `program` itself.
pub fn new(program: &str) -> Command {
    let mut command = Command::new(program);
    command.env("PATH", &*PATH);
    command
}

/// A `cargo` command run in the workspace root. It goes through the rustup proxy on `PATH`, so
/// the toolchain the caller chose (`cargo +toolchain xtask`, which sets `RUSTUP_TOOLCHAIN`)
/// carries over. The rest of the environment (`CARGO_TERM_COLOR`, `RUSTFLAGS`...) is inherited
/// untouched.
pub fn cargo() -> Command {
    let mut command = new("cargo");
    command.current_dir(workspace_root());
    command
}

/// How a command is echoed: environment we set (except `PATH`, which is on every command), the
/// program and its arguments, quoted where a shell would need it.
pub fn describe(command: &Command) -> String {
    let envs = command.get_envs().filter_map(|(key, value)| {
        let value = value?;
        (key != "PATH").then(|| format!("{}={}", key.to_string_lossy(), quote(value)))
    });
    let words = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(quote);
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

fn quote(word: &std::ffi::OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Echoes and runs `command`, inheriting stdio; fails unless it exits successfully.
pub fn run(command: &mut Command) -> Result<()> {
    let description = describe(command);
    println!("+ {description}");
    let status = command
        .status()
        .with_context(|| format!("failed to start `{description}`"))?;
    if !status.success() {
        bail!("`{description}` failed with {status}");
    }
    Ok(())
}

/// Runs `command` quietly and returns what it printed, whatever its exit status: for probes such
/// as `dpkg-query`, which exits 1 when some package is unknown but still reports the others.
pub fn output(command: &mut Command) -> Result<Output> {
    command
        .output()
        .with_context(|| format!("failed to start `{}`", describe(command)))
}
