//! The data plane's per-CPU counters, declared once.
//!
//! Every packet the XDP program sees gets exactly one *verdict*: the [`Action`] it returns (what
//! happens to the packet) and the [`Reason`] that led there (why). The program counts the
//! verdict in the `COUNTERS` per-CPU array at the slot of the (reason, action) pair, so the
//! verdict counters add up to the packets seen and each one says both why and what. A few
//! *informational* reasons (`fib_lookup`, `fib_miss`) are counted on top of the verdict, with
//! the action of the same packet.
//!
//! [`reasons!`] declares every reason once (variant, metric name, kind, the actions it can come
//! with, documentation); the enum, its list, names and kinds are generated from that one table.

/// What the program does with a packet: the XDP action it returns. The discriminants are the
/// kernel's `enum xdp_action` values.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Program error (e.g. a redirect the kernel refused); the kernel drops the packet and
    /// fires the `xdp_exception` tracepoint.
    Aborted = 0,
    Drop = 1,
    /// Handed to the kernel's stack.
    Pass = 2,
    /// Sent back out of the interface it came in on.
    Tx = 3,
    /// Sent out of another interface.
    Redirect = 4,
}

impl Action {
    pub const COUNT: u32 = 5;

    pub const ALL: [Action; Self::COUNT as usize] = [
        Action::Aborted,
        Action::Drop,
        Action::Pass,
        Action::Tx,
        Action::Redirect,
    ];

    /// The action of an XDP return code; anything the kernel does not know is `Aborted`, which
    /// is also how the kernel treats it.
    #[inline(always)]
    pub const fn from_xdp(code: u32) -> Self {
        match code {
            1 => Action::Drop,
            2 => Action::Pass,
            3 => Action::Tx,
            4 => Action::Redirect,
            _ => Action::Aborted,
        }
    }

    /// Lower-case name, used as the `action` label in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Aborted => "aborted",
            Action::Drop => "drop",
            Action::Pass => "pass",
            Action::Tx => "tx",
            Action::Redirect => "redirect",
        }
    }

    /// Bit of this action in a set of actions (see [`Reason::actions`]).
    pub const fn bit(self) -> u8 {
        1 << self as u32
    }
}

/// Whether a reason is a packet's verdict or an event counted on top of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Exactly one verdict counter moves per packet.
    Verdict,
    /// Counted in addition to the packet's verdict.
    Info,
}

impl Kind {
    /// The `kind` label in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Verdict => "verdict",
            Kind::Info => "info",
        }
    }
}

/// Declares the reasons: `Variant = "metric_name", kind, [actions it comes with];` each with
/// its documentation. Discriminants follow the order of declaration: add new reasons at the
/// end, since the controller and the program of one build agree on them, but a pinned map
/// outlives neither.
macro_rules! reasons {
    ($(
        $(#[doc = $doc:literal])+
        $variant:ident = $name:literal, $kind:ident, [$($action:ident)|+];
    )+) => {
        /// Why the program did what it did with a packet (the `reason` label in metrics).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl Reason {
            /// Every reason, in index order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)+];

            /// Number of reasons.
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Snake-case name, used as the `reason` label in metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)+
                }
            }

            /// Verdict or informational.
            pub const fn kind(self) -> Kind {
                match self {
                    $(Reason::$variant => Kind::$kind,)+
                }
            }

            /// The actions this reason can come with, as a set of [`Action::bit`]s.
            pub const fn actions(self) -> u8 {
                match self {
                    $(Reason::$variant => 0 $(| Action::$action.bit())+,)+
                }
            }
        }
    };
}

