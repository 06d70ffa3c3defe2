//! The steering tables as the kernel holds them: double-buffered swaps keep hop history, the
//! maps survive a controller restart (pinned), and two nodes fed the same events hold
//! bit-identical tables.

use std::path::PathBuf;

use anyhow::{Context as _, Result, ensure};
use cdn_common::maps::{
    Bucket, NO_MEMBER, SERVICE_PLACE_ELSEWHERE, SERVICE_PLACE_POP_MASK, SERVICE_PLACE_POP_SHIFT,
    Service,
};
use cdn_test_support::BpfMount;
use cdn_user::{
    cluster::maglev::{self, MaglevMember},
    cluster::pops,
    cluster::sync::table_digest,
    config::{self, Config},
    dataplane::{
        DataPlane, LoadOptions,
        tables::{self, Tables},
    },
};

const CONFIG: &str = r#"
[node]
name = "a"
interfaces = ["eth0"]
underlay_v4 = "10.0.0.1"

[cluster]
hash_key = "000102030405060708090a0b0c0d0e0f"
table_size = 1021

[[cluster.members]]
name = "a"
id = 1
underlay = "10.0.0.1"

[[cluster.members]]
name = "b"
id = 2
underlay = "10.0.0.2"

[[cluster.members]]
name = "c"
id = 3
underlay = "10.0.0.3"

[[services]]
name = "web"
vips = ["192.0.2.1/32", "2001:db8::1/128"]
tcp_ports = [80, 443]

[[services]]
name = "dns"
vips = ["198.51.100.0/24"]
udp_ports = [53]
"#;

fn owners(cfg: &Config, ids: &[u16]) -> Result<Vec<u16>> {
    let members: Vec<MaglevMember<'_>> = cfg
        .cluster
        .members
        .iter()
        .filter(|m| ids.contains(&m.id))
        .map(|m| MaglevMember {
            id: m.id,
            name: &m.name,
            weight: m.weight,
        })
        .collect();
    Ok(maglev::build_table(
        &members,
        cfg.cluster.hash_key,
        cfg.cluster.table_size,
    )?)
}

fn load(cfg: &Config, pins: Option<PathBuf>) -> Result<DataPlane> {
    Ok(DataPlane::load(&LoadOptions {
        table_entries: tables::table_entries(cfg.cluster.table_size, cfg.services.len()),
        pin_dir: pins,
    })?)
}

/// The table the data plane uses for `vip`, read through its LPM entry.
fn live_table(dp: &DataPlane, vip: &str, len: u8) -> Result<(u32, Vec<Bucket>)> {
    let entry = dp
        .service(vip.parse()?, len)?
        .with_context(|| format!("no LPM entry for {vip}"))?;
    Ok((
        entry.generation,
        dp.read_buckets(entry.table_offset, entry.table_size)?,
    ))
}

