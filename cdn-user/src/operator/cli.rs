//! Helpers of the operator's CLI commands that read the configuration file themselves.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Result, bail};

use crate::{
    cluster::maglev::{self, MaglevMember},
    config::{self, Config},
};

/// `cdn-steer check`: what the configuration would build, with every member healthy.
pub fn check_summary(cfg: &Config) -> Result<String> {
    use std::fmt::Write as _;
    let members: Vec<MaglevMember<'_>> = cfg
        .cluster
        .members
        .iter()
        .filter(|m| m.weight > 0)
        .map(|m| MaglevMember {
            id: m.id,
            name: &m.name,
            weight: m.weight,
        })
        .collect();
    let started = Instant::now();
    let table = maglev::build_table(&members, cfg.cluster.hash_key, cfg.cluster.table_size)?;
    let took = started.elapsed();
    let mut share: BTreeMap<u16, u32> = BTreeMap::new();
    for id in &table {
        *share.entry(*id).or_insert(0) += 1;
    }
    let mut out = String::new();
    writeln!(out, "configuration OK: node {}", cfg.node.name)?;
    writeln!(
        out,
        "table: {} buckets, built in {:.2} ms with every member healthy",
        cfg.cluster.table_size,
        took.as_secs_f64() * 1000.0
    )?;
    writeln!(
        out,
        "{:<6} {:<20} {:<40} {:>7} {:>9} {:>8}",
        "id", "member", "underlay", "weight", "buckets", "share"
    )?;
    for m in &cfg.cluster.members {
        let n = share.get(&m.id).copied().unwrap_or(0);
        writeln!(
            out,
            "{:<6} {:<20} {:<40} {:>7} {:>9} {:>7.2}%",
            m.id,
            m.name,
            m.underlay.to_string(),
            m.weight,
            n,
            100.0 * f64::from(n) / f64::from(cfg.cluster.table_size)
        )?;
    }
    for s in &cfg.services {
        writeln!(
            out,
            "service {}: VIPs {} TCP {:?} UDP {:?}",
            s.name,
            s.vips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            s.tcp_ports,
            s.udp_ports
        )?;
    }
    Ok(out)
}

/// The control socket path of a configuration file, for the CLI's client commands.
///
/// The file may have been edited into something invalid since the daemon read it (that is when
/// one wants `status` most), so only `node.control_socket` has to be readable.
pub fn control_socket_of(config: Option<&Path>) -> Result<PathBuf> {
    let Some(path) = config else {
        return Ok(PathBuf::from(config::DEFAULT_CONTROL_SOCKET));
    };
    match config::load(path) {
        Ok(cfg) => Ok(cfg.node.control_socket),
        Err(e) => {
            let text = std::fs::read_to_string(path).map_err(|_| anyhow::anyhow!("{e}"))?;
            let value: toml::Table = toml::from_str(&text).map_err(|_| anyhow::anyhow!("{e}"))?;
            match value.get("node").and_then(|n| n.get("control_socket")) {
                Some(toml::Value::String(socket)) => Ok(PathBuf::from(socket)),
                Some(_) => bail!("{e}"),
                None => Ok(PathBuf::from(config::DEFAULT_CONTROL_SOCKET)),
            }
        }
    }
}
