//! QUIC routing as the controller sets it up: a real daemon, started on pinned maps where a
//! previous controller left QUIC server IDs, writes every configured member's server ID into
//! `QUIC_SERVERS` (a member that is down too), clears the leftovers, fills the QUIC fields of
//! the service entries, and on a reload that removes a member clears that member's server ID.
//! Checked through the pinned maps (`DataPlane`, and one entry with `bpftool`), and through
//! `lookup --cid`, live against offline.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use cdn_common::{
    maps::{MAX_SERVICE_PORTS, SERVICE_QUIC, SERVICE_UDP_OWNER, Service},
    quic_lb::QuicLbConfig,
};
use cdn_test_support::{Netns, run, wait};
use cdn_tests::{
    node_host::{NodeHost, steer},
    packets::quic_cid_hex,
};
use cdn_user::{
    config,
    dataplane::{DataPlane, LoadOptions, tables},
    operator::quic::CidDocument,
};

const VIP: &str = "192.0.2.1";

/// Members a (id 3), b (id 4, its health check fails: nothing listens on 81) and, with
/// `with_c`, c (id 5, server ID 300). QUIC on UDP 443 with `cid_len`.
fn config(bpffs: &Path, socket: &Path, with_c: bool, cid_len: u8) -> String {
    let mut c = format!(
        "[node]\nname = \"a\"\ninterfaces = [\"eth0\"]\nunderlay_v4 = \"10.9.0.1\"\n\
         bpffs = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [cluster]\nhash_key = \"0f1e2d3c4b5a69788796a5b4c3d2e1f0\"\ntable_size = 251\n\n",
        bpffs.display(),
        socket.display()
    );
    let members = [
        ("a", 3, "10.9.0.1", 80, None),
        ("b", 4, "10.9.0.2", 81, None),
        ("c", 5, "10.9.0.3", 80, Some(300)),
    ];
    for (name, id, underlay, port, server_id) in members {
        if name == "c" && !with_c {
            continue;
        }
        c.push_str(&format!(
            "[[cluster.members]]\nname = \"{name}\"\nid = {id}\nunderlay = \"{underlay}\"\n"
        ));
        if let Some(sid) = server_id {
            c.push_str(&format!("quic_server_id = {sid}\n"));
        }
        c.push_str(&format!(
            "[cluster.members.health]\nport = {port}\ninterval_ms = 100\ntimeout_ms = 50\n\
             rise = 1\nfall = 1\n\n"
        ));
    }
    c.push_str(&format!(
        "[[services]]\nname = \"web\"\nvips = [\"{VIP}/32\"]\ntcp_ports = [80]\n\
         udp_ports = [53, 443]\n\
         quic = {{ ports = [443], config_id = 1, server_id_len = 2, cid_len = {cid_len} }}\n\n\
         [metrics]\nlisten = \"10.9.0.1:9465\"\n"
    ));
    c
}

/// The pinned maps, as a second user of them sees them.
fn pinned(maps: &Path, cfg: &config::Config) -> Result<DataPlane> {
    Ok(DataPlane::load(&LoadOptions {
        table_entries: tables::table_entries(cfg.cluster.table_size, cfg.services.len()),
        pin_dir: Some(maps.to_owned()),
    })?)
}

fn service_entry(dp: &DataPlane) -> Result<Service> {
    dp.service(VIP.parse()?, 32)?
        .context("no service entry for the VIP")
}

fn cid_for(server_id: u32, cid_len: u8) -> String {
    let lb = QuicLbConfig {
        config_id: 1,
        server_id_len: 2,
        cid_len,
    };
    quic_cid_hex(&lb, server_id, 0x3c)
}