#[test]
fn swaps_keep_history_and_survive_a_restart() -> Result<()> {
    let cfg = config::parse(CONFIG).map_err(|e| anyhow::anyhow!("{e}"))?;
    let fs = BpfMount::temp("swaps")?;
    let pins = fs.join("maps");
    std::fs::create_dir_all(&pins)?;
    let mut dp = load(&cfg, Some(pins.clone()))?;
    let mut t = Tables::recover(&dp, &cfg)?;

    let all = owners(&cfg, &[1, 2, 3])?;
    t.update(&mut dp, &cfg, &all)?;
    let (generation, first) = live_table(&dp, "192.0.2.1", 32)?;
    ensure!(generation == 1, "first generation is {generation}");
    // Without PoPs: one table, listed as the only PoP's, and nothing to search.
    let entry = dp
        .service("192.0.2.1".parse()?, 32)?
        .context("no LPM entry")?;
    ensure!(
        entry.search_pops == 0 && entry.pop_tables[0] == entry.table_offset,
        "single-PoP entry {entry:?}"
    );
    ensure!(entry.pop_tables[1..].iter().all(|o| *o == 0));
    for (b, o) in first.iter().zip(&all) {
        ensure!(
            b.hops == [*o, NO_MEMBER, NO_MEMBER],
            "fresh bucket {b:?}, owner {o}"
        );
    }

    // Member 2 stops taking new flows: its buckets move, and it stays their previous owner.
    let without_b = owners(&cfg, &[1, 3])?;
    let first_digest = t.tables()["web"].digest();
    ensure!(
        first_digest == table_digest(&first),
        "digest of the first table"
    );
    t.update(&mut dp, &cfg, &without_b)?;
    let (generation, second) = live_table(&dp, "192.0.2.1", 32)?;
    ensure!(generation == 2);
    // The digest is kept per swap: asked again, it must be the new table's.
    ensure!(
        t.tables()["web"].digest() == table_digest(&second)
            && first_digest != table_digest(&second),
        "digest after the swap"
    );
    let mut moved = 0;
    for ((b, old), new) in second.iter().zip(&all).zip(&without_b) {
        if old == new {
            ensure!(
                b.hops == [*new, NO_MEMBER, NO_MEMBER],
                "unchanged bucket rewritten: {b:?}"
            );
        } else {
            ensure!(
                b.hops == [*new, *old, NO_MEMBER],
                "moved bucket {b:?}: {old} -> {new}"
            );
            moved += 1;
        }
    }
    ensure!(
        moved > 300,
        "removing one of three members moved only {moved} buckets"
    );

    // And back: the third generation is written into the half the first one used.
    t.update(&mut dp, &cfg, &all)?;
    let (generation, third) = live_table(&dp, "192.0.2.1", 32)?;
    ensure!(generation == 3);
    for ((b, was), now) in third.iter().zip(&without_b).zip(&all) {
        if was != now {
            ensure!(b.hops == [*now, *was, NO_MEMBER], "returning owner: {b:?}");
        }
    }
    // Every VIP of a service, and every service, sees a complete table.
    ensure!(live_table(&dp, "2001:db8::1", 128)?.1 == third);
    let (_, dns) = live_table(&dp, "198.51.100.0", 24)?;
    ensure!(
        dns == third,
        "services fed the same owners hold the same table"
    );

    // A restart: new program, same pinned maps. The tables and their history are found again.
    drop(t);
    drop(dp);
    let mut dp = load(&cfg, Some(pins))?;
    let mut t = Tables::recover(&dp, &cfg)?;
    let web = &t.tables()["web"];
    ensure!(
        web.generation == 3 && web.buckets() == third.as_slice(),
        "recovered table differs"
    );
    t.update(&mut dp, &cfg, &without_b)?;
    let (generation, fourth) = live_table(&dp, "192.0.2.1", 32)?;
    ensure!(generation == 4);
    ensure!(
        fourth == second,
        "the same change after a restart gives the same table"
    );
    Ok(())
}

#[test]
fn two_nodes_fed_the_same_events_hold_identical_tables() -> Result<()> {
    let cfg = config::parse(CONFIG).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The second node lists its members in another order: the tables must not care.
    let mut reordered = cfg.clone();
    reordered.cluster.members.reverse();
    reordered.services.reverse();
    let mut a = load(&cfg, None)?;
    let mut b = load(&reordered, None)?;
    let mut ta = Tables::recover(&a, &cfg)?;
    let mut tb = Tables::recover(&b, &reordered)?;
    for ids in [&[1u16, 2, 3][..], &[1, 3], &[3], &[1, 2, 3]] {
        ta.update(&mut a, &cfg, &owners(&cfg, ids)?)?;
        tb.update(&mut b, &reordered, &owners(&reordered, ids)?)?;
        for (vip, len) in [
            ("192.0.2.1", 32),
            ("2001:db8::1", 128),
            ("198.51.100.0", 24),
        ] {
            let (_, x) = live_table(&a, vip, len)?;
            let (_, y) = live_table(&b, vip, len)?;
            ensure!(x == y, "tables differ for {vip} after members {ids:?}");
        }
    }
    Ok(())
}

