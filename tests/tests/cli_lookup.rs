//! `cdn-steer lookup --offline` against the live daemon: with every member healthy, the owner
//! computed from the configuration alone is the one the daemon's tables hold, for TCP and UDP
//! flows to IPv4 and IPv6 VIPs, and for QUIC flows with and without a connection ID
//! (`--cid`). Also the exit codes of the client commands: 3 when no daemon
//! answers, 4 when it refuses the request, 64 for a usage error.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use cdn_common::quic_lb::QuicLbConfig;
use cdn_test_support::{Netns, wait};
use cdn_tests::{
    node_host::{NodeHost, steer},
    packets::quic_cid_hex,
};
use cdn_user::operator::lookup::{LookupDocument, OFFLINE_ASSUMPTION, Source};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

const MEMBERS: [(&str, &str); 3] = [("a", "10.9.0.1"), ("b", "10.9.0.2"), ("c", "10.9.0.3")];
const VIP_V4: &str = "192.0.2.1";
const VIP_V6: &str = "2001:db8::1";

fn config(bpffs: &Path, socket: &Path) -> String {
    let mut c = format!(
        "[node]\nname = \"a\"\ninterfaces = [\"eth0\"]\nunderlay_v4 = \"10.9.0.1\"\n\
         bpffs = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [cluster]\nhash_key = \"0f1e2d3c4b5a69788796a5b4c3d2e1f0\"\n\n",
        bpffs.display(),
        socket.display()
    );
    for (i, (name, underlay)) in MEMBERS.iter().enumerate() {
        // Unequal weights, so that a table built from the wrong weights would differ.
        c.push_str(&format!(
            "[[cluster.members]]\nname = \"{name}\"\nid = {}\nunderlay = \"{underlay}\"\n\
             weight = {}\n[cluster.members.health]\ninterval_ms = 100\ntimeout_ms = 50\n\
             rise = 1\nfall = 3\n\n",
            i + 3,
            100 + 50 * i
        ));
    }
    c.push_str(&format!(
        "[[services]]\nname = \"web\"\nvips = [\"{VIP_V4}/32\"]\ntcp_ports = [80]\n\
         udp_ports = [443]\nquic = {{ ports = [443], config_id = 2 }}\n\n\
         [[services]]\nname = \"web6\"\nvips = [\"{VIP_V6}/128\"]\ntcp_ports = [80]\n\
         udp_ports = [443]\nudp_mode = \"local\"\n\n\
         [metrics]\nlisten = \"10.9.0.1:9465\"\n"
    ));
    c
}

