//! The socket side of a health probe: connecting, telling a local fault from a member fault,
//! and closing with a FIN (or, if asked for, a reset).
//!
//! A probe that fails because of *this* node says nothing about the member, and counting it
//! would take healthy members out of the table (issue #12: a controller out of file
//! descriptors marked every member down and rewrote the whole table). What is local:
//!
//! - `socket()` failing at all: `EMFILE`/`ENFILE` (descriptors), `ENOBUFS`/`ENOMEM` (kernel
//!   memory). No packet was sent.
//! - `connect()` failing *at once* (before any packet left) with `EADDRNOTAVAIL` (no free local
//!   port, or our source address is gone), `ENETUNREACH` (our routing table has no route to the
//!   member: "no route") or `ENETDOWN` (our interface is down), or with the memory errors.
//!
//! What is not: the same `ENETUNREACH` reported *later*, through `SO_ERROR`, comes from an
//! ICMP "network unreachable" that a router on the path sent back: the member really cannot be
//! reached from here, so it counts against it, like `EHOSTUNREACH` (no ARP/ND answer), a
//! refusal or a timeout. That is why the connect is done by hand (socket2) rather than with
//! `TcpStream::connect`, which returns both kinds alike.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

/// How long a closed probe connection is read out in the background, waiting for the member's
/// FIN, so that whatever the member still sends (a banner, a `400` to the empty request) is
/// read rather than answered with a reset.
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// At most this much is read while draining.
const DRAIN_MAX: usize = 16 * 1024;

/// A probe failure that is this node's fault, not the member's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalFault {
    /// `EMFILE`/`ENFILE`: out of file descriptors.
    FdLimit,
    /// `ENOBUFS`/`ENOMEM`: the kernel is out of memory for sockets.
    NoBuffers,
    /// `EADDRNOTAVAIL` at connect: no local port (or source address) to connect from.
    NoLocalPort,
    /// `ENETUNREACH`/`ENETDOWN` at connect: no route to the member in our routing table.
    NoRoute,
}

impl LocalFault {
    /// Every fault, in the order of [`LocalFaultCounts`].
    pub const ALL: [LocalFault; 4] = [
        LocalFault::FdLimit,
        LocalFault::NoBuffers,
        LocalFault::NoLocalPort,
        LocalFault::NoRoute,
    ];

    /// The `reason` label of `cdn_steer_health_local_errors_total`.
    pub fn name(self) -> &'static str {
        match self {
            LocalFault::FdLimit => "fd_limit",
            LocalFault::NoBuffers => "no_buffers",
            LocalFault::NoLocalPort => "no_local_port",
            LocalFault::NoRoute => "no_route",
        }
    }

    /// The fault behind an error of `socket()`/`connect()` returned before any packet was sent.
    fn of_immediate(error: &io::Error) -> Option<LocalFault> {
        match error.raw_os_error()? {
            libc::EMFILE | libc::ENFILE => Some(LocalFault::FdLimit),
            libc::ENOBUFS | libc::ENOMEM => Some(LocalFault::NoBuffers),
            libc::EADDRNOTAVAIL => Some(LocalFault::NoLocalPort),
            libc::ENETUNREACH | libc::ENETDOWN => Some(LocalFault::NoRoute),
            _ => None,
        }
    }
}

/// Local faults counted since start, per [`LocalFault`]; shared by every check task.
#[derive(Debug, Default)]
pub struct LocalFaultCounts([AtomicU64; LocalFault::ALL.len()]);

impl LocalFaultCounts {
    pub fn add(&self, fault: LocalFault) {
        self.0[fault as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `(reason, count)` for every fault.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        LocalFault::ALL
            .iter()
            .map(|&f| (f.name(), self.0[f as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Our fault: says nothing about the member.
    #[error("local fault ({name}): {1}", name = .0.name())]
    Local(LocalFault, #[source] io::Error),
    /// The member (or the path to it) did not accept the connection.
    #[error(transparent)]
    Member(io::Error),
    /// No connection before the deadline.
    #[error("timeout")]
    Timeout,
}

/// Connects to `addr` by `deadline`, telling local faults apart (see the module's text).
pub async fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, ConnectError> {
    let local = |e: io::Error| match LocalFault::of_immediate(&e) {
        Some(fault) => ConnectError::Local(fault, e),
        None => ConnectError::Member(e),
    };
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(local)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(local(e)),
    }
    // Registering with the reactor can only fail for lack of memory or descriptors.
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket)).map_err(local)?;
    timeout_at(deadline, stream.writable())
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Member)?;
    // Reported asynchronously: the answer of the network or the member, never a local fault.
    if let Some(e) = stream.take_error().map_err(ConnectError::Member)? {
        return Err(ConnectError::Member(e));
    }
    // Writable without an error but not connected would be a kernel oddity; ask to be sure.
    stream.peer_addr().map_err(ConnectError::Member)?;
    Ok(stream)
}

/// Makes dropping `stream` send a reset instead of a FIN (`SO_LINGER` 0), as `reset = true`
/// asks. Nothing blocks: a zero linger closes at once.
pub fn reset_on_drop(stream: &TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        log::debug!("health probe: SO_LINGER 0 not set: {e}");
    }
}

/// Closes a TCP probe's connection: a reset if `reset`, else a FIN, after which what the member
/// still sends is read out in the background (for up to [`DRAIN_TIME`]) so that the close
/// stays clean even if the member talks first.
pub fn close(mut stream: TcpStream, reset: bool) {
    if reset {
        reset_on_drop(&stream);
        return;
    }
    tokio::spawn(async move {
        if stream.shutdown().await.is_err() {
            return;
        }
        let drain = async {
            let mut chunk = [0_u8; 2048];
            let mut total = 0;
            while total < DRAIN_MAX {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = timeout(DRAIN_TIME, drain).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_errors_are_local_only_for_local_causes() {
        let local = |errno| LocalFault::of_immediate(&io::Error::from_raw_os_error(errno));
        assert_eq!(local(libc::EMFILE), Some(LocalFault::FdLimit));
        assert_eq!(local(libc::ENFILE), Some(LocalFault::FdLimit));
        assert_eq!(local(libc::ENOBUFS), Some(LocalFault::NoBuffers));
        assert_eq!(local(libc::EADDRNOTAVAIL), Some(LocalFault::NoLocalPort));
        assert_eq!(local(libc::ENETUNREACH), Some(LocalFault::NoRoute));
        for member in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ETIMEDOUT] {
            assert_eq!(local(member), None, "errno {member}");
        }
    }

    #[tokio::test]
    async fn a_refusal_is_the_members() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let deadline = Instant::now() + Duration::from_secs(5);
        match connect(addr, deadline).await {
            Err(ConnectError::Member(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn counts_add_up_by_reason() {
        let counts = LocalFaultCounts::default();
        counts.add(LocalFault::FdLimit);
        counts.add(LocalFault::FdLimit);
        counts.add(LocalFault::NoRoute);
        assert_eq!(
            counts.read(),
            [
                ("fd_limit", 2),
                ("no_buffers", 0),
                ("no_local_port", 0),
                ("no_route", 1)
            ]
        );
    }
}
