//! Claims as a real daemon receives them (README "PoPs: learned owners"): `POST /claims` on
//! its peer plane, sent from the namespace with a chosen source address. A valid claim writes
//! the flow into the pinned `LEARNED` map and sets its bucket's bit in `LEARNED_BUCKETS`;
//! claims with a wrong key, a tampered entry, a replayed nonce, a stale timestamp, a
//! non-member sender, from a wrong source address, malformed or too large are refused with the
//! reason counted in the metrics, and change neither map. `lookup` and `status` show the
//! entry and the counts. The learned entry expires once idle for `learned_idle_ms`, its bit
//! with it; one naming a member a reload removed goes at the next pass.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, ensure};
use cdn_common::hash::{PROTO_TCP, PROTO_UDP};
use cdn_common::maps::FlowKey;
use cdn_test_support::{Netns, wait};
use cdn_tests::node_host::{self, NodeHost, http, steer};
use cdn_user::{
    cluster::claims::{Claim, flow_bucket, flow_key},
    config,
    dataplane::{DataPlane, LoadOptions, learned::bucket_bit, tables},
};

const HASH_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const PEER_PLANE: &str = "10.9.0.1:9466";
const METRICS: &str = "10.9.0.1:9465";

/// Node a (id 3, PoP fra) with b (id 4, PoP ams) and c (id 5, PoP fra); only a has a sync
/// address (its peer plane). Learned entries expire after 5 s idle: long enough for the checks
/// before that, on a loaded machine too.
fn config(bpffs: &Path, socket: &Path, with_c: bool) -> String {
    let mut c = format!(
        "[node]\nname = \"a\"\ninterfaces = [\"eth0\"]\nunderlay_v4 = \"10.9.0.1\"\n\
         bpffs = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [cluster]\nhash_key = \"{HASH_KEY}\"\ntable_size = 251\nlearned_idle_ms = 5000\n\n",
        bpffs.display(),
        socket.display()
    );
    for (name, id, underlay, pop) in [
        ("a", 3, "10.9.0.1", "fra"),
        ("b", 4, "10.9.0.2", "ams"),
        ("c", 5, "10.9.0.3", "fra"),
    ] {
        if name == "c" && !with_c {
            continue;
        }
        c.push_str(&format!(
            "[[cluster.members]]\nname = \"{name}\"\nid = {id}\nunderlay = \"{underlay}\"\n\
             pop = \"{pop}\"\n"
        ));
        if name == "a" {
            c.push_str(&format!("sync = \"{PEER_PLANE}\"\n"));
        }
        c.push_str(
            "[cluster.members.health]\nport = 80\ninterval_ms = 100\ntimeout_ms = 50\n\
             rise = 1\nfall = 1\n\n",
        );
    }
    c.push_str(&format!(
        "[[services]]\nname = \"web\"\nvips = [\"192.0.2.1/32\"]\ntcp_ports = [80]\n\
         udp_ports = [53]\nudp_mode = \"connected\"\n\n[metrics]\nlisten = \"{METRICS}\"\n"
    ));
    c
}