/// `lookup --cid` live and offline: they must agree; returns the member name each service's
/// answer names.
fn cid_member(ns: &Netns, cfg: &str, cid: &str) -> Result<Option<String>> {
    let mut answers = Vec::new();
    for offline in [false, true] {
        let mut args = vec!["lookup", "--cid", cid, "--config", cfg, "--json"];
        if offline {
            args.push("--offline");
        }
        let out = steer(ns, &args)?;
        ensure!(
            out.status.success(),
            "lookup --cid {cid} (offline {offline}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: CidDocument = serde_json::from_slice(&out.stdout)?;
        ensure!(doc.services.len() == 1, "{doc:?}");
        answers.push(doc.services[0].member.as_ref().map(|m| m.name.clone()));
    }
    ensure!(
        answers[0] == answers[1],
        "cid {cid}: live {:?}, offline {:?}",
        answers[0],
        answers[1]
    );
    Ok(answers.remove(0))
}

#[test]
fn daemon_writes_server_ids_clears_leftovers_and_follows_reloads() -> Result<()> {
    let host = NodeHost::new("quic-config")?;
    let (dir, ns, mount) = (&host.dir, &host.ns, &host.mount);

    let socket = dir.path().join("ctl.sock");
    let bpffs = mount.join("a");
    let maps = bpffs.join("maps");
    let cfg_path = dir.path().join("node.toml");
    let text = config(&bpffs, &socket, true, 8);
    std::fs::write(&cfg_path, &text)?;
    let cfg_file = cfg_path.to_string_lossy().into_owned();
    let parsed = config::parse(&text)?;

    // What a previous controller left: a server ID nobody has now, and a configured one
    // pointing at the wrong member.
    std::fs::create_dir_all(&maps)?;
    {
        let mut dp = pinned(&maps, &parsed)?;
        dp.set_quic_server(777, Some(9))?;
        dp.set_quic_server(4, Some(9))?;
        ensure!(dp.quic_servers()? == [(4, 9), (777, 9)]);
    }

    let mut daemon = host.start_daemon(&cfg_file)?;
    // Up: a and c healthy, b down; the service entry written.
    let up = wait::until(Duration::from_secs(20), "a and c healthy, b down", || {
        let out = steer(ns, &["status", "--json", "--config", &cfg_file])?;
        if !out.status.success() {
            return Ok(false);
        }
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let health: Vec<_> = status["members"]
            .as_array()
            .context("members")?
            .iter()
            .map(|m| (m["name"].clone(), m["healthy"].clone()))
            .collect();
        Ok(health
            == [
                ("a".into(), true.into()),
                ("b".into(), false.into()),
                ("c".into(), true.into()),
            ])
    });
    if let Err(e) = up {
        return Err(e.context(daemon.log_text()));
    }

    let dp = pinned(&maps, &parsed)?;
    // Every member, b (down) too; the leftover 777 gone, 4 corrected.
    let scan = std::time::Instant::now();
    let servers = dp.quic_servers()?;
    eprintln!("full QUIC_SERVERS scan: {:?}", scan.elapsed());
    ensure!(
        servers == [(3, 3), (4, 4), (300, 5)],
        "QUIC_SERVERS after start: {servers:?}\n{}",
        daemon.log_text()
    );
    let entry = service_entry(&dp)?;
    let mut quic_ports = [0u16; MAX_SERVICE_PORTS];
    quic_ports[0] = 443;
    ensure!(
        entry.flags & SERVICE_QUIC != 0 && entry.flags & SERVICE_UDP_OWNER != 0,
        "flags {:#x}",
        entry.flags
    );
    ensure!(
        (
            entry.quic_ports,
            entry.quic_config_id,
            entry.quic_server_id_len,
            entry.quic_cid_len
        ) == (quic_ports, 1, 2, 8),
        "service entry {entry:?}"
    );
    // The same entry through bpftool: key 300 (little-endian u32) holds member 5, flag set.
    let pin = maps.join(cdn_common::maps::MAP_QUIC_SERVERS);
    let dump = run(
        "bpftool",
        &[
            "-j",
            "map",
            "lookup",
            "pinned",
            &pin.to_string_lossy(),
            "key",
            "0x2c",
            "0x01",
            "0",
            "0",
        ],
    )?;
    let value: serde_json::Value = serde_json::from_str(&dump)?;
    let bytes: Vec<String> = value["value"]
        .as_array()
        .context("bpftool value")?
        .iter()
        .filter_map(|b| b.as_str().map(str::to_owned))
        .collect();
    ensure!(bytes == ["0x05", "0x00", "0x01", "0x00"], "bpftool: {dump}");

    // status shows the settings, every server ID as the map holds it, and the counters.
    let out = steer(ns, &["status", "--json", "--config", &cfg_file])?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        status["services"][0]["quic"]
            == serde_json::json!({"ports": [443], "config_id": 1, "server_id_len": 2, "cid_len": 8}),
        "status services: {}",
        status["services"]
    );
    ensure!(
        status["quic_servers"]
            == serde_json::json!([
                {"server_id": 3, "member": "a", "mapped_to": 3},
                {"server_id": 4, "member": "b", "mapped_to": 4},
                {"server_id": 300, "member": "c", "mapped_to": 5},
            ]),
        "status quic_servers: {}",
        status["quic_servers"]
    );
    let out = steer(ns, &["status", "--config", &cfg_file])?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "  web              ports 443          config id 1, server_id_len 2, cid_len 8",
        "  server IDs: 3 -> a (id 3), 4 -> b (id 4), 300 -> c (id 5)",
        "  packets: quic_cid_forwarded 0, quic_cid_accept 0,",
    ] {
        ensure!(text.contains(line), "status lacks {line:?}:\n{text}");
    }

    // The CLI reads the same: live and offline agree.
    ensure!(cid_member(ns, &cfg_file, &cid_for(300, 8))?.as_deref() == Some("c"));
    ensure!(cid_member(ns, &cfg_file, &cid_for(4, 8))?.as_deref() == Some("b"));
    ensure!(cid_member(ns, &cfg_file, &cid_for(777, 8))?.is_none());

    // Reload without c, with longer connection IDs: c's server ID is cleared.
    std::fs::write(&cfg_path, config(&bpffs, &socket, false, 12))?;
    let out = steer(ns, &["reload", "--config", &cfg_file])?;
    ensure!(
        out.status.success(),
        "reload: {out:?}\n{}",
        daemon.log_text()
    );
    let servers = dp.quic_servers()?;
    ensure!(
        servers == [(3, 3), (4, 4)],
        "QUIC_SERVERS after the reload: {servers:?}"
    );
    let entry = service_entry(&dp)?;
    ensure!(entry.quic_cid_len == 12, "after the reload: {entry:?}");
    ensure!(cid_member(ns, &cfg_file, &cid_for(300, 12))?.is_none());
    ensure!(cid_member(ns, &cfg_file, &cid_for(3, 12))?.as_deref() == Some("a"));

    daemon.signal(libc::SIGTERM, Duration::from_secs(10))?;
    Ok(())
}
