//! The rules of PoPs: `cluster.members[].pop` on every member or none, valid names, at most
//! [`MAX_POPS`], and `[node] pop` consistent with them.

use cdn_common::maps::MAX_POPS;

use super::Checker;
use crate::config::schema::Config;

/// Longest PoP name.
pub const MAX_POP_NAME_LEN: usize = 32;

/// Why `name` is not a PoP name, if it is not one.
pub fn pop_name_problem(name: &str) -> Option<String> {
    let valid = (1..=MAX_POP_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    (!valid).then(|| {
        format!(
            "{name:?} is not a PoP name: 1 to {MAX_POP_NAME_LEN} characters of a-z, 0-9, '_' \
             and '-'"
        )
    })
}

/// Accepted range of `cluster.learned_idle_ms`.
pub const LEARNED_IDLE_MS_RANGE: std::ops::RangeInclusive<u128> = 1_000..=3_600_000;

impl Checker<'_> {
    pub(super) fn pops(&mut self, config: &Config) {
        let idle = config.cluster.learned_idle.as_millis();
        if !LEARNED_IDLE_MS_RANGE.contains(&idle) {
            self.problem(
                "cluster.learned_idle_ms",
                format!(
                    "{idle} is outside {}..={}",
                    LEARNED_IDLE_MS_RANGE.start(),
                    LEARNED_IDLE_MS_RANGE.end()
                ),
            );
        }
        let members = &config.cluster.members;
        let with = members.iter().position(|m| m.pop.is_some());
        for (i, m) in members.iter().enumerate() {
            match (&m.pop, with) {
                (Some(pop), _) => {
                    if let Some(reason) = pop_name_problem(pop) {
                        self.problem(format!("cluster.members[{i}].pop"), reason);
                    }
                }
                (None, Some(j)) => self.problem(
                    format!("cluster.members[{i}].pop"),
                    format!(
                        "not set, but members[{j}] ({}) has pop = {:?}; either every member \
                         has a pop or none",
                        members[j].name,
                        members[j].pop.as_deref().unwrap_or_default()
                    ),
                ),
                (None, None) => {}
            }
        }
        let pops = config.pops();
        if pops.len() > MAX_POPS {
            self.problem(
                "cluster.members",
                format!(
                    "{} PoPs ({}); at most {MAX_POPS} are supported",
                    pops.len(),
                    pops.join(", ")
                ),
            );
        }
        self.node_pop(config, &pops);
    }

    fn node_pop(&mut self, config: &Config, pops: &[&str]) {
        let node = &config.node;
        let own = config
            .cluster
            .members
            .iter()
            .position(|m| !node.steer_only && m.name == node.name);
        match (&node.pop, own) {
            (Some(pop), _) if pops.is_empty() => self.problem(
                "node.pop",
                format!("{pop:?} is set, but no member has a pop; leave it out"),
            ),
            (Some(pop), _) if pop_name_problem(pop).is_some() => {
                if let Some(reason) = pop_name_problem(pop) {
                    self.problem("node.pop", reason);
                }
            }
            (Some(pop), _) if !pops.contains(&pop.as_str()) => self.problem(
                "node.pop",
                format!(
                    "{pop:?} is not the pop of any member (PoPs: {})",
                    pops.join(", ")
                ),
            ),
            (Some(pop), Some(j)) => {
                if let Some(theirs) = &config.cluster.members[j].pop
                    && theirs != pop
                {
                    self.problem(
                        "node.pop",
                        format!(
                            "{pop:?} differs from cluster.members[{j}].pop ({theirs:?}), this \
                             node's member; leave it out or make them equal"
                        ),
                    );
                }
            }
            (None, None) if node.steer_only && !pops.is_empty() => self.problem(
                "node.pop",
                format!(
                    "required on a steering-only node when the members have a pop (one of: {})",
                    pops.join(", ")
                ),
            ),
            _ => {}
        }
    }
}
