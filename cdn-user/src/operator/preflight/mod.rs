//! Preflight: whether this host is set up the way the README asks for the configured node, each
//! shortfall named with the command that fixes it (`cdn-steer check`).
//!
//! One file per group of checks, each returning typed [`Finding`]s; nothing here changes the
//! host. The checks read the state of the calling thread's network namespace (sysctls through
//! `/proc/sys/net`, links and addresses over netlink), so they see what the daemon would see
//! when started the same way.

mod bird;
mod bpffs;
mod interfaces;
mod netlink;
mod sysctl;
mod vips;

use serde::{Deserialize, Serialize};

use crate::config::Config;

pub use interfaces::{CLIENT_MTU, XDP_NATIVE_DRIVERS};

/// How a checked item stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// As the README asks.
    Ok,
    /// Works, but not as well as it should, or could not be told for sure.
    Warning,
    /// The node will not work right until it is fixed.
    Problem,
}

impl Status {
    /// The word the text output shows.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warning => "WARNING",
            Self::Problem => "PROBLEM",
        }
    }
}

/// Which group of checks a finding belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    /// Kernel settings (`sysctl`).
    Sysctl,
    /// The VIPs on `lo`.
    Vips,
    /// The attached interfaces: present, up, native XDP.
    Interfaces,
    /// The underlay MTU against `max_frame` and the encapsulation.
    Mtu,
    /// The bpf filesystem of the pins.
    Bpffs,
    /// BIRD's control socket and the configured protocols.
    Bird,
}

impl Group {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sysctl => "sysctl",
            Self::Vips => "vips",
            Self::Interfaces => "interfaces",
            Self::Mtu => "mtu",
            Self::Bpffs => "bpffs",
            Self::Bird => "bird",
        }
    }
}

/// One checked item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub group: Group,
    /// What was checked: a sysctl name, an address, an interface, a path, a protocol.
    pub item: String,
    pub status: Status,
    /// What was found (and, when it is not ok, what that breaks).
    pub detail: String,
    /// The command or edit that fixes it; `None` when ok or when there is nothing to run.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(group: Group, item: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            group,
            item: item.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warning(
        group: Group,
        item: impl Into<String>,
        detail: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            group,
            item: item.into(),
            status: Status::Warning,
            detail: detail.into(),
            fix,
        }
    }

    fn problem(
        group: Group,
        item: impl Into<String>,
        detail: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            group,
            item: item.into(),
            status: Status::Problem,
            detail: detail.into(),
            fix,
        }
    }
}

/// Every finding of a preflight run, in the order of the groups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// The worst status found (`Ok` for an empty report).
    pub fn worst(&self) -> Status {
        self.findings
            .iter()
            .map(|f| f.status)
            .max()
            .unwrap_or(Status::Ok)
    }

    /// How many findings have `status`.
    pub fn count(&self, status: Status) -> usize {
        self.findings.iter().filter(|f| f.status == status).count()
    }

    /// The findings of one group.
    pub fn group(&self, group: Group) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.group == group)
    }
}

/// Checks this host (the calling thread's network namespace) for the node `cfg` describes.
/// Blocking: the BIRD check waits up to its client's timeout.
pub fn run(cfg: &Config) -> Report {
    let links = netlink::Links::read();
    let mut findings = Vec::new();
    findings.extend(sysctl::check(cfg));
    findings.extend(vips::check(cfg));
    findings.extend(interfaces::check(cfg, &links));
    findings.push(interfaces::check_underlay(cfg));
    findings.extend(interfaces::check_mtu(cfg, &links));
    findings.extend(bpffs::check(cfg));
    findings.extend(bird::check(cfg));
    Report { findings }
}

/// The report as text: one line per finding, its fix indented below it.
pub fn render(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for f in &report.findings {
        let _ = writeln!(
            out,
            "  {:<7} {:<10} {}: {}",
            f.status.label(),
            f.group.name(),
            f.item,
            f.detail
        );
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "          fix: {fix}");
        }
    }
    out
}
