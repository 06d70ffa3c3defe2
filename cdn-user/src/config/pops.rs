//! PoPs (points of presence) as the configuration defines them: the members' `pop`, numbered
//! by the sorted order of their names, the same on every node. A cluster whose members have
//! no `pop` has one implicit PoP (index 0, no name), and everything behaves as without PoPs.

use super::schema::{Config, MemberSettings};

/// The name of a steering table: the service's name without PoPs, `"<service>@<pop>"` with
/// them. Sync, digests and history merges are keyed by it.
pub fn table_name(service: &str, pop: Option<&str>) -> String {
    match pop {
        Some(pop) => format!("{service}@{pop}"),
        None => service.to_owned(),
    }
}

impl Config {
    /// The PoP names, sorted (their indices); empty when the members have no `pop`.
    pub fn pops(&self) -> Vec<&str> {
        let mut pops: Vec<&str> = self
            .cluster
            .members
            .iter()
            .filter_map(|m| m.pop.as_deref())
            .collect();
        pops.sort_unstable();
        pops.dedup();
        pops
    }

    /// Every PoP as tables are built for it, by index: its name, or one `None` without PoPs.
    pub fn pop_slots(&self) -> Vec<Option<&str>> {
        let pops = self.pops();
        if pops.is_empty() {
            vec![None]
        } else {
            pops.into_iter().map(Some).collect()
        }
    }

    /// How many PoP tables each service has: the number of PoPs, 1 without PoPs.
    pub fn pop_count(&self) -> usize {
        self.pops().len().max(1)
    }

    /// This node's PoP name: `[node] pop`, else its member's; `None` without PoPs.
    pub fn self_pop(&self) -> Option<&str> {
        self.node
            .pop
            .as_deref()
            .or_else(|| self.self_member().and_then(|m| m.pop.as_deref()))
    }

    /// The index of this node's PoP (0 without PoPs).
    pub fn self_pop_index(&self) -> usize {
        self.pop_index(self.self_pop())
    }

    /// The index of the PoP named `pop` (0 for `None` or an unknown name).
    pub fn pop_index(&self, pop: Option<&str>) -> usize {
        pop.and_then(|p| self.pops().iter().position(|q| *q == p))
            .unwrap_or(0)
    }

    /// Whether `member` stands in the PoP of index `index` (always, without PoPs).
    pub fn in_pop(&self, member: &MemberSettings, index: usize) -> bool {
        self.pop_index(member.pop.as_deref()) == index
    }

    /// Which member ids PoP `index`'s table may keep in its hop history: that PoP's members
    /// (every configured member without PoPs, as [`Config::known_ids`]). A chain that strays
    /// into another PoP would end there, and the search its last hop starts leaves out that
    /// hop's own PoP, where the flow may live; members' chains would also differ in order
    /// after gossip merges. So each PoP's chain holds its own members only.
    pub fn pop_member_ids(&self, index: usize) -> impl Fn(u16) -> bool + use<> {
        let mut known = vec![false; cdn_common::maps::MAX_MEMBERS as usize];
        let with_pops = !self.pops().is_empty();
        for m in &self.cluster.members {
            if with_pops && !self.in_pop(m, index) {
                continue;
            }
            if let Some(k) = known.get_mut(usize::from(m.id)) {
                *k = true;
            }
        }
        move |id| known.get(usize::from(id)).copied().unwrap_or(false)
    }

    /// Every steering table's name, service by service, PoP by PoP.
    pub fn table_names(&self) -> Vec<String> {
        let pops = self.pop_slots();
        self.services
            .iter()
            .flat_map(|s| pops.iter().map(|p| table_name(&s.name, *p)))
            .collect()
    }
}
