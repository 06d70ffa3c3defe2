//! `cluster.members[].pop` and `node.pop`.

use super::*;

/// The example with a `pop` on each member (`None`: left out).
fn with_pops(a: Option<&str>, b: Option<&str>, c: Option<&str>) -> String {
    let line = |name: &str, pop: Option<&str>| match pop {
        Some(pop) => format!("name = \"{name}\"\npop = \"{pop}\"\n"),
        None => format!("name = \"{name}\"\n"),
    };
    example_with(&[
        (
            "name = \"node-a\"\n# The PoP",
            &format!("{}# The PoP", line("node-a", a)),
        ),
        ("name = \"node-b\"\n", &line("node-b", b)),
        ("name = \"node-c\"\n", &line("node-c", c)),
    ])
}

/// `text` with `[node] pop` set.
fn with_node_pop(text: &str, pop: &str) -> String {
    assert!(text.contains("\n# Largest frame"));
    text.replacen(
        "\n# Largest frame",
        &format!("\npop = \"{pop}\"\n# Largest frame"),
        1,
    )
}

/// `text` as a steering-only node's configuration.
fn steer_only(text: &str) -> String {
    assert!(text.contains("name = \"node-a\"\n# Interfaces"));
    text.replacen("steer_only = false", "steer_only = true", 1)
        .replacen(
            "name = \"node-a\"\n# Interfaces",
            "name = \"node-x\"\n# Interfaces",
            1,
        )
}

#[test]
fn without_pops_there_is_one_implicit_pop() {
    let cfg = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.pops().is_empty());
    assert_eq!(cfg.pop_slots(), [None]);
    assert_eq!(cfg.pop_count(), 1);
    assert_eq!(cfg.self_pop(), None);
    assert_eq!(cfg.self_pop_index(), 0);
    assert_eq!(cfg.table_names(), ["web"]);
}

#[test]
fn pops_are_numbered_by_sorted_name_and_name_the_tables() {
    let cfg =
        parse(&with_pops(Some("fra"), Some("ams"), Some("fra"))).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.pops(), ["ams", "fra"]);
    assert_eq!(cfg.pop_count(), 2);
    assert_eq!(cfg.self_pop(), Some("fra"));
    assert_eq!(cfg.self_pop_index(), 1);
    assert_eq!(cfg.table_names(), ["web@ams", "web@fra"]);
    // The member's own PoP, written again, is accepted.
    parse(&with_node_pop(
        &with_pops(Some("fra"), Some("ams"), Some("fra")),
        "fra",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn every_member_or_none_has_a_pop() {
    let text = with_pops(Some("fra"), None, Some("ams"));
    assert_problem(
        &text,
        "cluster.members[1].pop",
        "either every member has a pop or none",
    );
    assert_problem(
        &text,
        "cluster.members[1].pop",
        "members[0] (node-a) has pop = \"fra\"",
    );
}

#[test]
fn pop_names_are_checked() {
    for bad in ["", "Fra", "fra 1", "f.ra", &"x".repeat(33)] {
        assert_problem(
            &with_pops(Some("fra"), Some(bad), Some("fra")),
            "cluster.members[1].pop",
            "is not a PoP name",
        );
    }
    parse(&with_pops(Some(&"x".repeat(32)), Some("a_b-9"), Some("z")))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn at_most_eight_pops() {
    // Nine members in nine PoPs: the example's three plus six more.
    let mut text = with_pops(Some("p0"), Some("p1"), Some("p2"));
    for i in 3..9 {
        text = text.replacen(
            "\n[[services]]\n",
            &format!(
                "\n[[cluster.members]]\nname = \"m{i}\"\nid = {}\nunderlay = \"10.0.0.{}\"\npop = \"p{i}\"\n\n[[services]]\n",
                10 + i,
                10 + i
            ),
            1,
        );
    }
    assert_problem(
        &text,
        "cluster.members",
        "9 PoPs (p0, p1, p2, p3, p4, p5, p6, p7, p8); at most 8",
    );
}

#[test]
fn node_pop_must_agree_with_the_members() {
    // Set while no member has a pop.
    assert_problem(
        &with_node_pop(EXAMPLE, "fra"),
        "node.pop",
        "no member has a pop",
    );
    let pops = with_pops(Some("fra"), Some("ams"), Some("ams"));
    // Not a PoP of any member.
    assert_problem(
        &with_node_pop(&pops, "lhr"),
        "node.pop",
        "\"lhr\" is not the pop of any member (PoPs: ams, fra)",
    );
    // Not this node's member's PoP.
    assert_problem(
        &with_node_pop(&pops, "ams"),
        "node.pop",
        "differs from cluster.members[0].pop (\"fra\")",
    );
    assert_problem(
        &with_node_pop(&pops, "AMS"),
        "node.pop",
        "is not a PoP name",
    );
}

#[test]
fn a_steering_only_node_names_its_pop() {
    let pops = steer_only(&with_pops(Some("fra"), Some("ams"), Some("ams")));
    assert_problem(
        &pops,
        "node.pop",
        "required on a steering-only node when the members have a pop (one of: ams, fra)",
    );
    let cfg = parse(&with_node_pop(&pops, "ams")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((cfg.self_pop(), cfg.self_pop_index()), (Some("ams"), 0));
    // Without PoPs, a steering-only node needs none.
    parse(&steer_only(EXAMPLE)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_digest_changes_with_pops_only_when_they_are_set() {
    let plain = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    let a =
        parse(&with_pops(Some("fra"), Some("ams"), Some("ams"))).unwrap_or_else(|e| panic!("{e}"));
    let b =
        parse(&with_pops(Some("fra"), Some("fra"), Some("ams"))).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(cluster_digest(&plain), cluster_digest(&a));
    assert_ne!(cluster_digest(&a), cluster_digest(&b));
}
