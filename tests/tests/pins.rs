//! Pins that outlive the daemon. `ip netns exec` gives the daemon a private mount namespace
//! with a fresh /sys, so a bpffs it mounts on /sys/fs/bpf exists only there and vanishes with
//! it, detaching XDP. The daemon refuses to start so (with a message naming the fix), runs
//! with `--allow-ephemeral-pins` (and then, indeed, loses XDP on kill -9), and with a bpffs
//! mounted on the host beforehand keeps XDP attached through kill -9. Also: after a refused
//! reload of a file that no longer parses, `--socket` still reaches the daemon.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use cdn_test_support::{
    BpfMount, Netns,
    binaries::cdn_steer,
    process::{Group, Process},
    scratch::ScratchDir,
    wait,
};

/// One node that is its own only member, in a network namespace with `eth0` and a listener
/// for its health check.
struct Node {
    // Declared first, dropped first: the daemon goes before the namespace.
    daemon: Option<Process>,
    config: PathBuf,
    socket: PathBuf,
    ns: Netns,
    dir: ScratchDir,
}

impl Node {
    fn new(tag: &str, bpffs: &Path) -> Result<Self> {
        let dir = ScratchDir::new(tag)?;
        let ns = Netns::new(tag)?;
        ns.ip_batch(
            "link add eth0 type veth peer name peer0\nlink set eth0 up\nlink set peer0 up\n\
             addr add 10.9.0.1/24 dev eth0\n",
        )?;
        let listener = ns.enter(|| TcpListener::bind("10.9.0.1:80"))??;
        std::thread::spawn(move || for _ in listener.incoming() {});
        let socket = dir.path().join("ctl.sock");
        let config = dir.path().join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"a\"\ninterfaces = [\"eth0\"]\nunderlay_v4 = \"10.9.0.1\"\n\
                 bpffs = \"{}\"\ncontrol_socket = \"{}\"\n\n\
                 [cluster]\nhash_key = \"0f1e2d3c4b5a69788796a5b4c3d2e1f0\"\n\n\
                 [[cluster.members]]\nname = \"a\"\nid = 1\nunderlay = \"10.9.0.1\"\n\
                 [cluster.members.health]\ninterval_ms = 100\ntimeout_ms = 50\nrise = 1\n\n\
                 [[services]]\nname = \"web\"\nvips = [\"192.0.2.1/32\"]\ntcp_ports = [80]\n\n\
                 [metrics]\nlisten = \"10.9.0.1:9465\"\n",
                bpffs.display(),
                socket.display()
            ),
        )?;
        Ok(Self {
            daemon: None,
            config,
            socket,
            ns,
            dir,
        })
    }

    fn steer(&self, args: &[&str]) -> Result<Output> {
        Ok(self
            .ns
            .command(&cdn_steer()?.to_string_lossy())
            .args(args)
            .output()?)
    }

    fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            "run".to_owned(),
            "--config".to_owned(),
            self.config.to_string_lossy().into_owned(),
            "--shutdown-grace-ms".to_owned(),
            "0".to_owned(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    /// Starts the daemon and waits until its control socket answers with XDP attached.
    fn start(&mut self, extra: &[&str]) -> Result<()> {
        let mut command = self.ns.command(&cdn_steer()?.to_string_lossy());
        command.args(self.run_args(extra));
        let log = self.dir.path().join("daemon.log");
        let daemon =
            self.daemon
                .insert(Process::spawn("cdn-steer", command, Group::Inherit, &log)?);
        let socket = self.socket.to_string_lossy().into_owned();
        let ns = &self.ns;
        let answered = wait::until(Duration::from_secs(20), "the daemon ready", || {
            let out = ns
                .command(&cdn_steer()?.to_string_lossy())
                .args(["status", "--json", "--socket", &socket])
                .output()?;
            if !out.status.success() {
                return Ok(false);
            }
            let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            Ok(status["ready"] == true)
        });
        answered.map_err(|e| e.context(daemon.log_text()))?;
        ensure!(self.xdp_attached()?, "ready without XDP on eth0");
        Ok(())
    }

    fn kill9(&mut self) -> Result<()> {
        let daemon = self.daemon.as_mut().context("no daemon")?;
        daemon.signal(libc::SIGKILL, Duration::from_secs(5))
    }

    fn xdp_attached(&self) -> Result<bool> {
        Ok(self
            .ns
            .ip(&["-d", "link", "show", "dev", "eth0"])?
            .contains("prog/xdp"))
    }

    fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Process::log_text)
            .unwrap_or_default()
    }
}

fn scratch_pins(tag: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/cdnt-{tag}-{}", std::process::id()))
}