/// A pinned map whose layout this build defines differently (here: the verdict counters with
/// the member-statistics layout, as after an upgrade that changed them) is created anew, and
/// the maps whose layout is the same keep their contents.
#[test]
fn pins_of_another_layout_are_replaced_and_the_others_kept() -> Result<()> {
    let cfg = config::parse(CONFIG)?;
    let fs = BpfMount::temp("stale")?;
    let pins = fs.join("maps");
    std::fs::create_dir_all(&pins)?;
    let bucket = Bucket {
        hops: [3, 2, NO_MEMBER],
        _pad: 0,
    };
    {
        let mut dp = load(&cfg, Some(pins.clone()))?;
        dp.write_buckets(7, &[bucket])?;
    }
    // An older build's counters: another value size and number of entries.
    let counters = pins.join(cdn_common::maps::MAP_COUNTERS);
    std::fs::remove_file(&counters)?;
    std::fs::rename(pins.join(cdn_common::maps::MAP_MEMBER_STATS), &counters)?;

    let dp = load(&cfg, Some(pins))?;
    let counts = dp.counters().context("counters after the layout change")?;
    ensure!(
        counts.slots.iter().all(|n| *n == 0),
        "fresh counters expected"
    );
    let kept = dp.read_buckets(7, 1)?;
    ensure!(
        kept == vec![bucket],
        "the table lost its contents: {kept:?}"
    );
    Ok(())
}

/// Two PoPs: "ams" (index 0: c, d) and "fra" (index 1: a, b, this node's).
fn pop_config() -> Result<Config> {
    let text = CONFIG
        .replace(
            "name = \"a\"\nid = 1\n",
            "name = \"a\"\nid = 1\npop = \"fra\"\n",
        )
        .replace(
            "name = \"b\"\nid = 2\n",
            "name = \"b\"\nid = 2\npop = \"fra\"\n",
        )
        .replace(
            "name = \"c\"\nid = 3\n",
            "name = \"c\"\nid = 3\npop = \"ams\"\n",
        )
        .replace(
            "[[services]]\nname = \"web\"",
            "[[cluster.members]]\nname = \"d\"\nid = 4\nunderlay = \"10.0.0.4\"\npop = \"ams\"\n\n[[services]]\nname = \"web\"",
        );
    let cfg = config::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(cfg.pops() == ["ams", "fra"] && cfg.self_pop_index() == 1);
    Ok(cfg)
}

/// Every PoP's owners with the members `ids` eligible, as the daemon builds them.
fn pop_owners(cfg: &Config, ids: &[u16]) -> Result<Vec<Vec<u16>>> {
    Ok(pop_build(cfg, ids)?.owners)
}

/// Every PoP's table with the members `ids` eligible, and the fallback, as the daemon builds
/// them.
fn pop_build(cfg: &Config, ids: &[u16]) -> Result<pops::PopOwners> {
    let members: Vec<MaglevMember<'_>> = cfg
        .cluster
        .members
        .iter()
        .filter(|m| ids.contains(&m.id))
        .map(|m| MaglevMember {
            id: m.id,
            name: &m.name,
            weight: m.weight,
        })
        .collect();
    Ok(pops::build(cfg, &members, Vec::new())?)
}

/// The buckets of every PoP's table of `vip`, read through its LPM entry's `pop_tables`.
fn live_pop_tables(dp: &DataPlane, vip: &str, len: u8) -> Result<(Service, Vec<Vec<Bucket>>)> {
    let entry = dp
        .service(vip.parse()?, len)?
        .with_context(|| format!("no LPM entry for {vip}"))?;
    let tables = entry.pop_tables[..2]
        .iter()
        .map(|offset| dp.read_buckets(*offset, entry.table_size))
        .collect::<Result<_, _>>()?;
    Ok((entry, tables))
}

