//! Values that are valid syntax but dangerous to run with: each is refused with a message that
//! says what is wrong and what to write instead, and a file holding all of them gets every one
//! reported in one round.

use super::*;

const VIPS: &str = "vips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]";

fn with_vip(vip: &str) -> String {
    example_with(&[(VIPS, &format!("vips = [\"{vip}\"]"))])
}

#[track_caller]
fn assert_valid(text: &str) {
    if let Err(e) = parse(text) {
        panic!("expected a valid configuration: {e}");
    }
}

#[test]
fn vips_wider_than_a_service_are_refused() {
    for vip in [
        "::/0",
        "0.0.0.0/0",
        "64.0.0.0/2",
        "198.0.0.0/7",
        "2000::/3",
        "2000::/15",
    ] {
        assert_problem(&with_vip(vip), "services[0].vips[0]", "is shorter than /");
    }
    assert_problem(
        &with_vip("::/0"),
        "services[0].vips[0]",
        "::/0 is shorter than /16: a VIP prefix that wide",
    );
    // The shortest accepted prefixes.
    assert_valid(&with_vip("198.0.0.0/8"));
    assert_valid(&with_vip("2001::/16"));
}

#[test]
fn vips_in_reserved_ranges_are_refused() {
    for (vip, what) in [
        ("127.0.0.1/32", "127.0.0.0/8, loopback"),
        ("127.0.0.0/8", "127.0.0.0/8, loopback"),
        ("::1/128", "::1/128, loopback"),
        ("224.0.0.1/32", "224.0.0.0/4, multicast"),
        ("239.1.0.0/16", "224.0.0.0/4, multicast"),
        ("ff02::1/128", "ff00::/8, multicast"),
        (
            "255.255.255.255/32",
            "255.255.255.255/32, the broadcast address",
        ),
        ("169.254.1.0/24", "169.254.0.0/16, link-local"),
        ("fe80::/64", "fe80::/10, link-local"),
        ("0.0.0.0/32", "0.0.0.0/8"),
        ("::/128", "::/128, the unspecified address"),
        ("::ffff:192.0.2.1/128", "::ffff:0.0.0.0/96, IPv4-mapped"),
    ] {
        let text = with_vip(vip);
        assert_problem(&text, "services[0].vips[0]", &format!("lies in {what}"));
        assert_problem(&text, "services[0].vips[0]", "use a unicast prefix");
    }
    // Wider than a reserved range, but not too wide.
    assert_problem(
        &with_vip("169.0.0.0/8"),
        "services[0].vips[0]",
        "169.0.0.0/8 takes in 169.254.0.0/16, link-local",
    );
    // Next to a reserved range is fine.
    assert_valid(&with_vip("126.255.255.0/24"));
    assert_valid(&with_vip("223.255.255.0/24"));
}

#[test]
fn the_pin_directory_is_one_of_its_own() {
    let bpffs = "bpffs = \"/sys/fs/bpf/cdn-steer\"";
    let with = |path: &str| example_with(&[(bpffs, &format!("bpffs = \"{path}\""))]);
    for path in ["/", "/tmp", "/run", "/cdn"] {
        assert_problem(
            &with(path),
            "node.bpffs",
            "the root or a top-level directory",
        );
        assert_problem(&with(path), "node.bpffs", "use a directory of its own");
    }
    for path in ["/var/lib", "/var/tmp", "/run/user"] {
        assert_problem(&with(path), "node.bpffs", "a directory the system uses");
    }
    for path in [
        "/sys",
        "/sys/fs",
        "/sys/kernel/cdn",
        "/proc/cdn",
        "/dev/shm/cdn",
    ] {
        assert_problem(&with(path), "node.bpffs", "inside a kernel filesystem");
    }
    assert_problem(
        &with("/sys/fs/bpf/../../../tmp"),
        "node.bpffs",
        "contains '..'",
    );
    assert_problem(&with("pins"), "node.bpffs", "must be an absolute path");
    for path in [
        "/sys/fs/bpf",
        "/sys/fs/bpf/x/y",
        "/var/lib/cdn-steer",
        "/srv/pins/a",
    ] {
        assert_valid(&with(path));
    }
}

#[test]
fn socket_paths_fit_a_unix_socket_address() {
    // SAFETY: sockaddr_un is plain old data; all zeros is a valid value.
    let sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    assert_eq!(MAX_UNIX_SOCKET_PATH + 1, sun.sun_path.len());

    let socket = "control_socket = \"/run/cdn-steer.sock\"";
    let path = |len: usize| format!("/run/{}", "s".repeat(len - "/run/".len()));
    let longest = path(MAX_UNIX_SOCKET_PATH);
    assert_valid(&example_with(&[(
        socket,
        &format!("control_socket = \"{longest}\""),
    )]));
    let too_long = path(MAX_UNIX_SOCKET_PATH + 1);
    assert_problem(
        &example_with(&[(socket, &format!("control_socket = \"{too_long}\""))]),
        "node.control_socket",
        "is 108 bytes long; a unix socket path holds at most 107 (sun_path): choose a shorter",
    );
    assert_problem(
        &example_with(&[(
            "bird_socket = \"/run/bird/bird.ctl\"",
            &format!("bird_socket = \"{too_long}\""),
        )]),
        "bgp.bird_socket",
        "at most 107",
    );
}

