//! Drift detection between nodes, in a two-node lab: while both nodes run the same cluster
//! configuration their digests agree, in `status --json` and in the metrics; once one node
//! reloads a configuration with another weight, `status` on either node names the other node
//! and each digest that differs (the configuration and the table it steers with), the metrics
//! differ, and agreement comes back with the configuration.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use cdn_tests::lab::{Lab, LabOptions};
use serde_json::Value;

/// The value of the unlabelled sample `name` in a scrape, which `promtool` accepts first.
fn gauge(text: &str, name: &str) -> Result<u64> {
    promtool_accepts(text)?;
    let prefix = format!("{name} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("no {name} in\n{text}"))?;
    Ok(line[prefix.len()..].trim().parse()?)
}

fn promtool_accepts(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (Debian package prometheus)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
    Ok(())
}

/// The first 48 bits of a hex digest, as the metrics export them.
fn prefix(hex: &Value) -> Result<u64> {
    let hex = hex.as_str().context("a digest is a string")?;
    Ok(u64::from_str_radix(
        hex.get(..12).context("short digest")?,
        16,
    )?)
}

/// `(peer, digest)` of every disagreement node `i`'s status reports.
fn disagreements(lab: &Lab, i: usize) -> Result<Vec<(String, String)>> {
    let status = lab.status(i)?;
    let drift = &status["drift"];
    Ok(drift["disagreements"]
        .as_array()
        .with_context(|| format!("no drift report in {status:#}"))?
        .iter()
        .map(|d| {
            (
                d["peer"].as_str().unwrap_or_default().to_owned(),
                d["digest"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// Writes `config` as node `i`'s configuration and reloads it; waits until the daemon
/// counted the reload as applied.
fn reload(lab: &mut Lab, i: usize, config: &str) -> Result<()> {
    let before = lab.status(i)?["reloads_ok"].as_u64().unwrap_or(0);
    std::fs::write(&lab.nodes[i].config, config)?;
    lab.nodes[i]
        .controller
        .as_mut()
        .context("node without a controller")?
        .send_signal(libc::SIGHUP)?;
    lab.wait_until(Duration::from_secs(10), "the reload to apply", || {
        Ok(lab.status(i)?["reloads_ok"].as_u64().unwrap_or(0) > before)
    })
}

#[test]
fn status_names_the_peer_and_digest_that_differ() -> Result<()> {
    let mut lab = Lab::start(LabOptions {
        nodes: 2,
        tag: "dr".into(),
        file_size: 64 * 1024,
        ..LabOptions::default()
    })?;

    // Same configuration: status agrees on every digest, with the peer's answer shown.
    let status = lab.status(0)?;
    let drift = &status["drift"];
    ensure!(
        drift["disagreements"].as_array().is_some_and(Vec::is_empty),
        "disagreement with the same configuration: {drift:#}"
    );
    let peer = &drift["peers"][0];
    ensure!(
        peer["member"] == "node2" && peer["error"].is_null(),
        "{drift:#}"
    );
    ensure!(
        peer["digests"]["config"] == drift["ours"]["config"],
        "{drift:#}"
    );
    ensure!(
        peer["digests"]["tables"]["web"] == drift["ours"]["tables"]["web"],
        "{drift:#}"
    );
    // The metric is the digest's first 48 bits, on both nodes.
    let ours = prefix(&drift["ours"]["config"])?;
    ensure!(gauge(&lab.scrape(0)?, "cdn_steer_config_digest")? == ours);
    ensure!(gauge(&lab.scrape(1)?, "cdn_steer_config_digest")? == ours);

    // node2 gives node1 half the weight: another configuration and another table.
    let original = std::fs::read_to_string(&lab.nodes[1].config)?;
    let member1 = "name = \"node1\"\nid = 1\n";
    ensure!(original.contains(member1), "{original}");
    let changed = original.replacen(member1, &format!("{member1}weight = 50\n"), 1);
    reload(&mut lab, 1, &changed)?;

    let expected = [
        ("node2".to_owned(), "config".to_owned()),
        ("node2".to_owned(), "table/web".to_owned()),
    ];
    // The table is rebuilt right after the reload; give it the debounce.
    lab.wait_until(Duration::from_secs(5), "node1 to see the drift", || {
        Ok(disagreements(&lab, 0)? == expected)
    })?;
    let status = lab.status(0)?;
    let seen = &status["drift"]["disagreements"][0];
    ensure!(
        seen["ours"] == status["drift"]["ours"]["config"]
            && seen["theirs"] == lab.status(1)?["drift"]["ours"]["config"]
            && seen["ours"] != seen["theirs"],
        "{seen:#}"
    );
    ensure!(
        disagreements(&lab, 1)?
            == [
                ("node1".to_owned(), "config".to_owned()),
                ("node1".to_owned(), "table/web".to_owned()),
            ]
    );
    let text = lab.steer(0, &["status"])?;
    println!("{text}");
    ensure!(
        text.contains("peer node2") && text.contains("DISAGREES"),
        "{text}"
    );
    ensure!(
        text.contains("DRIFT: node2 differs on config")
            && text.contains("DRIFT: node2 differs on table/web"),
        "{text}"
    );
    let (a, b) = (
        gauge(&lab.scrape(0)?, "cdn_steer_config_digest")?,
        gauge(&lab.scrape(1)?, "cdn_steer_config_digest")?,
    );
    ensure!(a == ours && b != ours, "metrics {a:#x} and {b:#x}");

    // The same configuration again: agreement, the tables included.
    reload(&mut lab, 1, &original)?;
    lab.wait_until(Duration::from_secs(10), "the nodes to agree again", || {
        Ok(disagreements(&lab, 0)?.is_empty() && disagreements(&lab, 1)?.is_empty())
    })?;
    ensure!(gauge(&lab.scrape(1)?, "cdn_steer_config_digest")? == ours);
    Ok(())
}
