//! `cdn-steer check`: the configuration file, then this host for the node it describes
//! ([`super::preflight`]). [`CheckDocument`] is the `--json` output; the text output renders
//! the same document.

use std::{collections::BTreeMap, path::Path, time::Instant};

use serde::{Deserialize, Serialize};

use super::preflight::{self, Finding, Status};
use crate::{
    cluster::maglev::{self, MaglevMember},
    config::{self, Config, ConfigError},
};

/// Version of the [`CheckDocument`] format; raised when a field changes meaning or goes away
/// (added fields keep it).
pub const FORMAT_VERSION: u32 = 1;

/// The verdict of a check, and the exit code that goes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The file is valid and the host has no problem (warnings allowed).
    Ok,
    /// The file was refused.
    ConfigError,
    /// The file is valid; the host has at least one problem.
    HostProblem,
}

/// `check --json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckDocument {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    pub verdict: Verdict,
    pub config: ConfigCheck,
    pub host: HostCheck,
}

/// The configuration part.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigCheck {
    pub path: String,
    pub valid: bool,
    /// Why the file was refused: each broken rule, or the one read or parse error.
    pub errors: Vec<ConfigProblem>,
    /// This node's name; `null` when refused.
    pub node: Option<String>,
    /// The table the file builds with every member healthy; `null` when refused.
    pub table: Option<TableSummary>,
    pub services: Vec<ServiceSummary>,
    /// Where the controller serves HTTP: the peer plane and metrics, one line each, or one
    /// line saying they share a listener and what to change; empty when refused.
    #[serde(default)]
    pub listeners: Vec<String>,
}

/// One reason a file was refused.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigProblem {
    /// The field, as `cluster.members[2].underlay`; `null` for a read or parse error.
    pub field: Option<String>,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TableSummary {
    pub buckets: u32,
    pub build_ms: f64,
    pub members: Vec<MemberShare>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberShare {
    pub id: u16,
    pub name: String,
    pub underlay: String,
    pub weight: u32,
    pub buckets: u32,
    /// `buckets` as a fraction (0..=1) of the table.
    pub share: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: String,
    pub vips: Vec<String>,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    pub udp_mode: String,
}

/// The host part.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostCheck {
    /// Whether the host was checked.
    pub checked: bool,
    /// Why not, when it was not.
    pub skipped: Option<String>,
    pub problems: usize,
    pub warnings: usize,
    pub findings: Vec<Finding>,
}

impl Verdict {
    /// The exit code of `cdn-steer check` for this verdict.
    pub const fn exit_code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::ConfigError => 1,
            Self::HostProblem => 2,
        }
    }
}

/// Checks the file at `path` and, with `host`, this host for its node.
pub fn check(path: &Path, host: bool) -> CheckDocument {
    let cfg = config::load(path);
    let config = match &cfg {
        Ok(cfg) => summarize(path, cfg),
        Err(e) => refused(path, e),
    };
    let host = match (&cfg, host) {
        (Err(_), _) => skipped("the configuration was refused"),
        (Ok(_), false) => skipped("--no-host: only the file was checked"),
        (Ok(cfg), true) => {
            let report = preflight::run(cfg);
            HostCheck {
                checked: true,
                skipped: None,
                problems: report.count(Status::Problem),
                warnings: report.count(Status::Warning),
                findings: report.findings,
            }
        }
    };
    let verdict = if !config.valid {
        Verdict::ConfigError
    } else if host.problems > 0 {
        Verdict::HostProblem
    } else {
        Verdict::Ok
    };
    CheckDocument {
        format: FORMAT_VERSION,
        verdict,
        config,
        host,
    }
}

fn skipped(why: &str) -> HostCheck {
    HostCheck {
        checked: false,
        skipped: Some(why.to_owned()),
        problems: 0,
        warnings: 0,
        findings: Vec::new(),
    }
}

fn refused(path: &Path, e: &ConfigError) -> ConfigCheck {
    let errors = match e.problems() {
        [] => vec![ConfigProblem {
            field: None,
            message: e.to_string(),
        }],
        problems => problems
            .iter()
            .map(|p| ConfigProblem {
                field: Some(p.field.clone()),
                message: p.reason.clone(),
            })
            .collect(),
    };
    ConfigCheck {
        path: path.display().to_string(),
        valid: false,
        errors,
        node: None,
        table: None,
        services: Vec::new(),
        listeners: Vec::new(),
    }
}

