//! The TOML configuration: parsed, checked as a whole, and turned into typed settings.
//!
//! The file is parsed into a document first; the document pass (`document.rs`) fills in every
//! default from [`FIELDS`] and parses every address and prefix, reporting each one that does
//! not parse; serde then deserialises the document straight into the typed settings of
//! `schema.rs` (unknown keys are errors, so a typo cannot silently fall back to a default);
//! last, `check.rs` checks every rule. All the problems found are reported together, each
//! naming the field it is about (`cluster.members[2].underlay: …`), so one edit-and-retry round
//! fixes them all. Only a configuration without any problem becomes a [`Config`].
//!
//! Every node of a cluster must carry the same `[cluster]` and `[[services]]` sections: the
//! steering table is computed independently on each node from them. `[node]` differs per node.

mod check;
mod digest;
mod document;
mod listeners;
mod pops;
mod prefix;
mod schema;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use cdn_common::maps::MAX_MEMBERS;
use serde::Deserialize;
use thiserror::Error;
use toml::de::DeTable;

pub use check::{
    HOP_BUDGET_RANGE, MAX_CLUSTER_TABLE_SIZE, MAX_IFNAME_LEN, MAX_POP_NAME_LEN,
    MAX_SERVICE_NAME_LEN, MAX_UNIX_SOCKET_PATH, MAX_WEIGHT, MIN_CLIENT_PACKET, MIN_VIP_PREFIX_V4,
    MIN_VIP_PREFIX_V6, min_max_frame,
};
pub use digest::{Digest, DigestParseError, Records, cluster_digest};
pub use listeners::{Listeners, SharedWhy};
pub use pops::table_name;
pub use prefix::{Prefix, PrefixError};
pub use schema::{
    BgpSettings, ClusterSettings, Config, DEFAULT_CONTROL_SOCKET, FIELDS, Field, HealthCheck,
    HealthProbe, MemberSettings, MetricsSettings, NodeSettings, QuicSettings, ServiceSettings,
    UdpMode, WhenAbsent, XdpMode, restart_only_changes,
};

/// A complete, valid configuration for the first node of a three-member cluster, every key
/// commented; the README shows it.
pub const EXAMPLE: &str = include_str!("example.toml");

impl Config {
    /// This node's own member entry; `None` for a steering-only node.
    pub fn self_member(&self) -> Option<&MemberSettings> {
        if self.node.steer_only {
            return None;
        }
        self.cluster
            .members
            .iter()
            .find(|m| m.name == self.node.name)
    }

    /// The member with id `id`, if configured.
    pub fn member(&self, id: u16) -> Option<&MemberSettings> {
        self.cluster.members.iter().find(|m| m.id == id)
    }

    /// Whether an id belongs to a configured member, as a lookup in a bitmap over the id space:
    /// cheap enough to call for every hop of every bucket (see [`crate::cluster::history::advance`]),
    /// where searching the member list each time would not be.
    pub fn known_ids(&self) -> impl Fn(u16) -> bool + use<> {
        let mut known = vec![false; MAX_MEMBERS as usize];
        for m in &self.cluster.members {
            if let Some(k) = known.get_mut(usize::from(m.id)) {
                *k = true;
            }
        }
        move |id| known.get(usize::from(id)).copied().unwrap_or(false)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One rule a configuration breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending field, e.g. `cluster.members[2].underlay`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Why a configuration could not be loaded. The underlying error's text is part of each
/// message, so printing the error alone tells everything.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The text is not TOML, or does not have the configuration's shape (unknown key, wrong
    /// type, missing required key). The message gives line and column.
    #[error("{}{error}", origin(path.as_deref()))]
    Parse {
        path: Option<PathBuf>,
        // Boxed: the TOML error is large and would bloat every `Result` carrying this type.
        error: Box<toml::de::Error>,
    },
    /// The configuration breaks one or more rules; every problem found is listed.
    #[error("{}", invalid_message(path.as_deref(), problems))]
    Invalid {
        path: Option<PathBuf>,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The rules broken, for an [`ConfigError::Invalid`] configuration; empty otherwise.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

fn origin(path: Option<&Path>) -> String {
    path.map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

fn invalid_message(path: Option<&Path>, problems: &[Problem]) -> String {
    let plural = if problems.len() == 1 { "" } else { "s" };
    let mut message = format!(
        "{}invalid configuration, {} problem{plural}:",
        origin(path),
        problems.len()
    );
    for problem in problems {
        message.push_str("\n  ");
        message.push_str(&problem.to_string());
    }
    message
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Reads and checks the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_from(&text, Some(path))
}

/// Parses and checks a configuration given as text.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_from(text, None)
}

fn parse_from(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
    let parse_error = |error| ConfigError::Parse {
        path: path.map(Path::to_owned),
        error: Box::new(error),
    };
    let mut doc = DeTable::parse(text).map_err(parse_error)?;
    let mut problems = Vec::new();
    document::prepare(&mut doc, &mut problems);
    let config = Config::deserialize(toml::de::Deserializer::from(doc)).map_err(|mut error| {
        // Built from the parsed document, the deserializer has no text to quote from.
        error.set_input(Some(text));
        parse_error(error)
    })?;
    check::check(&config, &mut problems);
    if problems.is_empty() {
        return Ok(config);
    }
    // The document pass and the checks run in their own orders (services before the cluster
    // that refers to them); report in the order of the file instead, keeping the order within
    // each section.
    problems.sort_by_key(|p| section_rank(&p.field));
    Err(ConfigError::Invalid {
        path: path.map(Path::to_owned),
        problems,
    })
}

fn section_rank(field: &str) -> usize {
    const SECTIONS: [&str; 5] = ["node", "cluster", "services", "bgp", "metrics"];
    let section = field.split(['.', '[']).next().unwrap_or(field);
    SECTIONS
        .iter()
        .position(|s| *s == section)
        .unwrap_or(SECTIONS.len())
}
