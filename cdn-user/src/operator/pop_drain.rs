//! `cdn-steer drain --pop` / `undrain --pop`: the answer, member by member, and its text.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// What a PoP drain (or undrain) did on each member of the PoP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopDrainReport {
    /// The PoP's name.
    pub pop: String,
    /// `true` for a drain, `false` for an undrain.
    pub drain: bool,
    /// This node first, then the other members of the PoP by id.
    pub members: Vec<PopDrainMember>,
}

/// One member's part of a [`PopDrainReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopDrainMember {
    pub id: u16,
    pub name: String,
    pub outcome: PopDrainOutcome,
    /// Why, for the outcomes that are failures: the error or the peer's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PopDrainOutcome {
    /// It changed state (drained, or undrained).
    Changed,
    /// It was in that state already.
    Unchanged,
    /// No answer (connection refused, timeout...).
    Unreachable,
    /// It answered, but refused (e.g. its cluster key differs, or it has no PoPs).
    Refused,
    /// It has no `sync` address: the peer plane cannot reach it.
    NoSyncAddress,
}

impl PopDrainOutcome {
    /// Whether the member is in the asked-for state now.
    pub const fn succeeded(self) -> bool {
        matches!(self, Self::Changed | Self::Unchanged)
    }
}

impl PopDrainReport {
    /// Whether every member of the PoP is in the asked-for state now.
    pub fn complete(&self) -> bool {
        self.members.iter().all(|m| m.outcome.succeeded())
    }

    /// The members that are not, by name (for the error message).
    pub fn failed(&self) -> Vec<&str> {
        self.members
            .iter()
            .filter(|m| !m.outcome.succeeded())
            .map(|m| m.name.as_str())
            .collect()
    }

    /// One line per member, e.g. `node-b (id 2): drained`.
    pub fn render(&self) -> String {
        let (done, already) = if self.drain {
            ("drained", "already drained")
        } else {
            ("undrained", "already undrained")
        };
        let verb = if self.drain { "drain" } else { "undrain" };
        let mut out = format!("PoP {}: {verb}\n", self.pop);
        for m in &self.members {
            let outcome = match m.outcome {
                PopDrainOutcome::Changed => done,
                PopDrainOutcome::Unchanged => already,
                PopDrainOutcome::Unreachable => "unreachable",
                PopDrainOutcome::Refused => "refused",
                PopDrainOutcome::NoSyncAddress => "unreachable: no sync address (peer plane)",
            };
            let _ = write!(out, "  {} (id {}): {outcome}", m.name, m.id);
            if let Some(detail) = &m.detail {
                let _ = write!(out, ": {detail}");
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_member_and_failures_make_it_incomplete() {
        let member = |id, name: &str, outcome, detail: Option<&str>| PopDrainMember {
            id,
            name: name.into(),
            outcome,
            detail: detail.map(Into::into),
        };
        let mut report = PopDrainReport {
            pop: "fra".into(),
            drain: true,
            members: vec![
                member(1, "a", PopDrainOutcome::Changed, None),
                member(2, "b", PopDrainOutcome::Unchanged, None),
            ],
        };
        assert!(report.complete());
        report.members.push(member(
            3,
            "c",
            PopDrainOutcome::Unreachable,
            Some("connection refused"),
        ));
        report
            .members
            .push(member(4, "d", PopDrainOutcome::NoSyncAddress, None));
        assert!(!report.complete());
        assert_eq!(report.failed(), ["c", "d"]);
        assert_eq!(
            report.render(),
            "PoP fra: drain\n  a (id 1): drained\n  b (id 2): already drained\n  \
             c (id 3): unreachable: connection refused\n  \
             d (id 4): unreachable: no sync address (peer plane)\n"
        );
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["members"][2]["outcome"], "unreachable");
        assert_eq!(json["members"][3]["outcome"], "no_sync_address");
    }
}