#[test]
fn a_bpffs_only_in_a_private_mount_namespace_is_refused() -> Result<()> {
    // Under `ip netns exec`, /sys is a fresh sysfs: no bpffs on /sys/fs/bpf, so the daemon
    // would have to mount one in its private namespace.
    let node = Node::new("pins-refused", &scratch_pins("refused"))?;
    let mut command = node.ns.command(&cdn_steer()?.to_string_lossy());
    command.args(node.run_args(&[]));
    let log = node.dir.path().join("daemon.log");
    let mut daemon = Process::spawn("cdn-steer", command, Group::Inherit, &log)?;
    let mut status = None;
    wait::until(Duration::from_secs(10), "the daemon to exit", || {
        status = daemon.exited()?;
        Ok(status.is_some())
    })
    .map_err(|e| {
        e.context(format!(
            "started instead of refusing: {}",
            daemon.log_text()
        ))
    })?;
    let stderr = daemon.log_text();
    ensure!(
        status.and_then(|s| s.code()) == Some(1),
        "exit {status:?}: {stderr}"
    );
    for says in [
        "refusing to start: the bpf filesystem at /sys/fs/bpf is mounted only in this \
         process's private mount namespace",
        "kill -9 or --keep-attached would detach XDP",
        "mount -t bpf bpf /sys/fs/bpf",
        "--allow-ephemeral-pins",
    ] {
        ensure!(stderr.contains(says), "no {says:?} in: {stderr}");
    }
    ensure!(!node.xdp_attached()?, "XDP attached by a refused start");
    Ok(())
}

#[test]
fn ephemeral_pins_run_when_allowed_and_end_with_the_daemon() -> Result<()> {
    let mut node = Node::new("pins-allowed", &scratch_pins("allowed"))?;
    node.start(&["--allow-ephemeral-pins"])?;
    ensure!(
        node.log().contains("pins will not outlive the daemon"),
        "no warning in: {}",
        node.log()
    );
    node.kill9()?;
    // What the refusal prevents: with the namespace gone, the pinned link went too.
    wait::until(Duration::from_secs(5), "XDP detached", || {
        Ok(!node.xdp_attached()?)
    })?;
    Ok(())
}

#[test]
fn pins_on_a_host_bpffs_keep_xdp_through_kill_9() -> Result<()> {
    let host = ScratchDir::new("pins-host")?;
    let mount = BpfMount::new(&host.path().join("bpffs"))?;
    let mut node = Node::new("pins-host", &mount.join("a"))?;
    node.start(&[])?;
    node.kill9()?;
    // Give a detach that should not happen the time to happen.
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        node.xdp_attached()?,
        "XDP detached by kill -9: {}",
        node.log()
    );
    ensure!(
        mount.join("a/links/eth0").exists(),
        "the link pin is gone from the host's bpffs"
    );
    // The next daemon takes the pins over.
    node.start(&[])?;
    ensure!(
        node.log().contains("XDP program replaced in place"),
        "{}",
        node.log()
    );
    drop(node);
    Ok(())
}

#[test]
fn a_refused_reload_leaves_the_daemon_reachable_by_socket() -> Result<()> {
    let host = ScratchDir::new("pins-reload")?;
    let mount = BpfMount::new(&host.path().join("bpffs"))?;
    let mut node = Node::new("pins-reload", &mount.join("a"))?;
    node.start(&[])?;
    let (cfg, socket) = (
        node.config.to_string_lossy().into_owned(),
        node.socket.to_string_lossy().into_owned(),
    );
    // A file that is not even TOML any more: the daemon refuses it and keeps running.
    std::fs::write(&node.config, "[node\nname = ")?;
    let out = node.steer(&["reload", "--socket", &socket])?;
    ensure!(out.status.code() == Some(4), "reload: {out:?}");
    // -c needs a file that parses far enough to name the socket; it says what to use instead.
    let out = node.steer(&["status", "--config", &cfg])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "status -c: {out:?}");
    ensure!(stderr.contains("--socket PATH"), "{stderr}");
    let out = node.steer(&["status", "--json", "--socket", &socket])?;
    ensure!(out.status.success(), "status --socket: {out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(status["reloads_failed"] == 1, "{status}");
    ensure!(status["ready"] == true, "{status}");
    for command in ["drain", "undrain"] {
        let out = node.steer(&[command, "--socket", &socket])?;
        ensure!(out.status.success(), "{command} --socket: {out:?}");
    }
    let out = node.steer(&[
        "lookup",
        "198.51.100.7:40000",
        "192.0.2.1:80",
        "--socket",
        &socket,
    ])?;
    ensure!(out.status.success(), "lookup --socket: {out:?}");
    // Both at once is a usage error.
    let out = node.steer(&["status", "--config", &cfg, "--socket", &socket])?;
    ensure!(out.status.code() == Some(64), "both: {out:?}");
    drop(node);
    Ok(())
}
