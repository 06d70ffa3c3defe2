//! What the daemon shows of PoPs: one report per PoP for `status` and the metrics, and a
//! flow's chain in every PoP for `lookup`.

use cdn_common::maps::{NO_MEMBER, Service};

use super::core::Core;
use crate::{
    dataplane::DataPlaneError,
    operator::{control::PopChain, report::PopReport},
};

impl Core {
    /// Every PoP with its members, healthy members and this node's fallback; empty without
    /// PoPs.
    pub(super) fn pop_reports(&self) -> Vec<PopReport> {
        let own = self.cfg.self_pop_index();
        self.cfg
            .pops()
            .into_iter()
            .enumerate()
            .map(|(index, name)| {
                let members: Vec<u16> = self
                    .cfg
                    .cluster
                    .members
                    .iter()
                    .filter(|m| m.pop.as_deref() == Some(name))
                    .map(|m| m.id)
                    .collect();
                let healthy = members
                    .iter()
                    .filter(|id| self.health.get(id).and_then(|h| h.healthy) == Some(true))
                    .count();
                PopReport {
                    name: name.to_owned(),
                    index,
                    members: members.len(),
                    healthy,
                    eligible: self.pop_eligible.get(index).copied().unwrap_or(0),
                    own: index == own,
                    fallback: index == own && self.pop_fallback.is_some(),
                    fallback_to: self
                        .pop_fallback
                        .filter(|_| index == own)
                        .and_then(|to| self.cfg.pops().get(to).map(|p| (*p).to_owned())),
                }
            })
            .collect()
    }
}

impl Core {
    /// The chain of `bucket` in every PoP's table, read through the service's LPM `entry`
    /// (its `pop_tables`); empty without PoPs.
    pub(super) fn pop_chains(
        &self,
        entry: &Service,
        bucket: u32,
    ) -> Result<Vec<PopChain>, DataPlaneError> {
        let own = self.cfg.self_pop_index();
        let mut out = Vec::new();
        for (index, (pop, offset)) in self
            .cfg
            .pops()
            .into_iter()
            .zip(entry.pop_tables)
            .enumerate()
        {
            let hops = self
                .dp
                .read_buckets(offset + bucket, 1)?
                .first()
                .map_or([NO_MEMBER; 3], |b| b.hops);
            out.push(PopChain {
                pop: pop.to_owned(),
                own: index == own,
                hops: hops
                    .iter()
                    .filter(|h| **h != NO_MEMBER)
                    .map(|h| {
                        let name = self.cfg.member(*h).map_or("(unknown)", |m| &m.name);
                        (*h, name.to_owned())
                    })
                    .collect(),
            });
        }
        Ok(out)
    }
}
