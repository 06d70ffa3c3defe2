//! Bounded floods of forged TCP segments at a VIP, sent from the lab's client namespace through
//! a raw socket: SYNs (half-open connections for the owners' kernels) or bare ACKs for
//! connections that do not exist (the data plane must find no state and pass them to their
//! owner, whose kernel answers with a RST). Sources are random addresses in 198.18.0.0/15
//! (the benchmarking range), so no answer ever reaches a real client.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use etherparse::PacketBuilder;
use rand::{Rng, SeedableRng, rngs::StdRng};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Which segments a flood sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    Syn,
    Ack,
}

/// A flood, bounded in count and rate.
#[derive(Clone, Debug)]
pub struct FloodSpec {
    pub segment: Segment,
    pub target: SocketAddrV4,
    pub count: u64,
    /// Packets per second, at most.
    pub rate: u64,
    pub seed: u64,
}

/// Packets sent between two checks of the pace.
const BATCH: u64 = 64;

/// One forged IPv4 TCP segment from a random 198.18.0.0/15 source and port.
pub fn segment(spec: &FloodSpec, rng: &mut impl Rng) -> Result<Vec<u8>> {
    let src = Ipv4Addr::from(0xc612_0000 | (rng.random::<u32>() & 0x0001_ffff));
    let builder = PacketBuilder::ipv4(src.octets(), spec.target.ip().octets(), 64).tcp(
        rng.random_range(1024..=u16::MAX),
        spec.target.port(),
        rng.random(),
        64240,
    );
    let builder = match spec.segment {
        Segment::Syn => builder.syn(),
        Segment::Ack => builder.ack(rng.random()),
    };
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).context("building a segment")?;
    Ok(out)
}

/// Sends the flood from the calling thread's network namespace; returns the packets sent.
/// Sends that fail (a full queue) are skipped, not retried: a flood is not a delivery.
pub fn send(spec: &FloodSpec) -> Result<u64> {
    // IPPROTO_RAW implies IP_HDRINCL: the segments carry their own (forged) IP header.
    let socket = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("opening a raw socket (needs CAP_NET_RAW)")?;
    let dest = SockAddr::from(std::net::SocketAddr::V4(spec.target));
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let started = Instant::now();
    let mut sent = 0;
    let mut attempted = 0;
    while attempted < spec.count {
        for _ in 0..BATCH.min(spec.count - attempted) {
            attempted += 1;
            if socket.send_to(&segment(spec, &mut rng)?, &dest).is_ok() {
                sent += 1;
            }
        }
        let due = Duration::from_secs_f64(attempted as f64 / spec.rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(sent)
}

/// Runs [`send`] on a thread that joins the network namespace at `netns_path` first.
pub fn spawn(netns_path: String, spec: FloodSpec) -> JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        crate::netns::join(&netns_path).context("joining the client namespace")?;
        send(&spec)
    })
}

#[cfg(test)]
mod tests {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    #[test]
    fn segments_are_forged_tcp_to_the_target() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(1);
        for segment_kind in [Segment::Syn, Segment::Ack] {
            let spec = FloodSpec {
                segment: segment_kind,
                target: "192.0.2.1:80".parse()?,
                count: 1,
                rate: 1,
                seed: 1,
            };
            let bytes = segment(&spec, &mut rng)?;
            let p = SlicedPacket::from_ip(&bytes)?;
            let Some(NetSlice::Ipv4(ip)) = p.net else {
                panic!("not IPv4")
            };
            assert_eq!(ip.header().destination_addr(), *spec.target.ip());
            assert_eq!(ip.header().source_addr().octets()[..2], [198, 18]);
            let Some(TransportSlice::Tcp(tcp)) = p.transport else {
                panic!("not TCP")
            };
            assert_eq!(tcp.destination_port(), 80);
            assert_eq!(tcp.syn(), segment_kind == Segment::Syn);
            assert_eq!(tcp.ack(), segment_kind == Segment::Ack);
        }
        Ok(())
    }
}
