//! A client for BIRD 2's control socket, enough to announce and withdraw the VIP routes.
//!
//! The VIP routes live in a BIRD `protocol static` that the operator's BIRD configuration
//! exports to its BGP peers. Enabling that protocol puts the routes into BIRD's table (and so
//! announces them); disabling it removes them (and so withdraws them). This module speaks the
//! control protocol directly over the unix socket instead of running `birdc`: no process per
//! poll, and replies come back with their numeric codes, so errors are told apart without
//! parsing human text.
//!
//! # The control protocol
//!
//! On connect BIRD greets with `0001 BIRD 2.0.12 ready.`. Each command is one line; each reply
//! is one or more lines. A line starts with a 4-digit code followed by `-` (more lines follow)
//! or a space (last line of the reply); a line starting with a space continues the previous
//! code. Codes 0xxx report success, 1xxx and 2xxx carry data and table headings, 8xxx are
//! run-time errors (`8003 No protocols match`) and 9xxx parse errors (`9001 syntax error`).
//!
//! Protocol names are always sent quoted (`enable "anycast_vips"`). Unquoted, BIRD parses the
//! name as a configuration symbol, and a name it does not know is a syntax error (`9001 ...
//! unexpected CF_SYM_UNDEFINED`), indistinguishable from a typo in the command; quoted, it is a
//! pattern, and a missing protocol gives `8003 No protocols match`. Names are checked to be
//! plain BIRD symbols first, so the pattern cannot contain wildcards and matches only the one
//! protocol.
//!
//! Every request opens its own connection, reads the greeting, sends one command, reads the
//! reply and closes. A long-lived connection would save a few microseconds per poll but dies
//! whenever BIRD restarts, and that is exactly the event the announcer must notice; with one
//! connection per request there is no stale state to detect.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::config::BgpSettings;

/// Time one request (connect, greeting, command, reply) may take by default. BIRD answers
/// `show protocols` in well under a millisecond; seconds mean it is stuck or overloaded.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest reply line accepted. BIRD's own lines are far shorter; the limit only keeps
/// something else listening on the socket from making us buffer without end.
const MAX_LINE: usize = 64 * 1024;
/// Largest reply accepted, in bytes. The commands sent here have replies of a few lines;
/// [`BirdClient::command`] callers asking for whole routing tables hit this limit.
const MAX_REPLY: usize = 4 * 1024 * 1024;

/// Reply codes this module interprets (BIRD's `doc/reply_codes`).
mod code {
    pub const WELCOME: u16 = 1;
    pub const ALREADY_DISABLED: u16 = 8;
    pub const DISABLED: u16 = 9;
    pub const ALREADY_ENABLED: u16 = 10;
    pub const ENABLED: u16 = 11;
    pub const PROTOCOL_LIST: u16 = 1002;
    pub const NO_PROTOCOLS_MATCH: u16 = 8003;
    /// Codes from here on are errors (8xxx run-time, 9xxx parse).
    pub const FIRST_ERROR: u16 = 8000;
}

