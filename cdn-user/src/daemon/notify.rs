//! The service manager's notification protocol (sd_notify(3)): `READY=1` once the data plane is
//! attached and its tables are written, `STATUS=` lines, `RELOADING=1`/`READY=1` around a
//! reload, `STOPPING=1`, and `WATCHDOG=1` pings from the main loop.
//!
//! Written here rather than with the `sd-notify` crate: its 0.5 sends to `NOTIFY_SOCKET` as a
//! file-system path, so an abstract socket (`@/org/freedesktop/...`, which systemd uses for
//! some services and which test harnesses use) fails. The protocol is one datagram of
//! `KEY=value` lines, which std's `UnixDatagram` sends to either kind of address.

use std::{
    cell::Cell,
    ffi::OsStr,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            ffi::OsStrExt as _,
            net::{SocketAddr, UnixDatagram},
        },
    },
    time::Duration,
};

use crate::dataplane;

/// Talks to the service manager, if one asked for notifications; otherwise does nothing.
pub(super) struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
    last_status: String,
    /// Whether the last send failed: failures are logged when they start, not at every ping.
    failing: Cell<bool>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` of this process.
    pub(super) fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| match open(&path) {
            Ok(socket) => Some(socket),
            Err(e) => {
                log::warn!(socket:? = path, error:% = e; "cannot notify the service manager");
                None
            }
        });
        let watchdog = socket.as_ref().and_then(|_| {
            ping_interval(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            )
        });
        if let Some(every) = watchdog {
            log::info!(ping_ms = every.as_millis() as u64; "systemd watchdog on");
        }
        Self {
            socket,
            watchdog,
            last_status: String::new(),
            failing: Cell::new(false),
        }
    }

    /// How often the main loop pings, when the service manager watches it.
    pub(super) fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    pub(super) fn ready(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// The reload starts now. `MONOTONIC_USEC` lets a service manager that checks it (systemd
    /// 253 and later, with `Type=notify-reload`) match the notice to its own request.
    pub(super) fn reloading(&mut self) {
        let usec = dataplane::monotonic_ns() / 1000;
        self.last_status = "reloading the configuration".to_string();
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={}\n",
            self.last_status
        ));
    }

    pub(super) fn stopping(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.send(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)));
    }

    /// Sends `status` if it differs from the last one sent.
    pub(super) fn status(&mut self, status: &str) {
        if self.last_status != status {
            self.last_status = status.to_string();
            self.send(&format!("STATUS={}\n", one_line(status)));
        }
    }

    /// One watchdog ping (nothing if the service manager does not watch this process).
    pub(super) fn watchdog(&self) {
        if self.watchdog.is_some() {
            self.send("WATCHDOG=1\n");
        }
    }

    fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.socket else {
            return;
        };
        // Non-blocking: a service manager that does not read its socket must not stall the
        // main loop (a lost ping then ends in a watchdog restart, which is the right outcome).
        match socket.send_to_addr(message.as_bytes(), addr) {
            Ok(_) if self.failing.replace(false) => {
                log::info!("notifying the service manager works again");
            }
            Ok(_) => {}
            Err(e) if !self.failing.replace(true) => {
                log::warn!(error:% = e; "notifying the service manager failed");
            }
            Err(_) => {}
        }
    }
}

/// An unbound datagram socket and the address `NOTIFY_SOCKET` names: a path, or an abstract
/// name after `@`.
fn open(path: &OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let bytes = path.as_bytes();
    let addr = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
        Some(b'/') => SocketAddr::from_pathname(path)?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@...)",
            ));
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// How often to ping: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises, and only if
/// `WATCHDOG_PID` (when set) is this process: the variables may have been inherited from a
/// parent that the service manager watches instead.
fn ping_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

/// A status is one line of the datagram.
fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_interval_follows_watchdog_usec_and_pid() {
        let half = Some(Duration::from_millis(200));
        assert_eq!(ping_interval(Some("400000"), None, 7), half);
        assert_eq!(ping_interval(Some("400000"), Some("7"), 7), half);
        assert_eq!(ping_interval(Some("400000"), Some("8"), 7), None);
        assert_eq!(ping_interval(Some("400000"), Some("x"), 7), None);
        assert_eq!(ping_interval(None, Some("7"), 7), None);
        assert_eq!(ping_interval(Some("0"), None, 7), None);
        assert_eq!(ping_interval(Some("soon"), None, 7), None);
    }

    #[test]
    fn sends_to_path_and_abstract_sockets() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("cdn-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let by_path = UnixDatagram::bind(&path)?;
        let name = format!("cdn-notify-test-{}", std::process::id());
        let by_name = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name)?)?;
        for (env, receiver) in [
            (path.clone().into_os_string(), &by_path),
            (format!("@{name}").into(), &by_name),
        ] {
            let (socket, addr) = open(&env)?;
            let notifier = Notifier {
                socket: Some((socket, addr)),
                watchdog: None,
                last_status: String::new(),
                failing: Cell::new(false),
            };
            let mut notifier = notifier;
            notifier.ready("ready,\nall fine");
            notifier.status("ready,\nall fine");
            notifier.status("draining");
            notifier.watchdog();
            let mut buf = [0u8; 256];
            let n = receiver.recv(&mut buf)?;
            assert_eq!(&buf[..n], b"READY=1\nSTATUS=ready, all fine\n");
            let n = receiver.recv(&mut buf)?;
            // The unchanged status was not sent again, and no ping without a watchdog.
            assert_eq!(&buf[..n], b"STATUS=draining\n");
            receiver.set_nonblocking(true)?;
            assert!(receiver.recv(&mut buf).is_err());
        }
        assert!(open(OsStr::new("relative/path")).is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
