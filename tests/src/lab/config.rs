//! The configuration files the lab writes: the router's and the nodes' BIRD, and each node's
//! `cdn-steer` configuration; and the HTTP/3 arguments of the nodes' web servers.

use std::path::Path;

use super::{
    H3_PORT, H3_RESET_KEY, HASH_KEY, LAB_QUIC_LB, Lab, LabNode, METRICS_PORT, PEER_PORT,
    QuicRouting, UDP_PORT, UNDERLAY_MTU, VIP_V4, VIP_V6, pops::pop_name,
};

pub(super) fn router_bird_config(nodes: usize) -> String {
    let mut c = String::from(
        "router id 10.100.0.1;\n\
         protocol device { scan time 2; }\n\
         protocol kernel k4 { ipv4 { import none; export all; }; merge paths on; }\n\
         protocol kernel k6 { ipv6 { import none; export all; }; merge paths on; }\n",
    );
    for i in 1..=nodes {
        for (suffix, local, neighbor, channel) in [
            ("", format!("10.1.{i}.1"), format!("10.1.{i}.2"), "ipv4"),
            (
                "v6",
                format!("fd00:1:{i}::1"),
                format!("fd00:1:{i}::2"),
                "ipv6",
            ),
        ] {
            c.push_str(&format!(
                "protocol bgp n{i}{suffix} {{\n  local {local} as 65000;\n  neighbor {neighbor} as 65001;\n  \
                 {channel} {{ import all; export none; }};\n  hold time 3; keepalive time 1;\n  \
                 connect retry time 1; error wait time 1,2; connect delay time 1;\n}}\n"
            ));
        }
    }
    c
}

/// Node `i`'s BIRD: its uplink (the router or its PoP's border) is in AS `uplink_as`.
pub(super) fn node_bird_config(i: usize, steering: bool, uplink_as: u32) -> String {
    // Without steering the VIP is announced from the start; with it, cdn-steer enables the
    // static protocols once the node is ready.
    let disabled = if steering { "disabled;" } else { "" };
    format!(
        "router id 10.1.{i}.2;\n\
         protocol device {{ scan time 2; }}\n\
         protocol static anycast_vips {{ {disabled} ipv4; route {VIP_V4}/32 blackhole; }}\n\
         protocol static anycast_vips6 {{ {disabled} ipv6; route {VIP_V6}/128 blackhole; }}\n\
         protocol bgp uplink {{\n  local 10.1.{i}.2 as 65001;\n  neighbor 10.1.{i}.1 as {uplink_as};\n  \
         ipv4 {{ import none; export where proto = \"anycast_vips\"; }};\n  hold time 3; keepalive time 1;\n  \
         connect retry time 1; error wait time 1,2; connect delay time 1;\n}}\n\
         protocol bgp uplink6 {{\n  local fd00:1:{i}::2 as 65001;\n  neighbor fd00:1:{i}::1 as {uplink_as};\n  \
         ipv6 {{ import none; export where proto = \"anycast_vips6\"; }};\n  hold time 3; keepalive time 1;\n  \
         connect retry time 1; error wait time 1,2; connect delay time 1;\n}}\n"
    )
}

pub(super) fn controller_config(lab: &Lab, node: &LabNode, bpffs: &Path) -> String {
    let mut c = format!(
        "[node]\nname = \"{name}\"\ninterfaces = [\"eth0\"]\nunderlay_v4 = \"{ul}\"\n\
         max_frame = {frame}\nbpffs = \"{bpffs}\"\ncontrol_socket = \"{ctl}\"\n\n\
         [cluster]\nhash_key = \"{HASH_KEY}\"\nhistory_sync_ms = 1000\n\n",
        name = node.name,
        ul = node.underlay,
        frame = UNDERLAY_MTU + 14,
        bpffs = bpffs.join(&node.name).display(),
        ctl = node.control.display(),
    );
    for i in 1..=lab.opts.nodes {
        // With PoPs, each member names its PoP; without, no `pop` key at all (as before PoPs).
        let pop = lab
            .pop_of(i - 1)
            .map(|p| format!("pop = \"{}\"\n", pop_name(p)))
            .unwrap_or_default();
        c.push_str(&format!(
            "[[cluster.members]]\nname = \"node{i}\"\nid = {i}\nunderlay = \"10.1.{i}.2\"\n{pop}\
             sync = \"10.1.{i}.2:{PEER_PORT}\"\n\
             [cluster.members.health]\nkind = \"http\"\nport = {PEER_PORT}\npath = \"/ready\"\n\
             interval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n\n"
        ));
    }
    c.push_str(&format!(
        "[[services]]\nname = \"web\"\nvips = [\"{VIP_V4}/32\", \"{VIP_V6}/128\"]\ntcp_ports = [80]\n{udp}\n\
         [bgp]\nbird_socket = \"{sock}\"\nprotocols = [\"anycast_vips\", \"anycast_vips6\"]\npoll_interval_ms = 200\n\n\
         [metrics]\nlisten = \"{ul}:{METRICS_PORT}\"\n",
        sock = node.bird_socket.display(),
        ul = node.underlay,
        udp = udp_config(lab),
    ));
    c
}

/// The service's UDP lines: the lab's UDP port with `udp_mode`, HTTP/3's port (`owner` mode
/// unless `udp_mode` says otherwise) and, for CID routing, the `quic` table.
fn udp_config(lab: &Lab) -> String {
    let mut ports = Vec::new();
    if lab.opts.udp_mode.is_some() {
        ports.push(UDP_PORT.to_string());
    }
    if lab.opts.h3.is_some() {
        ports.push(H3_PORT.to_string());
    }
    if ports.is_empty() {
        return String::new();
    }
    let mut c = format!(
        "udp_ports = [{}]\nudp_mode = \"{}\"\n",
        ports.join(", "),
        lab.opts.udp_mode.unwrap_or("owner")
    );
    if lab.opts.h3 == Some(QuicRouting::Cid) {
        let lb = LAB_QUIC_LB;
        c.push_str(&format!(
            "quic = {{ ports = [{H3_PORT}], server_id_len = {}, cid_len = {}, config_id = {} }}\n",
            lb.server_id_len, lb.cid_len, lb.config_id
        ));
    }
    c
}

/// The web server's HTTP/3 arguments for node `i` (none without `LabOptions::h3`): its QUIC
/// server ID is its member id, the `quic` default of `cdn-steer`.
pub(super) fn h3_httpd_args(lab: &Lab, i: usize) -> Vec<String> {
    if lab.opts.h3.is_none() {
        return Vec::new();
    }
    let node = &lab.nodes[i];
    let path = |name: &str| lab.dir.join(name).to_string_lossy().into_owned();
    [
        "--h3",
        &format!("{VIP_V4}:{H3_PORT}"),
        "--h3",
        &format!("[{VIP_V6}]:{H3_PORT}"),
        "--quic-server-id",
        &node.index.to_string(),
        "--quic-config-id",
        &LAB_QUIC_LB.config_id.to_string(),
        "--quic-server-id-len",
        &LAB_QUIC_LB.server_id_len.to_string(),
        "--quic-cid-len",
        &LAB_QUIC_LB.cid_len.to_string(),
        "--tls-cert",
        &path("h3.crt.der"),
        "--tls-key",
        &path("h3.key.der"),
        "--reset-key",
        H3_RESET_KEY,
    ]
    .map(str::to_owned)
    .to_vec()
}
