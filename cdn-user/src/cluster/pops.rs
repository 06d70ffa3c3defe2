//! New-flow placement per PoP: every node builds every PoP's Maglev table, each over that
//! PoP's eligible members, so that a new connection stays in the PoP where it lands. Without
//! PoPs this is the one cluster-wide table.

use cdn_common::maps::NO_MEMBER;

use crate::{
    cluster::maglev::{self, MaglevError, MaglevMember},
    config::Config,
};

/// The owners of every PoP's table, by PoP index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PopOwners {
    /// Per PoP: one owner per bucket, over that PoP's eligible members only (`NO_MEMBER`
    /// everywhere for a PoP with none, so that its hop history keeps its last owners).
    pub owners: Vec<Vec<u16>>,
    /// Per PoP: how many members its table was built over.
    pub eligible: Vec<usize>,
    /// This node's own PoP has no eligible member: new connections landing here are placed
    /// by the table of the PoP of this index instead, the first after ours (in PoP order,
    /// wrapping around) that has one. `None` without PoPs, while our PoP has an eligible
    /// member, or when no PoP has any.
    pub fallback: Option<usize>,
}

/// Builds every PoP's table from `eligible` (the members that may take new flows now),
/// reusing the vectors of `previous`.
///
/// A PoP's table never lists another PoP's member, not even while it has none of its own:
/// the search of every node walks that PoP's chain to find the flows its members still hold,
/// so every node must see the same chain there, and a drained member's flows must stay in
/// it. New connections that land in such a PoP go to another PoP's table instead
/// ([`PopOwners::fallback`]), which every node sees alike, so that a later search finds them.
pub fn build(
    cfg: &Config,
    eligible: &[MaglevMember<'_>],
    mut previous: Vec<Vec<u16>>,
) -> Result<PopOwners, MaglevError> {
    let pops = cfg.pop_slots();
    let own = cfg.self_pop_index();
    let size = cfg.cluster.table_size;
    previous.resize_with(pops.len(), Vec::new);
    let pop_of = |m: &MaglevMember<'_>| {
        cfg.member(m.id)
            .and_then(|s| s.pop.as_deref())
            .and_then(|p| pops.iter().position(|q| *q == Some(p)))
            .unwrap_or(0)
    };
    let mut out = PopOwners::default();
    for (index, mut owners) in previous.into_iter().enumerate().take(pops.len()) {
        let members: Vec<MaglevMember<'_>> = eligible
            .iter()
            .filter(|m| pop_of(m) == index)
            .copied()
            .collect();
        if members.is_empty() {
            owners.clear();
            owners.resize(size as usize, NO_MEMBER);
        } else {
            maglev::build_table_into(&members, cfg.cluster.hash_key, size, &mut owners)?;
        }
        out.eligible.push(members.len());
        out.owners.push(owners);
    }
    let count = out.eligible.len();
    if count > 1 && out.eligible.get(own) == Some(&0) {
        out.fallback = (1..count)
            .map(|step| (own + step) % count)
            .find(|&index| out.eligible[index] > 0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[node]
name = "a"
interfaces = ["eth0"]
underlay_v4 = "10.0.0.1"

[cluster]
hash_key = "000102030405060708090a0b0c0d0e0f"
table_size = 251

[[cluster.members]]
name = "a"
id = 1
underlay = "10.0.0.1"
pop = "fra"

[[cluster.members]]
name = "b"
id = 2
underlay = "10.0.0.2"
pop = "fra"

[[cluster.members]]
name = "c"
id = 3
underlay = "10.0.0.3"
pop = "ams"

[[services]]
name = "web"
vips = ["192.0.2.1/32"]
tcp_ports = [80]
"#;

    fn members<'a>(cfg: &'a Config, ids: &[u16]) -> Vec<MaglevMember<'a>> {
        cfg.cluster
            .members
            .iter()
            .filter(|m| ids.contains(&m.id))
            .map(|m| MaglevMember {
                id: m.id,
                name: &m.name,
                weight: m.weight,
            })
            .collect()
    }

    fn owners_of(table: &[u16]) -> Vec<u16> {
        let mut ids: Vec<u16> = table.to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    #[test]
    fn each_pop_is_built_over_its_own_members() {
        let cfg = crate::config::parse(CONFIG).unwrap_or_else(|e| panic!("{e}"));
        let all = members(&cfg, &[1, 2, 3]);
        let built = build(&cfg, &all, Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        // "ams" is index 0, "fra" 1.
        assert_eq!(owners_of(&built.owners[0]), [3]);
        assert_eq!(owners_of(&built.owners[1]), [1, 2]);
        assert_eq!(built.eligible, [1, 2]);
        assert_eq!(built.fallback, None);
        assert_eq!(
            built.owners[1],
            maglev::build_table(&members(&cfg, &[1, 2]), cfg.cluster.hash_key, 251)
                .unwrap_or_else(|e| panic!("{e}"))
        );
    }

    #[test]
    fn own_pop_without_members_places_in_the_next_pop_and_keeps_its_own_table() {
        let cfg = crate::config::parse(CONFIG).unwrap_or_else(|e| panic!("{e}"));
        // Nobody in "fra" (ours, index 1) is eligible: its table names nobody (its history
        // keeps its members), and new connections go to "ams" (index 0, after wrapping).
        let built = build(&cfg, &members(&cfg, &[3]), Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(built.fallback, Some(0));
        assert_eq!(owners_of(&built.owners[0]), [3]);
        assert_eq!(owners_of(&built.owners[1]), [NO_MEMBER]);
        assert_eq!(built.eligible, [1, 0]);
        // Nobody in "ams" (another PoP): no owner there, no fallback.
        let built = build(&cfg, &members(&cfg, &[1]), Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(built.fallback, None);
        assert_eq!(owners_of(&built.owners[0]), [NO_MEMBER]);
        assert_eq!(owners_of(&built.owners[1]), [1]);
        // Nobody anywhere: nowhere to fall back to.
        let built = build(&cfg, &[], Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(built.fallback, None);
    }

    #[test]
    fn the_fallback_is_the_next_pop_with_members_wrapping_around() {
        let text = format!(
            "{CONFIG}\n[[cluster.members]]\nname = \"d\"\nid = 4\nunderlay = \"10.0.0.4\"\npop = \"lon\"\n"
        );
        let cfg = crate::config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        // PoPs in order: ams 0, fra 1 (ours), lon 2.
        let built =
            build(&cfg, &members(&cfg, &[3, 4]), Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(built.fallback, Some(2));
        let built = build(&cfg, &members(&cfg, &[3]), Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(built.fallback, Some(0));
    }

    #[test]
    fn without_pops_there_is_the_one_cluster_table() {
        let text = CONFIG
            .replace("pop = \"fra\"\n", "")
            .replace("pop = \"ams\"\n", "");
        let cfg = crate::config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let all = members(&cfg, &[1, 2, 3]);
        let built = build(&cfg, &all, Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(built.owners.len(), 1);
        assert_eq!(
            built.owners[0],
            maglev::build_table(&all, cfg.cluster.hash_key, 251).unwrap_or_else(|e| panic!("{e}"))
        );
        let built = build(&cfg, &[], Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(built.fallback, None);
        assert_eq!(owners_of(&built.owners[0]), [NO_MEMBER]);
    }
}
