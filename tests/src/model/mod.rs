//! An independent reference model of the XDP program, for the differential test
//! (`tests/tests/differential.rs`, `cdn-difftest`): from a frame, the node's state and the
//! interface the frame came in on, the verdict (action, reason, informational reasons) and the
//! exact frame the program must leave behind.
//!
//! Written from the README and the data-plane rules, not from the program's code: [`frame`]
//! reads headers, [`steer`] takes the steering decision, [`output`] builds the expected
//! frames (with etherparse's header writers) and [`auth`] the steering MAC. The flow hash is
//! SipHash-1-3 from the `siphasher` crate over the message `cdn_common::hash` documents.
//!
//! The steering-trust rules of issue #12 are in the model already; [`PROGRAM_RULES`] says
//! which of them the program under test implements.

pub mod auth;
pub mod frame;
pub mod output;
pub mod quic;
pub mod search;
pub mod steer;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
};

use cdn_common::{
    counters::{Action, Reason},
    maps::{Bucket, NodeConfig, Service},
};

/// Which rules the program implements. The model implements all of them; the differential
/// test checks the program against the ones switched on here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// VLAN tags walked before giving up on a frame as "not IP".
    pub max_vlan_tags: usize,
    /// Steering packets accepted only on underlay interfaces (spec §1).
    pub underlay_ifaces: bool,
    /// Inner packets get the service and port checks of direct ones (spec §2).
    pub inner_checks: bool,
    /// The header's hop budget is capped at the local one (spec §3).
    pub hop_cap: bool,
    /// Redirected SYNs are marked and never redirected again (spec §4).
    pub syn_mark: bool,
    /// Steering header version 2 with a MAC; `steer_auth` (spec §5).
    pub mac: bool,
}

impl Rules {
    /// The program before the steering-trust work (issue #12).
    pub const BEFORE_TRUST: Rules = Rules {
        max_vlan_tags: 2,
        underlay_ifaces: false,
        inner_checks: false,
        hop_cap: false,
        syn_mark: false,
        mac: false,
    };
    /// Every rule of `/work/notes/steer_trust_spec.md` (README "Steering trust").
    pub const TRUST: Rules = Rules {
        underlay_ifaces: true,
        inner_checks: true,
        hop_cap: true,
        syn_mark: true,
        mac: true,
        ..Rules::BEFORE_TRUST
    };
}

impl Rules {
    /// `before-trust`, `trust`, or a comma-separated list of rules added to `before-trust`
    /// (`underlay_ifaces,inner_checks,hop_cap,syn_mark,mac`).
    pub fn parse(s: &str) -> Option<Rules> {
        match s {
            "before-trust" => return Some(Rules::BEFORE_TRUST),
            "trust" => return Some(Rules::TRUST),
            _ => {}
        }
        let mut r = Rules::BEFORE_TRUST;
        for name in s.split(',') {
            match name.trim() {
                "underlay_ifaces" => r.underlay_ifaces = true,
                "inner_checks" => r.inner_checks = true,
                "hop_cap" => r.hop_cap = true,
                "syn_mark" => r.syn_mark = true,
                "mac" => r.mac = true,
                _ => return None,
            }
        }
        Some(r)
    }
}

/// THE switch: the rules of the program this crate is built against. The data plane
/// implements every steering-trust rule (README "Steering trust"), and
/// `difftest::world::write_config` writes their settings; [`Rules::BEFORE_TRUST`] (or a
/// subset, `cdn-difftest --rules`) still describes the program before that work.
pub const PROGRAM_RULES: Rules = Rules::TRUST;

/// A cached next hop as the model sees it.
#[derive(Clone, Copy, Debug)]
pub struct Hop {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ifindex: u32,
    /// Not expired. A stale (or missing) entry makes the program ask the FIB, which in the
    /// test's namespace has no route to any member: the frame goes to the kernel.
    pub fresh: bool,
}

