//! Next hops of cluster members, resolved from the kernel's routing and neighbour tables over
//! rtnetlink.
//!
//! The data plane forwards encapsulated packets to members without a `bpf_fib_lookup` per
//! packet: the controller writes, per member, the egress interface and the two Ethernet
//! addresses to put on the frame. This module finds them the way the kernel itself would
//! forward: one `RTM_GETROUTE` per member (the kernel's own route choice, the same as
//! `ip route get`, multipath resolution included), one neighbour dump for the whole set, and the
//! MAC of each egress interface. A member whose neighbour is not resolved is reported as an
//! error rather than guessed at: the data plane then falls back to `bpf_fib_lookup` / the
//! kernel, which also triggers the ARP/ND resolution that a later refresh picks up.
//!
//! Synchronous on purpose: it runs about once a second from a blocking task and the kernel
//! answers these requests from memory, so a plain blocking socket is the simplest correct
//! client. A receive timeout bounds the wait should the kernel ever not answer.

mod error;
mod messages;

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    io,
    net::IpAddr,
    time::Duration,
};

use log::{debug, warn};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_MULTIPART, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_NOOP, NLMSG_OVERRUN, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
    neighbour::NeighbourMessage,
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The longest wait for one answer from the kernel. It answers these requests from memory in
/// microseconds; the timeout only keeps a bug from hanging the blocking task forever.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Starting size of the receive buffer. The kernel sizes dump datagrams after the largest
/// buffer the reader offers (up to a cap of a few tens of KiB), so a roomy buffer means fewer
/// datagrams for a large neighbour table. Each datagram's size is peeked before it is read,
/// so a larger one grows the buffer instead of being truncated.
const RECV_BUF: usize = 64 * 1024;

/// How often a neighbour dump that the kernel marks as interrupted (`NLM_F_DUMP_INTR`: the
/// table changed while it was being dumped, so entries may be missing) is taken again.
const DUMP_ATTEMPTS: usize = 3;

/// Length of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;

/// Neighbour states whose link-layer address may be used to send (the kernel itself sends to
/// STALE/DELAY/PROBE entries while it re-confirms them).
const NUD_USABLE: u16 = libc::NUD_REACHABLE
    | libc::NUD_STALE
    | libc::NUD_DELAY
    | libc::NUD_PROBE
    | libc::NUD_PERMANENT
    | libc::NUD_NOARP;

pub use error::{NeighbourProblem, NoRouteReason, NudState, Resolution, ResolveError, Resolved};
use error::{io_error, protocol_error};
use messages::*;

/// How one request/answer exchange went, when the kernel did not refuse it.
#[derive(Debug, Default)]
struct Answer {
    /// A dump the kernel marked `NLM_F_DUMP_INTR`.
    interrupted: bool,
    datagrams: usize,
    /// Messages that `netlink-packet-route` could not decode (skipped).
    undecodable: usize,
}

/// Resolves members' next hops; one per controller, reused every refresh.
pub struct Resolver {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// An exchange was abandoned half-way (I/O error, timeout, malformed answer). What is left
    /// of its answer, possibly a dump the kernel is still producing, is drained before the next
    /// request: its messages would otherwise be read in place of the new answer (they are also
    /// recognised by their sequence number), and a new dump would be refused with `EBUSY`.
    unfinished: bool,
    /// Datagrams the last neighbour dump took (the tests check multi-part dumps with it).
    neighbour_datagrams: usize,
}

