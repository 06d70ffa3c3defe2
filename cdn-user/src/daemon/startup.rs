//! Start-up up to the attached program: configuration, bpf filesystem, pinned maps (and what a
//! previous controller left in them), members and node settings, attachment.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail};
use cdn_common::maps::{MAX_MEMBERS, NODE_DRAINING, NODE_READY};

use super::{Options, core::Core, core::pin_paths};
use crate::{
    config,
    dataplane::{
        self, DataPlane, LoadOptions,
        bpffs::{self, PinLifetime},
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
    let mounted = dataplane::ensure_bpffs(&cfg.node.bpffs).with_context(|| {
        format!(
            "preparing the bpf filesystem at {}",
            cfg.node.bpffs.display()
        )
    })?;
    if let Some(mounted) = &mounted {
        log::info!(path:% = mounted.display(); "mounted a bpf filesystem");
    }
    lasting_pins(
        &cfg.node.bpffs,
        mounted.as_deref(),
        opts.allow_ephemeral_pins,
    )?;
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
        table_entries: tables::table_entries(
            cfg.cluster.table_size,
            cfg.services.len() * cfg.pop_count(),
        ),
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
    // Whatever server IDs a previous controller set, to clear those no longer configured.
    let leftover_quic_servers = dp
        .quic_servers()
        .context("reading the QUIC server IDs")?
        .into_iter()
        .map(|(server_id, _)| server_id)
        .collect();
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
        pop_eligible: Vec::new(),
        pop_fallback: None,
        written_members: (0..MAX_MEMBERS as u16).collect(),
        written_quic_servers: leftover_quic_servers,
        checks: Default::default(),
        learning: Default::default(),
        pop_drains: Default::default(),
        cfg,
    };
    core.start_learning()?;
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

/// Refuses to start when the pins would not outlive the daemon (see
/// [`bpffs::pin_lifetime`]), unless `allow` (`--allow-ephemeral-pins`). `mounted` is where
/// this daemon mounted a bpffs itself, if it did.
fn lasting_pins(dir: &Path, mounted: Option<&Path>, allow: bool) -> Result<()> {
    let fs = mounted.unwrap_or(dir).display();
    let why = match bpffs::pin_lifetime(dir) {
        PinLifetime::Outlives => return Ok(()),
        PinLifetime::EndsWithNamespace => format!(
            "the bpf filesystem at {fs} is mounted only in this process's private mount \
             namespace (as `ip netns exec` or `unshare -m` give), not on the host"
        ),
        // A bpffs that was there before us is taken to be the host's: under systemd it was
        // mounted at boot, and a unit may not be allowed to read PID 1's mount table. One we
        // mounted ourselves has nothing to show it outlives us.
        PinLifetime::Unknown(reason) if mounted.is_none() => {
            log::debug!(path:% = dir.display(), reason = reason.as_str(); "cannot tell whether the pins outlive the daemon");
            return Ok(());
        }
        PinLifetime::Unknown(reason) => format!(
            "this daemon had to mount the bpf filesystem at {fs} itself, and cannot tell \
             whether it outlives the daemon ({reason})"
        ),
    };
    let consequence = "pinned maps and XDP links would vanish when the daemon exits, so a \
                       kill -9 or --keep-attached would detach XDP and reset every flow";
    if allow {
        log::warn!(path:% = dir.display(), reason = why.as_str(), flag = "--allow-ephemeral-pins"; "pins will not outlive the daemon");
        return Ok(());
    }
    if let Some(at) = mounted
        && let Err(e) = bpffs::unmount(at)
    {
        log::warn!(path:% = at.display(), error:% = e; "could not unmount the bpf filesystem mounted at start-up");
    }
    bail!(
        "refusing to start: {why}; its {consequence}. Mount a bpf filesystem on the host first \
         (`mount -t bpf bpf /sys/fs/bpf`, or at a directory outside /sys for node.bpffs, since \
         `ip netns exec` hides the host's /sys) and run the daemon where it sees that mount \
         (`nsenter --net=/run/netns/NAME` enters only the network namespace); or pass \
         --allow-ephemeral-pins to run with pins that end with the daemon"
    )
}
