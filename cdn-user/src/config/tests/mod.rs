use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use cdn_common::maps::{DEFAULT_STEER_PORT, DEFAULT_TABLE_SIZE, MAX_SERVICES};

use super::*;

mod learned;
mod pops;
mod quic;
mod rejections;

/// The example with the first occurrence of each `from` replaced by its `to`.
fn example_with(edits: &[(&str, &str)]) -> String {
    let mut text = EXAMPLE.to_owned();
    for (from, to) in edits {
        assert!(text.contains(from), "example has no {from:?}");
        text = text.replacen(from, to, 1);
    }
    text
}

fn problems(text: &str) -> Vec<Problem> {
    match parse(text) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(other) => panic!("expected rule violations, got: {other}"),
        Ok(_) => panic!("configuration unexpectedly valid"),
    }
}

/// Asserts that the configuration is rejected with a problem at `field` whose reason
/// mentions `reason`, and that the error message shows it.
#[track_caller]
fn assert_problem(text: &str, field: &str, reason: &str) {
    let found = problems(text);
    assert!(
        found
            .iter()
            .any(|p| p.field == field && p.reason.contains(reason)),
        "no problem at {field} mentioning {reason:?} in {found:#?}"
    );
    let message = parse(text).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains(&format!("\n  {field}: ")), "{message}");
}

#[test]
fn example_parses() {
    let config = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.node.name, "node-a");
    assert_eq!(config.node.interfaces, ["eth0"]);
    assert_eq!(config.node.underlay_v4, Some(Ipv4Addr::new(10, 0, 0, 1)));
    assert_eq!(config.node.underlay_v6, None);
    assert_eq!(config.node.xdp_mode, XdpMode::Native);
    assert_eq!(config.node.max_frame, 1514);
    assert_eq!(
        config.cluster.hash_key,
        [0x0011_2233_4455_6677, 0x8899_aabb_ccdd_eeff]
    );
    assert_eq!(config.cluster.members.len(), 3);
    let a = &config.cluster.members[0];
    assert_eq!(
        a.health,
        HealthCheck {
            probe: HealthProbe::Tcp,
            port: 80,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            reset: false,
        }
    );
    let b = &config.cluster.members[1];
    assert_eq!(
        b.health.probe,
        HealthProbe::Http {
            path: "/healthz".into(),
            host: Some("www.example.org".into())
        }
    );
    assert_eq!(config.cluster.members[2].weight, 50);
    assert_eq!(
        config.services[0].vips,
        [
            "192.0.2.1/32".parse::<Prefix>().expect("valid prefix"),
            "2001:db8::1/128".parse().expect("valid prefix"),
        ]
    );
    let bgp = config.bgp.as_ref().expect("example has [bgp]");
    assert_eq!(bgp.protocols, ["anycast_vips", "anycast_vips6"]);
    assert_eq!(
        config.metrics.listen,
        "10.0.0.1:9465".parse().expect("valid")
    );
    assert_eq!(config.self_member().map(|m| m.id), Some(0));
    assert_eq!(config.member(2).map(|m| m.name.as_str()), Some("node-c"));
    let known = config.known_ids();
    assert!(known(0) && known(1) && known(2));
    assert!(!known(3) && !known(1023) && !known(cdn_common::maps::NO_MEMBER));
}

#[test]
fn defaults_apply() {
    let config = parse(
        r#"
        [node]
        name = "n1"
        interfaces = ["eth1"]
        underlay_v6 = "fd00::1"
        [cluster]
        hash_key = "ffffffffffffffff0000000000000001"
        [[cluster.members]]
        name = "n1"
        id = 7
        underlay = "fd00::1"
        [[services]]
        name = "dns"
        vips = ["2001:db8:53::/48"]
        udp_ports = [53]
        tcp_ports = [53]
        "#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.node.xdp_mode, XdpMode::Native);
    assert!(!config.node.steer_only);
    assert_eq!(config.node.max_frame, 0);
    assert_eq!(config.node.bpffs, Path::new("/sys/fs/bpf/cdn-steer"));
    assert_eq!(config.node.control_socket, Path::new("/run/cdn-steer.sock"));
    assert_eq!(config.cluster.hash_key, [u64::MAX, 1]);
    assert_eq!(config.cluster.steer_port, DEFAULT_STEER_PORT);
    assert_eq!(config.cluster.table_size, DEFAULT_TABLE_SIZE);
    assert_eq!(config.cluster.hop_budget, 3);
    assert_eq!(config.cluster.members[0].weight, 100);
    assert_eq!(config.cluster.members[0].health.port, 53);
    assert_eq!(config.bgp, None);
    assert_eq!(
        config.metrics.listen,
        SocketAddr::from(([127, 0, 0, 1], 9465))
    );
}

#[test]
fn steer_only_node_needs_no_member_entry() {
    let text = example_with(&[
        ("name = \"node-a\"", "name = \"edge-1\"\nsteer_only = true"),
        ("steer_only = false\n", ""),
        ("underlay_v4 = \"10.0.0.1\"", "underlay_v4 = \"10.0.0.9\""),
    ]);
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.self_member().is_none());
}

