//! One node's host for tests that run a real `cdn-steer run` and talk to it with the CLI: a
//! scratch directory, a network namespace whose `eth0` holds three members' underlay addresses
//! (10.9.0.1, .2, .3), a TCP listener on port 80 there (where every member's TCP health check
//! lands), and a private bpffs. Everything goes when dropped, also when the test fails.

use std::{net::TcpListener, process::Output};

use anyhow::Result;
use cdn_test_support::{
    BpfMount, Netns,
    binaries::cdn_steer,
    process::{Group, Process},
    scratch::ScratchDir,
};

/// The members' underlay addresses on the host's `eth0`.
pub const MEMBER_ADDRS: [&str; 3] = ["10.9.0.1", "10.9.0.2", "10.9.0.3"];

pub struct NodeHost {
    // Dropped in this order: the mount inside the scratch directory before the directory.
    pub mount: BpfMount,
    pub ns: Netns,
    pub dir: ScratchDir,
}

impl NodeHost {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = ScratchDir::new(tag)?;
        let ns = Netns::new(tag)?;
        let mount = BpfMount::new(&dir.path().join("bpffs"))?;
        let mut batch = String::from(
            "link add eth0 type veth peer name peer0\nlink set eth0 up\nlink set peer0 up\n",
        );
        for a in MEMBER_ADDRS {
            batch += &format!("addr add {a}/24 dev eth0\n");
        }
        ns.ip_batch(&batch)?;
        let listener = ns.enter(|| TcpListener::bind("0.0.0.0:80"))??;
        std::thread::spawn(move || for _ in listener.incoming() {});
        Ok(Self { mount, ns, dir })
    }

    /// `cdn-steer run --config <config>` in the namespace, its output in `d.log`; stopped
    /// (by pid) when the returned process is dropped.
    pub fn start_daemon(&self, config: &str) -> Result<Process> {
        let mut command = self.ns.command(&cdn_steer()?.to_string_lossy());
        command.args(["run", "--config", config, "--shutdown-grace-ms", "0"]);
        Process::spawn(
            "cdn-steer",
            command,
            Group::Inherit,
            &self.dir.path().join("d.log"),
        )
    }
}

/// `cdn-steer <args>` in `ns`, waited for.
pub fn steer(ns: &Netns, args: &[&str]) -> Result<Output> {
    Ok(ns
        .command(&cdn_steer()?.to_string_lossy())
        .args(args)
        .output()?)
}