/// What can go wrong talking to BIRD. The messages include their cause (there is no separate
/// error source), so logging `{error}` says everything.
#[derive(Debug, Error)]
pub enum BirdError {
    /// The protocol name is not a plain BIRD symbol; nothing was sent.
    #[error("{0:?} is not a BIRD protocol name (a letter or '_', then letters, digits or '_')")]
    InvalidName(String),
    /// The command contains a line break or another control character; nothing was sent.
    #[error("command {0:?} contains a control character")]
    InvalidCommand(String),
    /// The socket is missing, refuses connections (BIRD is not running) or is not accessible.
    #[error("cannot connect to BIRD's control socket {}: {error}", socket.display())]
    Connect { socket: PathBuf, error: io::Error },
    /// Reading or writing failed after the connection was made.
    #[error("talking to BIRD on {}: {error}", socket.display())]
    Io { socket: PathBuf, error: io::Error },
    /// BIRD did not answer in time (stopped, stuck or overloaded).
    #[error("BIRD on {} did not answer within {after:?}", socket.display())]
    Timeout { socket: PathBuf, after: Duration },
    /// The connection closed before the reply was complete (BIRD exited meanwhile).
    #[error("BIRD on {} closed the connection before the reply was complete", socket.display())]
    Closed { socket: PathBuf },
    /// What came back is not BIRD's control protocol.
    #[error("{} does not answer like BIRD: {detail}", socket.display())]
    Malformed { socket: PathBuf, detail: String },
    /// BIRD has no protocol of that name (`8003 No protocols match`).
    #[error("BIRD has no protocol named {0:?}")]
    NoSuchProtocol(String),
    /// BIRD answered the command with an error code (8xxx or 9xxx).
    #[error("BIRD refused {command:?}: {code:04} {message}")]
    Rejected {
        command: String,
        code: u16,
        message: String,
    },
    /// BIRD answered with success, but not with what the command should have produced.
    #[error("unexpected reply from BIRD to {command:?}: {reply}")]
    Unexpected { command: String, reply: String },
}

impl BirdError {
    /// Whether this error means there is no working BIRD on the socket (not running, not
    /// answering, or not speaking BIRD's protocol), as opposed to a BIRD that answered but
    /// refused or could not do what was asked.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. }
                | Self::Io { .. }
                | Self::Timeout { .. }
                | Self::Closed { .. }
                | Self::Malformed { .. }
        )
    }
}

/// One line of a reply: its code and the text after the code and separator. Continuation
/// lines (starting with a space) carry the code of the line they continue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyLine {
    pub code: u16,
    pub text: String,
}

/// A complete reply: at least one line, the last one being the one that ended the reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    lines: Vec<ReplyLine>,
}

impl Reply {
    /// All lines, in order.
    pub fn lines(&self) -> &[ReplyLine] {
        &self.lines
    }

    /// The code of the last line, which classifies the reply as a whole.
    pub fn code(&self) -> u16 {
        self.lines.last().map_or(0, |l| l.code)
    }

    /// The first error line (8xxx or 9xxx), if any.
    pub fn error(&self) -> Option<&ReplyLine> {
        self.lines.iter().find(|l| l.code >= code::FIRST_ERROR)
    }

    /// The text of every line with code `code`.
    pub fn with_code(&self, code: u16) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .filter(move |l| l.code == code)
            .map(|l| l.text.as_str())
    }
}

impl fmt::Display for Reply {
    /// The reply on one line, as BIRD sent it but with ` | ` between lines (for error messages).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, line) in self.lines.iter().enumerate() {
            if i > 0 {
                f.write_str(" | ")?;
            }
            write!(f, "{:04} {}", line.code, line.text.trim_end())?;
        }
        Ok(())
    }
}

/// A protocol's state as `show protocols` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolState {
    /// Not running: disabled, or not started.
    Down,
    /// Starting (a BGP session that is not established yet stays here).
    Start,
    /// Running; a static protocol in this state has its routes in the table.
    Up,
    /// Shutting down (being disabled or restarted).
    Stop,
    /// Down, with its routes still being removed from the table.
    Flush,
    /// A state this module does not know.
    Other(String),
}

impl ProtocolState {
    fn parse(text: &str) -> Self {
        match text {
            "down" => Self::Down,
            "start" => Self::Start,
            "up" => Self::Up,
            "stop" => Self::Stop,
            "flush" => Self::Flush,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Whether the protocol is enabled and running or coming up. `stop` and `flush` count as
    /// not enabled: BIRD does not say whether they lead to `down` (disabled) or back to
    /// `start` (restart), and sending the wanted `enable`/`disable` is harmless either way.
    pub fn is_enabled(&self) -> bool {
        matches!(self, Self::Start | Self::Up)
    }
}

impl fmt::Display for ProtocolState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Down => "down",
            Self::Start => "start",
            Self::Up => "up",
            Self::Stop => "stop",
            Self::Flush => "flush",
            Self::Other(s) => s,
        })
    }
}

