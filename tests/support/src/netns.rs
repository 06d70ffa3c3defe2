//! Network namespaces: created with a unique name, deleted when dropped (also when a test
//! fails), and usable from Rust code through a thread that joins the namespace.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

use crate::cmd::{run, run_with_input};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Moves the calling thread into the network namespace at `path` (`/run/netns/<name>`):
/// sockets it opens and BPF_PROG_TEST_RUN calls it makes live there from then on.
pub fn join(path: &str) -> std::io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns(2) with a namespace fd we hold open for the duration of the call; it
    // changes only the calling thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A network namespace that exists as long as this value.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `cdnt-<tag>-<pid>-<n>` with its loopback up. The pid and counter keep test
    /// binaries running side by side, and tests within one binary, apart.
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!(
            "cdnt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        // From here on, dropping `ns` deletes the namespace, also if the next step fails.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for threads that [`join`] the namespace.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip <args>` inside the namespace; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Many `ip` commands, one a line, in one `ip -batch` run.
    pub fn ip_batch(&self, commands: &str) -> Result<String> {
        run_with_input("ip", &["-n", &self.name, "-batch", "-"], commands)
    }

    /// A shell script (`sh -ec`) inside the namespace; returns its stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        run("ip", &["netns", "exec", &self.name, "sh", "-ec", script])
    }

    /// A `Command` that runs `program` inside the namespace. `ip netns exec` execs the
    /// program in place, so the child's pid is the program's own.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// The interface index of `dev` in the namespace.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        // "7: a0@a1: <BROADCAST,..." -> 7
        let out = self.ip(&["-o", "link", "show", "dev", dev])?;
        out.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no interface index in {out:?}"))
    }

    /// Runs `f` on a thread that has joined the namespace (sockets it opens and
    /// BPF_PROG_TEST_RUN calls it makes live there) and returns its result. A panic in `f`
    /// goes on in the caller, with its own message, as if `f` had run there.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        std::thread::scope(|scope| {
            let joined = scope.spawn(|| -> Result<T> {
                join(&path).with_context(|| format!("joining {path}"))?;
                Ok(f())
            });
            joined
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::*;

    /// The network namespace the calling thread is in, as `net:[inode]`.
    fn current() -> Result<String> {
        let link = std::fs::read_link("/proc/thread-self/ns/net").context("reading ns/net")?;
        link.into_os_string()
            .into_string()
            .map_err(|l| anyhow!("odd ns/net link {l:?}"))
    }

    #[test]
    fn lifecycle_commands_and_threads() -> Result<()> {
        let ns = Netns::new("support")?;
        let name = ns.name().to_owned();
        assert!(name.starts_with(&format!("cdnt-support-{}-", std::process::id())));
        assert!(std::path::Path::new(&ns.path()).exists());

        // Loopback is up; interfaces made with a batch are there.
        assert!(ns.ip(&["-o", "link", "show", "lo"])?.contains("UP"));
        ns.ip_batch(
            "link add d0 type veth peer name d1\nlink set d0 up\nlink set d1 up\naddr add 10.9.0.1/24 dev d0\n",
        )?;
        let d0 = ns.ifindex("d0")?;
        assert!(d0 > 1, "{d0}");
        assert!(ns.ifindex("nosuch").is_err());
        assert_eq!(
            ns.sh("cat /sys/class/net/d0/ifindex")?.trim(),
            d0.to_string()
        );
        let out = ns
            .command("ip")
            .args(["-o", "addr", "show", "d0"])
            .output()?;
        assert!(String::from_utf8_lossy(&out.stdout).contains("10.9.0.1/24"));

        // A thread in the namespace sees another network namespace than this one, and
        // d0's address is local there.
        let outside = current()?;
        let inside = ns.enter(|| -> Result<String> {
            std::net::UdpSocket::bind("10.9.0.1:0").context("binding in the namespace")?;
            current()
        })??;
        assert_ne!(inside, outside);
        assert_eq!(current()?, outside, "the caller stays where it was");
        assert!(std::net::UdpSocket::bind("10.9.0.1:0").is_err());

        // Panics keep their message.
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = ns.enter(|| panic!("inside the namespace"));
        }))
        .expect_err("the panic went on");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"inside the namespace"));

        drop(ns);
        assert!(!std::path::Path::new(&format!("/run/netns/{name}")).exists());
        Ok(())
    }

    #[test]
    fn deleted_when_a_test_panics() {
        let mut name = String::new();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ns = Netns::new("support").expect("netns");
            name = ns.name().to_owned();
            panic!("test failure");
        }));
        assert!(result.is_err());
        assert!(!name.is_empty());
        assert!(!std::path::Path::new(&format!("/run/netns/{name}")).exists());
    }
}
