//! The document pass, between TOML parsing and serde. On the parsed document, driven by
//! [`FIELDS`]:
//!
//! - every key left out gets its default, so serde needs none and the defaults live in one
//!   place (the table, which is also what the README shows); a table whose keys all have
//!   defaults is created when left out;
//! - every value written in a syntax of its own (addresses, prefixes, the hash key) is parsed
//!   here; one that does not parse is reported at its field path and replaced by a
//!   placeholder of the right syntax, so that deserialisation goes on and the checker reports
//!   the remaining problems in the same round. (Parsed by serde alone, the first bad address
//!   would stop everything.)
//!
//! Values of the wrong TOML type and unknown keys are left for serde to report, with line and
//! column.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Problem;
use super::prefix::Prefix;
use super::schema::{FIELDS, Field, WhenAbsent};

/// A syntax a text value must follow.
#[derive(Clone, Copy, Debug)]
pub(super) enum Text {
    Ipv4,
    Ipv6,
    Ip,
    SocketAddr,
    Prefix,
    HashKey,
}

impl Text {
    fn check(self, text: &str) -> Result<(), String> {
        let not = |what: &str| format!("{text:?} is not {what}");
        match self {
            Text::Ipv4 => text
                .parse::<Ipv4Addr>()
                .map(drop)
                .map_err(|_| not("an IPv4 address")),
            Text::Ipv6 => text
                .parse::<Ipv6Addr>()
                .map(drop)
                .map_err(|_| not("an IPv6 address")),
            Text::Ip => text
                .parse::<IpAddr>()
                .map(drop)
                .map_err(|_| not("an IP address")),
            Text::SocketAddr => text
                .parse::<SocketAddr>()
                .map(drop)
                .map_err(|_| not("an address:port")),
            Text::Prefix => text.parse::<Prefix>().map(drop).map_err(|e| e.to_string()),
            Text::HashKey => parse_hash_key(text).map(drop),
        }
    }

    /// A valid value standing in for one that is not; the configuration is discarded anyway.
    fn placeholder(self) -> &'static str {
        match self {
            Text::Ipv4 | Text::Ip => "0.0.0.0",
            Text::Ipv6 => "::",
            Text::SocketAddr => "0.0.0.0:0",
            Text::Prefix => "0.0.0.0/0",
            Text::HashKey => "00000000000000000000000000000000",
        }
    }
}

/// `[u64; 2]` from exactly 32 hex digits; see `ClusterSettings::hash_key`.
pub(super) fn parse_hash_key(text: &str) -> Result<[u64; 2], String> {
    // Checked digit by digit: u64::from_str_radix would also take a sign.
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "must be exactly 32 hex digits (128 bits), got {} characters{}",
            text.chars().count(),
            if text.chars().all(|c| c.is_ascii_hexdigit()) {
                ""
            } else {
                " with non-hex characters"
            }
        ));
    }
    let word = |digits: &str| u64::from_str_radix(digits, 16).map_err(|e| e.to_string());
    Ok([word(&text[..16])?, word(&text[16..])?])
}

/// What computed defaults may look at besides the table holding the key.
pub(super) struct Context<'i> {
    /// The first TCP port, not 0, of the first service that lists one.
    first_tcp_port: Option<DeValue<'i>>,
}

impl<'i> Context<'i> {
    fn of(doc: &DeTable<'i>) -> Self {
        let first_tcp_port = doc
            .get("services")
            .and_then(|s| s.get_ref().as_array())
            .into_iter()
            .flat_map(|services| services.iter())
            .filter_map(|service| service.get_ref().get("tcp_ports"))
            .filter_map(|ports| ports.get_ref().as_array())
            .flat_map(|ports| ports.iter())
            .map(|port| port.get_ref())
            .find(|port| {
                port.as_integer()
                    .and_then(|i| u64::from_str_radix(i.as_str(), i.radix()).ok())
                    .is_some_and(|p| p != 0)
            })
            .cloned();
        Context { first_tcp_port }
    }
}

/// Computes a default from the context and the table holding the key: `Ok(None)` leaves the
/// key out, `Err` says why there is no default.
#[derive(Clone, Copy, Debug)]
pub struct Compute(
    pub(super) for<'i> fn(&Context<'i>, &DeTable<'i>) -> Result<Option<DeValue<'i>>, String>,
);

/// `cluster.members[].health.port`: the first TCP port of the first service listing one.
pub(super) const FIRST_TCP_PORT: Compute =
    Compute(|context, _| {
        context.first_tcp_port.clone().map(Some).ok_or_else(|| {
            "not set, and no service lists a TCP port to check by default".to_owned()
        })
    });

/// `cluster.members[].quic_server_id`: the member's `id` (left out when that is missing,
/// which serde reports).
pub(super) const MEMBER_ID: Compute =
    Compute(|_, member| Ok(member.get("id").map(|id| id.get_ref().clone())));

