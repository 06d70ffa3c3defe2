//! The interfaces the XDP program attaches to: present, up, able to run it in the configured
//! mode, and with an MTU that carries encapsulated client packets.
//!
//! Native XDP support is told without touching the interface. A trial attach would be the
//! most direct test, but attaching a native program makes many drivers (mlx5, i40e, ixgbe)
//! rebuild their rings and reset the link: a traffic blip on a box that may be serving. So, in
//! order: a program attached in native mode right now proves it; otherwise the kernel's own
//! per-device answer, the `xdp-features` the driver declares (generic netlink `netdev` family,
//! Linux 6.3+); on older kernels, the driver's name (`ethtool -i`) against
//! [`XDP_NATIVE_DRIVERS`], where a driver not listed is a warning, not a verdict.

use cdn_common::wire::{ENCAP_LEN_V4, ENCAP_LEN_V6, ETH_HEADER_LEN};

use super::{
    Finding, Group,
    netlink::{self, Link, Links, XDP_ACT_BASIC, XDP_ACT_REDIRECT, XdpAttachment},
};
use crate::config::{Config, XdpMode};

/// Drivers with native XDP in mainline Linux 5.15, for kernels too old to say themselves.
pub const XDP_NATIVE_DRIVERS: &[&str] = &[
    "bnxt_en",
    "bond",
    "cpsw",
    "dpaa2-eth",
    "ena",
    "enetc",
    "fec",
    "hv_netvsc",
    "i40e",
    "ice",
    "igb",
    "igc",
    "ixgbe",
    "ixgbevf",
    "mlx4_en",
    "mlx5_core",
    "mvneta",
    "mvpp2",
    "netsec",
    "nfp",
    "nicvf",
    "qede",
    "sfc",
    "stmmac",
    "tun",
    "veth",
    "virtio_net",
    "xen-netfront",
];

/// Client packets this large must fit once encapsulated: the Internet's usual path MTU.
pub const CLIENT_MTU: u32 = 1500;

/// Whether steering trust rests on more than the outer source address: without
/// `node.underlay_interfaces`, anyone who can send to the underlay address from any attached
/// interface (the uplink) with a member's address as source can inject through the tunnel.
pub(super) fn check_underlay(cfg: &Config) -> Finding {
    let item = "node.underlay_interfaces";
    if cfg.node.underlay_interfaces.is_empty() {
        let also = if cfg.cluster.steer_auth {
            " and the MAC (cluster.steer_auth)"
        } else {
            ""
        };
        return Finding::warning(
            Group::Interfaces,
            item,
            format!(
                "empty: steering packets are trusted on every attached interface, by their outer \
                 source address{also} alone"
            ),
            Some("list the interfaces the other members are reached through".to_owned()),
        );
    }
    Finding::ok(
        Group::Interfaces,
        item,
        format!(
            "steering packets accepted only on {}",
            cfg.node.underlay_interfaces.join(", ")
        ),
    )
}

pub(super) fn check(cfg: &Config, links: &Links) -> Vec<Finding> {
    let mut out = Vec::new();
    for name in &cfg.node.interfaces {
        let link = match links.get(name) {
            Ok(Some(link)) => link,
            Ok(None) => {
                out.push(Finding::problem(
                    Group::Interfaces,
                    name,
                    "no such interface",
                    Some("create it, or correct node.interfaces".to_owned()),
                ));
                continue;
            }
            Err(e) => {
                out.push(Finding::problem(Group::Interfaces, name, e, None));
                continue;
            }
        };
        out.push(if !link.up {
            Finding::problem(
                Group::Interfaces,
                name,
                "down",
                Some(format!("ip link set dev {name} up")),
            )
        } else if !link.lower_up {
            Finding::warning(Group::Interfaces, name, "up, but no carrier", None)
        } else {
            Finding::ok(Group::Interfaces, name, "up")
        });
        out.push(native_xdp(cfg.node.xdp_mode, name, link));
    }
    out
}