/// One row of `show protocols`. That a status exists means the protocol exists; a missing one
/// is [`BirdError::NoSuchProtocol`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolStatus {
    /// The protocol's name.
    pub name: String,
    /// Its type, such as `Static` or `BGP`.
    pub proto: String,
    /// Its table, such as `master4` (`---` for protocols without one).
    pub table: String,
    /// Its state.
    pub state: ProtocolState,
    /// When it last changed state, in BIRD's configured time format.
    pub since: String,
    /// BIRD's extra information, such as `Established` for BGP; often empty.
    pub info: String,
}

impl ProtocolStatus {
    /// Whether the protocol is enabled (see [`ProtocolState::is_enabled`]).
    pub fn is_enabled(&self) -> bool {
        self.state.is_enabled()
    }
}

/// What [`BirdClient::set_enabled`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toggle {
    /// BIRD enabled or disabled the protocol.
    Changed,
    /// The protocol already was in that state (`already enabled` / `already disabled`).
    Unchanged,
}

/// A client for one BIRD control socket. Cheap to clone; holds no connection.
#[derive(Clone, Debug)]
pub struct BirdClient {
    socket: PathBuf,
    timeout: Duration,
}

impl BirdClient {
    /// A client for the control socket at `socket` (BIRD's `-s`), each request limited to
    /// `timeout` from connecting to the end of the reply.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    /// A client for `settings.bird_socket` with [`DEFAULT_TIMEOUT`].
    pub fn from_settings(settings: &BgpSettings) -> Self {
        Self::new(settings.bird_socket.clone(), DEFAULT_TIMEOUT)
    }

    /// The control socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The time limit of one request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends one command line (without the newline) and returns BIRD's reply. A reply with an
    /// error code is returned as [`BirdError::Rejected`].
    pub async fn command(&self, command: &str) -> Result<Reply, BirdError> {
        // A newline would end the command early and make BIRD run the rest as a second
        // command, one nobody checked (`show status\ndisable x`).
        if command.chars().any(char::is_control) {
            return Err(BirdError::InvalidCommand(command.to_owned()));
        }
        let reply = tokio::time::timeout(self.timeout, self.converse(command))
            .await
            .map_err(|_| BirdError::Timeout {
                socket: self.socket.clone(),
                after: self.timeout,
            })??;
        if let Some(error) = reply.error() {
            return Err(BirdError::Rejected {
                command: command.to_owned(),
                code: error.code,
                message: error.text.trim_end().to_owned(),
            });
        }
        Ok(reply)
    }

    /// The state of protocol `name` (`show protocols "<name>"`).
    pub async fn protocol(&self, name: &str) -> Result<ProtocolStatus, BirdError> {
        check_name(name)?;
        let command = format!("show protocols \"{name}\"");
        let reply = self
            .command(&command)
            .await
            .map_err(|e| no_such_protocol(e, name))?;
        reply
            .with_code(code::PROTOCOL_LIST)
            .filter_map(parse_protocol_row)
            .find(|row| row.name == name)
            .ok_or_else(|| BirdError::Unexpected {
                command,
                reply: reply.to_string(),
            })
    }

