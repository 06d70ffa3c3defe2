//! What each episode does to the lab, and how it is repaired. Kills and restarts go through
//! the lab's own accessors; a bad reload writes a broken file where the daemon reads its
//! configuration, asks it to reload, checks that it refused and that nothing changed, and puts
//! the good file back.

use anyhow::{Context as _, Result, bail, ensure};

use super::schedule::{Episode, Kind};
use crate::lab::Lab;

/// The broken configurations a bad reload tries, by name: each a transformation of the good
/// file that the daemon must refuse.
const BAD_CONFIGS: [&str; 6] = [
    "truncated file",
    "hash key not hex",
    "duplicate member id",
    "unknown field",
    "VIP prefix /33",
    "node not a member",
];

/// The broken variant `variant` of the configuration `good` of node `node`.
pub fn bad_config(good: &str, node: &str, variant: u64) -> (&'static str, String) {
    let index = (variant % BAD_CONFIGS.len() as u64) as usize;
    let text = match index {
        0 => good[..good.len() / 2].to_string(),
        1 => good.replace(crate::lab::HASH_KEY, "not-a-hex-key"),
        2 => good.replacen("id = 2\n", "id = 1\n", 1),
        3 => good.replacen("[node]\n", "[node]\nno_such_field = 1\n", 1),
        4 => good.replace("/32\"", "/33\""),
        _ => good.replacen(
            &format!("name = \"{node}\"\ninterfaces"),
            "name = \"node99\"\ninterfaces",
            1,
        ),
    };
    (BAD_CONFIGS[index], text)
}

/// Starts `episode`'s fault. Floods are not handled here (they run on a thread of their own).
pub fn begin(lab: &mut Lab, episode: &Episode) -> Result<String> {
    let i = episode.node;
    match episode.kind {
        Kind::ControllerKill => {
            lab.kill_controller(i);
            Ok("SIGKILL".into())
        }
        Kind::BirdKill => {
            lab.kill_bird(i);
            Ok("SIGKILL".into())
        }
        Kind::HttpdKill => {
            lab.kill_httpd(i);
            Ok("SIGKILL".into())
        }
        Kind::NodeKill => {
            lab.stop_node(i);
            Ok("controller, web server and BIRD: SIGKILL".into())
        }
        Kind::RouteFlip => {
            lab.withdraw_at_router(i)?;
            Ok("router withdraws its routes".into())
        }
        Kind::BadReload => bad_reload(lab, i, episode.variant),
        Kind::SynFlood | Kind::AckFlood => bail!("floods are run by the runner"),
    }
}

/// Repairs what [`begin`] broke.
pub fn end(lab: &mut Lab, episode: &Episode) -> Result<String> {
    let i = episode.node;
    match episode.kind {
        Kind::ControllerKill => lab.start_controller(i).map(|()| "started again".into()),
        Kind::BirdKill => lab.restart_bird(i).map(|()| "started again".into()),
        Kind::HttpdKill => lab.start_httpd(i).map(|()| "started again".into()),
        Kind::NodeKill => lab
            .start_node(i)
            .map(|()| "everything started again".into()),
        Kind::RouteFlip => lab
            .restore_at_router(i)
            .map(|()| "router restores its routes".into()),
        Kind::BadReload | Kind::SynFlood | Kind::AckFlood => Ok(String::new()),
    }
}

/// What a refused reload must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// (service, generation, active half)
    services: Vec<(String, u64, u64)>,
    reloads_ok: u64,
    reloads_failed: u64,
}

fn snapshot(lab: &Lab, i: usize) -> Result<Snapshot> {
    let s = lab.status(i)?;
    let services = s["services"]
        .as_array()
        .context("status without services")?
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or_default().to_string(),
                v["generation"].as_u64().unwrap_or_default(),
                v["active_half"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    Ok(Snapshot {
        services,
        reloads_ok: s["reloads_ok"].as_u64().unwrap_or_default(),
        reloads_failed: s["reloads_failed"].as_u64().unwrap_or_default(),
    })
}

/// Writes a broken configuration where node `i`'s daemon reads its own, asks it to reload (the
/// CLI finds the control socket through an intact copy), and puts the good file back. Fails
/// unless the reload was refused and changed nothing but the refusal counter.
fn bad_reload(lab: &Lab, i: usize, variant: u64) -> Result<String> {
    let node = &lab.nodes[i];
    let good = std::fs::read_to_string(&node.config)?;
    let intact = lab.dir.join(format!("{}-intact.toml", node.name));
    std::fs::write(&intact, &good)?;
    let (what, bad) = bad_config(&good, &node.name, variant);
    let before = snapshot(lab, i)?;
    std::fs::write(&node.config, bad)?;
    let out = node
        .ns
        .command(&lab.bin.cdn_steer.to_string_lossy())
        .args(["reload", "--config"])
        .arg(&intact)
        .output();
    // The good file goes back whatever happened, before anything else can fail.
    std::fs::write(&node.config, &good)?;
    let out = out.context("running cdn-steer reload")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let reason = reason.join(" ");
    ensure!(
        !out.status.success(),
        "{what}: the daemon took the broken configuration"
    );
    let after = snapshot(lab, i)?;
    ensure!(
        after.services == before.services && after.reloads_ok == before.reloads_ok,
        "{what}: the refused reload changed the daemon: {before:?} -> {after:?}"
    );
    ensure!(
        after.reloads_failed == before.reloads_failed + 1,
        "{what}: the refusal was not counted ({} -> {})",
        before.reloads_failed,
        after.reloads_failed
    );
    Ok(format!("{what}: refused, nothing changed ({reason})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_config_differs_from_the_good_one() {
        let good = format!(
            "[node]\nname = \"node2\"\ninterfaces = [\"eth0\"]\n\n[cluster]\nhash_key = \"{}\"\n\
             [[cluster.members]]\nname = \"node1\"\nid = 1\n[[cluster.members]]\nname = \"node2\"\nid = 2\n\
             [[services]]\nvips = [\"192.0.2.1/32\"]\n",
            crate::lab::HASH_KEY
        );
        for variant in 0..BAD_CONFIGS.len() as u64 {
            let (what, bad) = bad_config(&good, "node2", variant);
            assert_ne!(bad, good, "{what} left the file as it was");
        }
    }
}
