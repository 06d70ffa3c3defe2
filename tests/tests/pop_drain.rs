//! PoP drains as a real daemon receives and sends them (README "PoPs", `drain --pop`).
//!
//! Receiving: `POST /drain` and `POST /undrain` on the daemon's peer plane, sent from the
//! namespace with a chosen source address. A forged MAC, a message signed with the claim key,
//! a non-member sender, a wrong source address, a stale timestamp, an undrain posted to
//! `/drain` and a replay are refused, counted by reason, and leave the node as it was; a valid
//! one drains it, a valid undrain undrains it.
//!
//! Sending: `drain --pop` on the node drains it and reports, per member of its PoP, a peer
//! that does not answer and one without a sync address, exiting 5.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, ensure};
use cdn_test_support::{Netns, wait};
use cdn_tests::node_host::{self, NodeHost, http, steer};
use cdn_user::cluster::{
    claims::claim_key,
    peer_auth::Envelope,
    peer_control::{DrainMessage, control_key},
};

const HASH_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const PEER_PLANE: &str = "10.9.0.1:9476";
const METRICS: &str = "10.9.0.1:9475";

/// Node a (id 3, PoP fra, the daemon) with b (id 4, PoP ams), c (id 5, PoP fra, a sync
/// address where nothing listens) and d (id 6, PoP fra, no sync address).
fn config(bpffs: &Path, socket: &Path) -> String {
    let mut c = format!(
        "[node]\nname = \"a\"\ninterfaces = [\"eth0\"]\nunderlay_v4 = \"10.9.0.1\"\n\
         bpffs = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [cluster]\nhash_key = \"{HASH_KEY}\"\ntable_size = 251\n\n",
        bpffs.display(),
        socket.display()
    );
    for (name, id, underlay, pop, sync) in [
        ("a", 3, "10.9.0.1", "fra", Some(PEER_PLANE)),
        ("b", 4, "10.9.0.2", "ams", None),
        ("c", 5, "10.9.0.3", "fra", Some("10.9.0.3:9999")),
        ("d", 6, "10.9.0.4", "fra", None),
    ] {
        c.push_str(&format!(
            "[[cluster.members]]\nname = \"{name}\"\nid = {id}\nunderlay = \"{underlay}\"\n\
             pop = \"{pop}\"\n"
        ));
        if let Some(sync) = sync {
            c.push_str(&format!("sync = \"{sync}\"\n"));
        }
        c.push_str(
            "[cluster.members.health]\nport = 80\ninterval_ms = 100\ntimeout_ms = 50\n\
             rise = 1\nfall = 1\n\n",
        );
    }
    c.push_str(&format!(
        "[[services]]\nname = \"web\"\nvips = [\"192.0.2.1/32\"]\ntcp_ports = [80]\n\n\
         [metrics]\nlisten = \"{METRICS}\"\n"
    ));
    c
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn message(sender: u16, nonce: u64, sent: u64, drain: bool) -> DrainMessage {
    DrainMessage {
        envelope: Envelope {
            sender,
            sent_unix_ms: sent,
            nonce,
        },
        drain,
    }
}

/// `POST path` with `body` from `source` to the daemon's peer plane: status and body.
fn post(ns: &Netns, source: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let (status, body) = http(ns, source, PEER_PLANE, request)?;
    Ok((status, body.trim().to_owned()))
}

fn draining(ns: &Netns, cfg: &str) -> Result<bool> {
    let out = steer(ns, &["status", "--json", "--config", cfg])?;
    ensure!(out.status.success(), "status: {out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    doc["draining"]
        .as_bool()
        .ok_or_else(|| anyhow::anyhow!("no draining in {doc}"))
}

#[test]
fn peer_drains_are_checked_and_drain_pop_reports_every_member() -> Result<()> {
    let host = NodeHost::new("popdrain")?;
    let (dir, ns, mount) = (&host.dir, &host.ns, &host.mount);
    let socket = dir.path().join("ctl.sock");
    let cfg_path = dir.path().join("node.toml");
    std::fs::write(&cfg_path, config(&mount.join("a"), &socket))?;
    let cfg = cfg_path.to_string_lossy().into_owned();
    let hash_key = cdn_user::config::parse(&std::fs::read_to_string(&cfg_path)?)?
        .cluster
        .hash_key;
    let key = control_key(hash_key);
    let metric = |series: &str| node_host::metric(ns, METRICS, series);

    let daemon = host.start_daemon(&cfg)?;
    let up = wait::until(Duration::from_secs(20), "the peer plane answers", || {
        Ok(metric("cdn_steer_pop_drains_received_total").is_ok())
    });
    if let Err(e) = up {
        return Err(e.context(daemon.log_text()));
    }
    let result = (|| -> Result<()> {
        // c (id 5, 10.9.0.3) asks; each of these is refused and changes nothing.
        let refused = [
            (
                "bad_mac",
                "/drain",
                message(5, 1, now_ms(), true).encode([1, 2]),
                "10.9.0.3",
                403,
            ),
            (
                "bad_mac",
                "/drain",
                message(5, 2, now_ms(), true).encode(claim_key(hash_key)),
                "10.9.0.3",
                403,
            ),
            (
                "not_member",
                "/drain",
                message(77, 3, now_ms(), true).encode(key),
                "10.9.0.3",
                403,
            ),
            (
                "wrong_source",
                "/drain",
                message(5, 4, now_ms(), true).encode(key),
                "10.9.0.2",
                403,
            ),
            (
                "stale",
                "/drain",
                message(5, 5, now_ms() - 31_000, true).encode(key),
                "10.9.0.3",
                403,
            ),
            (
                "malformed",
                "/drain",
                message(5, 6, now_ms(), false).encode(key),
                "10.9.0.3",
                400,
            ),
            ("too_large", "/drain", vec![0u8; 64 * 1024], "10.9.0.3", 413),
            (
                "other_pop",
                "/drain",
                message(4, 7, now_ms(), true).encode(key),
                "10.9.0.2",
                403,
            ),
        ];
        for (reason, path, body, source, want) in &refused {
            let (status, text) = post(ns, source, path, body)?;
            ensure!(status == *want, "{reason}: {status} {text}, want {want}");
            ensure!(!draining(ns, &cfg)?, "{reason}: the node drained");
        }

        // A valid drain, its replay, a valid undrain, and an undrain of an undrained node.
        let valid = message(5, 10, now_ms(), true).encode(key);
        ensure!(post(ns, "10.9.0.3", "/drain", &valid)? == (200, "changed".into()));
        ensure!(draining(ns, &cfg)?, "a valid drain did not drain");
        let (status, _) = post(ns, "10.9.0.3", "/drain", &valid)?;
        ensure!(status == 403, "replay: {status}");
        let undrain = message(5, 11, now_ms(), false).encode(key);
        ensure!(post(ns, "10.9.0.3", "/undrain", &undrain)? == (200, "changed".into()));
        ensure!(!draining(ns, &cfg)?, "a valid undrain did not undrain");
        let again = message(5, 12, now_ms(), false).encode(key);
        ensure!(post(ns, "10.9.0.3", "/undrain", &again)? == (200, "unchanged".into()));

        for (reason, n) in [
            ("bad_mac", 2),
            ("not_member", 1),
            ("wrong_source", 1),
            ("stale", 1),
            ("malformed", 1),
            ("too_large", 1),
            ("replay", 1),
            ("busy", 0),
            ("other_pop", 1),
        ] {
            let series = format!("cdn_steer_pop_drains_rejected_total{{reason=\"{reason}\"}}");
            let got = metric(&series)?;
            ensure!(got == n, "{series} = {got}, want {n}");
        }
        ensure!(metric("cdn_steer_pop_drains_received_total")? == 3);
        // Claims are counted apart.
        ensure!(metric("cdn_steer_claims_rejected_total{reason=\"bad_mac\"}")? == 0);

        // drain --pop: a drains; c's sync address does not answer; d has none. Exit code 5.
        let out = steer(ns, &["drain", "--pop", "--json", "--config", &cfg])?;
        ensure!(out.status.code() == Some(5), "drain --pop: {out:?}");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let rows: Vec<(String, String)> = doc["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| (m["name"].to_string(), m["outcome"].to_string()))
                    .collect()
            })
            .unwrap_or_default();
        ensure!(
            rows == [
                ("\"a\"".into(), "\"changed\"".into()),
                ("\"c\"".into(), "\"unreachable\"".into()),
                ("\"d\"".into(), "\"no_sync_address\"".into()),
            ],
            "drain --pop: {doc}"
        );
        ensure!(doc["pop"] == "fra", "{doc}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(stderr.contains("not drained on c, d"), "stderr: {stderr}");
        ensure!(draining(ns, &cfg)?, "drain --pop did not drain this node");
        let out = steer(ns, &["undrain", "--pop", "--config", &cfg])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.code() == Some(5)
                && text.contains("a (id 3): undrained")
                && text.contains("d (id 6): unreachable: no sync address"),
            "undrain --pop: {out:?}"
        );
        ensure!(!draining(ns, &cfg)?, "undrain --pop did not undrain");
        Ok(())
    })();
    result.map_err(|e| e.context(daemon.log_text()))
}