    /// Enables (`enable "<name>"`) or disables (`disable "<name>"`) protocol `name`. Idempotent:
    /// a protocol already in that state gives [`Toggle::Unchanged`].
    ///
    /// BIRD answers once it has recorded the change; routes leave the table (and the BGP
    /// peers) asynchronously after a `disable`. Wait for [`ProtocolState::Down`] with
    /// [`BirdClient::protocol`] to know they are gone.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<Toggle, BirdError> {
        check_name(name)?;
        let verb = if enabled { "enable" } else { "disable" };
        let command = format!("{verb} \"{name}\"");
        let reply = self
            .command(&command)
            .await
            .map_err(|e| no_such_protocol(e, name))?;
        let (changed, unchanged) = if enabled {
            (code::ENABLED, code::ALREADY_ENABLED)
        } else {
            (code::DISABLED, code::ALREADY_DISABLED)
        };
        // The reply names the protocol (`0011-anycast_vips: enabled`); check both the code and
        // the name so that a reply about anything else is not taken for success.
        let about_us = |line: &&ReplyLine| {
            line.text
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(':'))
        };
        match reply.lines().iter().find(about_us).map(|l| l.code) {
            Some(c) if c == changed => Ok(Toggle::Changed),
            Some(c) if c == unchanged => Ok(Toggle::Unchanged),
            _ => Err(BirdError::Unexpected {
                command,
                reply: reply.to_string(),
            }),
        }
    }

    /// One connection: greeting, command, reply.
    async fn converse(&self, command: &str) -> Result<Reply, BirdError> {
        let mut stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|error| BirdError::Connect {
                    socket: self.socket.clone(),
                    error,
                })?;
        let (read, mut write) = stream.split();
        let mut reader = BufReader::new(read);
        let greeting = read_reply(&mut reader, &self.socket).await?;
        if greeting.code() != code::WELCOME {
            return Err(BirdError::Malformed {
                socket: self.socket.clone(),
                detail: format!("greeting {greeting:?} instead of 0001"),
            });
        }
        let io_error = |error| BirdError::Io {
            socket: self.socket.clone(),
            error,
        };
        write
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io_error)?;
        read_reply(&mut reader, &self.socket).await
    }
}

/// Rejects names that are not plain BIRD symbols, so that quoting them gives a pattern that
/// matches exactly that name (no `*`, `?` or quotes).
fn check_name(name: &str) -> Result<(), BirdError> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(BirdError::InvalidName(name.to_owned()))
    }
}

/// Turns BIRD's `8003 No protocols match` into [`BirdError::NoSuchProtocol`].
fn no_such_protocol(error: BirdError, name: &str) -> BirdError {
    match error {
        BirdError::Rejected {
            code: code::NO_PROTOCOLS_MATCH,
            ..
        } => BirdError::NoSuchProtocol(name.to_owned()),
        other => other,
    }
}

/// Reads one complete reply.
async fn read_reply<R>(reader: &mut R, socket: &Path) -> Result<Reply, BirdError>
where
    R: AsyncBufRead + Unpin,
{
    let malformed = |detail: String| BirdError::Malformed {
        socket: socket.to_owned(),
        detail,
    };
    let mut lines: Vec<ReplyLine> = Vec::new();
    let mut total = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|error| BirdError::Io {
                socket: socket.to_owned(),
                error,
            })?;
        if buf.last() != Some(&b'\n') {
            return Err(if n > MAX_LINE {
                malformed(format!("reply line longer than {MAX_LINE} bytes"))
            } else {
                BirdError::Closed {
                    socket: socket.to_owned(),
                }
            });
        }
        total += n;
        if total > MAX_REPLY {
            return Err(malformed(format!("reply longer than {MAX_REPLY} bytes")));
        }
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        let line = String::from_utf8_lossy(&buf);
        let (code, text, last) =
            parse_line(&line, lines.last().map(|l| l.code)).map_err(malformed)?;
        lines.push(ReplyLine {
            code,
            text: text.to_owned(),
        });
        if last {
            return Ok(Reply { lines });
        }
    }
}

