//! One node's host for tests that run a real `cdn-steer run` and talk to it with the CLI: a
//! scratch directory, a network namespace whose `eth0` holds three members' underlay addresses
//! (10.9.0.1, .2, .3), a TCP listener on port 80 there (where every member's TCP health check
//! lands), and a private bpffs. Everything goes when dropped, also when the test fails.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::Output,
    time::Duration,
};

use anyhow::{Context as _, Result};
use cdn_test_support::{
    BpfMount, Netns,
    binaries::cdn_steer,
    process::{Group, Process},
    scratch::ScratchDir,
};
use socket2::{Domain, Socket, Type};

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

/// One HTTP exchange in `ns` from the local address `source` to `to` (e.g. a daemon's peer
/// plane): the status code and body of the answer.
pub fn http(ns: &Netns, source: &str, to: &str, request: Vec<u8>) -> Result<(u16, String)> {
    let source: IpAddr = source.parse()?;
    let to: SocketAddr = to.parse()?;
    let answer = ns.enter(move || -> Result<Vec<u8>> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&to.into(), Duration::from_secs(2))?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(&request)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(answer)
    })??;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// The value of the metric `series` (name and labels, as in the exposition) that the daemon
/// serves at `metrics` (its `[metrics] listen`), scraped from 10.9.0.1.
pub fn metric(ns: &Netns, metrics: &str, series: &str) -> Result<u64> {
    let (_, body) = http(
        ns,
        MEMBER_ADDRS[0],
        metrics,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec(),
    )?;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no {series} in\n{body}"))
}
