//! BIRD instances for tests and the lab: each with its own configuration, control socket, pid
//! file and log (`bird -f -c ... -s ... -P ...`), in a network namespace, stopped when dropped.

use std::{
    io::{BufRead, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    cmd::run,
    netns::Netns,
    process::{Group, Process},
};

/// How long BIRD may take to start answering. Generous: the machine may be busy with other
/// tests.
pub const START_DEADLINE: Duration = Duration::from_secs(15);

/// How long one readiness probe waits for BIRD's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The files of one BIRD instance, all in one directory and named after the instance.
#[derive(Clone, Debug)]
pub struct BirdFiles {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
}

impl BirdFiles {
    /// `<dir>/<name>-bird.{conf,ctl,pid,log}`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let file = |ext: &str| dir.join(format!("{name}-bird.{ext}"));
        Self {
            config: file("conf"),
            socket: file("ctl"),
            pid: file("pid"),
            log: file("log"),
        }
    }
}

/// A BIRD process (`bird -f`, in the foreground, so it is our child) in a network namespace.
#[derive(Debug)]
pub struct Bird {
    name: String,
    netns: String,
    files: BirdFiles,
    group: Group,
    process: Option<Process>,
}

impl Bird {
    /// Writes `config` to the instance's files in `dir`, starts BIRD in `ns` and returns once
    /// it answers on its control socket. `name` names the files and appears in messages.
    pub fn start(ns: &Netns, dir: &Path, name: &str, config: &str, group: Group) -> Result<Self> {
        let files = BirdFiles::new(dir, name);
        std::fs::write(&files.config, config)
            .with_context(|| format!("writing {}", files.config.display()))?;
        let mut bird = Self {
            name: name.to_owned(),
            netns: ns.name().to_owned(),
            files,
            group,
            process: None,
        };
        bird.restart()?;
        Ok(bird)
    }