impl Resolver {
    /// Opens a `NETLINK_ROUTE` socket in the calling thread's network namespace; every later
    /// lookup sees that namespace, whichever thread calls [`Resolver::resolve`].
    pub fn new() -> Result<Self, ResolveError> {
        let mut socket =
            Socket::new(NETLINK_ROUTE).map_err(|e| io_error("opening NETLINK_ROUTE", e))?;
        socket.bind_auto().map_err(|e| io_error("binding", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| io_error("connecting to the kernel", e))?;
        set_recv_timeout(&socket, RECV_TIMEOUT).map_err(|e| io_error("setting SO_RCVTIMEO", e))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
            unfinished: false,
            neighbour_datagrams: 0,
        })
    }

    /// Resolves each address: one route lookup per address (the route the kernel would use,
    /// like `ip route get`), one neighbour dump, and one link lookup per egress interface.
    ///
    /// Per-address problems (no route, unresolved neighbour, non-Ethernet egress) come back
    /// next to their address, in input order; the outer error is for failures that affect the
    /// whole call (the socket, the neighbour dump).
    pub fn resolve(&mut self, addrs: &[IpAddr]) -> Result<Vec<Resolution>, ResolveError> {
        let mut routes = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            routes.push(self.route_get(addr)?);
        }

        let wanted: HashSet<(u32, IpAddr)> = routes
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| (r.oif, r.neighbour))
            .collect();
        let mut links = HashMap::new();
        for &(oif, _) in &wanted {
            if let Entry::Vacant(slot) = links.entry(oif) {
                slot.insert(self.link_get(oif)?);
            }
        }
        // Taken last, so the neighbour states are the freshest data of the call.
        let neighbours = if wanted.is_empty() {
            HashMap::new()
        } else {
            self.neighbours(&wanted)?
        };

        let results: Vec<_> = addrs
            .iter()
            .zip(routes)
            .map(|(&addr, route)| {
                let resolved = route.and_then(|r| next_hop(addr, &r, &links, &neighbours));
                (addr, resolved)
            })
            .collect();
        debug!(
            "resolved {} of {} next hops ({} neighbour dump datagrams)",
            results.iter().filter(|(_, r)| r.is_ok()).count(),
            results.len(),
            self.neighbour_datagrams
        );
        Ok(results)
    }

    /// `RTM_GETROUTE` for one address. The outer error is a socket failure; the inner one
    /// this address's answer.
    fn route_get(&mut self, addr: IpAddr) -> Result<Result<Route, ResolveError>, ResolveError> {
        let mut msg = RouteMessage::default();
        let (family, prefix_len) = match addr {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = prefix_len;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        let what = format!("RTM_GETROUTE {addr}");
        let mut reply = None;
        // No NLM_F_DUMP: the kernel runs a lookup (selecting one path of a multipath route)
        // and answers with the single route it would use.
        let answer = self.exchange(&what, 0, RouteNetlinkMessage::GetRoute(msg), |m| {
            if let RouteNetlinkMessage::NewRoute(route) = m {
                reply.get_or_insert(route);
            }
        })?;
        Ok(match (answer, reply) {
            (Err(e), _) => Err(route_refused(addr, &what, e)),
            (Ok(_), Some(route)) => route_from_reply(addr, &route),
            (Ok(answer), None) => Err(protocol_error(
                &what,
                format!(
                    "the answer holds no decodable route ({} undecodable messages)",
                    answer.undecodable
                ),
            )),
        })
    }

    /// `RTM_GETLINK` for one interface. The inner error is the kernel's refusal (e.g. the
    /// interface vanished since the route lookup), reported with each address using it.
    fn link_get(&mut self, ifindex: u32) -> Result<Result<Link, io::Error>, ResolveError> {
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        let what = format!("RTM_GETLINK ifindex {ifindex}");
        let mut reply = None;
        let answer = self.exchange(&what, 0, RouteNetlinkMessage::GetLink(msg), |m| {
            if let RouteNetlinkMessage::NewLink(link) = m {
                reply.get_or_insert(link);
            }
        })?;
        Ok(match (answer, reply) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(link)) => {
                let mut name = None;
                let mut address = Vec::new();
                for attr in link.attributes {
                    match attr {
                        LinkAttribute::IfName(n) => name = Some(n),
                        LinkAttribute::Address(a) => address = a,
                        _ => {}
                    }
                }
                Ok(Link {
                    name: name.unwrap_or_else(|| format!("ifindex {ifindex}")),
                    link_type: link.header.link_layer_type,
                    address,
                })
            }
            (Ok(_), None) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the answer holds no decodable link",
            )),
        })
    }

    /// One neighbour dump (all families), keeping only the entries in `wanted` so that a large
    /// table costs time but not memory.
    fn neighbours(
        &mut self,
        wanted: &HashSet<(u32, IpAddr)>,
    ) -> Result<HashMap<(u32, IpAddr), Neighbour>, ResolveError> {
        const WHAT: &str = "RTM_GETNEIGH dump";
        let mut attempt = 1;
        loop {
            let mut found = HashMap::new();
            let mut msg = NeighbourMessage::default();
            msg.header.family = AddressFamily::Unspec;
            let answer = self
                .exchange(
                    WHAT,
                    NLM_F_DUMP,
                    RouteNetlinkMessage::GetNeighbour(msg),
                    |m| {
                        if let RouteNetlinkMessage::NewNeighbour(n) = m
                            && let Some((key, entry)) = neighbour_entry(n)
                            && wanted.contains(&key)
                        {
                            found.insert(key, entry);
                        }
                    },
                )?
                .map_err(|source| ResolveError::Netlink {
                    request: WHAT.to_owned(),
                    source,
                })?;
            self.neighbour_datagrams = answer.datagrams;
            if answer.undecodable > 0 {
                warn!(
                    "{WHAT}: skipped {} entries that could not be decoded",
                    answer.undecodable
                );
            }
            if !answer.interrupted {
                return Ok(found);
            }
            if attempt == DUMP_ATTEMPTS {
                // Still better than nothing: entries missing from it only fall back to the
                // kernel path until the next refresh.
                warn!("{WHAT}: interrupted by table changes {attempt} times; using the last one");
                return Ok(found);
            }
            debug!("{WHAT}: interrupted by a table change; taking it again");
            attempt += 1;
        }
    }

    /// Sends one request and reads its whole answer, handing each decoded message to
    /// `on_message`. A dump's answer ends with `NLMSG_DONE`; a plain request's is one message
    /// (or a multi-part one ending with `NLMSG_DONE`); either ends early with `NLMSG_ERROR`.
    ///
    /// The outer error means the socket or the framing failed; the inner one is the kernel's
    /// refusal of this request (errno from `NLMSG_ERROR`, or from `NLMSG_DONE` of a dump).
    fn exchange(
        &mut self,
        what: &str,
        flags: u16,
        request: RouteNetlinkMessage,
        mut on_message: impl FnMut(RouteNetlinkMessage),
    ) -> Result<Result<Answer, io::Error>, ResolveError> {
        if self.unfinished {
            self.drain();
        }
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(request));
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);

        // Cleared only once the whole answer has been read.
        self.unfinished = true;
        self.socket
            .send(&out, 0)
            .map_err(|e| io_error(format!("sending {what}"), e))?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answer = Answer::default();
        loop {
            let len = self.recv_datagram(what)?;
            answer.datagrams += 1;
            let mut offset = 0;
            while offset < len {
                let data = &self.buf[offset..len];
                let nl = NetlinkBuffer::new_checked(data).map_err(|e| protocol_error(what, e))?;
                let msg_len = nl.length() as usize;
                let (msg_type, msg_flags, msg_seq) =
                    (nl.message_type(), nl.flags(), nl.sequence_number());
                // new_checked guarantees NLMSG_HDRLEN <= msg_len <= data.len().
                let body = &data[..msg_len];
                let payload = &body[NLMSG_HDRLEN..];
                offset += msg_len.next_multiple_of(4);

                if msg_seq != seq {
                    // Left over from an earlier, abandoned request.
                    debug!("{what}: discarding a message of sequence {msg_seq}");
                    continue;
                }
                if msg_flags & NLM_F_DUMP_INTR != 0 {
                    answer.interrupted = true;
                }
                match msg_type {
                    NLMSG_NOOP => continue,
                    NLMSG_DONE => {
                        self.unfinished = false;
                        // A dump that failed midway carries the (negative) errno here; the
                        // kernel may also send a DONE without payload.
                        let code = leading_i32(payload).unwrap_or(0);
                        return Ok(if code < 0 {
                            Err(io::Error::from_raw_os_error(code.saturating_neg()))
                        } else {
                            Ok(answer)
                        });
                    }
                    NLMSG_ERROR => {
                        let code = leading_i32(payload).ok_or_else(|| {
                            protocol_error(what, "NLMSG_ERROR without an error code")
                        })?;
                        self.unfinished = false;
                        // Code 0 is an acknowledgement, which ends the answer as well.
                        return Ok(if code == 0 {
                            Ok(answer)
                        } else {
                            Err(io::Error::from_raw_os_error(code.saturating_neg()))
                        });
                    }
                    NLMSG_OVERRUN => {
                        return Err(protocol_error(what, "the kernel reported a data overrun"));
                    }
                    _ => {}
                }
                match NetlinkMessage::<RouteNetlinkMessage>::deserialize(body) {
                    Ok(NetlinkMessage {
                        payload: NetlinkPayload::InnerMessage(m),
                        ..
                    }) => on_message(m),
                    Ok(_) => {}
                    Err(e) => {
                        // Skipped rather than fatal: one exotic entry (a new attribute the
                        // crate cannot parse) must not stop every member's resolution.
                        debug!("{what}: cannot decode a message of type {msg_type}: {e}");
                        answer.undecodable += 1;
                    }
                }
                if !dump && msg_flags & NLM_F_MULTIPART == 0 {
                    self.unfinished = false;
                    return Ok(Ok(answer));
                }
            }
        }
    }

    /// Reads one datagram whole into `self.buf`, returning its length.
    fn recv_datagram(&mut self, what: &str) -> Result<usize, ResolveError> {
        let recv_error = |e: io::Error| {
            let op = if e.kind() == io::ErrorKind::WouldBlock {
                format!("no answer to {what} within {RECV_TIMEOUT:?}")
            } else {
                format!("receiving the answer to {what}")
            };
            io_error(op, e)
        };
        // Peek at the size first: a datagram read into a too small buffer is truncated and
        // the rest of it lost.
        let size = loop {
            let mut probe = [0u8; NLMSG_HDRLEN];
            let mut probe: &mut [u8] = &mut probe;
            match self
                .socket
                .recv(&mut probe, libc::MSG_PEEK | libc::MSG_TRUNC)
            {
                Ok(size) => break size,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(recv_error(e)),
            }
        };
        self.buf.clear();
        self.buf.reserve(size.max(RECV_BUF));
        let len = loop {
            match self.socket.recv(&mut self.buf, 0) {
                Ok(len) => break len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(recv_error(e)),
            }
        };
        if len > self.buf.len() {
            return Err(protocol_error(
                what,
                format!("datagram of {len} bytes truncated to {}", self.buf.len()),
            ));
        }
        Ok(len)
    }

    /// Reads and discards whatever is queued, without waiting. Reading also makes the kernel
    /// produce the next part of a dump in progress, so this runs such a dump to its end.
    fn drain(&mut self) {
        let mut discarded = 0usize;
        loop {
            self.buf.clear();
            self.buf.reserve(RECV_BUF);
            // Truncation does not matter: the data is thrown away.
            match self.socket.recv(&mut self.buf, libc::MSG_DONTWAIT) {
                Ok(_) => discarded += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        warn!("draining the netlink socket: {e}");
                    }
                    break;
                }
            }
        }
        debug!("discarded {discarded} datagrams left from an abandoned request");
        self.unfinished = false;
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use cdn_test_support::Netns;

    use super::*;

    const A0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
    const MEMBER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
    const MEMBER6_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
    const GW6_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];
    const LL_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0xfe];

    /// Runs `ip` commands (one a line) in `ns`, failing the test if one fails.
    fn ip_batch(ns: &Netns, commands: &str) {
        if let Err(e) = ns.ip_batch(commands) {
            panic!("{e:#}");
        }
    }

    fn ifindex(ns: &Netns, dev: &str) -> u32 {
        ns.ifindex(dev).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs `f` on a thread that has joined `ns`.
    fn enter<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
        ns.enter(f).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The lab: a0 (10.77.0.1/24, fd77::1/64) with its peer a1, members 10.77.0.2 and fd77::2
    /// on-link, 10.88.0.0/16 via 10.77.0.254 and fd88::/32 via fd77::fe, all neighbours static.
    fn lab() -> Netns {
        let ns = Netns::new("nh").unwrap_or_else(|e| panic!("{e:#}"));
        ip_batch(
            &ns,
            "link add a0 address 02:00:00:00:aa:01 type veth peer name a1
             link set a0 up
             link set a1 up
             addr add 10.77.0.1/24 dev a0
             addr add fd77::1/64 dev a0 nodad
             route add 10.88.0.0/16 via 10.77.0.254
             route add fd88::/32 via fd77::fe
             neigh replace 10.77.0.2 lladdr 02:00:00:00:00:02 dev a0 nud permanent
             neigh replace 10.77.0.254 lladdr 02:00:00:00:00:fe dev a0 nud permanent
             neigh replace fd77::2 lladdr 02:00:00:00:01:02 dev a0 nud permanent
             neigh replace fd77::fe lladdr 02:00:00:00:01:fe dev a0 nud permanent
            ",
        );
        ns
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    /// Resolves `addrs` with a fresh resolver inside `ns`.
    fn resolve_in(ns: &Netns, addrs: &[IpAddr]) -> Vec<Resolution> {
        enter(ns, || {
            Resolver::new()
                .expect("resolver")
                .resolve(addrs)
                .expect("resolve")
        })
    }

    fn expect_ok(results: &[Resolution], i: usize) -> Resolved {
        match &results[i].1 {
            Ok(r) => *r,
            Err(e) => panic!("{}: {e}", results[i].0),
        }
    }

    fn expect_err(results: &[Resolution], i: usize) -> &ResolveError {
        match &results[i].1 {
            Ok(r) => panic!("{}: resolved to {r:?}, expected an error", results[i].0),
            Err(e) => e,
        }
    }

    #[test]
    fn on_link_and_gatewayed_members_ipv4_and_ipv6() {
        let ns = lab();
        let a0 = ifindex(&ns, "a0");
        let addrs = [
            ip("10.77.0.2"),
            ip("10.88.3.4"),
            ip("fd77::2"),
            ip("fd88::9"),
        ];
        let results = resolve_in(&ns, &addrs);
        assert_eq!(results.len(), addrs.len());
        for (i, (addr, _)) in results.iter().enumerate() {
            assert_eq!(*addr, addrs[i], "results keep the input order");
        }
        let expected = [
            (ip("10.77.0.2"), MEMBER_MAC),
            (ip("10.77.0.254"), GW_MAC),
            (ip("fd77::2"), MEMBER6_MAC),
            (ip("fd77::fe"), GW6_MAC),
        ];
        for (i, (via, mac)) in expected.into_iter().enumerate() {
            assert_eq!(
                expect_ok(&results, i),
                Resolved {
                    ifindex: a0,
                    src_mac: A0_MAC,
                    dst_mac: mac,
                    via
                },
                "{}",
                addrs[i]
            );
        }
    }

    #[test]
    fn link_local_ipv6_gateway() {
        let ns = lab();
        ip_batch(
            &ns,
            "route add fd66::/32 via fe80::1 dev a0
             neigh replace fe80::1 lladdr 02:00:00:00:02:fe dev a0 nud permanent
            ",
        );
        let results = resolve_in(&ns, &[ip("fd66::1")]);
        let r = expect_ok(&results, 0);
        assert_eq!(r.via, ip("fe80::1"));
        assert_eq!(r.dst_mac, LL_GW_MAC);
        assert_eq!(r.ifindex, ifindex(&ns, "a0"));
    }

    #[test]
    fn unresolved_neighbours() {
        let ns = lab();
        ip_batch(
            &ns,
            "neigh replace 10.77.0.4 dev a0 nud incomplete
             neigh replace 10.77.0.5 dev a0 nud failed
             route add 10.89.0.0/16 via 10.77.0.253
             neigh replace 10.77.0.7 lladdr 02:00:00:00:00:07 dev a0 nud stale
             neigh replace 10.77.0.8 lladdr 02:00:00:00:00:08 dev a0 nud reachable
            ",
        );
        let addrs = [
            ip("10.77.0.3"), // on-link, no entry
            ip("10.77.0.4"), // INCOMPLETE
            ip("10.77.0.5"), // FAILED
            ip("fd77::3"),   // on-link, no entry
            ip("10.89.0.1"), // gateway without entry
            ip("10.77.0.7"), // STALE: usable
            ip("10.77.0.8"), // REACHABLE: usable
        ];
        let a0 = ifindex(&ns, "a0");
        let results = resolve_in(&ns, &addrs);

        let problem = |i: usize| match expect_err(&results, i) {
            ResolveError::NeighbourUnresolved {
                target,
                ifname,
                ifindex,
                problem,
                ..
            } => {
                assert_eq!(*target, addrs[i]);
                assert_eq!((ifname.as_str(), *ifindex), ("a0", a0));
                problem.clone()
            }
            e => panic!("{}: expected NeighbourUnresolved, got {e}", addrs[i]),
        };
        assert_eq!(problem(0), NeighbourProblem::NoEntry);
        assert_eq!(
            expect_err(&results, 0).to_string(),
            "neighbour 10.77.0.3 on a0 has no entry"
        );
        // The kernel may already have moved the INCOMPLETE entry on (it probes, nobody answers).
        let incomplete = problem(1);
        assert!(
            matches!(
                incomplete,
                NeighbourProblem::State(NudState(libc::NUD_INCOMPLETE | libc::NUD_FAILED))
            ),
            "{incomplete:?}"
        );
        if incomplete == NeighbourProblem::State(NudState(libc::NUD_INCOMPLETE)) {
            assert_eq!(
                expect_err(&results, 1).to_string(),
                "neighbour 10.77.0.4 on a0 is INCOMPLETE"
            );
        }
        assert!(matches!(
            problem(2),
            NeighbourProblem::State(NudState(libc::NUD_FAILED))
        ));
        assert_eq!(problem(3), NeighbourProblem::NoEntry);
        assert_eq!(problem(4), NeighbourProblem::NoEntry);
        assert_eq!(
            expect_err(&results, 4).to_string(),
            "neighbour 10.77.0.253 on a0 has no entry (next hop for 10.89.0.1)"
        );
        assert_eq!(expect_ok(&results, 5).dst_mac, [2, 0, 0, 0, 0, 7]);
        assert_eq!(expect_ok(&results, 6).dst_mac, [2, 0, 0, 0, 0, 8]);
    }

    #[test]
    fn no_route_reasons() {
        let ns = lab();
        ip_batch(
            &ns,
            "route add blackhole 10.99.0.0/16
             route add unreachable 10.98.0.0/16
             route add prohibit 10.97.0.0/16
             route add blackhole fd99::/32
             route add unreachable fd98::/32
             route add prohibit fd97::/32
            ",
        );
        let cases = [
            ("203.0.113.9", NoRouteReason::NoMatchingRoute),
            ("2001:db8::9", NoRouteReason::NoMatchingRoute),
            ("10.77.0.1", NoRouteReason::Local),
            ("fd77::1", NoRouteReason::Local),
            ("10.77.0.255", NoRouteReason::Broadcast),
            ("10.99.0.1", NoRouteReason::Blackhole),
            ("10.98.0.1", NoRouteReason::Unreachable),
            ("10.97.0.1", NoRouteReason::Prohibit),
            ("fd99::1", NoRouteReason::Blackhole),
            ("fd98::1", NoRouteReason::Unreachable),
            ("fd97::1", NoRouteReason::Prohibit),
        ];
        let addrs: Vec<IpAddr> = cases.iter().map(|(a, _)| ip(a)).collect();
        let results = resolve_in(&ns, &addrs);
        for (i, (addr, reason)) in cases.iter().enumerate() {
            match expect_err(&results, i) {
                ResolveError::NoRoute { addr: a, reason: r } => {
                    assert_eq!((*a, *r), (ip(addr), *reason), "{addr}");
                }
                e => panic!("{addr}: expected NoRoute, got {e}"),
            }
        }
        assert_eq!(
            expect_err(&results, 0).to_string(),
            "no route to 203.0.113.9: no route matches"
        );
        assert_eq!(
            expect_err(&results, 2).to_string(),
            "no route to 10.77.0.1: the address is local to this host"
        );
    }

    #[test]
    fn non_ethernet_egress() {
        let ns = lab();
        ip_batch(&ns, "route add 10.44.0.0/16 dev lo");
        let results = resolve_in(&ns, &[ip("10.44.0.1")]);
        match expect_err(&results, 0) {
            ResolveError::NotEthernet {
                ifname, ifindex, ..
            } => {
                assert_eq!((ifname.as_str(), *ifindex), ("lo", 1));
            }
            e => panic!("expected NotEthernet, got {e}"),
        }
    }

    #[test]
    fn neighbour_changes_are_seen_on_the_next_call() {
        let ns = lab();
        let member = ip("10.77.0.2");
        let gatewayed = ip("10.88.0.1");
        enter(&ns, || {
            let mut resolver = Resolver::new().expect("resolver");
            let first = resolver.resolve(&[member, gatewayed]).expect("resolve");
            assert_eq!(expect_ok(&first, 0).dst_mac, MEMBER_MAC);
            assert_eq!(expect_ok(&first, 1).dst_mac, GW_MAC);

            ip_batch(
                &ns,
                "neigh replace 10.77.0.2 lladdr 02:00:00:00:00:22 dev a0 nud permanent",
            );
            ip_batch(
                &ns,
                "neigh replace 10.77.0.254 lladdr 02:00:00:00:00:ef dev a0 nud permanent",
            );
            let second = resolver.resolve(&[member, gatewayed]).expect("resolve");
            assert_eq!(expect_ok(&second, 0).dst_mac, [2, 0, 0, 0, 0, 0x22]);
            assert_eq!(expect_ok(&second, 1).dst_mac, [2, 0, 0, 0, 0, 0xef]);

            ip_batch(&ns, "neigh del 10.77.0.2 dev a0");
            let third = resolver.resolve(&[member]).expect("resolve");
            assert!(matches!(
                third[0].1,
                Err(ResolveError::NeighbourUnresolved {
                    problem: NeighbourProblem::NoEntry,
                    ..
                })
            ));
        });
    }

    #[test]
    fn multipath_route_resolves_to_one_of_its_next_hops() {
        let ns = lab();
        ip_batch(
            &ns,
            "route add 10.55.0.0/16 nexthop via 10.77.0.254 nexthop via 10.77.0.2",
        );
        let addrs: Vec<IpAddr> = (1..=64u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 55, i, 7)))
            .collect();
        let results = resolve_in(&ns, &addrs);
        let mut seen = HashSet::new();
        for (i, addr) in addrs.iter().enumerate() {
            let r = expect_ok(&results, i);
            let expected_mac = match r.via {
                v if v == ip("10.77.0.254") => GW_MAC,
                v if v == ip("10.77.0.2") => MEMBER_MAC,
                v => panic!("{addr}: via {v}, not one of the route's next hops"),
            };
            assert_eq!(r.dst_mac, expected_mac);
            seen.insert(r.via);
        }
        // The kernel hashes each destination onto a path: 64 destinations use both.
        assert_eq!(seen.len(), 2, "next hops used: {seen:?}");
    }

    #[test]
    fn large_neighbour_table_spans_datagrams() {
        let ns = lab();
        let mut batch = String::from(
            "link add b0 address 02:00:00:00:bb:01 type veth peer name b1
             link set b0 up
             link set b1 up
             addr add 10.66.0.1/16 dev b0
             addr add fd66:1::1/64 dev b0 nodad
            ",
        );
        const N: u16 = 3000;
        for i in 0..N {
            let [hi, lo] = (i + 2).to_be_bytes();
            batch.push_str(&format!(
                "neigh replace 10.66.{hi}.{lo} lladdr 02:66:00:00:{hi:02x}:{lo:02x} dev b0 nud permanent\n\
                 neigh replace fd66:1::{:x} lladdr 02:66:01:00:{hi:02x}:{lo:02x} dev b0 nud permanent\n",
                i + 2
            ));
        }
        ip_batch(&ns, &batch);
        let b0 = ifindex(&ns, "b0");
        let last = N + 1;
        let [hi, lo] = last.to_be_bytes();
        let addrs = [
            IpAddr::V4(Ipv4Addr::new(10, 66, 0, 2)),
            IpAddr::V4(Ipv4Addr::new(10, 66, hi, lo)),
            IpAddr::V6(Ipv6Addr::new(0xfd66, 1, 0, 0, 0, 0, 0, last)),
            ip("10.77.0.2"),
        ];
        let (results, datagrams) = enter(&ns, || {
            let mut resolver = Resolver::new().expect("resolver");
            let results = resolver.resolve(&addrs).expect("resolve");
            (results, resolver.neighbour_datagrams)
        });
        assert!(datagrams > 1, "the dump took {datagrams} datagram(s)");
        assert_eq!(expect_ok(&results, 0).dst_mac, [2, 0x66, 0, 0, 0, 2]);
        assert_eq!(expect_ok(&results, 1).dst_mac, [2, 0x66, 0, 0, hi, lo]);
        assert_eq!(expect_ok(&results, 2).dst_mac, [2, 0x66, 1, 0, hi, lo]);
        assert_eq!(expect_ok(&results, 1).ifindex, b0);
        assert_eq!(expect_ok(&results, 1).src_mac, [2, 0, 0, 0, 0xbb, 1]);
        assert_eq!(expect_ok(&results, 3).dst_mac, MEMBER_MAC);
    }

    #[test]
    fn recovers_from_an_abandoned_dump() {
        let ns = lab();
        // Enough entries that the dump cannot finish in the one datagram read below.
        let mut batch = String::new();
        for i in 0..2000u16 {
            let [hi, lo] = (i + 2).to_be_bytes();
            batch.push_str(&format!(
                "neigh replace fd77::1:{:x} lladdr 02:77:00:00:{hi:02x}:{lo:02x} dev a0 nud permanent\n",
                i + 2
            ));
        }
        ip_batch(&ns, &batch);
        let a0 = ifindex(&ns, "a0");
        enter(&ns, || {
            let mut resolver = Resolver::new().expect("resolver");
            // Starts a dump and walks away after its first datagram, as an I/O error would.
            let abandon_dump = |resolver: &mut Resolver| {
                let mut header = NetlinkHeader::default();
                header.flags = NLM_F_REQUEST | NLM_F_DUMP;
                header.sequence_number = 999;
                let mut msg = NetlinkMessage::new(
                    header,
                    NetlinkPayload::from(RouteNetlinkMessage::GetNeighbour(
                        NeighbourMessage::default(),
                    )),
                );
                msg.finalize();
                let mut out = vec![0; msg.buffer_len()];
                msg.serialize(&mut out);
                resolver.socket.send(&out, 0).expect("send");
                resolver
                    .recv_datagram("abandoned dump")
                    .expect("first datagram");
                resolver.unfinished = true;
            };

            // A dump straight away: the kernel would refuse it (EBUSY) while the old one runs.
            abandon_dump(&mut resolver);
            let key = (a0, ip("10.77.0.2"));
            let found = resolver
                .neighbours(&HashSet::from([key]))
                .expect("neighbour dump after an abandoned one");
            assert_eq!(
                found.get(&key).and_then(|n| n.lladdr.as_deref()),
                Some(&MEMBER_MAC[..])
            );

            // Route lookups first, whose answers queue up behind the old dump's.
            abandon_dump(&mut resolver);
            let results = resolver
                .resolve(&[ip("10.77.0.2"), ip("fd77::2")])
                .expect("resolve after an abandoned dump");
            assert_eq!(expect_ok(&results, 0).dst_mac, MEMBER_MAC);
            assert_eq!(expect_ok(&results, 1).dst_mac, MEMBER6_MAC);
        });
    }

    #[test]
    fn empty_input_makes_no_dump() {
        let ns = lab();
        let results = resolve_in(&ns, &[]);
        assert!(results.is_empty());
    }

    #[test]
    fn resolver_can_move_to_a_blocking_task() {
        fn assert_send<T: Send>() {}
        assert_send::<Resolver>();
    }

    #[test]
    fn state_and_error_texts() {
        assert_eq!(NudState(libc::NUD_INCOMPLETE).to_string(), "INCOMPLETE");
        assert_eq!(NudState(libc::NUD_NONE).to_string(), "NONE");
        assert_eq!(
            NudState(libc::NUD_STALE | libc::NUD_NOARP | 0x100).to_string(),
            "STALE|NOARP|0x100"
        );
        let e = ResolveError::NeighbourUnresolved {
            target: ip("10.88.0.9"),
            neighbour: ip("10.0.0.1"),
            ifname: "eth0".into(),
            ifindex: 2,
            problem: NeighbourProblem::BadLinkLayerAddress {
                state: NudState(libc::NUD_NOARP),
                lladdr: vec![0x33, 0x33, 0, 0, 0, 1],
            },
        };
        assert_eq!(
            e.to_string(),
            "neighbour 10.0.0.1 on eth0 is NOARP with link-layer address 33:33:00:00:00:01, \
             not a unicast Ethernet MAC (next hop for 10.88.0.9)"
        );
        assert_eq!(unicast_mac(&[2, 0, 0, 0, 0, 1]), Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(unicast_mac(&[0; 6]), None);
        assert_eq!(unicast_mac(&[1, 0, 0x5e, 0, 0, 1]), None);
        assert_eq!(unicast_mac(&[2, 0, 0, 0, 0]), None);
    }
}