fn pinned(maps: &Path, cfg: &config::Config) -> Result<DataPlane> {
    Ok(DataPlane::load(&LoadOptions {
        table_entries: tables::table_entries(
            cfg.cluster.table_size,
            cfg.services.len() * cfg.pop_count(),
        ),
        pin_dir: Some(maps.to_owned()),
    })?)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn post(ns: &Netns, source: &str, body: &[u8]) -> Result<u16> {
    let mut request = format!(
        "POST /claims HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    Ok(http(ns, source, PEER_PLANE, request)?.0)
}

fn metric(ns: &Netns, series: &str) -> Result<u64> {
    node_host::metric(ns, METRICS, series)
}

fn flow(n: u8, proto: u8) -> FlowKey {
    flow_key(
        format!("198.51.100.{n}")
            .parse()
            .unwrap_or(IpAddr::from([0; 4])),
        40000 + u16::from(n),
        "192.0.2.1".parse().unwrap_or(IpAddr::from([0; 4])),
        if proto == PROTO_TCP { 80 } else { 53 },
        proto,
    )
}

fn claim(sender: u16, nonce: u64, sent: u64, entries: Vec<FlowKey>) -> Claim {
    Claim {
        sender,
        sent_unix_ms: sent,
        nonce,
        entries,
    }
}

#[test]
fn claims_are_checked_learned_and_expire() -> Result<()> {
    let host = NodeHost::new("claims")?;
    let (dir, ns, mount) = (&host.dir, &host.ns, &host.mount);
    let socket = dir.path().join("ctl.sock");
    let bpffs = mount.join("a");
    let maps = bpffs.join("maps");
    let cfg_path = dir.path().join("node.toml");
    let text = config(&bpffs, &socket, true);
    std::fs::write(&cfg_path, &text)?;
    let parsed = config::parse(&text)?;
    let hash_key = parsed.cluster.hash_key;
    let key = cdn_user::cluster::claims::claim_key(hash_key);
    let table_size = parsed.cluster.table_size;

    let daemon = host.start_daemon(&cfg_path.to_string_lossy())?;
    let up = wait::until(Duration::from_secs(20), "the peer plane answers", || {
        Ok(metric(ns, "cdn_steer_learned_entries").is_ok())
    });
    if let Err(e) = up {
        return Err(e.context(daemon.log_text()));
    }
    let result = (|| -> Result<()> {
        let learned = flow(1, PROTO_TCP);
        let valid = claim(4, 1, now_ms(), vec![learned, flow(2, PROTO_UDP)]).encode(key);

        // Refused: each changes nothing.
        let mut tampered = claim(4, 2, now_ms(), vec![flow(3, PROTO_TCP)]).encode(key);
        tampered[26 + 15] ^= 1; // the client address's last byte
        let rejected = [
            (
                "bad_mac",
                claim(4, 3, now_ms(), vec![flow(4, PROTO_TCP)]).encode([1, 2]),
                "10.9.0.2",
                403,
            ),
            ("bad_mac", tampered, "10.9.0.2", 403),
            (
                "stale",
                claim(4, 5, now_ms() - 31_000, vec![flow(5, PROTO_TCP)]).encode(key),
                "10.9.0.2",
                403,
            ),
            (
                "not_member",
                claim(77, 6, now_ms(), vec![flow(6, PROTO_TCP)]).encode(key),
                "10.9.0.2",
                403,
            ),
            (
                "wrong_source",
                claim(4, 7, now_ms(), vec![flow(7, PROTO_TCP)]).encode(key),
                "10.9.0.3",
                403,
            ),
            ("malformed", b"not a claim at all".to_vec(), "10.9.0.2", 400),
            ("too_large", vec![0u8; 64 * 1024], "10.9.0.2", 413),
        ];
        for (reason, body, source, want) in &rejected {
            let status = post(ns, source, body)?;
            ensure!(status == *want, "{reason}: status {status}, want {want}");
        }
        let mut dp = pinned(&maps, &parsed)?;
        ensure!(
            dp_entries(&mut dp)?.is_empty(),
            "refused claims wrote {:?}",
            dp_entries(&mut dp)?
        );
        ensure!(
            bucket_words(&mut dp, &[])?,
            "refused claims set bucket bits"
        );
        drop(dp);

        // The valid one, then its replay.
        ensure!(post(ns, "10.9.0.2", &valid)? == 200, "valid claim refused");
        ensure!(post(ns, "10.9.0.2", &valid)? == 403, "replay accepted");
        let mut dp = pinned(&maps, &parsed)?;
        let mut entries = dp_entries(&mut dp)?;
        entries.sort_by_key(|(k, _)| k.proto);
        ensure!(
            entries.iter().map(|(k, m)| (*k, *m)).collect::<Vec<_>>()
                == [(learned, 4), (flow(2, PROTO_UDP), 4)],
            "LEARNED after the valid claim: {entries:?}"
        );
        let buckets: Vec<u32> = entries
            .iter()
            .map(|(k, _)| flow_bucket(&hash_key, k, table_size))
            .collect();
        ensure!(
            bucket_words(&mut dp, &buckets)?,
            "bucket bits of {buckets:?} not set (or others set)"
        );
        drop(dp);

        // `lookup` shows the learned entry (live only), for the TCP flow and not for another.
        let cfg_file = cfg_path.to_string_lossy().into_owned();
        let learned_member = |src: &str| -> Result<Option<u64>> {
            let out = steer(
                ns,
                &[
                    "lookup",
                    src,
                    "192.0.2.1:80",
                    "tcp",
                    "--config",
                    &cfg_file,
                    "--json",
                ],
            )?;
            ensure!(
                out.status.success(),
                "lookup: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            Ok(doc["learned"]["member"].as_u64())
        };
        ensure!(learned_member("198.51.100.1:40001")? == Some(4));
        ensure!(learned_member("198.51.100.9:40009")?.is_none());
        let status = steer(ns, &["status", "--config", &cfg_file])?;
        let status = String::from_utf8_lossy(&status.stdout);
        ensure!(
            status.contains(
                "learned flows: 2 (added 2, expired 0); claims sent 0, received 1, rejected 8"
            ),
            "status:\n{status}"
        );

        for (reason, n) in [
            ("bad_mac", 2),
            ("stale", 1),
            ("not_member", 1),
            ("wrong_source", 1),
            ("malformed", 1),
            ("too_large", 1),
            ("replay", 1),
            ("busy", 0),
        ] {
            let series = format!("cdn_steer_claims_rejected_total{{reason=\"{reason}\"}}");
            let got = metric(ns, &series)?;
            ensure!(got == n, "{series} = {got}, want {n}");
        }
        ensure!(metric(ns, "cdn_steer_claims_received_total")? == 1);
        ensure!(metric(ns, "cdn_steer_learned_added_total")? == 2);

        // Idle: gone after learned_idle_ms (5 s) and an expiry pass (every 2 s), bits too.
        wait::until(Duration::from_secs(20), "learned entries expired", || {
            Ok(metric(ns, "cdn_steer_learned_expired_total")? == 2)
        })?;
        let mut dp = pinned(&maps, &parsed)?;
        ensure!(dp_entries(&mut dp)?.is_empty(), "entries left after expiry");
        ensure!(bucket_words(&mut dp, &[])?, "bucket bits left after expiry");
        ensure!(metric(ns, "cdn_steer_learned_entries")? == 0);

        // An entry naming a member that a reload removes goes at the next pass, long before
        // it would be idle.
        let from_c = claim(5, 20, now_ms(), vec![flow(20, PROTO_TCP)]).encode(key);
        let claimed = std::time::Instant::now();
        ensure!(post(ns, "10.9.0.3", &from_c)? == 200, "c's claim refused");
        std::fs::write(&cfg_path, config(&bpffs, &socket, false))?;
        let out = steer(ns, &["reload", "--config", &cfg_file])?;
        ensure!(out.status.success(), "reload: {out:?}");
        wait::until(Duration::from_secs(10), "c's entry deleted", || {
            Ok(metric(ns, "cdn_steer_learned_expired_total")? == 3)
        })?;
        let took = claimed.elapsed();
        ensure!(
            took < Duration::from_millis(4900),
            "c's entry went after {took:?}, as if idle rather than for its member"
        );
        ensure!(dp_entries(&mut pinned(&maps, &parsed)?)?.is_empty());
        Ok(())
    })();
    result.map_err(|e| e.context(daemon.log_text()))
}

/// Every entry of the pinned `LEARNED`: (flow, member).
fn dp_entries(dp: &mut DataPlane) -> Result<Vec<(FlowKey, u16)>> {
    Ok(dp
        .learning()
        .get()?
        .entries()?
        .into_iter()
        .map(|(k, v)| (k, v.member))
        .collect())
}

/// Whether the nonzero words of the pinned `LEARNED_BUCKETS` are exactly the bits of `buckets`.
fn bucket_words(dp: &mut DataPlane, buckets: &[u32]) -> Result<bool> {
    let mut want = std::collections::BTreeMap::new();
    for &b in buckets {
        let (word, bit) = bucket_bit(b);
        *want.entry(word).or_insert(0u32) |= bit;
    }
    Ok(dp.learning().get()?.nonzero_words()? == want)
}