fn lookup(ns: &Netns, config: &str, flow: &[&str], offline: bool) -> Result<LookupDocument> {
    let mut args = vec!["lookup"];
    args.extend_from_slice(flow);
    args.extend_from_slice(&["--config", config, "--json"]);
    if offline {
        args.push("--offline");
    }
    let out = steer(ns, &args)?;
    ensure!(
        out.status.success(),
        "lookup {flow:?} (offline {offline}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A connection ID of the `web` service's layout (config id 2, 2 octets of server ID, 8 in
/// all) naming `server_id`.
fn cid(server_id: u32) -> String {
    let lb = QuicLbConfig {
        config_id: 2,
        server_id_len: 2,
        cid_len: 8,
    };
    quic_cid_hex(&lb, server_id, 0x77)
}

/// QUIC flows with a connection ID: one naming member b (id 4, its server ID by default) goes
/// to b whoever owns the flow's bucket; a client's first-flight DCID (config id 7 here, random
/// otherwise) goes to the owner. Live and offline alike.
fn quic_cids(ns: &Netns, cfg: &str, flows: &[(String, String)]) -> Result<()> {
    ensure!(!flows.is_empty(), "no QUIC flow among the lookups");
    let to_b = cid(4);
    let first_flight = "e1d2c3b4a5968778";
    for (src, dst) in flows.iter().take(6) {
        for offline in [false, true] {
            let flow = [src.as_str(), dst.as_str(), "udp", "--cid", &to_b];
            let doc = lookup(ns, cfg, &flow, offline)?;
            let placed = doc.quic.as_ref().and_then(|q| q.cid.as_ref());
            ensure!(
                placed.and_then(|c| c.server_id) == Some(4)
                    && doc.accepted_by.starts_with("b (id 4), by connection ID"),
                "cid to b, offline {offline}: {doc:#?}"
            );
            let flow = [src.as_str(), dst.as_str(), "udp", "--cid", first_flight];
            let doc = lookup(ns, cfg, &flow, offline)?;
            let owner = doc.owner.as_ref().context("an owner")?;
            ensure!(
                doc.accepted_by
                    .starts_with(&format!("{}, the owner, by flow hash", owner.name)),
                "first flight, offline {offline}: {doc:#?}"
            );
        }
    }
    // Text output names the member; a bad CID is refused (exit code 4) live and offline.
    let out = steer(ns, &["lookup", "--cid", &to_b, "--config", cfg])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("server ID 4 is b (id 4)"),
        "{out:?}"
    );
    for offline in [false, true] {
        let mut args = vec!["lookup", "--cid", "0x12", "--config", cfg];
        if offline {
            args.push("--offline");
        }
        let out = steer(ns, &args)?;
        ensure!(
            out.status.code() == Some(4),
            "bad cid (offline {offline}): {out:?}"
        );
    }
    Ok(())
}

#[test]
fn offline_owner_is_the_live_daemons_with_every_member_up() -> Result<()> {
    let host = NodeHost::new("cli-lookup")?;
    let (dir, ns, mount) = (&host.dir, &host.ns, &host.mount);

    let socket = dir.path().join("ctl.sock");
    let cfg_path = dir.path().join("node.toml");
    std::fs::write(&cfg_path, config(&mount.join("a"), &socket))?;
    let cfg = cfg_path.to_string_lossy().into_owned();

    // No daemon yet: unreachable is exit code 3.
    let out = steer(ns, &["status", "--config", &cfg])?;
    ensure!(
        out.status.code() == Some(3),
        "status without a daemon: {out:?}"
    );

    let mut daemon = host.start_daemon(&cfg)?;
    let all_up = wait::until(
        Duration::from_secs(20),
        "every member healthy and in the table",
        || {
            let out = steer(ns, &["status", "--json", "--config", &cfg])?;
            if !out.status.success() {
                return Ok(false);
            }
            let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let members = status["members"].as_array().context("members")?;
            Ok(members.len() == 3
                && members
                    .iter()
                    .all(|m| m["healthy"] == true && m["share"].as_f64().is_some_and(|s| s > 0.0)))
        },
    );
    if let Err(e) = all_up {
        return Err(e.context(daemon.log_text()));
    }

    let mut rng = StdRng::seed_from_u64(7);
    let mut owners = std::collections::BTreeSet::new();
    let mut quic_flows = Vec::new();
    for i in 0..120 {
        let v6 = i % 2 == 1;
        let src: SocketAddr = if v6 {
            let ip: u128 =
                0x2001_0db8_0100_0000_0000_0000_0000_0000 | u128::from(rng.random::<u32>());
            SocketAddr::new(IpAddr::V6(ip.into()), rng.random_range(1024..65535))
        } else {
            SocketAddr::new(
                IpAddr::V4(rng.random::<u32>().into()),
                rng.random_range(1024..65535),
            )
        };
        let dst: SocketAddr = if v6 {
            format!("[{VIP_V6}]:443").parse()?
        } else {
            format!("{VIP_V4}:443").parse()?
        };
        let proto = if i % 4 < 2 { "tcp" } else { "udp" };
        let (src, dst) = (src.to_string(), dst.to_string());
        let flow = [src.as_str(), dst.as_str(), proto];
        let live = lookup(ns, &cfg, &flow, false)?;
        let offline = lookup(ns, &cfg, &flow, true)?;
        ensure!(live.source == Source::Live && offline.source == Source::Offline);
        ensure!(offline.assumption.as_deref() == Some(OFFLINE_ASSUMPTION));
        ensure!(
            (
                &live.service,
                live.hash,
                live.bucket,
                &live.owner,
                &live.accepted_by
            ) == (
                &offline.service,
                offline.hash,
                offline.bucket,
                &offline.owner,
                &offline.accepted_by
            ),
            "flow {flow:?}: live {live:#?}\noffline {offline:#?}"
        );
        // UDP to the IPv4 VIP is QUIC (web has quic on 443); web6 has none.
        let quic = proto == "udp" && !v6;
        ensure!(
            live.quic.is_some() == quic && offline.quic == live.quic,
            "flow {flow:?}: QUIC {quic}, live {:?}",
            live.quic
        );
        if quic {
            ensure!(
                live.accepted_by.starts_with("QUIC: "),
                "{}",
                live.accepted_by
            );
            quic_flows.push((src.clone(), dst.clone()));
        }
        owners.insert(
            live.owner
                .context("an empty bucket with every member up")?
                .name,
        );
    }
    ensure!(owners.len() == 3, "120 flows reached only {owners:?}");
    quic_cids(ns, &cfg, &quic_flows)?;

    // The daemon refuses a lookup for an address that is no VIP: exit code 4, offline too.
    for offline in [false, true] {
        let mut args = vec![
            "lookup",
            "198.51.100.7:1000",
            "192.0.2.99:443",
            "--config",
            &cfg,
        ];
        if offline {
            args.push("--offline");
        }
        let out = steer(ns, &args)?;
        ensure!(
            out.status.code() == Some(4),
            "not a VIP (offline {offline}): {out:?}"
        );
    }
    // A usage error is 64, not clap's 2 (which is "host problem" here).
    let out = steer(ns, &["lookup", "not-an-address", "192.0.2.1:443"])?;
    ensure!(out.status.code() == Some(64), "usage error: {out:?}");

    daemon.signal(libc::SIGTERM, Duration::from_secs(10))?;
    Ok(())
}