/// Splits one reply line (without its newline) into code, text and whether it ends the reply.
/// `previous` is the code of the line before, which a continuation line inherits.
fn parse_line(line: &str, previous: Option<u16>) -> Result<(u16, &str, bool), String> {
    let bytes = line.as_bytes();
    if bytes.len() >= 4 && bytes[..4].iter().all(u8::is_ascii_digit) {
        // Four ASCII digits: the slice is on a character boundary and the number fits.
        let code = line[..4]
            .parse::<u16>()
            .map_err(|e| format!("reply code in {line:?}: {e}"))?;
        match bytes.get(4) {
            Some(b'-') => Ok((code, &line[5..], false)),
            Some(b' ') => Ok((code, &line[5..], true)),
            // BIRD always writes the separator; a bare code can only be a last line.
            None => Ok((code, "", true)),
            Some(_) => Err(format!("line {line:?}: no '-' or ' ' after the reply code")),
        }
    } else if let Some(text) = line.strip_prefix(' ') {
        match previous {
            Some(code) => Ok((code, text, false)),
            None => Err(format!("reply starts with a continuation line {line:?}")),
        }
    } else {
        Err(format!("line {line:?} has no reply code"))
    }
}

/// Parses one `show protocols` row: `name proto table state since info`. The columns are
/// padded but widen for long names, so they are split on whitespace, not by position. `since`
/// is one word in BIRD's default time formats (`14:19:41.593`, or `2026-11-23` once older
/// than a day) and two in `iso long` ones (`2026-11-23 14:19:41`); `info` is the rest.
fn parse_protocol_row(row: &str) -> Option<ProtocolStatus> {
    let (name, rest) = next_word(row)?;
    let (proto, rest) = next_word(rest)?;
    let (table, rest) = next_word(rest)?;
    let (state, rest) = next_word(rest)?;
    let (mut since, mut rest) =
        next_word(rest).map_or((String::new(), ""), |(w, r)| (w.to_owned(), r));
    if is_date(&since)
        && let Some((time, after)) = next_word(rest)
        && time.starts_with(|c: char| c.is_ascii_digit())
        && time.contains(':')
    {
        since = format!("{since} {time}");
        rest = after;
    }
    Some(ProtocolStatus {
        name: name.to_owned(),
        proto: proto.to_owned(),
        table: table.to_owned(),
        state: ProtocolState::parse(state),
        since,
        info: rest.trim().to_owned(),
    })
}

/// The first whitespace-separated word of `text` and what follows it.
fn next_word(text: &str) -> Option<(&str, &str)> {
    let text = text.trim_start();
    if text.is_empty() {
        return None;
    }
    let end = text.find(char::is_whitespace).unwrap_or(text.len());
    Some(text.split_at(end))
}

