//! The VIPs on `lo`: the servers on this node accept a flow only for an address that is local,
//! so every configured VIP prefix must be an address of the loopback interface, as
//! `ip addr add <prefix> dev lo` puts it there.

use super::{Finding, Group, netlink};
use crate::config::{Config, Prefix};

pub(super) fn check(cfg: &Config) -> Vec<Finding> {
    let prefixes: Vec<&Prefix> = cfg.services.iter().flat_map(|s| &s.vips).collect();
    let on_lo = netlink::lo_index().and_then(netlink::addresses);
    let on_lo = match on_lo {
        Ok(addresses) => addresses,
        Err(e) => {
            return vec![Finding::problem(
                Group::Vips,
                "lo",
                format!("cannot read the addresses of lo: {e}"),
                None,
            )];
        }
    };
    prefixes
        .into_iter()
        .map(|prefix| {
            let item = prefix.to_string();
            let fix = Some(format!("ip addr add {prefix} dev lo"));
            let lengths: Vec<u8> = on_lo
                .iter()
                .filter(|(ip, _)| *ip == prefix.addr())
                .map(|(_, len)| *len)
                .collect();
            if lengths.contains(&prefix.prefix_len()) {
                Finding::ok(Group::Vips, item, "on lo")
            } else if let Some(len) = lengths.first() {
                Finding::warning(
                    Group::Vips,
                    item,
                    format!(
                        "on lo as {}/{len}, not with the configured prefix length",
                        prefix.addr()
                    ),
                    fix,
                )
            } else {
                Finding::problem(
                    Group::Vips,
                    item,
                    "not on lo: servers here would not accept the VIP's flows",
                    fix,
                )
            }
        })
        .collect()
}
