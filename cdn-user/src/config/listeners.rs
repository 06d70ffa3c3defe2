//! Where this node's controller listens for HTTP, as the configuration decides it.
//!
//! The *peer plane* (`/ready`, `/table/<service>`, `/digests`: the other members' health
//! checks, history syncs and drift comparisons) is served on this member's own `sync` address,
//! the one the other nodes are configured to reach it at. Metrics (`/metrics`) are served on
//! `[metrics] listen`. There is no separate key for the peer plane: `sync` already says where
//! the peers look, and a second key could only disagree with it.
//!
//! Configurations written before the split keep working: a node whose `sync` is its
//! `[metrics] listen` (the usual setup then), or that has no `sync` at all (steering-only
//! nodes, clusters without history sync), serves both on one listener. That listener still
//! reserves places for member addresses, so outsiders cannot starve the peers, but scrapers
//! and outsiders share the rest; `cdn-steer check` says so and what to change.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::Config;

/// The HTTP listeners of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listeners {
    /// The peer plane on this member's `sync` address, metrics on `[metrics] listen`.
    Separate {
        peer: SocketAddr,
        metrics: SocketAddr,
    },
    /// One listener, at `[metrics] listen`, for both.
    Shared { addr: SocketAddr, why: SharedWhy },
}

/// Why a node serves both planes on one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedWhy {
    /// This member's `sync` is `[metrics] listen`.
    SameAddress,
    /// This member has no `sync`.
    NoSync,
    /// A steering-only node: no member checks or syncs from it.
    SteerOnly,
}

impl Listeners {
    /// The address of the peer plane.
    pub fn peer(&self) -> SocketAddr {
        match *self {
            Listeners::Separate { peer, .. } => peer,
            Listeners::Shared { addr, .. } => addr,
        }
    }

    /// The address of the metrics listener.
    pub fn metrics(&self) -> SocketAddr {
        match *self {
            Listeners::Separate { metrics, .. } => metrics,
            Listeners::Shared { addr, .. } => addr,
        }
    }
}

impl fmt::Display for Listeners {
    /// One line per listener, for `cdn-steer check` and the start-up log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listeners::Separate { peer, metrics } => write!(
                f,
                "peer plane (/ready, /table, /digests) on {peer} (this member's sync address)\n\
                 metrics (/metrics) on {metrics} ([metrics] listen)"
            ),
            Listeners::Shared { addr, why } => {
                write!(
                    f,
                    "peer plane and metrics share one listener on {addr} ([metrics] listen): "
                )?;
                match why {
                    SharedWhy::SameAddress => write!(
                        f,
                        "this member's sync address is the same. Members keep reserved places, \
                         but scrapers share the rest with everyone else; to separate them, move \
                         [metrics] listen to another port (and keep sync, which the peers use)"
                    ),
                    SharedWhy::NoSync => write!(
                        f,
                        "this member has no sync address. To serve the peer plane on its own \
                         listener, give this member (on every node) a sync address on another \
                         port than [metrics] listen, and point HTTP health checks of /ready at it"
                    ),
                    SharedWhy::SteerOnly => {
                        write!(f, "a steering-only node has no peer plane of its own")
                    }
                }
            }
        }
    }
}

impl Config {
    /// This node's HTTP listeners; see the module documentation.
    pub fn listeners(&self) -> Listeners {
        let metrics = self.metrics.listen;
        let why = match self.self_member() {
            None => SharedWhy::SteerOnly,
            Some(member) => match member.sync {
                None => SharedWhy::NoSync,
                Some(peer) if peer == metrics => SharedWhy::SameAddress,
                Some(peer) => return Listeners::Separate { peer, metrics },
            },
        };
        Listeners::Shared { addr: metrics, why }
    }

    /// The addresses other members connect from: every member's underlay and `sync` address,
    /// and this node's own underlay addresses. Connections from them get the places reserved
    /// for members on the peer plane.
    pub fn member_addresses(&self) -> BTreeSet<IpAddr> {
        let members = self.cluster.members.iter();
        let underlays = members.clone().map(|m| m.underlay);
        let syncs = members.filter_map(|m| m.sync).map(|s| s.ip());
        let own = [
            self.node.underlay_v4.map(IpAddr::V4),
            self.node.underlay_v6.map(IpAddr::V6),
        ];
        underlays
            .chain(syncs)
            .chain(own.into_iter().flatten())
            .map(|ip| ip.to_canonical())
            .collect()
    }
}

/// Why two listeners of `listeners` could not both be bound, if they could not: the same port,
/// one of them on a wildcard address (which takes the port on every address).
pub(super) fn conflict(listeners: &Listeners) -> Option<String> {
    let Listeners::Separate { peer, metrics } = *listeners else {
        return None;
    };
    let wildcard = peer.ip().is_unspecified() || metrics.ip().is_unspecified();
    (peer.port() == metrics.port() && wildcard).then(|| {
        format!(
            "{metrics} and this member's sync address {peer} have the same port, one on a \
             wildcard address: both listeners cannot be bound. Give [metrics] listen another \
             port (the peer plane stays on sync), or set it to {peer} to serve both on one \
             listener"
        )
    })
}
