//! What a next-hop resolution can find wrong, worded for the operator's log.

use std::{fmt, io, net::IpAddr};

/// One address of a [`Resolver::resolve`] call with its outcome.
pub type Resolution = (IpAddr, Result<Resolved, ResolveError>);

/// Where to send a member's packets: the data plane's next-hop entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Egress interface.
    pub ifindex: u32,
    /// The egress interface's MAC.
    pub src_mac: [u8; 6],
    /// The neighbour's MAC: the member's own if it is on-link, else its gateway's.
    pub dst_mac: [u8; 6],
    /// The neighbour's address: the gateway, or the member itself when on-link.
    pub via: IpAddr,
}

impl Resolved {
    /// What the data plane's next-hop entry is built from.
    pub fn link(&self) -> cdn_common::maps::Link {
        cdn_common::maps::Link {
            ifindex: self.ifindex,
            dst_mac: self.dst_mac,
            src_mac: self.src_mac,
        }
    }
}

/// Why the kernel has no usable route to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRouteReason {
    /// No route matches (the kernel answered `ENETUNREACH`).
    NoMatchingRoute,
    /// An `unreachable` route matches (`EHOSTUNREACH`).
    Unreachable,
    /// A `blackhole` route matches (the kernel answers `EINVAL` for these).
    Blackhole,
    /// A `prohibit` route matches (`EACCES`).
    Prohibit,
    /// The address is one of this host's.
    Local,
    /// The address is a broadcast address.
    Broadcast,
    /// The address is a multicast address.
    Multicast,
    /// The address is an anycast address of this host.
    Anycast,
    /// The lookup ended at a `throw` route.
    Throw,
    /// The route names no output interface.
    NoOutputInterface,
    /// The next hop is neither IPv4 nor IPv6 (e.g. MPLS).
    UnsupportedNextHop,
    /// A route type this resolver does not forward over (the raw `RTN_*` value).
    RouteType(u8),
}

impl fmt::Display for NoRouteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMatchingRoute => f.write_str("no route matches"),
            Self::Unreachable => f.write_str("an unreachable route matches"),
            Self::Blackhole => {
                f.write_str("a blackhole route matches (the kernel answered EINVAL)")
            }
            Self::Prohibit => f.write_str("a prohibit route matches"),
            Self::Local => f.write_str("the address is local to this host"),
            Self::Broadcast => f.write_str("it is a broadcast address"),
            Self::Multicast => f.write_str("it is a multicast address"),
            Self::Anycast => f.write_str("it is an anycast address of this host"),
            Self::Throw => f.write_str("the lookup ended at a throw route"),
            Self::NoOutputInterface => f.write_str("the route has no output interface"),
            Self::UnsupportedNextHop => f.write_str("the next hop is neither IPv4 nor IPv6"),
            Self::RouteType(t) => write!(f, "the route is of type {t}, not unicast"),
        }
    }
}

/// A neighbour state (`NUD_*` bits), printed the way `ip neigh` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NudState(pub u16);

impl fmt::Display for NudState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u16, &str); 8] = [
            (libc::NUD_INCOMPLETE, "INCOMPLETE"),
            (libc::NUD_REACHABLE, "REACHABLE"),
            (libc::NUD_STALE, "STALE"),
            (libc::NUD_DELAY, "DELAY"),
            (libc::NUD_PROBE, "PROBE"),
            (libc::NUD_FAILED, "FAILED"),
            (libc::NUD_NOARP, "NOARP"),
            (libc::NUD_PERMANENT, "PERMANENT"),
        ];
        if self.0 == libc::NUD_NONE {
            return f.write_str("NONE");
        }
        let mut rest = self.0;
        let mut first = true;
        for (bit, name) in NAMES {
            if rest & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
                rest &= !bit;
            }
        }
        if rest != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{rest:#x}")?;
        }
        Ok(())
    }
}

/// What is wrong with a neighbour entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NeighbourProblem {
    /// The table has no entry: nothing has tried to reach the neighbour yet, or the entry was
    /// garbage-collected.
    NoEntry,
    /// The entry is in a state without a usable address (INCOMPLETE, FAILED, NONE).
    State(NudState),
    /// The state is usable but the link-layer address is missing, not 6 bytes, all zero or a
    /// group address.
    BadLinkLayerAddress { state: NudState, lladdr: Vec<u8> },
}

impl fmt::Display for NeighbourProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoEntry => f.write_str("has no entry"),
            Self::State(state) => write!(f, "is {state}"),
            Self::BadLinkLayerAddress { state, lladdr } if lladdr.is_empty() => {
                write!(f, "is {state} but has no link-layer address")
            }
            Self::BadLinkLayerAddress { state, lladdr } => write!(
                f,
                "is {state} with link-layer address {}, not a unicast Ethernet MAC",
                fmt_lladdr(lladdr)
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no route to {addr}: {reason}")]
    NoRoute { addr: IpAddr, reason: NoRouteReason },
    #[error("neighbour {neighbour} on {ifname} {problem}{}", next_hop_for(.target, .neighbour))]
    NeighbourUnresolved {
        /// The address being resolved.
        target: IpAddr,
        /// The neighbour it is sent through: `target` itself or its gateway.
        neighbour: IpAddr,
        ifname: String,
        ifindex: u32,
        problem: NeighbourProblem,
    },
    #[error(
        "{addr} is routed out of {ifname} (ifindex {ifindex}), which is not Ethernet: {detail}"
    )]
    NotEthernet {
        addr: IpAddr,
        ifname: String,
        ifindex: u32,
        detail: String,
    },
    /// The kernel refused a request (`NLMSG_ERROR`), or answered something undecodable.
    #[error("netlink {request}: {source}")]
    Netlink {
        request: String,
        #[source]
        source: io::Error,
    },
    /// The socket itself failed.
    #[error("netlink socket: {op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
}

pub(super) fn next_hop_for(target: &IpAddr, neighbour: &IpAddr) -> String {
    if target == neighbour {
        String::new()
    } else {
        format!(" (next hop for {target})")
    }
}

pub(super) fn fmt_lladdr(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(super) fn io_error(op: impl Into<String>, source: io::Error) -> ResolveError {
    ResolveError::Io {
        op: op.into(),
        source,
    }
}

pub(super) fn protocol_error(request: &str, detail: impl fmt::Display) -> ResolveError {
    ResolveError::Netlink {
        request: request.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, detail.to_string()),
    }
}

/// `io::Error` is not `Clone`; one failed link lookup is reported for every address using it.
pub(super) fn copy_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}