    /// Starts BIRD again (killing it first if it runs), with the same configuration, socket
    /// and pid file; returns once it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let mut command = std::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, "bird", "-f", "-c"])
            .arg(&self.files.config)
            .arg("-s")
            .arg(&self.files.socket)
            .arg("-P")
            .arg(&self.files.pid);
        let process = Process::spawn(
            &format!("bird ({})", self.name),
            command,
            self.group,
            &self.files.log,
        )?;
        self.process = Some(process);
        self.wait_ready()
    }

    /// Waits until BIRD answers `show status` on its socket. The socket file alone says
    /// little: a killed BIRD leaves it behind, and a starting one creates it early.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let error = match probe(&self.files.socket, PROBE_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if let Some(process) = &mut self.process
                && let Some(status) = process.exited()?
            {
                let log = process.log_text();
                self.process = None;
                bail!("{} exited ({status}); log:\n{log}", self.describe());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not answering after {START_DEADLINE:?}: {error:#}; log:\n{}",
                    self.describe(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn describe(&self) -> String {
        format!("bird ({}) in {}", self.name, self.netns)
    }

    /// Kills BIRD (SIGKILL, so it leaves its socket file behind, as after a crash) and reaps
    /// it. Does nothing if it is not running.
    pub fn kill(&mut self) {
        // Dropping the process kills and reaps it.
        self.process = None;
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) BIRD: a stopped BIRD still has its socket,
    /// whose backlog accepts connections, but it never answers.
    pub fn pause(&mut self, paused: bool) -> Result<()> {
        let process = self.process.as_mut().context("bird is not running")?;
        process.send_signal(if paused { libc::SIGSTOP } else { libc::SIGCONT })
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    pub fn socket(&self) -> &Path {
        &self.files.socket
    }

    pub fn files(&self) -> &BirdFiles {
        &self.files
    }

    /// What BIRD has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.files.log).unwrap_or_default()
    }

    /// `birdc -s <socket> <command>`; returns its output.
    pub fn birdc(&self, command: &str) -> Result<String> {
        let socket = self.files.socket.to_string_lossy();
        let mut args = vec!["-s", socket.as_ref()];
        args.extend(command.split_whitespace());
        run("birdc", &args)
    }
}

/// Connects to BIRD's control socket, reads its greeting and asks `show status`; succeeds if
/// BIRD answers without an error code.
pub fn probe(socket: &Path, timeout: Duration) -> Result<()> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(&stream);
    let (code, text) = reply(&mut reader).context("reading the greeting")?;
    ensure!(code == 1, "greeting {code:04} {text:?}, expected 0001");
    (&stream).write_all(b"show status\n")?;
    let (code, text) = reply(&mut reader).context("reading the answer to show status")?;
    // BIRD's reply codes from 8000 on are errors.
    ensure!(code < 8000, "show status: {code:04} {text}");
    Ok(())
}

/// Reads one reply of BIRD's control protocol and returns the code and text of its last line.
/// Lines are `DDDD-text` (more follow), `DDDD text` (the last) or ` text` (continuation).
fn reply(reader: &mut impl BufRead) -> Result<(u16, String)> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed in the middle of a reply");
        }
        let text = line.trim_end();
        let (code, rest) = text.split_at_checked(4).unwrap_or((text, ""));
        if rest.starts_with(' ') && code.bytes().all(|b| b.is_ascii_digit()) {
            let code = code.parse().context("reply code")?;
            return Ok((code, rest[1..].to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;

    const CONFIG: &str = "router id 10.255.0.1;\n\
        protocol device {}\n\
        protocol static vips { ipv4; disabled; route 192.0.2.0/24 blackhole; }\n";

    #[test]
    fn replies_are_read_to_their_last_line() -> Result<()> {
        let mut input = &b"1000-BIRD 2.0.12\n1011-Router ID is 10.0.0.1\n more\n0013 Daemon is up and running\n"[..];
        assert_eq!(
            reply(&mut input)?,
            (13, "Daemon is up and running".to_owned())
        );
        let mut cut = &b"1000-BIRD 2.0.12\n"[..];
        assert!(reply(&mut cut).is_err());
        Ok(())
    }

    #[test]
    fn starts_answers_pauses_and_stops() -> Result<()> {
        let dir = ScratchDir::new("bird")?;
        let ns = Netns::new("bird")?;
        let mut bird = Bird::start(&ns, dir.path(), "t", CONFIG, Group::Inherit)?;
        assert_eq!(bird.socket(), dir.path().join("t-bird.ctl"));
        assert!(bird.is_running());
        assert!(bird.birdc("show protocols vips")?.contains("down"));
        let pid: u32 = std::fs::read_to_string(&bird.files().pid)?.trim().parse()?;

        bird.pause(true)?;
        let e = probe(bird.socket(), Duration::from_millis(200)).expect_err("paused");
        assert!(format!("{e:#}").contains("greeting"), "{e:#}");
        bird.pause(false)?;
        probe(bird.socket(), PROBE_TIMEOUT)?;

        bird.kill();
        assert!(!bird.is_running());
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(bird.socket().exists(), "a killed BIRD leaves its socket");
        probe(bird.socket(), PROBE_TIMEOUT).expect_err("killed");
        bird.pause(true).expect_err("not running");

        bird.restart()?;
        probe(bird.socket(), PROBE_TIMEOUT)?;
        drop(bird);
        probe(&dir.path().join("t-bird.ctl"), PROBE_TIMEOUT).expect_err("dropped");
        Ok(())
    }

    #[test]
    fn a_bad_configuration_fails_with_the_log() -> Result<()> {
        let dir = ScratchDir::new("bird")?;
        let ns = Netns::new("bird")?;
        let e = Bird::start(
            &ns,
            dir.path(),
            "bad",
            "protocol nonsense {}\n",
            Group::Inherit,
        )
        .expect_err("bad configuration");
        let text = format!("{e:#}");
        assert!(text.contains("exited"), "{text}");
        assert!(text.contains("bad-bird.conf"), "{text}");
        Ok(())
    }
}