/// `cluster.members[].health.path`: `"/"`, for an HTTP check only (a TCP check takes none).
pub(super) const HTTP_PATH: Compute = Compute(|_, health| {
    let http = health
        .get("kind")
        .is_some_and(|kind| kind.get_ref().as_str() == Some("http"));
    Ok(http.then_some(DeValue::String(Cow::Borrowed("/"))))
});

/// Fills in defaults and checks text values; see the module documentation.
pub(super) fn prepare(doc: &mut Spanned<DeTable<'_>>, problems: &mut Vec<Problem>) {
    let span = doc.span();
    let context = Context::of(doc.get_ref());
    for field in FIELDS {
        let segments: Vec<&'static str> = field.path.split('.').collect();
        let mut walk = Walk {
            field,
            segments: &segments,
            context: &context,
            problems,
        };
        walk.table(doc.get_mut(), 0, "", span.clone());
    }
}

/// One field's walk through the document; arrays of tables are walked element by element.
struct Walk<'a, 'i> {
    field: &'a Field,
    segments: &'a [&'static str],
    context: &'a Context<'i>,
    problems: &'a mut Vec<Problem>,
}

impl<'i> Walk<'_, 'i> {
    /// Continues at `segments[depth]` inside `table`, found at path `at` and `span`.
    fn table(&mut self, table: &mut DeTable<'i>, depth: usize, at: &str, span: Range<usize>) {
        let Some(&segment) = self.segments.get(depth) else {
            return;
        };
        let join = |key: &str| {
            if at.is_empty() {
                key.to_owned()
            } else {
                format!("{at}.{key}")
            }
        };
        if depth + 1 == self.segments.len() {
            return self.key(table, segment, &join(segment), span);
        }
        let (name, array) = match segment.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (segment, false),
        };
        if !array && table.get(name).is_none() && self.may_be_left_out(depth) {
            table.insert(
                Spanned::new(span.clone(), Cow::Borrowed(name)),
                Spanned::new(span, DeValue::Table(DeTable::default())),
            );
        }
        let at = join(name);
        let Some(child) = table.get_mut(name) else {
            return;
        };
        let span = child.span();
        match child.get_mut() {
            DeValue::Table(inner) if !array => self.table(inner, depth + 1, &at, span),
            DeValue::Array(items) if array => {
                for (i, item) in items.iter_mut().enumerate() {
                    let span = item.span();
                    if let DeValue::Table(inner) = item.get_mut() {
                        self.table(inner, depth + 1, &format!("{at}[{i}]"), span);
                    }
                }
            }
            // Of the wrong type: serde says so.
            _ => {}
        }
    }

    /// Whether the table at `segments[..=depth]` may be left out: every key in it has a
    /// default.
    fn may_be_left_out(&self, depth: usize) -> bool {
        let prefix = format!("{}.", self.segments[..=depth].join("."));
        FIELDS
            .iter()
            .filter(|f| f.path.starts_with(&prefix))
            .all(|f| !matches!(f.when_absent, WhenAbsent::Required))
    }

    fn key(&mut self, table: &mut DeTable<'i>, key: &'static str, at: &str, span: Range<usize>) {
        if let Some(value) = table.get_mut(key) {
            if let Some(text) = self.field.text {
                self.check_text(value.get_mut(), text, at);
            }
            return;
        }
        let default = match self.field.when_absent {
            // Defaults are checked to parse by a unit test; one that did not would leave the
            // key out, for serde to report.
            WhenAbsent::Value(toml) => DeValue::parse(toml).ok().map(Spanned::into_inner),
            WhenAbsent::Computed(_, Compute(compute)) => match compute(self.context, table) {
                Ok(value) => value,
                Err(reason) => {
                    self.problem(at.to_owned(), reason);
                    None
                }
            },
            WhenAbsent::Required | WhenAbsent::Unset => None,
        };
        if let Some(value) = default {
            table.insert(
                Spanned::new(span.clone(), Cow::Borrowed(key)),
                Spanned::new(span, value),
            );
        }
    }

    fn check_text(&mut self, value: &mut DeValue<'i>, text: Text, at: &str) {
        match value {
            DeValue::String(s) => {
                if let Err(reason) = text.check(s) {
                    self.problem(at.to_owned(), reason);
                    *s = Cow::Borrowed(text.placeholder());
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    if let DeValue::String(s) = item.get_mut()
                        && let Err(reason) = text.check(s)
                    {
                        self.problem(format!("{at}[{i}]"), reason);
                        *s = Cow::Borrowed(text.placeholder());
                    }
                }
            }
            _ => {}
        }
    }

    fn problem(&mut self, field: String, reason: String) {
        self.problems.push(Problem { field, reason });
    }
}
