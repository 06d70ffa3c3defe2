//! Debian packages: query dpkg once, and only when something is missing run `apt-get update`
//! and install it. Installing bird2 may start the distribution's BIRD service; the lab runs its
//! own BIRD instances, so one started by the install is stopped again.

use std::{collections::BTreeSet, fs, path::Path, process::Stdio, thread, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Installs whichever of `packages` are not installed.
pub fn ensure(packages: &[&str]) -> Result<()> {
    let missing = missing(packages)?;
    if missing.is_empty() {
        println!("apt packages: all {} present", packages.len());
        return Ok(());
    }
    println!("installing apt packages: {}", missing.join(" "));

    let birds_before = pids_named(BIRD)?;
    let installed = install(&missing);
    // Even after a failed install: bird2 may have been unpacked and started before the failure.
    stop_new_daemons(BIRD, &birds_before)?;
    installed?;

    // apt-get can succeed without installing a package, e.g. when it is held.
    let still_missing = self::missing(packages)?;
    if !still_missing.is_empty() {
        bail!(
            "apt-get install succeeded but these packages are still not installed: {}",
            still_missing.join(" ")
        );
    }
    Ok(())
}

/// The packages dpkg does not report as fully installed. One `dpkg-query` for all of them keeps a
/// no-op setup fast.
fn missing<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    // dpkg-query exits 1 when it knows nothing of some package (never installed), yet still
    // prints the others, so its exit status is not an error here.
    let output = cmd::output(
        cmd::new("dpkg-query")
            .args(["-W", "-f=${Package}\t${Status}\n"])
            .args(packages),
    )
    .context("cannot query the installed Debian packages (is this Debian?)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // A multi-arch package can be listed once per architecture; installed for one is enough.
    let installed: BTreeSet<&str> = stdout
        .lines()
        .filter_map(|line| line.split_once('\t'))
        // Anything else ("deinstall ok config-files", half-installed...) needs installing again.
        .filter(|(_, status)| *status == "install ok installed")
        .map(|(package, _)| package)
        .collect();
    Ok(packages
        .iter()
        .copied()
        .filter(|package| !installed.contains(package))
        .collect())
}

fn install(packages: &[&str]) -> Result<()> {
    // The lists may be stale or absent (container images ship without them); update once, here,
    // since nothing gets here unless something must be installed.
    cmd::run(cmd::new("apt-get").arg("update").stdin(Stdio::null()))?;
    cmd::run(
        cmd::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            // CI has no stdin; make sure nothing ever waits for an answer.
            .stdin(Stdio::null()),
    )
}

/// The name of BIRD's processes and of the service bird2 installs.
const BIRD: &str = "bird";

/// Pids of live processes named exactly `name` (what `pgrep -x` reports, less zombies), read
/// from /proc so this does not depend on procps being installed.
fn pids_named(name: &str) -> Result<BTreeSet<u32>> {
    let mut pids = BTreeSet::new();
    for entry in fs::read_dir("/proc").context("failed to list /proc")? {
        let entry = entry.context("failed to list /proc")?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        // The process may exit between listing and reading; that is not an error.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ...": comm may itself contain spaces and parentheses.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, comm)| comm);
        // A zombie has exited already; it only waits for its parent to reap it.
        let zombie = tail.trim_start().starts_with('Z');
        if comm == Some(name) && !zombie {
            pids.insert(pid);
        }
    }
    Ok(pids)
}

/// Stops any process called `name` that was not running before the install: the package's
/// service, which would otherwise keep running with the default configuration. Daemons that
/// were already running (someone's lab) are left alone.
fn stop_new_daemons(name: &str, before: &BTreeSet<u32>) -> Result<()> {
    let started =
        || -> Result<Vec<u32>> { Ok(pids_named(name)?.difference(before).copied().collect()) };
    if started()?.is_empty() {
        return Ok(());
    }
    // The same test as sd_booted(3): the install went through systemd if systemd is init.
    if Path::new("/run/systemd/system").exists() {
        println!("the install started the {name} service; stopping it");
        // If this fails, the pids are killed below.
        if let Err(err) = cmd::run(cmd::new("systemctl").args(["stop", name])) {
            println!("warning: {err:#}");
        }
    }
    let pids = started()?;
    if pids.is_empty() {
        return Ok(());
    }
    println!("stopping {name} started by the install: pid {pids:?}");
    for &pid in &pids {
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions. The pid is one we just saw running
        // as `name`; ESRCH (it has exited since) is fine, hence the ignored result.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    // BIRD exits promptly on SIGTERM; give it a few seconds before declaring failure.
    for _ in 0..50 {
        if started()?.is_empty() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{name} started by the install is still running: pid {:?}",
        started()?
    )
}

#[cfg(test)]
mod tests {
    use std::{env, fs, process::Command};

    use super::{pids_named, stop_new_daemons};

    /// A stand-in daemon: `sleep` under a name no real process has (15 characters, the most
    /// /proc keeps), so the test cannot touch anyone's BIRD.
    #[test]
    fn stops_only_daemons_started_since() {
        const NAME: &str = "xtask-test-bird";
        let dir = env::temp_dir().join(format!("xtask-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fake = dir.join(NAME);
        fs::copy("/bin/sleep", &fake).unwrap();

        // Another test thread forking while the copy's write descriptor is still open gives its
        // child that descriptor until it execs, and exec of the copy then fails with "text
        // file busy": retried for a moment.
        let spawn = || {
            for _ in 0..50 {
                match Command::new(&fake).arg("30").spawn() {
                    Err(e) if e.raw_os_error() == Some(26) => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    other => return other.unwrap(),
                }
            }
            panic!("{} stayed busy for a second", fake.display());
        };
        let mut old = spawn();
        let before = pids_named(NAME).unwrap();
        assert!(before.contains(&old.id()));
        let mut new = spawn();

        stop_new_daemons(NAME, &before).unwrap();
        assert!(!new.wait().unwrap().success(), "the new daemon was killed");
        assert!(
            pids_named(NAME).unwrap().contains(&old.id()),
            "the old one was not"
        );

        old.kill().unwrap();
        old.wait().unwrap();
        fs::remove_dir_all(dir).unwrap();
    }
}
