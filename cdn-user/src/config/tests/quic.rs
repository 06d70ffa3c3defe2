//! `[services.quic]` and `cluster.members[].quic_server_id`.

use super::*;

/// The example's QUIC table, from its header to its last key.
const QUIC: &str = "[services.quic]
ports = [443]
# Config rotation bits (0 to 6), octets of server ID (1 or 2), octets of the whole CID.
config_id = 0
server_id_len = 2
cid_len = 8
";

fn with_quic(table: &str) -> String {
    example_with(&[(QUIC, table)])
}

#[test]
fn example_has_quic_and_server_ids_default_to_the_member_id() {
    let cfg = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    let quic = cfg.services[0]
        .quic
        .as_ref()
        .expect("the example's web service has QUIC");
    assert_eq!(
        quic,
        &QuicSettings {
            ports: vec![443],
            config_id: 0,
            server_id_len: 2,
            cid_len: 8,
        }
    );
    let ids: Vec<(u16, u32)> = cfg
        .cluster
        .members
        .iter()
        .map(|m| (m.id, m.quic_server_id))
        .collect();
    assert_eq!(ids, [(0, 0), (1, 1), (2, 12)]);
}

#[test]
fn quic_defaults_and_absence() {
    let cfg =
        parse(&with_quic("[services.quic]\nports = [443]\n")).unwrap_or_else(|e| panic!("{e}"));
    let quic = cfg.services[0].quic.clone().expect("quic");
    assert_eq!(
        (quic.config_id, quic.server_id_len, quic.cid_len),
        (0, 2, 8)
    );
    // The inline form is the same table.
    let inline = parse(&with_quic("quic = { ports = [443] }\n")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(inline, cfg);
    let none = parse(&with_quic("")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(none.services[0].quic, None);
    // A quic table without ports is refused by serde, with its place.
    let message = parse(&with_quic("[services.quic]\ncid_len = 9\n"))
        .expect_err("ports are required")
        .to_string();
    assert!(message.contains("missing field `ports`"), "{message}");
}

#[test]
fn quic_ports_are_udp_ports() {
    assert_problem(
        &with_quic("[services.quic]\nports = [8443]\n"),
        "services[0].quic.ports[0]",
        "8443 is not one of the service's udp_ports",
    );
    assert_problem(
        &with_quic("[services.quic]\nports = [443, 443]\n"),
        "services[0].quic.ports[1]",
        "duplicate port 443 (also [0])",
    );
    assert_problem(
        &with_quic("[services.quic]\nports = []\n"),
        "services[0].quic.ports",
        "at least one port is required",
    );
}

#[test]
fn quic_lb_ranges_are_checked() {
    for (table, field, reason) in [
        ("config_id = 7", "config_id", "config_id 7 is outside 0..=6"),
        (
            "server_id_len = 3",
            "server_id_len",
            "server_id_len 3 is outside 1..=2",
        ),
        (
            "server_id_len = 0",
            "server_id_len",
            "server_id_len 0 is outside",
        ),
        ("cid_len = 6", "cid_len", "cid_len 6 must leave room"),
        ("cid_len = 21", "cid_len", "at most 20"),
    ] {
        assert_problem(
            &with_quic(&format!("[services.quic]\nports = [443]\n{table}\n")),
            &format!("services[0].quic.{field}"),
            reason,
        );
    }
    // The smallest CID of one octet of server ID: first octet, server ID, 4 octets of nonce.
    parse(&with_quic(
        "[services.quic]\nports = [443]\nserver_id_len = 1\ncid_len = 6\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn server_ids_fit_the_smallest_length_and_are_unique() {
    // node-c's 12 fits one octet; 300 does not.
    assert_problem(
        &example_with(&[
            ("server_id_len = 2", "server_id_len = 1"),
            ("quic_server_id = 12", "quic_server_id = 300"),
        ]),
        "cluster.members[2].quic_server_id",
        "300 does not fit services[0].quic.server_id_len = 1 (at most 255)",
    );
    // The default (the member id) is checked too: ids go up to 1023.
    let big_id = example_with(&[
        ("server_id_len = 2", "server_id_len = 1"),
        ("id = 2\n", "id = 700\n"),
        ("quic_server_id = 12\n", ""),
    ]);
    assert_problem(
        &big_id,
        "cluster.members[2].quic_server_id",
        "700 (the member's id, the default) does not fit",
    );
    // Without any QUIC service, only the map's range.
    assert_problem(
        &example_with(&[
            (QUIC, ""),
            ("quic_server_id = 12", "quic_server_id = 65536"),
        ]),
        "cluster.members[2].quic_server_id",
        "65536 is above the largest server ID, 65535",
    );
    // node-b's default (1) against node-c's explicit one.
    assert_problem(
        &example_with(&[("quic_server_id = 12", "quic_server_id = 1")]),
        "cluster.members[2].quic_server_id",
        "duplicate server ID 1 (also cluster.members[1])",
    );
}

#[test]
fn quic_settings_change_live() {
    let old = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    let new = parse(&example_with(&[
        ("cid_len = 8", "cid_len = 12"),
        ("quic_server_id = 12", "quic_server_id = 13"),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(old, new);
    assert!(restart_only_changes(&old, &new).is_empty());
}
