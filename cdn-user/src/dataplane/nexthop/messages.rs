//! Turning the kernel's rtnetlink answers (routes, links, neighbours) into next hops.

use std::{collections::HashMap, io, net::IpAddr, os::fd::AsRawFd, time::Duration};

use netlink_packet_route::{
    link::LinkLayerType,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia},
};
use netlink_sys::Socket;

use super::{NUD_USABLE, error::*};

/// The kernel's route to one address.
#[derive(Debug)]
pub(super) struct Route {
    pub(super) oif: u32,
    /// The gateway, or the address itself when on-link.
    pub(super) neighbour: IpAddr,
}

/// An egress interface.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) name: String,
    pub(super) link_type: LinkLayerType,
    pub(super) address: Vec<u8>,
}

/// A neighbour table entry.
#[derive(Debug)]
pub(super) struct Neighbour {
    pub(super) state: u16,
    pub(super) lladdr: Option<Vec<u8>>,
}

pub(super) fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: the fd is the socket's, open for the call; the option value is a timeval we own,
    // passed with its exact size, which is what SO_RCVTIMEO expects.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The first four bytes as a native-endian i32 (the error code of `NLMSG_ERROR`/`NLMSG_DONE`).
pub(super) fn leading_i32(payload: &[u8]) -> Option<i32> {
    payload
        .first_chunk::<4>()
        .map(|bytes| i32::from_ne_bytes(*bytes))
}

/// Maps the kernel's refusal of a route lookup. For IPv4 and IPv6 alike the kernel answers a
/// lookup that hits an unreachable/blackhole/prohibit route (or none) with an errno rather than
/// with the route.
pub(super) fn route_refused(addr: IpAddr, what: &str, e: io::Error) -> ResolveError {
    let reason = match e.raw_os_error() {
        Some(libc::ENETUNREACH) => NoRouteReason::NoMatchingRoute,
        Some(libc::EHOSTUNREACH) => NoRouteReason::Unreachable,
        Some(libc::EINVAL) => NoRouteReason::Blackhole,
        Some(libc::EACCES | libc::EPERM) => NoRouteReason::Prohibit,
        _ => {
            return ResolveError::Netlink {
                request: what.to_owned(),
                source: e,
            };
        }
    };
    ResolveError::NoRoute { addr, reason }
}

pub(super) fn route_from_reply(addr: IpAddr, route: &RouteMessage) -> Result<Route, ResolveError> {
    let no_route = |reason| ResolveError::NoRoute { addr, reason };
    let reason = match route.header.kind {
        RouteType::Unicast => None,
        RouteType::Local => Some(NoRouteReason::Local),
        RouteType::Broadcast => Some(NoRouteReason::Broadcast),
        RouteType::Multicast => Some(NoRouteReason::Multicast),
        RouteType::Anycast => Some(NoRouteReason::Anycast),
        RouteType::BlackHole => Some(NoRouteReason::Blackhole),
        RouteType::Unreachable => Some(NoRouteReason::Unreachable),
        RouteType::Prohibit => Some(NoRouteReason::Prohibit),
        RouteType::Throw => Some(NoRouteReason::Throw),
        other => Some(NoRouteReason::RouteType(u8::from(other))),
    };
    if let Some(reason) = reason {
        return Err(no_route(reason));
    }
    let mut oif = None;
    // None: on-link. Some(None): a next hop we cannot use.
    let mut gateway: Option<Option<IpAddr>> = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Gateway(a) => {
                gateway = Some(match a {
                    RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                    RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
            }
            // An IPv4 route with an IPv6 next hop (RFC 5549) names it in RTA_VIA.
            RouteAttribute::Via(via) => {
                gateway = Some(match via {
                    RouteVia::Inet(v4) => Some(IpAddr::V4(*v4)),
                    RouteVia::Inet6(v6) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    let oif = oif.ok_or_else(|| no_route(NoRouteReason::NoOutputInterface))?;
    let neighbour = match gateway {
        None => addr,
        Some(Some(gw)) => gw,
        Some(None) => return Err(no_route(NoRouteReason::UnsupportedNextHop)),
    };
    Ok(Route { oif, neighbour })
}

/// The key and entry of an IPv4/IPv6 neighbour message; other families are of no use here.
pub(super) fn neighbour_entry(msg: NeighbourMessage) -> Option<((u32, IpAddr), Neighbour)> {
    let mut dst = None;
    let mut lladdr = None;
    for attr in msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                dst = Some(IpAddr::V4(v4));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                dst = Some(IpAddr::V6(v6));
            }
            NeighbourAttribute::LinkLayerAddress(a) => lladdr = Some(a),
            _ => {}
        }
    }
    let entry = Neighbour {
        state: u16::from(msg.header.state),
        lladdr,
    };
    Some(((msg.header.ifindex, dst?), entry))
}

/// A MAC the data plane may put on a frame: six bytes, not all zero, not a group address.
pub(super) fn unicast_mac(bytes: &[u8]) -> Option<[u8; 6]> {
    let mac: [u8; 6] = bytes.try_into().ok()?;
    (mac != [0; 6] && mac[0] & 1 == 0).then_some(mac)
}

pub(super) fn next_hop(
    addr: IpAddr,
    route: &Route,
    links: &HashMap<u32, Result<Link, io::Error>>,
    neighbours: &HashMap<(u32, IpAddr), Neighbour>,
) -> Result<Resolved, ResolveError> {
    let link = match links.get(&route.oif) {
        Some(Ok(link)) => link,
        Some(Err(e)) => {
            return Err(ResolveError::Netlink {
                request: format!("RTM_GETLINK ifindex {}", route.oif),
                source: copy_io_error(e),
            });
        }
        // resolve() looks up every interface a route names.
        None => {
            return Err(protocol_error(
                &format!("RTM_GETLINK ifindex {}", route.oif),
                "interface not looked up",
            ));
        }
    };
    let not_ethernet = |detail: String| ResolveError::NotEthernet {
        addr,
        ifname: link.name.clone(),
        ifindex: route.oif,
        detail,
    };
    if link.link_type != LinkLayerType::Ether {
        return Err(not_ethernet(format!("link type {}", link.link_type)));
    }
    let src_mac = unicast_mac(&link.address).ok_or_else(|| {
        not_ethernet(if link.address.is_empty() {
            "it has no hardware address".to_owned()
        } else {
            format!(
                "hardware address {} is not a unicast MAC",
                fmt_lladdr(&link.address)
            )
        })
    })?;

    let unresolved = |problem| ResolveError::NeighbourUnresolved {
        target: addr,
        neighbour: route.neighbour,
        ifname: link.name.clone(),
        ifindex: route.oif,
        problem,
    };
    let entry = neighbours
        .get(&(route.oif, route.neighbour))
        .ok_or_else(|| unresolved(NeighbourProblem::NoEntry))?;
    if entry.state & NUD_USABLE == 0 {
        return Err(unresolved(NeighbourProblem::State(NudState(entry.state))));
    }
    let lladdr = entry.lladdr.as_deref().unwrap_or_default();
    let dst_mac = unicast_mac(lladdr).ok_or_else(|| {
        unresolved(NeighbourProblem::BadLinkLayerAddress {
            state: NudState(entry.state),
            lladdr: lladdr.to_vec(),
        })
    })?;
    Ok(Resolved {
        ifindex: route.oif,
        src_mac,
        dst_mac,
        via: route.neighbour,
    })
}