#[test]
fn bgp_defaults() {
    let text = example_with(&[
        ("enabled = true\n", ""),
        ("bird_socket = \"/run/bird/bird.ctl\"\n", ""),
        ("poll_interval_ms = 1000\n", ""),
    ]);
    let bgp = parse(&text)
        .unwrap_or_else(|e| panic!("{e}"))
        .bgp
        .expect("[bgp] present");
    assert!(bgp.enabled);
    assert_eq!(bgp.bird_socket, Path::new("/run/bird/bird.ctl"));
    assert_eq!(bgp.poll_interval, Duration::from_secs(1));
}

#[test]
fn unknown_keys_are_errors_with_line_and_column() {
    let text = example_with(&[("hop_budget = 3", "hop_budgte = 3")]);
    let err = parse(&text).expect_err("typo must be rejected");
    assert!(matches!(err, ConfigError::Parse { .. }));
    let message = err.to_string();
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("hop_budgte"))
        .unwrap_or(0);
    assert!(
        message.contains(&format!("line {line}, column 1")),
        "{message}"
    );
    assert!(message.contains("column"), "{message}");
    assert!(message.contains("hop_budgte"), "{message}");

    // Every table denies unknown keys, including nested ones.
    let text = example_with(&[("rise = 2", "raise = 2")]);
    assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
    assert!(matches!(
        parse(&format!("{EXAMPLE}\n[extra]\nx = 1\n")),
        Err(ConfigError::Parse { .. })
    ));
}

#[test]
fn syntax_and_type_errors_give_line_and_column() {
    let err = parse("[node]\nname = \"a\"\ninterfaces = [\"eth0\"\n").expect_err("bad TOML");
    assert!(err.to_string().contains("line 3"), "{err}");
    let text = example_with(&[("id = 1\n", "id = \"one\"\n")]);
    let err = parse(&text).expect_err("string id");
    assert!(matches!(err, ConfigError::Parse { .. }));
    assert!(err.to_string().contains("line "), "{err}");
    let text = example_with(&[("xdp_mode = \"native\"", "xdp_mode = \"offload\"")]);
    let err = parse(&text).expect_err("unknown mode");
    assert!(err.to_string().contains("generic"), "{err}");
}

#[test]
fn all_problems_are_reported_together() {
    let text = example_with(&[
        ("id = 1\n", "id = 0\n"),
        (
            "hash_key = \"00112233445566778899aabbccddeeff\"",
            "hash_key = \"abc\"",
        ),
        ("tcp_ports = [80, 443]", "tcp_ports = [80, 0]"),
        ("timeout_ms = 500", "timeout_ms = 1000"),
    ]);
    let found = problems(&text);
    let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "cluster.hash_key",
            "cluster.members[1].id",
            "cluster.members[1].health.timeout_ms",
            "services[0].tcp_ports[1]",
        ]
    );
    let message = parse(&text).expect_err("invalid").to_string();
    assert_eq!(message.lines().count(), 1 + found.len(), "{message}");
    assert!(
        message.starts_with("invalid configuration, 4 problems:"),
        "{message}"
    );
    assert!(message.contains("\n  cluster.members[1].id: duplicate id 0 (also members[0])"));
}

#[test]
fn member_names_ids_and_addresses_are_unique() {
    assert_problem(
        &example_with(&[("name = \"node-b\"", "name = \"node-a\"")]),
        "cluster.members[1].name",
        "duplicate name \"node-a\" (also members[0])",
    );
    assert_problem(
        &example_with(&[("id = 2", "id = 1")]),
        "cluster.members[2].id",
        "duplicate id 1 (also members[1])",
    );
    assert_problem(
        &example_with(&[("underlay = \"10.0.0.3\"", "underlay = \"10.0.0.1\"")]),
        "cluster.members[2].underlay",
        "duplicate address 10.0.0.1 (also members[0])",
    );
}

