//! Per-CPU counters: one per verdict and reason. The program bumps exactly one *verdict* counter
//! for every packet it sees (so the verdict counters add up to the packets seen); the
//! *informational* counters (`FibLookup`, `FibMiss`) come on top of a verdict.

/// Index into the `COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Not addressed to a VIP or to our steering port: left to the kernel untouched.
    NonVipPass = 0,
    /// Client packet to a VIP whose first hop is this node and which this node accepts.
    LocalAccept,
    /// Client packet encapsulated and sent to another member.
    Forwarded,
    /// Steering packet accepted here as the owner, decapsulated and given to the local stack.
    OwnerAccept,
    /// Not ours (no socket, not a new connection): encapsulated to the next hop.
    PassedOn,
    /// Accepted because no hop was left to try.
    LastHopAccept,
    /// Truncated or malformed packet to a VIP or to the steering port: dropped.
    Malformed,
    /// Steering packet from an address that is not a member: dropped.
    Spoofed,
    /// IP fragment to a VIP: dropped (policy: a fragment cannot be steered per flow).
    Fragment,
    /// Informational: no usable neighbour entry, so the encapsulated packet was handed to the
    /// kernel to route (the verdict stays forwarded / passed on).
    FibMiss,
    /// Hop budget spent: dropped.
    LoopGuard,
    /// ICMP error about a VIP flow, sent to that flow's owner.
    IcmpForwarded,
    /// ICMP to a VIP answered by this node (echo and informational messages).
    IcmpLocal,
    /// TCP/UDP to a VIP on a port or protocol no service lists: dropped.
    PortMiss,
    /// IP protocol or extension-header chain the program does not steer, to a VIP: dropped.
    Unsupported,
    /// Steering header with an unknown version or impossible fields: dropped.
    BadEncap,
    /// Bucket or member missing (table not written yet, member without address): dropped.
    NoRoute,
    /// The encapsulated frame would exceed the underlay's maximum frame: dropped.
    TooBig,
    /// New TCP connection passed on because this node is draining.
    DrainPassOn,
    /// Informational: `bpf_fib_lookup` was needed because the next-hop cache had no fresh entry.
    FibLookup,
    /// The controller has not marked the configuration ready: passed untouched.
    NotReady,
    /// A new connection steered here although this node's own table names another owner: sent
    /// on to that owner instead of being accepted.
    SynRedirect,
}

impl Counter {
    pub const COUNT: u32 = 22;

    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::NonVipPass,
        Counter::LocalAccept,
        Counter::Forwarded,
        Counter::OwnerAccept,
        Counter::PassedOn,
        Counter::LastHopAccept,
        Counter::Malformed,
        Counter::Spoofed,
        Counter::Fragment,
        Counter::FibMiss,
        Counter::LoopGuard,
        Counter::IcmpForwarded,
        Counter::IcmpLocal,
        Counter::PortMiss,
        Counter::Unsupported,
        Counter::BadEncap,
        Counter::NoRoute,
        Counter::TooBig,
        Counter::DrainPassOn,
        Counter::FibLookup,
        Counter::NotReady,
        Counter::SynRedirect,
    ];

    /// Snake-case name, used as the `reason` label in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::NonVipPass => "non_vip_pass",
            Counter::LocalAccept => "local_accept",
            Counter::Forwarded => "forwarded",
            Counter::OwnerAccept => "owner_accept",
            Counter::PassedOn => "passed_on",
            Counter::LastHopAccept => "last_hop_accept",
            Counter::Malformed => "malformed",
            Counter::Spoofed => "spoofed",
            Counter::Fragment => "fragment",
            Counter::FibMiss => "fib_miss",
            Counter::LoopGuard => "loop_guard",
            Counter::IcmpForwarded => "icmp_forwarded",
            Counter::IcmpLocal => "icmp_local",
            Counter::PortMiss => "port_miss",
            Counter::Unsupported => "unsupported",
            Counter::BadEncap => "bad_encap",
            Counter::NoRoute => "no_route",
            Counter::TooBig => "too_big",
            Counter::DrainPassOn => "drain_pass_on",
            Counter::FibLookup => "fib_lookup",
            Counter::NotReady => "not_ready",
            Counter::SynRedirect => "syn_redirect",
        }
    }

    /// Verdict counters add up to the packets seen; informational ones come on top.
    pub const fn is_verdict(self) -> bool {
        !matches!(self, Counter::FibLookup | Counter::FibMiss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_counter_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "{}", c.name());
        }
    }
}