fn native_xdp(mode: XdpMode, name: &str, link: &Link) -> Finding {
    let item = format!("{name} xdp");
    if mode == XdpMode::Generic {
        return Finding::ok(
            Group::Interfaces,
            item,
            "xdp_mode = \"generic\": runs on any interface (slower than native)",
        );
    }
    if matches!(
        link.xdp,
        XdpAttachment::Driver | XdpAttachment::Multiple { driver: true }
    ) {
        return Finding::ok(
            Group::Interfaces,
            item,
            "an XDP program runs on it in native mode now",
        );
    }
    let driver = netlink::driver(name).unwrap_or_else(|| "(unknown)".to_owned());
    let generic_fix = Some(
        "set node.xdp_mode = \"generic\", or attach to a NIC whose driver has native XDP"
            .to_owned(),
    );
    match netlink::xdp_features(link.index) {
        Ok(Some(features)) if features & XDP_ACT_BASIC != 0 => {
            let redirect = if features & XDP_ACT_REDIRECT != 0 {
                ", redirect"
            } else {
                ""
            };
            Finding::ok(
                Group::Interfaces,
                item,
                format!("driver {driver} declares native XDP (basic{redirect})"),
            )
        }
        Ok(Some(_)) => Finding::problem(
            Group::Interfaces,
            item,
            format!(
                "driver {driver} declares no native XDP: attaching with xdp_mode = \"native\" \
                 fails"
            ),
            generic_fix,
        ),
        Ok(None) if XDP_NATIVE_DRIVERS.contains(&driver.as_str()) => Finding::ok(
            Group::Interfaces,
            item,
            format!("driver {driver} is known to have native XDP"),
        ),
        Ok(None) => Finding::warning(
            Group::Interfaces,
            item,
            format!(
                "cannot tell: the kernel does not declare XDP features (before 6.3) and \
                 driver {driver} is not known to have native XDP; `cdn-steer run` fails to \
                 attach if it has none"
            ),
            generic_fix,
        ),
        Err(e) => Finding::warning(
            Group::Interfaces,
            item,
            format!("cannot ask the kernel for the XDP features of driver {driver}: {e}"),
            None,
        ),
    }
}

/// Bytes the encapsulation adds in front of a client packet, Ethernet header included: the
/// larger of the node's underlay families.
fn encap_len(cfg: &Config) -> u32 {
    let v6 = cfg.node.underlay_v6.is_some();
    (if v6 { ENCAP_LEN_V6 } else { ENCAP_LEN_V4 }) as u32
}

