//! Child processes that are stopped and reaped when dropped. Signals only ever go to a child
//! this value started and has not reaped, so never to an unrelated process that reused a pid.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Which process group a child goes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// The caller's: Ctrl-C at the terminal reaches the child too.
    Inherit,
    /// One of its own: Ctrl-C reaches only the caller, which then stops its children in the
    /// order it chooses (the lab does).
    Own,
}

/// A running child process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `command` with stdin from /dev/null and stdout and stderr appended to a new file
    /// at `log`. `name` is for messages.
    pub fn spawn(name: &str, mut command: Command, group: Group, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        if group == Group::Own {
            command.process_group(0);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file that collects its stdout and stderr.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// What it has written to its log so far (empty if the log cannot be read).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.name))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.exited(), Ok(None))
    }

    /// Sends `signal` to the process. Fails, sending nothing, once it has exited and been
    /// reaped: its pid may belong to another process by then.
    pub fn send_signal(&mut self, signal: i32) -> Result<()> {
        if let Some(status) = self.exited()? {
            bail!(
                "{} (pid {}) has already exited ({status})",
                self.name,
                self.pid()
            );
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) has no memory effects; the pid is that of our own child, which
        // `exited` just found unreaped, so the pid cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {signal} to {}", self.name));
        }
        Ok(())
    }

    /// Sends `signal` and waits up to `wait` for the process to exit.
    pub fn signal(&mut self, signal: i32, wait: Duration) -> Result<()> {
        self.send_signal(signal)?;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if self.exited()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} (pid {}) did not exit within {wait:?}",
            self.name,
            self.pid()
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Err(e) = self.child.kill() {
            eprintln!("cleanup: killing {}: {e}", self.name);
        }
        if let Err(e) = self.child.wait() {
            eprintln!("cleanup: reaping {}: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;

    /// Whether a process with `pid` exists (a zombie counts).
    fn exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    /// The state letter of `pid` in /proc (R, S, T, Z, ...).
    fn state(pid: u32) -> Result<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // "pid (comm) S ...": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .context("no state in /proc/pid/stat")
    }

    #[test]
    fn logs_signals_and_exit() -> Result<()> {
        let dir = ScratchDir::new("process")?;
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exec sleep 30"]);
        let mut p = Process::spawn("sleeper", cmd, Group::Inherit, &dir.path().join("s.log"))?;
        assert_eq!(p.name(), "sleeper");
        assert!(p.is_running());
        crate::wait::until(Duration::from_secs(5), "both lines logged", || {
            Ok(p.log_text().lines().count() == 2)
        })?;
        assert!(p.log_text().contains("out\n") && p.log_text().contains("err\n"));

        // Stopped, it is still running (state T); continued, it runs on; terminated, it is
        // gone, and no signal goes out after that.
        p.send_signal(libc::SIGSTOP)?;
        crate::wait::until(Duration::from_secs(5), "stopped", || {
            Ok(state(p.pid())? == 'T')
        })?;
        assert!(p.is_running());
        p.send_signal(libc::SIGCONT)?;
        crate::wait::until(Duration::from_secs(5), "continued", || {
            Ok(state(p.pid())? == 'S')
        })?;
        p.signal(libc::SIGTERM, Duration::from_secs(5))?;
        assert!(!p.is_running());
        let e = p.send_signal(libc::SIGTERM).expect_err("signal after exit");
        assert!(e.to_string().contains("already exited"), "{e}");
        Ok(())
    }

    #[test]
    fn killed_and_reaped_when_dropped() -> Result<()> {
        let dir = ScratchDir::new("process")?;
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let p = Process::spawn("sleep", cmd, Group::Own, &dir.path().join("s.log"))?;
        let pid = p.pid();
        assert!(exists(pid));
        // Its own process group: the group id is its pid.
        // SAFETY: getpgid(2) only reads the process table.
        assert_eq!(
            unsafe { libc::getpgid(pid as libc::pid_t) },
            pid as libc::pid_t
        );
        drop(p);
        // Reaped, not left a zombie.
        assert!(!exists(pid));

        let e = Process::spawn(
            "nothing",
            Command::new("/nonexistent"),
            Group::Inherit,
            &dir.path().join("n.log"),
        )
        .expect_err("no such program");
        assert!(format!("{e:#}").starts_with("starting nothing"), "{e:#}");
        Ok(())
    }
}