/// What a valid configuration builds, with every member healthy.
pub fn summarize(path: &Path, cfg: &Config) -> ConfigCheck {
    let members: Vec<MaglevMember<'_>> = cfg
        .cluster
        .members
        .iter()
        .filter(|m| m.weight > 0)
        .map(|m| MaglevMember {
            id: m.id,
            name: &m.name,
            weight: m.weight,
        })
        .collect();
    let started = Instant::now();
    // A checked configuration always builds (prime size above the member count, unique
    // names and ids); should that ever not hold, say so instead of showing a table.
    let built = maglev::build_table(&members, cfg.cluster.hash_key, cfg.cluster.table_size);
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (table, errors) = match built {
        Ok(table) => {
            let mut count: BTreeMap<u16, u32> = BTreeMap::new();
            for id in &table {
                *count.entry(*id).or_insert(0) += 1;
            }
            let size = cfg.cluster.table_size;
            let members = cfg
                .cluster
                .members
                .iter()
                .map(|m| {
                    let buckets = count.get(&m.id).copied().unwrap_or(0);
                    MemberShare {
                        id: m.id,
                        name: m.name.clone(),
                        underlay: m.underlay.to_string(),
                        weight: m.weight,
                        buckets,
                        share: f64::from(buckets) / f64::from(size),
                    }
                })
                .collect();
            let table = TableSummary {
                buckets: size,
                build_ms,
                members,
            };
            (Some(table), Vec::new())
        }
        Err(e) => (
            None,
            vec![ConfigProblem {
                field: Some("cluster".to_owned()),
                message: e.to_string(),
            }],
        ),
    };
    ConfigCheck {
        path: path.display().to_string(),
        valid: errors.is_empty(),
        errors,
        node: Some(cfg.node.name.clone()),
        table,
        listeners: cfg
            .listeners()
            .to_string()
            .lines()
            .map(str::to_owned)
            .collect(),
        services: cfg
            .services
            .iter()
            .map(|s| ServiceSummary {
                name: s.name.clone(),
                vips: s.vips.iter().map(ToString::to_string).collect(),
                tcp_ports: s.tcp_ports.clone(),
                udp_ports: s.udp_ports.clone(),
                udp_mode: s.udp_mode.name().to_owned(),
            })
            .collect(),
    }
}

/// The configuration part as text.
pub fn render_config(c: &ConfigCheck) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if !c.valid {
        let _ = writeln!(out, "configuration REFUSED: {}", c.path);
        for e in &c.errors {
            match &e.field {
                Some(field) => {
                    let _ = writeln!(out, "  {field}: {}", e.message);
                }
                None => {
                    let _ = writeln!(out, "  {}", e.message);
                }
            }
        }
        return out;
    }
    let _ = writeln!(
        out,
        "configuration OK: node {}",
        c.node.as_deref().unwrap_or("?")
    );
    if let Some(t) = &c.table {
        let _ = writeln!(
            out,
            "table: {} buckets, built in {:.2} ms with every member healthy",
            t.buckets, t.build_ms
        );
        let _ = writeln!(
            out,
            "{:<6} {:<20} {:<40} {:>7} {:>9} {:>8}",
            "id", "member", "underlay", "weight", "buckets", "share"
        );
        for m in &t.members {
            let _ = writeln!(
                out,
                "{:<6} {:<20} {:<40} {:>7} {:>9} {:>7.2}%",
                m.id,
                m.name,
                m.underlay,
                m.weight,
                m.buckets,
                m.share * 100.0
            );
        }
    }
    for s in &c.services {
        let _ = writeln!(
            out,
            "service {}: VIPs {} TCP {:?} UDP {:?}",
            s.name,
            s.vips.join(", "),
            s.tcp_ports,
            s.udp_ports
        );
    }
    for line in &c.listeners {
        let _ = writeln!(out, "http: {line}");
    }
    out
}

/// The whole check as text: the file, then the host (or why it was not checked), then the
/// verdict.
pub fn render(doc: &CheckDocument) -> String {
    let mut out = render_config(&doc.config);
    let h = &doc.host;
    if let Some(why) = &h.skipped {
        out.push_str(&format!("host: not checked ({why})\n"));
    } else {
        out.push_str(&format!(
            "host: checked for node {} (this host, as this process sees it):\n",
            doc.config.node.as_deref().unwrap_or("?")
        ));
        out.push_str(&preflight::render(&preflight::Report {
            findings: h.findings.clone(),
        }));
    }
    out.push_str(&match doc.verdict {
        Verdict::Ok if h.checked => format!(
            "result: OK ({} warning{})\n",
            h.warnings,
            if h.warnings == 1 { "" } else { "s" }
        ),
        Verdict::Ok => "result: configuration OK; host not checked\n".to_owned(),
        Verdict::ConfigError => "result: CONFIGURATION REFUSED\n".to_owned(),
        Verdict::HostProblem => format!(
            "result: HOST NOT READY: {} problem{}, {} warning{}\n",
            h.problems,
            if h.problems == 1 { "" } else { "s" },
            h.warnings,
            if h.warnings == 1 { "" } else { "s" }
        ),
    });
    out
}