#[test]
fn member_fields_are_checked() {
    assert_problem(
        &example_with(&[("id = 2", "id = 1024")]),
        "cluster.members[2].id",
        "out of range",
    );
    assert_problem(
        &example_with(&[("name = \"node-c\"", "name = \"node c\"")]),
        "cluster.members[2].name",
        "whitespace",
    );
    assert_problem(
        &example_with(&[("weight = 50", "weight = 10001")]),
        "cluster.members[2].weight",
        "above the maximum 10000",
    );
    assert_problem(
        &example_with(&[("underlay = \"10.0.0.3\"", "underlay = \"10.0.0.300\"")]),
        "cluster.members[2].underlay",
        "not an IP address",
    );
    assert_problem(
        &example_with(&[("underlay = \"10.0.0.3\"", "underlay = \"224.0.0.1\"")]),
        "cluster.members[2].underlay",
        "not a unicast address",
    );
    let start = EXAMPLE.find("\n[[cluster.members]]").expect("members");
    let end = EXAMPLE.find("\n[[services]]").expect("services");
    let text = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]).replacen(
        "steer_only = false",
        "steer_only = true",
        1,
    );
    assert_eq!(problems(&text).len(), 1, "{:#?}", problems(&text));
    assert_problem(&text, "cluster.members", "at least one member");
}

#[test]
fn node_must_be_a_member_unless_steer_only() {
    assert_problem(
        &example_with(&[("name = \"node-a\"", "name = \"node-x\"")]),
        "node.name",
        "not the name of any cluster member",
    );
    assert_problem(
        &example_with(&[("steer_only = false", "steer_only = true")]),
        "node.steer_only",
        "must not be a member",
    );
}

#[test]
fn own_member_address_must_be_a_node_underlay() {
    assert_problem(
        &example_with(&[("underlay = \"10.0.0.1\"", "underlay = \"10.0.0.11\"")]),
        "cluster.members[0].underlay",
        "neither node.underlay_v4 (10.0.0.1) nor node.underlay_v6 (unset)",
    );
}

#[test]
fn member_families_need_a_node_underlay() {
    assert_problem(
        &example_with(&[("underlay = \"10.0.0.3\"", "underlay = \"fd00::3\"")]),
        "cluster.members[2].underlay",
        "IPv6 but node.underlay_v6 is not set",
    );
    // With an IPv6 underlay on the node as well, the mixed cluster is fine.
    let text = example_with(&[
        ("underlay = \"10.0.0.3\"", "underlay = \"fd00::3\""),
        ("# underlay_v6 = \"fd00::1\"", "underlay_v6 = \"fd00::1\""),
    ]);
    parse(&text).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn node_underlays_are_checked() {
    assert_problem(
        &example_with(&[("underlay_v4 = \"10.0.0.1\"", "")]),
        "node.underlay_v4",
        "at least one is required",
    );
    assert_problem(
        &example_with(&[("underlay_v4 = \"10.0.0.1\"", "underlay_v4 = \"fd00::1\"")]),
        "node.underlay_v4",
        "is not an IPv4 address",
    );
    assert_problem(
        &example_with(&[("# underlay_v6 = \"fd00::1\"", "underlay_v6 = \"::\"")]),
        "node.underlay_v6",
        "not a unicast address",
    );
    // An invalid node address is reported once, not again at the members.
    let found = problems(&example_with(&[(
        "underlay_v4 = \"10.0.0.1\"",
        "underlay_v4 = \"ten\"",
    )]));
    let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["node.underlay_v4"], "{found:#?}");
}

#[test]
fn interfaces_are_checked() {
    assert_problem(
        &example_with(&[("interfaces = [\"eth0\"]", "interfaces = []")]),
        "node.interfaces",
        "at least one interface",
    );
    let text = example_with(&[(
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\", \"\", \"a-very-long-name0\", \"eth0\", \"a/b\"]",
    )]);
    assert_problem(&text, "node.interfaces[1]", "must not be empty");
    assert_problem(&text, "node.interfaces[2]", "at most 15");
    assert_problem(
        &text,
        "node.interfaces[3]",
        "duplicate interface \"eth0\" (also [0])",
    );
    assert_problem(&text, "node.interfaces[4]", "not a valid interface name");
    // Exactly 15 characters is fine.
    let text = example_with(&[(
        "interfaces = [\"eth0\"]",
        "interfaces = [\"abcdefghijklmno\"]",
    )]);
    parse(&text).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn underlay_interfaces_are_attached_interfaces() {
    let base = example_with(&[(
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\", \"eth1\"]",
    )]);
    // Absent: empty, every interface trusted; steer_auth off.
    let config = parse(&base).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.node.underlay_interfaces.is_empty());
    assert!(!config.cluster.steer_auth);
    let text = base.replacen(
        "# underlay_interfaces = [\"eth1\"]",
        "underlay_interfaces = [\"eth1\"]",
        1,
    );
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.node.underlay_interfaces, ["eth1"]);
    let text = base.replacen(
        "# underlay_interfaces = [\"eth1\"]",
        "underlay_interfaces = [\"eth1\", \"eth2\", \"eth1\"]",
        1,
    );
    assert_problem(
        &text,
        "node.underlay_interfaces[1]",
        "\"eth2\" is not one of node.interfaces",
    );
    assert_problem(
        &text,
        "node.underlay_interfaces[2]",
        "duplicate interface \"eth1\" (also [0])",
    );
    let config = parse(&example_with(&[(
        "steer_auth = false",
        "steer_auth = true",
    )]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.cluster.steer_auth);
}