reasons! {
    /// Not addressed to a VIP or to our steering port: left to the kernel untouched.
    NonVipPass = "non_vip_pass", Verdict, [Pass];
    /// Client packet to a VIP whose first hop is this node and which this node accepts.
    LocalAccept = "local_accept", Verdict, [Pass];
    /// Client packet encapsulated and sent to another member (pass: handed to the kernel to
    /// route, see fib_miss; aborted: the kernel refused the redirect).
    Forwarded = "forwarded", Verdict, [Tx | Redirect | Pass | Aborted];
    /// Steering packet accepted here as the owner, decapsulated and given to the local stack.
    OwnerAccept = "owner_accept", Verdict, [Pass];
    /// Not ours (no socket, not a new connection): encapsulated to the next hop.
    PassedOn = "passed_on", Verdict, [Tx | Redirect | Pass | Aborted];
    /// Accepted because no hop was left to try.
    LastHopAccept = "last_hop_accept", Verdict, [Pass];
    /// Truncated or malformed packet to a VIP or to the steering port: dropped.
    Malformed = "malformed", Verdict, [Drop];
    /// Steering packet from an address that is not a member: dropped.
    Spoofed = "spoofed", Verdict, [Drop];
    /// IP fragment to a VIP: dropped (policy: a fragment cannot be steered per flow).
    Fragment = "fragment", Verdict, [Drop];
    /// Informational: no usable neighbour entry, so the encapsulated packet was handed to the
    /// kernel to route (the verdict stays forwarded, passed on... with action pass).
    FibMiss = "fib_miss", Info, [Pass];
    /// Hop budget spent: dropped.
    LoopGuard = "loop_guard", Verdict, [Drop];
    /// ICMP error about a VIP flow, sent to that flow's owner.
    IcmpForwarded = "icmp_forwarded", Verdict, [Tx | Redirect | Pass | Aborted];
    /// ICMP to a VIP answered by this node (echo and informational messages).
    IcmpLocal = "icmp_local", Verdict, [Pass];
    /// TCP/UDP to a VIP on a port or protocol no service lists: dropped.
    PortMiss = "port_miss", Verdict, [Drop];
    /// IP protocol or extension-header chain the program does not steer, to a VIP: dropped.
    Unsupported = "unsupported", Verdict, [Drop];
    /// Steering header with an unknown version or impossible fields: dropped.
    BadEncap = "bad_encap", Verdict, [Drop];
    /// Bucket or member missing (table not written yet, member without address): dropped.
    NoRoute = "no_route", Verdict, [Drop];
    /// The encapsulated frame would exceed the underlay's maximum frame: dropped.
    TooBig = "too_big", Verdict, [Drop];
    /// New TCP connection passed on because this node is draining.
    DrainPassOn = "drain_pass_on", Verdict, [Tx | Redirect | Pass | Aborted];
    /// Informational: `bpf_fib_lookup` was needed because the next-hop cache had no fresh entry.
    FibLookup = "fib_lookup", Info, [Tx | Redirect | Pass | Aborted];
    /// The controller has not marked the configuration ready (or there is no configuration
    /// entry at all): passed untouched.
    NotReady = "not_ready", Verdict, [Pass];
    /// A new connection steered here although this node's own table names another owner: sent
    /// on to that owner instead of being accepted.
    SynRedirect = "syn_redirect", Verdict, [Tx | Redirect | Pass | Aborted];
    /// The frame could not be grown or trimmed for the encapsulation (the driver left too
    /// little headroom): dropped.
    EncapFailed = "encap_failed", Verdict, [Drop];
    /// UDP to a service in `local` placement: accepted by the node it lands on, never steered.
    /// Also a steering packet carrying such a flow (sent while tables or configurations
    /// disagree, e.g. during a rollout): decapsulated and accepted, never passed on.
    UdpLocalAccept = "udp_local_accept", Verdict, [Pass];
    /// UDP to a service in `owner` placement, accepted here as the flow's current owner
    /// (`hops[0]`) without a socket check: at ingress untouched, or decapsulated from the
    /// steering packet another node sent. Never passed on.
    UdpOwnerAccept = "udp_owner_accept", Verdict, [Pass];
    /// Steering packet that arrived on an interface not listed in `[node]
    /// underlay_interfaces`: dropped.
    NotUnderlay = "not_underlay", Verdict, [Drop];
    /// Steering header without a valid MAC: a version-2 header whose MAC does not verify, or
    /// a version-1 header on a node with `steer_auth`: dropped.
    AuthFailed = "auth_failed", Verdict, [Drop];
    /// A new connection another node redirected here (marked `STEER_SYN_REDIRECTED`):
    /// decapsulated and accepted, never redirected again.
    RedirectedSynAccept = "redirected_syn_accept", Verdict, [Pass];
    /// QUIC packet whose destination connection ID names another member's server ID: sent
    /// straight to that member.
    QuicCidForwarded = "quic_cid_forwarded", Verdict, [Tx | Redirect | Pass | Aborted];
    /// QUIC packet whose destination connection ID names this member: accepted (at ingress
    /// untouched, or decapsulated from the steering packet another node sent).
    QuicCidAccept = "quic_cid_accept", Verdict, [Pass];
    /// QUIC packet without a routable connection ID (a client's first flight, another config
    /// id, an unknown server ID): sent by flow hash to its bucket's current owner.
    QuicHashForwarded = "quic_hash_forwarded", Verdict, [Tx | Redirect | Pass | Aborted];
    /// QUIC packet without a routable connection ID, accepted here as its bucket's current
    /// owner (at ingress untouched, or decapsulated).
    QuicHashAccept = "quic_hash_accept", Verdict, [Pass];
    /// Informational: a connection ID of our config id whose server ID no member has; the
    /// packet is placed by flow hash.
    QuicUnknownServer = "quic_unknown_server", Info, [Tx | Redirect | Pass | Aborted];
    /// QUIC packet too short for the header it announces (short header: the configured CID
    /// length; long header: its DCID length field): dropped.
    QuicTruncated = "quic_truncated", Verdict, [Drop];
    /// QUIC long header a client never sends to a server (Version Negotiation, Retry), or a
    /// version-1 header whose DCID length exceeds 20: dropped.
    QuicInvalid = "quic_invalid", Verdict, [Drop];
    /// Not a new connection, and no member of this node's PoP holds it (the PoP's hop chain is
    /// done): sent to the current owner of the first other PoP, to search for it there
    /// (steering header version 3). A cross-PoP forward.
    SearchStart = "search_start", Verdict, [Tx | Redirect | Pass | Aborted];
    /// A search that this node does not hold: passed on along this PoP's hop chain, or to the
    /// owner of the next PoP left.
    SearchPassOn = "search_pass_on", Verdict, [Tx | Redirect | Pass | Aborted];
    /// A search that this node holds: decapsulated and accepted.
    SearchAccept = "search_accept", Verdict, [Pass];
    /// A search that no PoP held: accepted by its last hop, whose stack answers a stray
    /// segment with a reset (README "PoPs").
    SearchExhausted = "search_exhausted", Verdict, [Pass];
    /// A client packet of a flow a claim taught this node (`LEARNED`): sent straight to the
    /// member that holds it, in another PoP, without a search.
    LearnedForward = "learned_forward", Verdict, [Tx | Redirect | Pass | Aborted];
    /// Informational: a search accepted here could not be reported to the controller (the
    /// claim ring was full), so no claim teaches its PoP this time.
    ClaimLost = "claim_lost", Info, [Pass];
}