/// The MTU of each attached interface against `max_frame` and the encapsulation: frames the
/// program may send must fit the interface, and full-size client packets should fit them.
pub(super) fn check_mtu(cfg: &Config, links: &Links) -> Vec<Finding> {
    let encap = encap_len(cfg);
    let eth = ETH_HEADER_LEN as u32;
    let max_frame = cfg.node.max_frame;
    let mut out = Vec::new();
    for name in &cfg.node.interfaces {
        let Ok(Some(Link { mtu: Some(mtu), .. })) = links.get(name) else {
            // Missing interfaces are reported by the interface check.
            continue;
        };
        let carried = mtu + eth;
        if max_frame > carried {
            out.push(Finding::problem(
                Group::Mtu,
                name,
                format!(
                    "MTU {mtu} carries frames up to {carried} bytes, but max_frame is \
                     {max_frame}: encapsulated packets in between are sent and lost instead of \
                     dropped and counted (too_big); the other way out: node.max_frame = {carried}"
                ),
                Some(format!("ip link set dev {name} mtu {}", max_frame - eth)),
            ));
            continue;
        }
        let frame = if max_frame == 0 { carried } else { max_frame };
        let client = frame.saturating_sub(encap);
        let summary = format!(
            "MTU {mtu}, max_frame {max_frame}: client packets up to {client} bytes fit once \
             encapsulated ({encap} bytes added)"
        );
        if client < CLIENT_MTU {
            let need = CLIENT_MTU + encap;
            out.push(Finding::warning(
                Group::Mtu,
                name,
                format!(
                    "{summary}; full-size {CLIENT_MTU}-byte client packets are dropped \
                     (too_big)"
                ),
                Some(if carried < need {
                    format!(
                        "ip link set dev {name} mtu {} (and node.max_frame = {need})",
                        need - eth
                    )
                } else {
                    format!("set node.max_frame = {need}")
                }),
            ));
        } else if max_frame == 0 {
            out.push(Finding::warning(
                Group::Mtu,
                name,
                format!(
                    "{summary}; max_frame = 0: a larger one would be lost at the NIC instead \
                     of counted"
                ),
                Some(format!("set node.max_frame = {carried}")),
            ));
        } else {
            out.push(Finding::ok(Group::Mtu, name, summary));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::operator::preflight::Status;

    fn config(max_frame: u32, v6: bool) -> Config {
        let underlay_v6 = if v6 {
            "underlay_v6 = \"fd00::1\"\n"
        } else {
            ""
        };
        crate::config::parse(&format!(
            "[node]\nname = \"a\"\ninterfaces = [\"eth0\"]\nunderlay_v4 = \"10.0.0.1\"\n\
             {underlay_v6}max_frame = {max_frame}\n\
             [cluster]\nhash_key = \"00112233445566778899aabbccddeeff\"\n\
             [[cluster.members]]\nname = \"a\"\nid = 0\nunderlay = \"10.0.0.1\"\n\
             [[services]]\nname = \"web\"\nvips = [\"192.0.2.1/32\"]\ntcp_ports = [80]\n"
        ))
        .expect("valid configuration")
    }

    fn mtu_finding(mtu: u32, max_frame: u32, v6: bool) -> Finding {
        let link = Link {
            index: 2,
            up: true,
            lower_up: true,
            mtu: Some(mtu),
            xdp: XdpAttachment::None,
        };
        let links = Links(Ok(BTreeMap::from([("eth0".to_owned(), link)])));
        let mut found = check_mtu(&config(max_frame, v6), &links);
        assert_eq!(found.len(), 1, "{found:?}");
        found.remove(0)
    }

    #[test]
    fn mtu_against_max_frame_and_the_encapsulation() {
        // The lab's setting: 1600 + 14 carries a 1500-byte client packet plus 50 bytes.
        let f = mtu_finding(1600, 1614, false);
        assert_eq!(f.status, Status::Ok, "{f:?}");
        assert!(f.detail.contains("up to 1564 bytes"), "{f:?}");

        // max_frame above what the interface carries: packets lost instead of counted.
        let f = mtu_finding(1500, 1614, false);
        assert_eq!(f.status, Status::Problem, "{f:?}");
        assert_eq!(f.fix.as_deref(), Some("ip link set dev eth0 mtu 1600"));

        // A standard 1500 underlay: full-size client packets cannot be encapsulated.
        let f = mtu_finding(1500, 1514, false);
        assert_eq!(f.status, Status::Warning, "{f:?}");
        assert!(f.detail.contains("up to 1464 bytes"), "{f:?}");
        assert_eq!(
            f.fix.as_deref(),
            Some("ip link set dev eth0 mtu 1536 (and node.max_frame = 1550)")
        );

        // The MTU is large enough, max_frame is what holds them back.
        let f = mtu_finding(9000, 1514, false);
        assert_eq!(f.status, Status::Warning, "{f:?}");
        assert_eq!(f.fix.as_deref(), Some("set node.max_frame = 1550"));

        // An IPv6 underlay adds 70 bytes, not 50.
        let f = mtu_finding(1536, 1550, true);
        assert_eq!(f.status, Status::Warning, "{f:?}");
        assert!(f.detail.contains("up to 1480 bytes"), "{f:?}");

        // Unchecked: fits, but a larger one would be lost unseen.
        let f = mtu_finding(1600, 0, false);
        assert_eq!(f.status, Status::Warning, "{f:?}");
        assert_eq!(f.fix.as_deref(), Some("set node.max_frame = 1614"));
    }

    #[test]
    fn an_empty_underlay_interface_list_is_a_warning() {
        use crate::config::{EXAMPLE, parse};
        use crate::operator::preflight::Status;
        let cfg = parse(EXAMPLE).expect("the example parses");
        let f = check_underlay(&cfg);
        assert_eq!(f.status, Status::Warning, "{f:?}");
        assert!(f.detail.contains("outer source address alone"), "{f:?}");
        let listed = EXAMPLE.replacen(
            "# underlay_interfaces = [\"eth1\"]",
            "underlay_interfaces = [\"eth0\"]",
            1,
        );
        let f = check_underlay(&parse(&listed).expect("parses"));
        assert_eq!(f.status, Status::Ok, "{f:?}");
        assert!(f.detail.ends_with("only on eth0"), "{f:?}");
    }
}