#[test]
fn paths_must_be_absolute() {
    assert_problem(
        &example_with(&[("bpffs = \"/sys/fs/bpf/cdn-steer\"", "bpffs = \"bpf\"")]),
        "node.bpffs",
        "absolute",
    );
    assert_problem(
        &example_with(&[(
            "control_socket = \"/run/cdn-steer.sock\"",
            "control_socket = \"x.sock\"",
        )]),
        "node.control_socket",
        "absolute",
    );
}

#[test]
fn hash_key_is_exactly_32_hex_digits() {
    let key = "hash_key = \"00112233445566778899aabbccddeeff\"";
    for bad in [
        "hash_key = \"00112233445566778899aabbccddeef\"",
        "hash_key = \"00112233445566778899aabbccddeeff0\"",
        "hash_key = \"0x112233445566778899aabbccddeeff\"",
        "hash_key = \"+0112233445566778899aabbccddeeff\"",
        "hash_key = \"\"",
    ] {
        assert_problem(
            &example_with(&[(key, bad)]),
            "cluster.hash_key",
            "32 hex digits",
        );
    }
    let upper = example_with(&[(key, "hash_key = \"00112233445566778899AABBCCDDEEFF\"")]);
    let config = parse(&upper).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.cluster.hash_key[1], 0x8899_aabb_ccdd_eeff);
}

#[test]
fn table_size_is_a_prime_above_the_member_count() {
    assert_problem(
        &example_with(&[("table_size = 65537", "table_size = 65536")]),
        "cluster.table_size",
        "not prime",
    );
    assert_problem(
        &example_with(&[("table_size = 65537", "table_size = 3")]),
        "cluster.table_size",
        "larger than the number of members (3)",
    );
    assert_problem(
        &example_with(&[("table_size = 65537", "table_size = 1000033")]),
        "cluster.table_size",
        "larger than the maximum",
    );
    let text = example_with(&[("table_size = 65537", "table_size = 5")]);
    assert_eq!(parse(&text).map(|c| c.cluster.table_size).ok(), Some(5));
}

#[test]
fn steer_port_and_hop_budget_are_checked() {
    assert_problem(
        &example_with(&[("steer_port = 6080", "steer_port = 0")]),
        "cluster.steer_port",
        "must not be 0",
    );
    assert_problem(
        &example_with(&[("steer_port = 6080", "steer_port = 443")]),
        "cluster.steer_port",
        "443 is also services[0].tcp_ports[1]",
    );
    for budget in ["0", "9"] {
        assert_problem(
            &example_with(&[("hop_budget = 3", &format!("hop_budget = {budget}"))]),
            "cluster.hop_budget",
            "outside 1..=8",
        );
    }
}

#[test]
fn health_checks_are_checked() {
    assert_problem(
        &example_with(&[("timeout_ms = 500", "timeout_ms = 1000")]),
        "cluster.members[1].health.timeout_ms",
        "less than interval_ms (1000)",
    );
    assert_problem(
        &example_with(&[("timeout_ms = 500", "timeout_ms = 0")]),
        "cluster.members[1].health.timeout_ms",
        "more than 0",
    );
    assert_problem(
        &example_with(&[("rise = 2", "rise = 0")]),
        "cluster.members[1].health.rise",
        "at least 1",
    );
    assert_problem(
        &example_with(&[("fall = 3", "fall = 0")]),
        "cluster.members[1].health.fall",
        "at least 1",
    );
    assert_problem(
        &example_with(&[("path = \"/healthz\"", "path = \"healthz\"")]),
        "cluster.members[1].health.path",
        "must start with '/'",
    );
    assert_problem(
        &example_with(&[("path = \"/healthz\"", "path = \"/a b\"")]),
        "cluster.members[1].health.path",
        "whitespace",
    );
    // HealthCheck has no place for a path or host of a TCP check: a shape error, located.
    let text = example_with(&[("kind = \"http\"", "kind = \"tcp\"")]);
    let err = parse(&text).expect_err("path with a TCP check");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("only valid with kind = \"http\""),
        "{message}"
    );
    assert!(message.contains("line "), "{message}");
    assert_problem(
        &example_with(&[("port = 80", "port = 0")]),
        "cluster.members[1].health.port",
        "must not be 0",
    );
    // No TCP port to default to: every member without an explicit port is reported.
    let text = example_with(&[("tcp_ports = [80, 443]", "tcp_ports = []")]);
    assert_problem(
        &text,
        "cluster.members[0].health.port",
        "no service lists a TCP port",
    );
    assert_problem(
        &text,
        "cluster.members[2].health.port",
        "no service lists a TCP port",
    );
    assert!(
        !problems(&text)
            .iter()
            .any(|p| p.field.starts_with("cluster.members[1]"))
    );
}