impl Reason {
    /// Number of informational reasons.
    pub const INFO_COUNT: usize = {
        let mut n = 0;
        let mut i = 0;
        while i < Self::ALL.len() {
            if !Self::ALL[i].is_verdict() {
                n += 1;
            }
            i += 1;
        }
        n
    };

    /// The informational reasons, in index order.
    pub const INFO: [Reason; Self::INFO_COUNT] = {
        let mut out = [Reason::NonVipPass; Self::INFO_COUNT];
        let (mut i, mut n) = (0, 0);
        while i < Self::ALL.len() {
            if !Self::ALL[i].is_verdict() {
                out[n] = Self::ALL[i];
                n += 1;
            }
            i += 1;
        }
        out
    };

    /// Position of an informational reason in [`Reason::INFO`] (the program keeps them as one
    /// bit each); [`Reason::INFO_COUNT`] for a verdict reason.
    pub const fn info_index(self) -> u32 {
        let mut i = 0;
        while i < Self::INFO_COUNT {
            if Self::INFO[i] as u32 == self as u32 {
                return i as u32;
            }
            i += 1;
        }
        Self::INFO_COUNT as u32
    }

    /// Verdict counters add up to the packets seen; informational ones come on top.
    pub const fn is_verdict(self) -> bool {
        matches!(self.kind(), Kind::Verdict)
    }

    /// Whether the program may count this reason with `action`.
    pub const fn allows(self, action: Action) -> bool {
        self.actions() & action.bit() != 0
    }
}

/// Slots of the `COUNTERS` array: one per (reason, action) pair.
pub const COUNTER_SLOTS: u32 = Reason::COUNT * Action::COUNT;

/// Slot of the (reason, action) counter in the `COUNTERS` array.
#[inline(always)]
pub const fn counter_slot(reason: Reason, action: Action) -> u32 {
    reason as u32 * Action::COUNT + action as u32
}

/// Every counter of the data plane, summed over CPUs: what the controller reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketCounts {
    /// Indexed by [`counter_slot`].
    pub slots: [u64; COUNTER_SLOTS as usize],
}

impl Default for PacketCounts {
    fn default() -> Self {
        Self {
            slots: [0; COUNTER_SLOTS as usize],
        }
    }
}

impl PacketCounts {
    pub const fn get(&self, reason: Reason, action: Action) -> u64 {
        self.slots[counter_slot(reason, action) as usize]
    }

