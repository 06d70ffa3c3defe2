//! Log lines for people and machines: under systemd (stderr is the journal's stream), each
//! line starts with its sd-daemon priority (`<4>member down member=n2 reason=...`) so the
//! journal records its level and time; anywhere else, logfmt:
//! `ts=2026-05-20T10:00:00.000Z level=warn target=cdn_user::cluster::health msg="member down"
//! member=n2 reason="connection refused"`.
//!
//! Call sites say what happened in the message and give the details as key-value pairs
//! (`log::warn!(member = name, reason:% = err; "member down")`). `RUST_LOG` filters as
//! before, default `info`.

use std::{
    fmt::Write as _,
    io::Write as _,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
};

use log::{
    Level, Record,
    kv::{self, VisitSource},
};

/// How lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// `<priority>message key=value...`: the journal adds time, unit and pid.
    Journal,
    /// `ts=... level=... target=... msg="..." key=value...`.
    Logfmt,
}

/// Installs the logger on stderr, in the style stderr calls for.
pub fn init() {
    let style = detect_style();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            let ts = match style {
                Style::Journal => String::new(),
                Style::Logfmt => buf.timestamp_millis().to_string(),
            };
            let line = format_line(style, &ts, record);
            buf.write_all(line.as_bytes())
        })
        .init();
}

/// The journal's style if stderr is the stream systemd connected to the journal: it says so
/// in `JOURNAL_STREAM` (`device:inode` of that stream), which a child process may inherit
/// with another stderr, so the stream itself is compared.
pub fn detect_style() -> Style {
    let Ok(var) = std::env::var("JOURNAL_STREAM") else {
        return Style::Logfmt;
    };
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata());
    match stderr {
        Ok(meta) if journal_stream_is(&var, meta.dev(), meta.ino()) => Style::Journal,
        _ => Style::Logfmt,
    }
}

/// Whether `JOURNAL_STREAM`'s value names the file with `dev` and `ino`.
fn journal_stream_is(var: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// sd-daemon(3) priorities: err, warning, info, debug.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// One line (with its newline) for `record`. `ts` is only used in the logfmt style.
pub fn format_line(style: Style, ts: &str, record: &Record<'_>) -> String {
    let message = record.args().to_string();
    let mut line = String::with_capacity(message.len() + 64);
    // Writing to a String cannot fail.
    let _ = match style {
        Style::Journal => write!(
            line,
            "<{}>{}",
            priority(record.level()),
            // A newline would start a new journal entry without the priority.
            message.replace('\n', "; ")
        ),
        Style::Logfmt => write!(
            line,
            "ts={ts} level={} target={} msg={}",
            record.level().as_str().to_ascii_lowercase(),
            value(record.target()),
            quoted(&message)
        ),
    };
    let mut fields = Fields(&mut line);
    let _ = record.key_values().visit(&mut fields);
    line.push('\n');
    line
}

/// Appends ` key=value` for each pair.
struct Fields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, v: kv::Value<'kvs>) -> Result<(), kv::Error> {
        let key: String = key
            .as_str()
            .chars()
            .map(|c| {
                if c.is_whitespace() || c == '=' {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let _ = write!(self.0, " {key}={}", value(&v.to_string()));
        Ok(())
    }
}

/// A logfmt value: bare if it can be, quoted otherwise.
fn value(text: &str) -> String {
    let bare = !text.is_empty()
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=' || c == '\\');
    if bare { text.to_string() } else { quoted(text) }
}

/// `"text"` with backslashes, quotes and control characters escaped, so a value never breaks
/// the line.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(style: Style, level: Level, message: &str, kvs: &[(&str, &str)]) -> String {
        format_line(
            style,
            "2026-05-20T10:00:00.000Z",
            &Record::builder()
                .level(level)
                .target("cdn_user::cluster::health")
                .args(format_args!("{message}"))
                .key_values(&kvs)
                .build(),
        )
    }

    #[test]
    fn logfmt_lines() {
        assert_eq!(
            line(
                Style::Logfmt,
                Level::Warn,
                "member down",
                &[("member", "n2"), ("reason", "connect: \"refused\"")]
            ),
            "ts=2026-05-20T10:00:00.000Z level=warn target=cdn_user::cluster::health \
             msg=\"member down\" member=n2 reason=\"connect: \\\"refused\\\"\"\n"
        );
        // Multi-line messages and empty values stay on one line, each value readable back.
        assert_eq!(
            line(
                Style::Logfmt,
                Level::Error,
                "a\nb",
                &[("why", ""), ("k=x", "a=b")]
            ),
            "ts=2026-05-20T10:00:00.000Z level=error target=cdn_user::cluster::health \
             msg=\"a\\nb\" why=\"\" k_x=\"a=b\"\n"
        );
    }

    #[test]
    fn journal_lines_carry_the_priority() {
        assert_eq!(
            line(
                Style::Journal,
                Level::Info,
                "member up",
                &[("member", "n1")]
            ),
            "<6>member up member=n1\n"
        );
        assert_eq!(
            line(Style::Journal, Level::Error, "reload refused:\nx", &[]),
            "<3>reload refused:; x\n"
        );
        assert!(line(Style::Journal, Level::Warn, "w", &[]).starts_with("<4>"));
        assert!(line(Style::Journal, Level::Debug, "d", &[]).starts_with("<7>"));
        assert!(line(Style::Journal, Level::Trace, "t", &[]).starts_with("<7>"));
    }

    #[test]
    fn journal_stream_must_match_stderr() {
        assert!(journal_stream_is("8:12345", 8, 12345));
        assert!(!journal_stream_is("8:12345", 8, 12346));
        assert!(!journal_stream_is("9:12345", 8, 12345));
        assert!(!journal_stream_is("garbage", 8, 12345));
        assert!(!journal_stream_is("", 8, 12345));
    }
}
