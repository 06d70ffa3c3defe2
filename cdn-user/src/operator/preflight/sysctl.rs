//! The kernel settings the README asks of a node, read from `/proc/sys/net` (which shows the
//! calling thread's network namespace).
//!
//! Per-interface IPv4 settings combine with `all` the way the kernel combines them:
//! `accept_local` is on if either is on; `rp_filter`, `arp_ignore` and `arp_announce` take the
//! larger of the two. Each attached interface is judged by that effective value, and a fix
//! names the one key that makes it right.

use std::path::PathBuf;

use super::{Finding, Group};
use crate::config::Config;

/// A sysctl key: its dotted name as `sysctl` takes it and its file under `/proc/sys`.
struct Key {
    name: String,
    path: PathBuf,
}

impl Key {
    /// A global key, `net.ipv4.ip_forward`.
    fn global(dotted: &str) -> Self {
        Self {
            name: dotted.to_owned(),
            path: PathBuf::from("/proc/sys").join(dotted.replace('.', "/")),
        }
    }

    /// `net.<family>.conf.<interface>.<setting>`. `sysctl` writes a dot inside an interface
    /// name (`eth0.100`, a VLAN) as `/`, since dots separate its components.
    fn conf(family: &str, interface: &str, setting: &str) -> Self {
        Self {
            name: format!(
                "net.{family}.conf.{}.{setting}",
                interface.replace('.', "/")
            ),
            path: ["/proc/sys/net", family, "conf", interface, setting]
                .iter()
                .collect(),
        }
    }

    fn read(&self) -> Result<i64, String> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        text.trim().parse().map_err(|_| {
            format!(
                "{} holds {:?}, not a number",
                self.path.display(),
                text.trim()
            )
        })
    }

    fn fix(&self, value: i64) -> Option<String> {
        Some(format!("sysctl -w {}={value}", self.name))
    }
}

/// The sysctl findings for the node `cfg` describes.
pub(super) fn check(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    exact(
        &mut out,
        &Key::global("net.ipv4.ip_forward"),
        1,
        "the kernel must route encapsulated packets whose next hop is not resolved yet",
    );
    if cfg.node.underlay_v6.is_some() {
        exact(
            &mut out,
            &Key::conf("ipv6", "all", "forwarding"),
            1,
            "the IPv6 underlay needs forwarding as the IPv4 one does",
        );
    }
    exact(
        &mut out,
        &Key::conf("ipv4", "all", "rp_filter"),
        0,
        "reverse-path filtering drops packets whose replies leave by another path than they \
         came (it applies if all or the interface asks for it)",
    );
    // Interfaces that do not exist are the interface group's finding; their keys are missing.
    let present = |name: &&String| Key::conf("ipv4", name, "rp_filter").path.exists();
    for interface in cfg.node.interfaces.iter().filter(present) {
        exact(
            &mut out,
            &Key::conf("ipv4", interface, "rp_filter"),
            0,
            "reverse-path filtering drops packets whose replies leave by another path than they \
             came",
        );
        combined(
            &mut out,
            interface,
            "accept_local",
            1,
            Combine::Either,
            "packets from a local address are dropped, and the kernel must route encapsulated \
             packets from this node's own address when a neighbour is unresolved",
        );
        combined(
            &mut out,
            interface,
            "arp_ignore",
            1,
            Combine::Max,
            "the node answers ARP for the VIPs on lo, pulling their traffic to itself",
        );
        combined(
            &mut out,
            interface,
            "arp_announce",
            2,
            Combine::Max,
            "the node may use a VIP as the source of its ARP requests",
        );
    }
    out
}

/// `key` must be `want`.
fn exact(out: &mut Vec<Finding>, key: &Key, want: i64, why: &str) {
    out.push(match key.read() {
        Ok(v) if v == want => Finding::ok(Group::Sysctl, &key.name, format!("{v}")),
        Ok(v) => Finding::problem(
            Group::Sysctl,
            &key.name,
            format!("{v}, must be {want}: {why}"),
            key.fix(want),
        ),
        Err(e) => Finding::warning(Group::Sysctl, &key.name, e, key.fix(want)),
    });
}

/// How the kernel combines `all` with an interface's own value.
#[derive(Clone, Copy)]
enum Combine {
    /// On if either is on (`IN_DEV_ORCONF`); the effective value is at least `want`.
    Either,
    /// The larger of the two (`IN_DEV_MAXCONF`), which must reach `want`.
    Max,
}

fn combined(
    out: &mut Vec<Finding>,
    interface: &str,
    setting: &str,
    want: i64,
    combine: Combine,
    why: &str,
) {
    let own = Key::conf("ipv4", interface, setting);
    let all = Key::conf("ipv4", "all", setting);
    let (v_own, v_all) = match (own.read(), all.read()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            out.push(Finding::warning(Group::Sysctl, &own.name, e, own.fix(want)));
            return;
        }
    };
    let effective = match combine {
        Combine::Either if v_own != 0 || v_all != 0 => v_own.max(v_all),
        Combine::Either => 0,
        Combine::Max => v_own.max(v_all),
    };
    let shown = format!("{v_own} ({} {v_all}, effective {effective})", all.name);
    out.push(if effective >= want {
        Finding::ok(Group::Sysctl, &own.name, shown)
    } else {
        Finding::problem(
            Group::Sysctl,
            &own.name,
            format!("{shown}, must be {want}: {why}"),
            own.fix(want),
        )
    });
}