/// A connection tuple as a socket lookup sees it: (remote addr, remote port, local addr,
/// local port), i.e. (client, client port, VIP, VIP port) for the server's end.
pub type Tuple = (IpAddr, u16, IpAddr, u16);

/// Everything the program's maps and the namespace's sockets hold, as the test wrote them.
#[derive(Clone, Debug)]
pub struct Env {
    pub cfg: NodeConfig,
    /// VIP prefixes (longest match wins).
    pub services: Vec<(IpAddr, u8, Service)>,
    /// The whole `TABLE` map.
    pub table: Vec<Bucket>,
    /// Member ids with an underlay address.
    pub members: BTreeMap<u16, IpAddr>,
    pub next_hops: BTreeMap<u16, Hop>,
    /// Established TCP sockets (both ends of every connection). Listeners never prove
    /// ownership (a SYN cookie would, and no SYN queue overflowed).
    pub tcp_established: HashSet<Tuple>,
    /// Connected UDP sockets (both ends). Unconnected ones never prove ownership.
    pub udp_connected: HashSet<Tuple>,
    /// Spec §1: interfaces steering packets are accepted on; empty: all.
    pub underlay_ifindexes: Vec<u32>,
    /// Spec §5: this node requires (and sends) authenticated headers.
    pub steer_auth: bool,
    /// Spec §5: (k0, k1) derived from the hash key.
    pub auth_key: [u64; 2],
    /// `QUIC_SERVERS`: QUIC-LB server ID -> member, the entries that are set.
    pub quic_servers: BTreeMap<u32, u16>,
    /// `LEARNED`: (client, VIP, client port, VIP port, protocol) -> member (README "PoPs:
    /// learned owners").
    pub learned: BTreeMap<LearnedKey, u16>,
    /// `LEARNED_BUCKETS`: the bucket indexes whose bit is set.
    pub learned_buckets: BTreeSet<u32>,
}

/// A flow as `LEARNED` keys it: client address, VIP, client port, VIP port, protocol.
pub type LearnedKey = (IpAddr, IpAddr, u16, u16, u8);

/// A verdict's reason: one of the program's, or one the steering-trust rules add (spec §6)
/// that `cdn_common::counters::Reason` does not have yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Why {
    Is(Reason),
    New(&'static str),
}

impl Why {
    pub const NOT_UNDERLAY: Why = Why::Is(Reason::NotUnderlay);
    pub const AUTH_FAILED: Why = Why::Is(Reason::AuthFailed);
    pub const REDIRECTED_SYN_ACCEPT: Why = Why::Is(Reason::RedirectedSynAccept);

    /// The metric name.
    pub fn name(self) -> &'static str {
        match self {
            Why::Is(r) => r.name(),
            Why::New(name) => name,
        }
    }
}

impl From<Reason> for Why {
    fn from(r: Reason) -> Self {
        Why::Is(r)
    }
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the program must leave in the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    /// The input, untouched.
    Unchanged,
    /// Exactly these bytes.
    Frame(Vec<u8>),
    /// Dropped: the buffer does not matter.
    Dropped,
}

/// The model's verdict on one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub action: Action,
    pub reason: Why,
    /// Informational reasons counted on top (with `action`).
    pub info: Vec<Reason>,
    pub out: Out,
}

impl Expect {
    pub fn pass(reason: impl Into<Why>) -> Self {
        Self {
            action: Action::Pass,
            reason: reason.into(),
            info: Vec::new(),
            out: Out::Unchanged,
        }
    }

    pub fn drop(reason: impl Into<Why>) -> Self {
        Self {
            action: Action::Drop,
            reason: reason.into(),
            info: Vec::new(),
            out: Out::Dropped,
        }
    }
}

/// The model's verdict on `frame`, arriving on `ifindex`, under `rules`.
pub fn expect(env: &Env, rules: &Rules, frame: &[u8], ifindex: u32) -> Expect {
    steer::decide(env, rules, frame, ifindex)
}