#[test]
fn pop_tables_have_slots_of_their_own_swap_together_and_survive_a_restart() -> Result<()> {
    let cfg = pop_config()?;
    let fs = BpfMount::temp("pops")?;
    let pins = fs.join("maps");
    std::fs::create_dir_all(&pins)?;
    let load = |pins: PathBuf| {
        DataPlane::load(&LoadOptions {
            table_entries: tables::table_entries(
                cfg.cluster.table_size,
                cfg.services.len() * cfg.pop_count(),
            ),
            pin_dir: Some(pins),
        })
    };
    let mut dp = load(pins.clone())?;
    let mut t = Tables::recover(&dp, &cfg)?;
    let names: Vec<&String> = t.tables().keys().collect();
    ensure!(
        names == ["dns@ams", "dns@fra", "web@ams", "web@fra"],
        "tables {names:?}"
    );
    let mut slots: Vec<u32> = t.tables().values().map(|t| t.slot).collect();
    slots.sort_unstable();
    slots.dedup();
    ensure!(slots.len() == 4, "one slot per service and PoP: {slots:?}");

    let all = pop_owners(&cfg, &[1, 2, 3, 4])?;
    t.update_pops(&mut dp, &cfg, &all, None)?;
    let (entry, first) = live_pop_tables(&dp, "192.0.2.1", 32)?;
    ensure!(entry.generation == 1);
    // Our own PoP ("fra", 1) is the ingress table; the other one is searched.
    ensure!(entry.table_offset == entry.pop_tables[1], "{entry:?}");
    ensure!(
        entry.search_pops == 0b01,
        "search_pops {:#b}",
        entry.search_pops
    );
    for (pop, (table, owners)) in first.iter().zip(&all).enumerate() {
        for (b, o) in table.iter().zip(owners) {
            ensure!(
                b.hops == [*o, NO_MEMBER, NO_MEMBER],
                "PoP {pop}: {b:?}, owner {o}"
            );
        }
    }
    let owners_of = |table: &[Bucket]| {
        let mut ids: Vec<u16> = table.iter().map(|b| b.hops[0]).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    ensure!(owners_of(&first[0]) == [3, 4] && owners_of(&first[1]) == [1, 2]);
    ensure!(
        t.tables()["web@fra"].digest() == table_digest(&first[1])
            && t.tables()["web@ams"].digest() == table_digest(&first[0])
    );

    // b (fra) and d (ams) go: both PoP tables change, in one swap of the service's entry.
    let fewer = pop_owners(&cfg, &[1, 3])?;
    let report = t.update_pops(&mut dp, &cfg, &fewer, None)?;
    ensure!(report.swapped.len() == 4, "swapped {:?}", report.swapped);
    let (entry2, second) = live_pop_tables(&dp, "192.0.2.1", 32)?;
    ensure!(entry2.generation == 2);
    for pop in 0..2 {
        ensure!(
            entry2.pop_tables[pop] != entry.pop_tables[pop]
                && entry2.pop_tables[pop] / (2 * 1021) == entry.pop_tables[pop] / (2 * 1021),
            "PoP {pop}: not the other half of the same slot"
        );
        let mut moved = 0;
        for ((b, old), new) in second[pop].iter().zip(&all[pop]).zip(&fewer[pop]) {
            let want = if old == new {
                [*new, NO_MEMBER, NO_MEMBER]
            } else {
                moved += 1;
                [*new, *old, NO_MEMBER]
            };
            ensure!(b.hops == want, "PoP {pop}: {b:?}, {old} -> {new}");
        }
        ensure!(moved > 300, "PoP {pop}: only {moved} buckets moved");
    }

    // b comes back: only "fra" changes, "ams" keeps its half, and the entry, replaced once,
    // still points at it.
    let only_fra = pop_owners(&cfg, &[1, 2, 3])?;
    let report = t.update_pops(&mut dp, &cfg, &only_fra, None)?;
    ensure!(
        report.swapped == ["web@fra", "dns@fra"],
        "swapped {:?}",
        report.swapped
    );
    let (entry3, third) = live_pop_tables(&dp, "192.0.2.1", 32)?;
    ensure!(
        entry3.pop_tables[0] == entry2.pop_tables[0]
            && entry3.pop_tables[1] == entry.pop_tables[1]
            && entry3.generation == 3,
        "{entry3:?}"
    );
    ensure!(third[0] == second[0], "ams rewritten");
    ensure!(owners_of(&third[1]) == [1, 2]);

    // A restart: every PoP's table and history is found again through the entry.
    drop(t);
    drop(dp);
    let mut dp = load(pins)?;
    let mut t = Tables::recover(&dp, &cfg)?;
    ensure!(
        t.tables()["web@ams"].buckets() == third[0].as_slice(),
        "ams recovered"
    );
    ensure!(
        t.tables()["web@fra"].buckets() == third[1].as_slice(),
        "fra recovered"
    );
    ensure!(t.tables()["web@fra"].generation == 3);
    // Everyone back: each PoP's previous owners are still in its history.
    t.update_pops(&mut dp, &cfg, &all, None)?;
    let (_, back) = live_pop_tables(&dp, "192.0.2.1", 32)?;
    for pop in 0..2 {
        for ((b, was), now) in back[pop].iter().zip(&third[pop]).zip(&all[pop]) {
            ensure!(b.hops[0] == *now, "PoP {pop}: owner {b:?}");
            if was.hops[0] != *now && was.hops[0] != NO_MEMBER {
                ensure!(
                    b.hops[1] == was.hops[0],
                    "PoP {pop}: history lost {b:?} after {was:?}"
                );
            }
        }
    }

    // A peer's history that names members of another PoP in fra's table (as a fallback or an
    // older release could leave it): merged, but fra's chains keep fra's members only.
    let (_, now) = live_pop_tables(&dp, "192.0.2.1", 32)?;
    let foreign: Vec<Bucket> = now[1]
        .iter()
        .map(|b| Bucket {
            hops: [b.hops[0], 3, 4],
            _pad: 0,
        })
        .collect();
    ensure!(t.absorb("web@fra", &foreign), "nothing to merge");
    t.update_pops(&mut dp, &cfg, &all, None)?;
    let (_, merged) = live_pop_tables(&dp, "192.0.2.1", 32)?;
    ensure!(
        merged[1]
            .iter()
            .all(|b| b.hops.iter().all(|h| [1, 2, NO_MEMBER].contains(h))),
        "a member of ams in fra's chains"
    );

    // No member of fra (ours) is eligible: fra's table keeps naming fra's members (the
    // chains every node's search walks there), and the entry names ams as the PoP that places
    // new connections. Nothing else changes.
    let none_in_fra = pop_build(&cfg, &[3, 4])?;
    ensure!(
        none_in_fra.fallback == Some(0),
        "fallback {:?}",
        none_in_fra.fallback
    );
    t.update_pops(&mut dp, &cfg, &none_in_fra.owners, none_in_fra.fallback)?;
    let (entry4, during) = live_pop_tables(&dp, "192.0.2.1", 32)?;
    let placing = (entry4.flags >> SERVICE_PLACE_POP_SHIFT) & SERVICE_PLACE_POP_MASK;
    ensure!(
        entry4.flags & SERVICE_PLACE_ELSEWHERE != 0
            && placing == 0
            && entry4.table_offset == entry4.pop_tables[1]
            && entry4.search_pops == 0b01,
        "{entry4:?}"
    );
    ensure!(
        during == merged,
        "a PoP's chains changed while fra had no eligible member"
    );
    // fra's members are back: new connections stay in fra again.
    t.update_pops(&mut dp, &cfg, &all, None)?;
    let (entry5, _) = live_pop_tables(&dp, "192.0.2.1", 32)?;
    ensure!(entry5.flags & SERVICE_PLACE_ELSEWHERE == 0, "{entry5:?}");

    // The PoPs are dropped from the configuration: the map does not record PoP names, so
    // no table of the two-PoP layout is taken as the one table's history.
    drop(t);
    let plain = config::parse(CONFIG).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Tables::recover(&dp, &plain)?;
    ensure!(
        t.tables()["web"].generation == 0,
        "a PoP's table recovered as the single table"
    );
    Ok(())
}