    pub fn set(&mut self, reason: Reason, action: Action, value: u64) {
        self.slots[counter_slot(reason, action) as usize] = value;
    }

    /// The reason's packets, whatever the action.
    pub fn reason_total(&self, reason: Reason) -> u64 {
        Action::ALL.iter().map(|&a| self.get(reason, a)).sum()
    }

    /// Every (reason, action) pair the program can count (see [`Reason::allows`]), plus any
    /// other pair that is non-zero (a pair the declaration missed must still show), in slot
    /// order, with its count.
    pub fn series(&self) -> impl Iterator<Item = (Reason, Action, u64)> + '_ {
        Reason::ALL.iter().flat_map(move |&r| {
            Action::ALL.iter().filter_map(move |&a| {
                let n = self.get(r, a);
                (r.allows(a) || n != 0).then_some((r, a, n))
            })
        })
    }

    /// The pairs whose count differs from `before`'s, with how much they grew (wrapping).
    pub fn moved_since<'a>(
        &'a self,
        before: &'a PacketCounts,
    ) -> impl Iterator<Item = (Reason, Action, u64)> + 'a {
        Reason::ALL.iter().flat_map(move |&r| {
            Action::ALL.iter().filter_map(move |&a| {
                let delta = self.get(r, a).wrapping_sub(before.get(r, a));
                (delta != 0).then_some((r, a, delta))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_in_index_order() {
        assert_eq!(Reason::ALL.len() as u32, Reason::COUNT);
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{}", r.name());
        }
        for (i, a) in Action::ALL.iter().enumerate() {
            assert_eq!(*a as u32, i as u32, "{}", a.name());
            assert_eq!(Action::from_xdp(i as u32), *a);
        }
        assert_eq!(Action::from_xdp(Action::COUNT), Action::Aborted);
    }

    #[test]
    fn slots_are_distinct_and_cover_the_array() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for &r in Reason::ALL {
            for a in Action::ALL {
                let slot = counter_slot(r, a) as usize;
                assert!(!seen[slot], "{} {}", r.name(), a.name());
                seen[slot] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn names_are_unique_snake_case_and_every_reason_has_an_action() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            let name = r.name();
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(Reason::ALL[..i].iter().all(|o| o.name() != name), "{name}");
            assert_ne!(r.actions(), 0, "{name}");
        }
        // Only these come on top of a verdict.
        assert_eq!(
            Reason::INFO,
            [
                Reason::FibMiss,
                Reason::FibLookup,
                Reason::QuicUnknownServer,
                Reason::ClaimLost
            ]
        );
        assert_eq!(Reason::QuicUnknownServer.info_index(), 2);
        assert_eq!(Reason::ClaimLost.info_index(), 3);
        for &r in Reason::ALL {
            assert_eq!(r.is_verdict(), !Reason::INFO.contains(&r), "{}", r.name());
        }
        // Drops say why; nothing that drops passes too.
        assert!(Reason::Malformed.allows(Action::Drop));
        assert!(!Reason::NotReady.allows(Action::Drop));
    }

    #[test]
    fn series_show_declared_pairs_and_any_other_non_zero_one() {
        let mut c = PacketCounts::default();
        c.set(Reason::Forwarded, Action::Tx, 5);
        c.set(Reason::Malformed, Action::Pass, 1);
        let series: [(Reason, Action, u64); 4] = [
            (Reason::Forwarded, Action::Aborted, 0),
            (Reason::Forwarded, Action::Pass, 0),
            (Reason::Forwarded, Action::Tx, 5),
            (Reason::Forwarded, Action::Redirect, 0),
        ];
        let got: [(Reason, Action, u64); 4] = {
            let mut it = c.series().filter(|(r, _, _)| *r == Reason::Forwarded);
            core::array::from_fn(|_| it.next().expect("four forwarded series"))
        };
        assert_eq!(got, series);
        assert!(
            c.series()
                .any(|s| s == (Reason::Malformed, Action::Pass, 1)),
            "an undeclared non-zero pair still shows"
        );
        assert!(!c.series().any(|s| s == (Reason::Malformed, Action::Tx, 0)));
        assert_eq!(c.reason_total(Reason::Forwarded), 5);

        let before = c;
        c.set(Reason::Forwarded, Action::Tx, 7);
        let mut moved = c.moved_since(&before);
        assert_eq!(moved.next(), Some((Reason::Forwarded, Action::Tx, 2)));
        assert_eq!(moved.next(), None);
    }
}