#[test]
fn services_are_checked() {
    let start = EXAMPLE.find("\n[[services]]").expect("services");
    let end = EXAMPLE.find("# Optional: announce").expect("bgp");
    let text = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]);
    assert_problem(&text, "services", "at least one");
    assert_problem(
        &example_with(&[(
            "vips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]",
            "vips = []",
        )]),
        "services[0].vips",
        "at least one VIP",
    );
    assert_problem(
        &example_with(&[("tcp_ports = [80, 443]\nudp_ports = [443]", "")]),
        "services[0]",
        "neither tcp_ports nor udp_ports",
    );
    assert_problem(
        &example_with(&[("name = \"web\"", "name = \"\"")]),
        "services[0].name",
        "must not be empty",
    );
    let second = "\n[[services]]\nname = \"web\"\nvips = [\"198.51.100.0/24\"]\ntcp_ports = [22]\n";
    assert_problem(
        &format!("{EXAMPLE}{second}"),
        "services[1].name",
        "duplicate name \"web\" (also services[0])",
    );
}

#[test]
fn ports_are_checked() {
    let text = example_with(&[
        ("tcp_ports = [80, 443]", "tcp_ports = [80, 0, 80]"),
        (
            "udp_ports = [443]",
            "udp_ports = [1, 2, 3, 4, 5, 6, 7, 8, 9]",
        ),
    ]);
    assert_problem(&text, "services[0].tcp_ports[1]", "port 0");
    assert_problem(
        &text,
        "services[0].tcp_ports[2]",
        "duplicate port 80 (also [0])",
    );
    assert_problem(&text, "services[0].udp_ports", "9 ports; at most 8");
    // Eight, one of them the QUIC port.
    let text = example_with(&[(
        "udp_ports = [443]",
        "udp_ports = [1, 2, 3, 4, 5, 6, 7, 443]",
    )]);
    parse(&text).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn vips_are_checked() {
    let vips = "vips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]";
    assert_problem(
        &example_with(&[(vips, "vips = [\"192.0.2.1/24\"]")]),
        "services[0].vips[0]",
        "host bits set (did you mean 192.0.2.0/24?)",
    );
    assert_problem(
        &example_with(&[(vips, "vips = [\"192.0.2.1\"]")]),
        "services[0].vips[0]",
        "no prefix length",
    );
    assert_problem(
        &example_with(&[(vips, "vips = [\"2001:db8::/129\"]")]),
        "services[0].vips[0]",
        "longer than 128",
    );
    assert_problem(
        &example_with(&[(vips, "vips = [\"192.0.2.0/24\", \"192.0.2.0/24\"]")]),
        "services[0].vips[1]",
        "duplicate prefix 192.0.2.0/24 (also services[0].vips[0])",
    );
    let second = "\n[[services]]\nname = \"dns\"\nvips = [\"192.0.2.0/30\"]\nudp_ports = [53]\n";
    assert_problem(
        &format!("{EXAMPLE}{second}"),
        "services[1].vips[0]",
        "192.0.2.0/30 overlaps 192.0.2.1/32 (services[0].vips[0])",
    );
    // Another family never overlaps.
    let second = "\n[[services]]\nname = \"dns\"\nvips = [\"::/0\"]\nudp_ports = [53]\n";
    assert_problem(
        &format!("{EXAMPLE}{second}"),
        "services[1].vips[0]",
        "overlaps 2001:db8::1/128",
    );
}

#[test]
fn vip_count_per_family_is_limited() {
    let many: Vec<String> = (0..=MAX_SERVICES)
        .map(|i| format!("\"198.51.100.{i}/32\""))
        .collect();
    let text = example_with(&[(
        "vips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]",
        &format!("vips = [{}]", many.join(", ")),
    )]);
    assert_problem(&text, "services", "65 IPv4 VIP prefixes in all; at most 64");
    // 64 is allowed.
    let text = text.replacen("\"198.51.100.64/32\", ", "", 1);
    let text = text.replacen(", \"198.51.100.64/32\"", "", 1);
    assert_eq!(
        parse(&text).map(|c| c.services[0].vips.len()).ok(),
        Some(64)
    );
}

#[test]
fn underlay_must_not_be_a_vip() {
    assert_problem(
        &example_with(&[(
            "vips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]",
            "vips = [\"10.0.0.0/30\"]",
        )]),
        "cluster.members[1].underlay",
        "10.0.0.2 lies inside VIP prefix 10.0.0.0/30 (services[0].vips[0])",
    );
}

#[test]
fn bgp_and_metrics_are_checked() {
    const LIST: &str = "protocols = [\"anycast_vips\", \"anycast_vips6\"]";
    assert_problem(
        &example_with(&[(LIST, "protocols = [\"anycast_vips\", \"anycast vips\"]")]),
        "bgp.protocols[1]",
        "not a BIRD protocol name",
    );
    assert_problem(
        &example_with(&[(LIST, "protocols = [\"a\", \"a\"]")]),
        "bgp.protocols[1]",
        "listed twice",
    );
    assert_problem(
        &example_with(&[(LIST, "protocols = []")]),
        "bgp.protocols",
        "at least one",
    );
    assert_problem(
        &example_with(&[(LIST, "protocol = \"anycast vips\"")]),
        "bgp.protocols[0]",
        "not a BIRD protocol name",
    );
    // Neither or both spellings: shape errors, located.
    for (edit, says) in [
        ("", "missing field `protocols`"),
        (
            "protocol = \"x\"\nprotocols = [\"y\"]",
            "duplicate field `protocols`",
        ),
    ] {
        let err = parse(&example_with(&[(LIST, edit)])).expect_err(edit);
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains(says), "{err}");
        assert!(err.to_string().contains("line "), "{err}");
    }
    let one = parse(&example_with(&[(LIST, "protocol = \"anycast_vips\"")]))
        .expect("a single protocol is accepted");
    assert_eq!(one.bgp.expect("bgp").protocols, ["anycast_vips"]);
    assert_problem(
        &example_with(&[("poll_interval_ms = 1000", "poll_interval_ms = 0")]),
        "bgp.poll_interval_ms",
        "more than 0",
    );
    assert_problem(
        &example_with(&[(
            "bird_socket = \"/run/bird/bird.ctl\"",
            "bird_socket = \"bird.ctl\"",
        )]),
        "bgp.bird_socket",
        "absolute",
    );
    assert_problem(
        &example_with(&[("listen = \"10.0.0.1:9465\"", "listen = \"localhost\"")]),
        "metrics.listen",
        "not an address:port",
    );
    let text = example_with(&[("listen = \"10.0.0.1:9465\"", "listen = \"[::1]:9100\"")]);
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.metrics.listen, "[::1]:9100".parse().expect("valid"));
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("cdn-steer-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = dir.join("good.toml");
    std::fs::write(&good, EXAMPLE).expect("write");
    assert_eq!(load(&good).ok(), parse(EXAMPLE).ok());

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, example_with(&[("hop_budget = 3", "hop_budget = 0")])).expect("write");
    let message = load(&bad).expect_err("invalid").to_string();
    assert!(message.starts_with(&format!("{}: invalid configuration", bad.display())));

    std::fs::write(&bad, "node = 1\n").expect("write");
    let message = load(&bad).expect_err("wrong shape").to_string();
    assert!(
        message.starts_with(&format!("{}: ", bad.display())),
        "{message}"
    );

    let missing = dir.join("missing.toml");
    let err = load(&missing).expect_err("no such file");
    assert!(
        matches!(&err, ConfigError::Read { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
    );
    assert!(err.to_string().contains(&missing.display().to_string()));
    assert!(err.problems().is_empty());
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn prefixes_parse_and_compare() {
    let p = |s: &str| s.parse::<Prefix>().unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(p("192.0.2.0/24").to_string(), "192.0.2.0/24");
    assert_eq!(p("2001:db8::/32").prefix_len(), 32);
    assert_eq!(p("0.0.0.0/0").addr(), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    assert!(p("192.0.2.0/24").contains("192.0.2.255".parse().expect("ip")));
    assert!(!p("192.0.2.0/24").contains("192.0.3.0".parse().expect("ip")));
    assert!(!p("0.0.0.0/0").contains("::1".parse().expect("ip")));
    assert!(p("::/0").contains("2001:db8::1".parse().expect("ip")));
    assert!(p("192.0.2.0/24").overlaps(&p("192.0.2.128/25")));
    assert!(p("192.0.2.128/25").overlaps(&p("192.0.2.0/24")));
    assert!(!p("192.0.2.0/25").overlaps(&p("192.0.2.128/25")));
    assert!(!p("0.0.0.0/0").overlaps(&p("::/0")));

    let e = |s: &str| s.parse::<Prefix>().expect_err(s);
    assert!(matches!(e("192.0.2.0"), PrefixError::MissingLength(_)));
    assert!(matches!(e("192.0.2/24"), PrefixError::BadAddress(_)));
    assert!(matches!(e("192.0.2.0/+24"), PrefixError::BadLength(_)));
    assert!(matches!(e("192.0.2.0/"), PrefixError::BadLength(_)));
    assert!(matches!(
        e("192.0.2.0/33"),
        PrefixError::TooLong { max: 32, .. }
    ));
    assert!(
        matches!(e("2001:db8::1/64"), PrefixError::HostBitsSet { network, .. }
        if network == p("2001:db8::/64"))
    );
    assert!(matches!(e("0.0.0.1/0"), PrefixError::HostBitsSet { .. }));
    assert!(Prefix::new("10.1.2.3".parse().expect("ip"), 32).is_ok());
}

/// The keys serde accepts in the table at `table` (a [`FIELDS`] path prefix such as
/// `cluster.members[]`, `""` for the top level), read from its error for an unknown key put
/// into that table of the example.
fn keys_serde_accepts(table: &str) -> BTreeSet<String> {
    let header = match table.strip_suffix("[]") {
        Some(array) => format!("[[{array}]]\n"),
        None if table.is_empty() => String::new(),
        None => format!("[{}]\n", table.replace("[]", "")),
    };
    assert!(EXAMPLE.contains(&header), "the example has no {header:?}");
    let text = EXAMPLE.replacen(&header, &format!("{header}unknown_probe = 1\n"), 1);
    let message = parse(&text).expect_err("unknown key").to_string();
    let (_, expected) = message
        .split_once("unknown field `unknown_probe`, expected ")
        .unwrap_or_else(|| panic!("no list of expected keys in {message}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Keys serde accepts that are another spelling of a key in [`FIELDS`].
const ALIASES: &[&str] = &["bgp.protocol"];

#[test]
fn the_field_table_lists_exactly_the_keys_serde_accepts() {
    // Every table that holds a key, with the keys and sub-tables FIELDS says it has.
    let mut tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    tables.insert(String::new(), BTreeSet::new());
    for field in FIELDS {
        let segments: Vec<&str> = field.path.split('.').collect();
        for depth in 0..segments.len() {
            let table = segments[..depth].join(".");
            let key = segments[depth].trim_end_matches("[]").to_owned();
            tables.entry(table).or_default().insert(key);
        }
    }
    assert!(tables.len() >= 8, "{tables:?}");
    for (table, mut keys) in tables {
        for alias in ALIASES {
            if let Some((at, key)) = alias.rsplit_once('.')
                && at == table
            {
                keys.insert(key.to_owned());
            }
        }
        assert_eq!(keys_serde_accepts(&table), keys, "table {table:?}");
    }
}

#[test]
fn field_table_defaults_are_what_a_file_without_the_key_gets() {
    for field in FIELDS {
        if let WhenAbsent::Value(toml) = field.when_absent {
            assert!(
                toml::de::DeValue::parse(toml).is_ok(),
                "{}: default {toml:?} is not a TOML value",
                field.path
            );
        }
    }
    let control_socket = FIELDS
        .iter()
        .find(|f| f.path == "node.control_socket")
        .map(|f| f.when_absent.describe());
    assert_eq!(
        control_socket,
        Some(format!("`\"{DEFAULT_CONTROL_SOCKET}\"`"))
    );

    // Writing each default out changes nothing. (`defaults_apply` checks the values.)
    for field in FIELDS {
        let WhenAbsent::Value(toml) = field.when_absent else {
            continue;
        };
        let (table, key) = field.path.rsplit_once('.').expect("a key in a table");
        let header = match table.strip_suffix("[]") {
            Some(array) => format!("[[{array}]]\n"),
            None => format!("[{}]\n", table.replace("[]", "")),
        };
        // [bgp] is optional: compare with a [bgp] that leaves out everything it can.
        let base = if table == "bgp" {
            format!("{MINIMAL}[bgp]\nprotocols = [\"p\"]\n")
        } else {
            MINIMAL.to_owned()
        };
        // A service needs a port: the one port list it gives swaps sides to test its own default.
        let base = if base.contains(&format!("\n{key} = ")) {
            base.replace("udp_ports = [53]", "tcp_ports = [53]")
        } else {
            base
        };
        let written = base.replacen(&header, &format!("{header}{key} = {toml}\n"), 1);
        assert_eq!(
            parse(&written).unwrap_or_else(|e| panic!("{}: {e}", field.path)),
            parse(&base).unwrap_or_else(|e| panic!("{e}")),
            "{}: writing the default {toml} changes the configuration",
            field.path
        );
    }
}

/// A configuration giving only what is required.
const MINIMAL: &str = r#"[node]
name = "n1"
interfaces = ["eth1"]
underlay_v6 = "fd00::1"
[cluster]
hash_key = "ffffffffffffffff0000000000000001"
[[cluster.members]]
name = "n1"
id = 7
underlay = "fd00::1"
[cluster.members.health]
port = 53
[[services]]
name = "dns"
vips = ["2001:db8:53::/48"]
udp_ports = [53]
[metrics]
"#;

#[test]
fn restart_only_changes_name_the_keys() {
    let old = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    let changed = |edits: &[(&str, &str)]| {
        let new = parse(&example_with(edits)).unwrap_or_else(|e| panic!("{e}"));
        restart_only_changes(&old, &new)
    };
    assert!(changed(&[]).is_empty());
    // Live: weights, health checks, services.
    assert!(changed(&[("weight = 50", "weight = 60"), ("rise = 2", "rise = 3")]).is_empty());
    assert!(changed(&[("udp_ports = [443]", "udp_ports = [443, 53]")]).is_empty());
    assert_eq!(
        changed(&[
            ("interfaces = [\"eth0\"]", "interfaces = [\"eth1\"]"),
            ("table_size = 65537", "table_size = 65521"),
            ("poll_interval_ms = 1000", "poll_interval_ms = 2000"),
            ("listen = \"10.0.0.1:9465\"", "listen = \"10.0.0.1:9466\""),
        ]),
        [
            "node.interfaces",
            "cluster.table_size",
            "bgp.poll_interval_ms",
            "metrics.listen"
        ]
    );
    // Dropping [bgp] changes each of its keys.
    let start = EXAMPLE.find("# Optional: announce").expect("bgp");
    let end = EXAMPLE.find("\n[metrics]").expect("metrics");
    let without = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]);
    let new = parse(&without).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        restart_only_changes(&old, &new),
        [
            "bgp.enabled",
            "bgp.bird_socket",
            "bgp.protocols",
            "bgp.poll_interval_ms"
        ]
    );
}

#[test]
fn peer_plane_is_on_the_own_sync_address_and_metrics_on_their_own() {
    let config = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.listeners(),
        Listeners::Separate {
            peer: "10.0.0.1:9466".parse().expect("valid"),
            metrics: "10.0.0.1:9465".parse().expect("valid"),
        }
    );
    let shown = config.listeners().to_string();
    assert!(
        shown.contains("peer plane (/ready, /table, /digests) on 10.0.0.1:9466"),
        "{shown}"
    );

    // A configuration from before the split: sync is [metrics] listen. It keeps working, on
    // one listener, and says what to change.
    let same = parse(&example_with(&[(
        "sync = \"10.0.0.1:9466\"",
        "sync = \"10.0.0.1:9465\"",
    )]))
    .unwrap_or_else(|e| panic!("{e}"));
    let addr = "10.0.0.1:9465".parse().expect("valid");
    assert_eq!(
        same.listeners(),
        Listeners::Shared {
            addr,
            why: SharedWhy::SameAddress
        }
    );
    assert!(
        same.listeners()
            .to_string()
            .contains("move [metrics] listen to another port")
    );

    // No sync of its own, or a steering-only node: one listener too.
    let none = parse(&example_with(&[("sync = \"10.0.0.1:9466\"\n", "")]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        none.listeners(),
        Listeners::Shared {
            addr,
            why: SharedWhy::NoSync
        }
    );
    let edge = parse(&example_with(&[
        ("name = \"node-a\"", "name = \"edge-1\"\nsteer_only = true"),
        ("steer_only = false\n", ""),
        ("underlay_v4 = \"10.0.0.1\"", "underlay_v4 = \"10.0.0.9\""),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        edge.listeners(),
        Listeners::Shared {
            addr,
            why: SharedWhy::SteerOnly
        }
    );
}

#[test]
fn listeners_that_cannot_both_be_bound_are_refused() {
    for listen in ["0.0.0.0:9466", "[::]:9466"] {
        assert_problem(
            &example_with(&[(
                "listen = \"10.0.0.1:9465\"",
                &format!("listen = \"{listen}\""),
            )]),
            "metrics.listen",
            "both listeners cannot be bound. Give [metrics] listen another port",
        );
    }
    // A wildcard on another port, or another address on the same port, binds.
    for listen in ["0.0.0.0:9465", "127.0.0.1:9466"] {
        parse(&example_with(&[(
            "listen = \"10.0.0.1:9465\"",
            &format!("listen = \"{listen}\""),
        )]))
        .unwrap_or_else(|e| panic!("{listen}: {e}"));
    }
}

#[test]
fn member_addresses_are_underlays_and_sync_addresses() {
    let config = parse(&example_with(&[(
        "sync = \"10.0.0.1:9466\"",
        "sync = \"[::ffff:10.0.9.1]:9466\"",
    )]))
    .unwrap_or_else(|e| panic!("{e}"));
    let expected: BTreeSet<IpAddr> = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.9.1"]
        .iter()
        .map(|a| a.parse().expect("valid"))
        .collect();
    // The mapped sync address counts as the IPv4 address connections come from.
    let mut addresses = config.member_addresses();
    if let Some(v6) = config.node.underlay_v6 {
        assert!(addresses.remove(&IpAddr::V6(v6)));
    }
    assert_eq!(addresses, expected);
}