/// Whether `word` looks like `YYYY-MM-DD`.
fn is_date(word: &str) -> bool {
    let b = word.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// A real BIRD for tests, shared with the announcer's tests: `cdn-test-support`'s BIRD in a
/// namespace and directory of its own, plus what these tests check through [`BirdClient`].
#[cfg(test)]
pub(crate) mod testbird {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use anyhow::{Context as _, Result};
    use cdn_test_support::{Netns, bird::Bird, process::Group, scratch::ScratchDir};

    use super::BirdClient;

    pub use cdn_test_support::wait::eventually;

    /// The configuration the tests use: one disabled static protocol with one route, and no
    /// kernel protocol, so even outside the namespace nothing would reach the host's routes.
    pub const CONFIG: &str = "router id 10.255.0.1;
protocol device {}
protocol static anycast_vips { ipv4; disabled; route 192.0.2.0/24 blackhole; }
";

    /// How long a state change observed through BIRD or a status channel may take.
    pub const DEADLINE: Duration = Duration::from_secs(10);

    /// BIRD in a network namespace of its own, with its configuration, control socket and pid
    /// file in a scratch directory. Dropping it stops BIRD, then deletes the namespace and
    /// the directory, also when a test fails.
    pub struct TestBird {
        // Fields drop in this order: the process before its namespace and directory.
        bird: Option<Bird>,
        _netns: Netns,
        dir: ScratchDir,
        socket: PathBuf,
    }

    impl TestBird {
        /// Writes `config`, creates the namespace and starts BIRD; returns once BIRD answers.
        pub async fn start(config: &str) -> Result<Self> {
            let dir = ScratchDir::new("bird")?;
            let netns = Netns::new("bird")?;
            let config = config.to_owned();
            let (dir, netns, bird) = tokio::task::spawn_blocking(move || {
                let bird = Bird::start(&netns, dir.path(), "test", &config, Group::Inherit);
                (dir, netns, bird)
            })
            .await?;
            let bird = bird?;
            Ok(Self {
                socket: bird.socket().to_path_buf(),
                bird: Some(bird),
                _netns: netns,
                dir,
            })
        }

        /// Starts BIRD again after [`TestBird::kill`], with the same configuration, socket and
        /// pid file; returns once it answers. The wait runs off the runtime's thread, so the
        /// tasks under test go on meanwhile.
        pub async fn restart(&mut self) -> Result<()> {
            let mut bird = self.bird.take().context("bird failed to restart before")?;
            let (bird, restarted) = tokio::task::spawn_blocking(move || {
                let restarted = bird.restart();
                (bird, restarted)
            })
            .await?;
            self.bird = Some(bird);
            restarted
        }

        fn bird(&mut self) -> Result<&mut Bird> {
            self.bird.as_mut().context("bird failed to restart before")
        }

        /// Kills BIRD with SIGKILL (it leaves its socket file behind, as after a crash).
        pub fn kill(&mut self) {
            if let Some(bird) = &mut self.bird {
                bird.kill();
            }
        }

        /// Stops (`SIGSTOP`) or continues (`SIGCONT`) BIRD: a stopped BIRD still has its
        /// socket, whose backlog accepts connections, but never answers.
        pub fn pause(&mut self, paused: bool) -> Result<()> {
            self.bird()?.pause(paused)
        }

        pub fn socket(&self) -> &Path {
            &self.socket
        }

        /// A client with a short timeout for the tests.
        pub fn client(&self) -> BirdClient {
            BirdClient::new(&self.socket, Duration::from_secs(2))
        }

        pub fn dir(&self) -> &Path {
            self.dir.path()
        }
    }

    /// Whether BIRD's table holds the test route of `anycast_vips`.
    pub async fn route_present(client: &BirdClient) -> Result<bool> {
        let reply = client.command("show route protocol anycast_vips").await?;
        Ok(reply
            .lines()
            .iter()
            .any(|l| l.text.trim_start().starts_with("192.0.2.0/24")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use anyhow::Result;
    use tokio::time::Instant;

    use super::testbird::{CONFIG, DEADLINE, TestBird, eventually, route_present};
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Reply, BirdError> {
        let mut reader = bytes;
        read_reply(&mut reader, Path::new("test.ctl")).await
    }

    #[tokio::test]
    async fn reply_lines_codes_and_continuations() {
        let reply = parse(
            b"2002-Name       Proto      Table      State  Since         Info\n\
              1002-anycast_vips Static     master4    down   14:20:09.538  \n \
              other Static     master4    up     14:20:09.538  \n\
              0000 \n\
              0001 next reply\n",
        )
        .await
        .expect("valid reply");
        assert_eq!(reply.code(), 0);
        assert_eq!(reply.lines().len(), 4);
        assert_eq!(reply.error(), None);
        let rows: Vec<_> = reply
            .with_code(code::PROTOCOL_LIST)
            .filter_map(parse_protocol_row)
            .map(|r| (r.name, r.state))
            .collect();
        assert_eq!(
            rows,
            [
                ("anycast_vips".to_owned(), ProtocolState::Down),
                ("other".to_owned(), ProtocolState::Up)
            ]
        );

        let greeting = parse(b"0001 BIRD 2.0.12 ready.\r\n")
            .await
            .expect("greeting");
        assert_eq!(greeting.code(), code::WELCOME);
        assert_eq!(greeting.lines()[0].text, "BIRD 2.0.12 ready.");

        let error = parse(b"8003 No protocols match\n")
            .await
            .expect("error reply");
        assert_eq!(
            error.error().map(|l| l.code),
            Some(code::NO_PROTOCOLS_MATCH)
        );
    }

    #[tokio::test]
    async fn broken_replies_are_errors() {
        // The connection ends before the last line, or in the middle of one.
        for bytes in [&b""[..], b"0011-x: enabled\n", b"0000"] {
            let e = parse(bytes).await.expect_err("incomplete reply");
            assert!(matches!(e, BirdError::Closed { .. }), "{bytes:?}: {e}");
        }
        for bytes in [
            &b"HTTP/1.1 400 Bad Request\n"[..],
            b" continuation first\n",
            b"12345 five digits\n",
        ] {
            let e = parse(bytes).await.expect_err("not BIRD");
            assert!(matches!(e, BirdError::Malformed { .. }), "{bytes:?}: {e}");
            assert!(e.is_unreachable());
        }
        let mut long = vec![b'0'; MAX_LINE + 10];
        long.push(b'\n');
        let e = parse(&long).await.expect_err("line too long");
        assert!(e.to_string().contains("longer than"), "{e}");
    }

    #[test]
    fn protocol_rows_in_all_time_formats() {
        let row = parse_protocol_row("bgp1       BGP        ---        start  14:20:09.538  Active        Socket: Connection refused")
            .expect("row");
        assert_eq!(row.name, "bgp1");
        assert_eq!(row.proto, "BGP");
        assert_eq!(row.table, "---");
        assert_eq!(row.state, ProtocolState::Start);
        assert!(row.is_enabled());
        assert_eq!(row.since, "14:20:09.538");
        assert_eq!(row.info, "Active        Socket: Connection refused");

        let row = parse_protocol_row("vips Static master4 up 2026-11-23 14:20:09 ").expect("row");
        assert_eq!(row.since, "2026-11-23 14:20:09");
        assert_eq!(row.info, "");

        let row =
            parse_protocol_row("vips Static master4 flush 2026-11-23 Established").expect("row");
        assert_eq!(row.state, ProtocolState::Flush);
        assert!(!row.is_enabled());
        assert_eq!(row.since, "2026-11-23");
        assert_eq!(row.info, "Established");

        let row = parse_protocol_row("vips Static master4 weird").expect("row");
        assert_eq!(row.state, ProtocolState::Other("weird".to_owned()));
        assert_eq!(parse_protocol_row("vips Static master4"), None);
    }

    #[tokio::test]
    async fn bad_names_and_commands_are_refused_before_sending() {
        // The socket does not exist: these must fail without trying to connect.
        let client = BirdClient::new("/nonexistent/bird.ctl", Duration::from_millis(100));
        for name in ["", "1abc", "anycast_*", "a\"b", "a b", "a\nshow status"] {
            let e = client.protocol(name).await.expect_err(name);
            assert!(matches!(e, BirdError::InvalidName(_)), "{name:?}: {e}");
            let e = client.set_enabled(name, true).await.expect_err(name);
            assert!(matches!(e, BirdError::InvalidName(_)), "{name:?}: {e}");
        }
        let e = client
            .command("show status\ndisable x")
            .await
            .expect_err("newline");
        assert!(matches!(e, BirdError::InvalidCommand(_)), "{e}");
    }

    #[tokio::test]
    async fn protocol_status_of_real_bird() -> Result<()> {
        let config = format!(
            "{CONFIG}protocol static other_vips {{ ipv4; route 198.51.100.0/24 blackhole; }}\n\
             filter some_filter {{ accept; }}\n"
        );
        let bird = TestBird::start(&config).await?;
        let client = bird.client();

        let status = client.protocol("anycast_vips").await?;
        assert_eq!(status.name, "anycast_vips");
        assert_eq!(status.proto, "Static");
        assert_eq!(status.table, "master4");
        assert_eq!(status.state, ProtocolState::Down);
        assert!(!status.is_enabled());

        // A configured-enabled static protocol comes up right after start; allow for it.
        eventually("other_vips up", DEADLINE, || async {
            Ok(client.protocol("other_vips").await?.state == ProtocolState::Up)
        })
        .await?;
        assert!(client.protocol("other_vips").await?.is_enabled());

        for missing in ["nosuch", "some_filter", "all"] {
            let e = client.protocol(missing).await.expect_err(missing);
            assert!(
                matches!(&e, BirdError::NoSuchProtocol(n) if n == missing),
                "{missing}: {e}"
            );
            assert!(!e.is_unreachable());
            let e = client.set_enabled(missing, true).await.expect_err(missing);
            assert!(matches!(e, BirdError::NoSuchProtocol(_)), "{missing}: {e}");
        }

        let e = client.command("no such command").await.expect_err("bad");
        assert!(matches!(e, BirdError::Rejected { code: 9001, .. }), "{e}");
        Ok(())
    }

    #[tokio::test]
    async fn enable_disable_round_trip() -> Result<()> {
        let bird = TestBird::start(CONFIG).await?;
        let client = bird.client();
        assert!(!route_present(&client).await?, "route before enabling");

        assert_eq!(
            client.set_enabled("anycast_vips", true).await?,
            Toggle::Changed
        );
        assert_eq!(
            client.set_enabled("anycast_vips", true).await?,
            Toggle::Unchanged
        );
        eventually("protocol up with its route", DEADLINE, || async {
            Ok(
                client.protocol("anycast_vips").await?.state == ProtocolState::Up
                    && route_present(&client).await?,
            )
        })
        .await?;

        assert_eq!(
            client.set_enabled("anycast_vips", false).await?,
            Toggle::Changed
        );
        assert_eq!(
            client.set_enabled("anycast_vips", false).await?,
            Toggle::Unchanged
        );
        eventually("protocol down without its route", DEADLINE, || async {
            Ok(
                client.protocol("anycast_vips").await?.state == ProtocolState::Down
                    && !route_present(&client).await?,
            )
        })
        .await?;
        assert!(!client.protocol("anycast_vips").await?.is_enabled());
        Ok(())
    }

    #[tokio::test]
    async fn absent_stopped_and_killed_bird() -> Result<()> {
        let mut bird = TestBird::start(CONFIG).await?;

        let absent = BirdClient::new(bird.dir().join("missing.ctl"), Duration::from_secs(1));
        let e = absent
            .protocol("anycast_vips")
            .await
            .expect_err("no socket");
        assert!(
            matches!(e, BirdError::Connect { .. }) && e.is_unreachable(),
            "{e}"
        );

        // A stopped BIRD accepts the connection (the kernel does) but never greets.
        let timeout = Duration::from_millis(300);
        let client = BirdClient::new(bird.socket(), timeout);
        bird.pause(true)?;
        let started = Instant::now();
        let result = client.protocol("anycast_vips").await;
        let took = started.elapsed();
        bird.pause(false)?;
        let e = result.expect_err("stopped bird answered");
        assert!(
            matches!(e, BirdError::Timeout { .. }) && e.is_unreachable(),
            "{e}"
        );
        assert!(took >= timeout, "gave up after {took:?}");
        // Generous upper bound for a loaded machine; without the timeout it would hang.
        assert!(took < Duration::from_secs(5), "gave up only after {took:?}");
        eventually("bird answers again", DEADLINE, || async {
            Ok(client.protocol("anycast_vips").await.is_ok())
        })
        .await?;

        // Killed: the socket file stays, but nobody listens.
        bird.kill();
        let e = client
            .protocol("anycast_vips")
            .await
            .expect_err("dead bird");
        assert!(
            matches!(e, BirdError::Connect { .. }) && e.is_unreachable(),
            "{e}"
        );
        Ok(())
    }
}
