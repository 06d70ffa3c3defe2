//! Start-up up to the attached program: configuration, bpf filesystem, pinned maps (and what a
//! previous controller left in them), members and node settings, attachment.

use std::{collections::BTreeMap, path::PathBuf, time::SystemTime};

use anyhow::{Context as _, Result};
use cdn_common::maps::{MAX_MEMBERS, NODE_DRAINING, NODE_READY};

use super::{Options, core::Core, core::pin_paths};
use crate::{
    config,
    dataplane::{
        self, DataPlane, LoadOptions,
        tables::{self, Tables},
    },
};

/// The interface indexes of `[node] underlay_interfaces`. Read once: the list only changes
/// with a restart, and an interface recreated under a new index needs one too (as its XDP
/// attachment does).
fn underlay_ifindexes(names: &[String]) -> Result<Vec<u32>> {
    names
        .iter()
        .map(|name| {
            let c = std::ffi::CString::new(name.as_str())
                .with_context(|| format!("interface name {name:?}"))?;
            // SAFETY: `c` is a NUL-terminated string that outlives the call.
            let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if index == 0 {
                anyhow::bail!(
                    "underlay interface {name}: {}",
                    std::io::Error::last_os_error()
                );
            }
            Ok(index)
        })
        .collect()
}

/// Loads the configuration and the data plane and attaches the program. Returns the state and
/// the directory the XDP links are pinned in.
pub(super) fn attach(opts: &Options) -> Result<(Core, PathBuf)> {
    let cfg = config::load(&opts.config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    log::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = cfg.node.name.as_str(),
        members = cfg.cluster.members.len(),
        services = cfg.services.len();
        "cdn-steer starting"
    );
    if let Some(mounted) = dataplane::ensure_bpffs(&cfg.node.bpffs).with_context(|| {
        format!(
            "preparing the bpf filesystem at {}",
            cfg.node.bpffs.display()
        )
    })? {
        log::info!(path:% = mounted.display(); "mounted a bpf filesystem");
    }
    let (map_dir, link_dir) = pin_paths(&cfg);
    if opts.reset_maps {
        for dir in [&map_dir, &link_dir] {
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        log::warn!(cause = "--reset-maps"; "pinned maps and links removed; hop history starts empty");
    }
    std::fs::create_dir_all(&map_dir)?;
    std::fs::create_dir_all(&link_dir)?;
    let restarted = map_dir.join(cdn_common::maps::MAP_TABLE).exists();
    let dp = DataPlane::load(&LoadOptions {
        table_entries: tables::table_entries(cfg.cluster.table_size, cfg.services.len()),
        pin_dir: Some(map_dir.clone()),
    })
    .context("loading the XDP program")?;
    let tables = Tables::recover(&dp, &cfg)?;
    if restarted {
        log::info!(path:% = map_dir.display(); "found pinned maps: continuing with the previous tables and hop history");
    }
    // Node settings as they were (READY stays if a previous controller set it), so a running
    // data plane keeps steering while we start.
    let previous_flags = if restarted { dp.config()?.flags } else { 0 };
    let mut core = Core {
        config_path: std::fs::canonicalize(&opts.config_path)
            .unwrap_or_else(|_| opts.config_path.clone()),
        dp,
        tables,
        attachments: Vec::new(),
        draining: previous_flags & NODE_DRAINING != 0,
        ready: previous_flags & NODE_READY != 0,
        // A trace a previous controller left running has no reader any more.
        tracing: false,
        health: BTreeMap::new(),
        bgp: Vec::new(),
        reloads_ok: 0,
        reloads_failed: 0,
        started: SystemTime::now(),
        owners: Vec::new(),
        written_members: (0..MAX_MEMBERS as u16).collect(),
        cfg,
    };
    core.write_members()?;
    // Before the flag that makes the program read it (written with the node settings).
    let underlay = underlay_ifindexes(&core.cfg.node.underlay_interfaces)?;
    core.dp
        .set_underlay_ifaces(&underlay)
        .context("writing the underlay interfaces")?;
    core.write_node_config()?;
    let generic = core.cfg.node.xdp_mode == config::XdpMode::Generic;
    for interface in core.cfg.node.interfaces.clone() {
        let link_pin = link_dir.join(&interface);
        let a = core
            .dp
            .attach(&interface, generic, &link_pin)
            .with_context(|| format!("attaching to {interface}"))?;
        log::info!(
            interface = a.interface.as_str(),
            mode = a.mode;
            "{}",
            if a.replaced {
                "XDP program replaced in place"
            } else {
                "XDP attached"
            }
        );
        if generic {
            log::warn!(
                interface = a.interface.as_str(),
                cause = "node.xdp_mode = \"generic\"";
                "generic XDP mode: slower than native"
            );
        }
        core.attachments.push(a);
    }
    Ok((core, link_dir))
}
