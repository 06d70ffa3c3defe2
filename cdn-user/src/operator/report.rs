//! The one report of a member: `status` (and its `--json`) shows it as it is, and the metrics
//! are encoded from it. A field added here is in `status --json` at once; the metrics encode
//! the fields they list (`operator::metrics`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::cluster::sync::{Disagreement, NodeDigests};

/// One member as this node sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberReport {
    /// Member id from the configuration (the value the data plane uses).
    pub id: u16,
    /// Member name from the configuration; the `member` label of the metrics.
    pub name: String,
    /// Underlay address the member is steered to.
    pub underlay: String,
    /// Configured weight.
    pub weight: u32,
    /// Whether this member is this node.
    pub is_self: bool,
    /// Result of the last health check; `None` until the first one finished.
    pub healthy: Option<bool>,
    /// Why the last failed health check failed.
    pub last_error: Option<String>,
    /// How long the last health check took, in milliseconds; `None` until the first one.
    pub last_check_ms: Option<f64>,
    /// Steering buckets the member owns, over every service.
    pub buckets: u64,
    /// Those buckets as a fraction (0..=1) of all buckets of all services.
    pub share: f64,
    /// Client packets this node forwarded to the member (summed over CPUs).
    pub forwarded_packets: u64,
    /// Bytes of those packets.
    pub forwarded_bytes: u64,
    /// The member's PoP, when the cluster has PoPs; `buckets` and `share` are then over the
    /// tables of that PoP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pop: Option<String>,
}

/// One PoP as this node sees it (status and metrics); none without PoPs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopReport {
    /// The PoP's name (`cluster.members[].pop`).
    pub name: String,
    /// Its index: its place in the sorted names, the bit of searches.
    pub index: usize,
    /// Configured members.
    pub members: usize,
    /// Members whose last health check passed.
    pub healthy: usize,
    /// Members its table was last built over.
    pub eligible: usize,
    /// This node's own PoP.
    pub own: bool,
    /// Own PoP only: no member of it is eligible, so new connections landing here are placed
    /// in another PoP (`fallback_to`).
    pub fallback: bool,
    /// Own PoP only, during a fallback: the PoP that places new connections landing here.
    #[serde(default)]
    pub fallback_to: Option<String>,
}

/// The health checker's own state: probes that failed for local reasons, and the mass-flap
/// hold (every member that was up went down within one check round, so the table keeps them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthChecksReport {
    /// Probes that failed for a local reason since start, by reason (`fd_limit`, `no_buffers`,
    /// `no_local_port`, `no_route`); never counted against a member.
    pub local_errors: BTreeMap<String, u64>,
    /// Members kept in the table by the mass-flap rule; empty while the rule does not apply.
    pub held_members: Vec<String>,
    /// When the hold began, in seconds since the Unix epoch.
    pub held_since: Option<f64>,
}

/// How this node's digests compare with its peers' (`status`): whether every node runs the
/// same cluster configuration and steers with the same tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftReport {
    /// This node's digests.
    pub ours: NodeDigests,
    /// Every other member with a `sync` endpoint, with what it answered.
    pub peers: Vec<PeerDigests>,
    /// Every digest on which a peer that answered differs from this node; empty when all agree.
    pub disagreements: Vec<Disagreement>,
}

/// What one peer answered at `/digests`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerDigests {
    /// The member's name.
    pub member: String,
    /// Its `sync` endpoint.
    pub address: String,
    /// Its digests; `None` when it could not be asked.
    pub digests: Option<NodeDigests>,
    /// Why it could not be asked.
    pub error: Option<String>,
}

/// Learned owners and claims (status and metrics); `None` without PoPs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedReport {
    /// Entries in `LEARNED` at the last expiry pass or claim.
    pub entries: u64,
    /// Entries written on the strength of accepted claims.
    pub added: u64,
    /// Entries deleted because idle, or naming a member no longer configured.
    pub expired: u64,
    /// Claim messages a PoP peer accepted.
    pub claims_sent: u64,
    /// Claim messages accepted here.
    pub claims_received: u64,
    /// Claim messages refused here, by reason (`crate::cluster::claims::Rejection::reason`).
    pub rejected: Vec<(String, u64)>,
    /// PoP drains and undrains accepted from peers over the peer plane.
    #[serde(default)]
    pub pop_drains_received: u64,
    /// PoP drains and undrains refused here, by reason (as `rejected`).
    #[serde(default)]
    pub pop_drains_rejected: Vec<(String, u64)>,
    /// Searches this node accepted (it held the flow), as (hops they took, count), by hops:
    /// the start and every pass-on.
    #[serde(default)]
    pub search_hops: Vec<(u8, u64)>,
    /// Searches accepted here whose hop count could not be read.
    #[serde(default)]
    pub search_hops_unknown: u64,
}

impl LearnedReport {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }
}
