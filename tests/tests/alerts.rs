//! The Prometheus alert rules shipped in `packaging/prometheus/`: `promtool check rules`
//! accepts them, `promtool test rules` passes their unit tests, and every alert has a unit test
//! in which it fires and one in which it stays silent.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, ensure};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus")
}

/// Runs `promtool <args>` in the rules' directory; fails with everything it said.
fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir())
        .output()
        .context("running promtool (Debian package prometheus)")?;
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "promtool {} failed:\n{said}",
        args.join(" ")
    );
    Ok(said)
}

/// The alert names of the rules file, in order.
fn alerts(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// For every `alertname` checked in the unit tests: (name, whether that check expects it to
/// fire), one entry per check.
fn checks(tests: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut current = None;
    let mut lines = tests.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        if let Some(name) = line.strip_prefix("alertname: ") {
            current = Some(name.trim().to_owned());
        } else if let Some(expected) = line.strip_prefix("exp_alerts:")
            && let Some(name) = current.take()
        {
            let fires = match expected.trim() {
                "[]" => false,
                // A list follows: firing if it has an item.
                "" => lines.peek().is_some_and(|next| next.starts_with("- ")),
                _ => true,
            };
            out.push((name, fires));
        }
    }
    out
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() -> Result<()> {
    let said = promtool(&["check", "rules", "cdn-steer-alerts.yml"])?;
    ensure!(said.contains("SUCCESS"), "{said}");
    let said = promtool(&["test", "rules", "cdn-steer-alerts.test.yml"])?;
    ensure!(said.contains("SUCCESS"), "{said}");
    Ok(())
}

#[test]
fn every_alert_has_a_test_that_fires_and_one_that_stays_silent() -> Result<()> {
    let rules = std::fs::read_to_string(dir().join("cdn-steer-alerts.yml"))?;
    let tests = std::fs::read_to_string(dir().join("cdn-steer-alerts.test.yml"))?;
    let alerts = alerts(&rules);
    let checks = checks(&tests);
    ensure!(alerts.len() >= 9, "alerts found: {alerts:?}");
    for alert in &alerts {
        for fires in [true, false] {
            ensure!(
                checks.contains(&(alert.clone(), fires)),
                "{alert} has no unit test in which it {}",
                if fires { "fires" } else { "stays silent" }
            );
        }
    }
    for (name, _) in &checks {
        ensure!(alerts.contains(name), "test of an unknown alert {name}");
    }
    Ok(())
}