#[test]
fn service_names_are_url_and_log_safe() {
    let name = "name = \"web\"";
    let with = |n: &str| example_with(&[(name, &format!("name = {n}"))]);
    for bad in [
        "\"web/x\"",
        "\"web?x\"",
        "\"web x\"",
        "\"web\\r\"",
        "\"web\\nlevel=error\"",
        "\"wéb\"",
        "\"..\"",
    ] {
        assert_problem(
            &with(bad),
            "services[0].name",
            "may only use letters, digits, '_', '.' and '-'",
        );
    }
    assert_problem(&with("\"\""), "services[0].name", "must not be empty");
    let long = "w".repeat(MAX_SERVICE_NAME_LEN + 1);
    assert_problem(
        &with(&format!("\"{long}\"")),
        "services[0].name",
        "65 bytes long; at most 64",
    );
    let longest = "w".repeat(MAX_SERVICE_NAME_LEN);
    assert_valid(&with(&format!("\"{longest}\"")));
    assert_valid(&with("\"Web_1.v2-b\""));
}

#[test]
fn max_frame_fits_a_minimum_ipv6_packet_encapsulated() {
    let frame = "max_frame = 1514";
    let with = |n: u32, v6: bool| {
        let mut edits = vec![(frame, format!("max_frame = {n}"))];
        if v6 {
            edits.push((
                "# underlay_v6 = \"fd00::1\"",
                "underlay_v6 = \"fd00::1\"".into(),
            ));
        }
        let edits: Vec<(&str, &str)> = edits.iter().map(|(a, b)| (*a, b.as_str())).collect();
        example_with(&edits)
    };
    assert_eq!(min_max_frame(false), 1330);
    assert_eq!(min_max_frame(true), 1350);
    assert_problem(
        &with(1, false),
        "node.max_frame",
        "1 is below 1330, the frame a 1280-byte client packet (the IPv6 minimum MTU) makes",
    );
    assert_problem(&with(1329, false), "node.max_frame", "or 0 for no check");
    assert_valid(&with(1330, false));
    assert_problem(&with(1349, true), "node.max_frame", "below 1350");
    assert_valid(&with(1350, true));
    assert_valid(&with(0, true));
}

#[test]
fn some_member_must_take_new_connections() {
    let text = EXAMPLE
        .replace("weight = 100", "weight = 0")
        .replace("weight = 50", "weight = 0");
    assert_problem(
        &text,
        "cluster.members",
        "every member has weight 0, so no member could take a new connection",
    );
    // One is enough.
    assert_valid(&EXAMPLE.replacen("weight = 100", "weight = 0", 2));
}

#[test]
fn the_hash_key_is_not_all_zeros() {
    let text = example_with(&[(
        "hash_key = \"00112233445566778899aabbccddeeff\"",
        "hash_key = \"00000000000000000000000000000000\"",
    )]);
    assert_problem(&text, "cluster.hash_key", "is all zeros");
    assert_problem(&text, "cluster.hash_key", "openssl rand -hex 16");
    // A key that does not parse is reported as that, not also as all zeros (its placeholder).
    let text = example_with(&[(
        "hash_key = \"00112233445566778899aabbccddeeff\"",
        "hash_key = \"00\"",
    )]);
    let found: Vec<_> = problems(&text)
        .into_iter()
        .filter(|p| p.field == "cluster.hash_key")
        .collect();
    assert_eq!(found.len(), 1, "{found:#?}");
}

#[test]
fn ports_to_listen_on_and_connect_to_are_not_0() {
    let listen = "listen = \"10.0.0.1:9465\"";
    assert_problem(
        &example_with(&[(listen, "listen = \"10.0.0.1:0\"")]),
        "metrics.listen",
        "10.0.0.1:0: port 0 would listen on a random port",
    );
    let sync = "sync = \"10.0.0.1:9466\"";
    assert_problem(
        &example_with(&[(sync, "sync = \"10.0.0.1:0\"")]),
        "cluster.members[0].sync",
        "port 0 cannot be connected to",
    );
    assert_problem(
        &example_with(&[(sync, "sync = \"0.0.0.0:9466\"")]),
        "cluster.members[0].sync",
        "not a unicast address",
    );
    // A listen address that does not parse is reported once, not also as port 0.
    let found = problems(&example_with(&[(listen, "listen = \"x\"")]));
    assert_eq!(
        found.iter().filter(|p| p.field == "metrics.listen").count(),
        1,
        "{found:#?}"
    );
}

#[test]
fn every_dangerous_value_is_reported_in_one_round() {
    let text = example_with(&[
        (VIPS, "vips = [\"::/0\", \"127.0.0.1/32\"]"),
        ("bpffs = \"/sys/fs/bpf/cdn-steer\"", "bpffs = \"/tmp\""),
        (
            "control_socket = \"/run/cdn-steer.sock\"",
            &format!("control_socket = \"/run/{}\"", "s".repeat(200)),
        ),
        ("name = \"web\"", "name = \"web?x\""),
        ("max_frame = 1514", "max_frame = 1"),
        (
            "hash_key = \"00112233445566778899aabbccddeeff\"",
            "hash_key = \"00000000000000000000000000000000\"",
        ),
        ("listen = \"10.0.0.1:9465\"", "listen = \"10.0.0.1:0\""),
    ])
    .replace("weight = 100", "weight = 0")
    .replace("weight = 50", "weight = 0");
    let fields: BTreeSet<String> = problems(&text).into_iter().map(|p| p.field).collect();
    let expected = [
        "node.bpffs",
        "node.control_socket",
        "node.max_frame",
        "cluster.hash_key",
        "cluster.members",
        "services[0].name",
        "services[0].vips[0]",
        "services[0].vips[1]",
        "metrics.listen",
    ];
    for field in expected {
        assert!(fields.contains(field), "{field} not reported: {fields:?}");
    }
}
