//! The rate benchmark's links: two network namespaces joined by veth pairs.
//!
//! ```text
//!   generator ns            device-under-test ns
//!   +----------+            +-------------------------------+
//!   |  gen0  --+------------+-- dut0   (program under test) |
//!   |  (sink)  |  veth pair |                               |
//!   +----------+            |   out0 ---- out1 (sink)       |
//!                           |      second veth pair         |
//!                           +-------------------------------+
//! ```
//!
//! The generator sends out of `gen0`, so frames arrive on `dut0`, where the measured program
//! runs in native XDP. What it sends back with XDP_TX arrives on `gen0`; what it redirects goes
//! out of `out0` and arrives on `out1`. A veth delivers frames sent by XDP only if the
//! receiving end runs an XDP program, so both receiving ends get the counting sink. Every pair
//! has two queues, one per generator CPU: a veth picks the receive queue by the sending CPU,
//! and each queue's NAPI runs on the CPU that scheduled it, so two generator CPUs scale like
//! RSS.

use anyhow::{Context as _, Result};

use crate::{
    netns::Netns,
    packets::NODE_MAC,
    scenario::{CLIENT_V4, UNDERLAY_V4, VIP_V4},
};

pub const GEN_DEV: &str = "gen0";
pub const DUT_DEV: &str = "dut0";
pub const OUT_DEV: &str = "out0";
pub const OUT_PEER_DEV: &str = "out1";

/// Both namespaces and the interface indexes, each in its own namespace. The namespaces (and
/// with them every link) are deleted when this is dropped, on every exit path.
pub struct Topology {
    pub generator: Netns,
    pub dut: Netns,
    pub gen_if: u32,
    pub dut_if: u32,
    pub out_if: u32,
    pub out_peer_if: u32,
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Topology {
    pub fn new() -> Result<Self> {
        let generator = Netns::new("rate-gen")?;
        let dut = Netns::new("rate-dut")?;
        let queues = "numtxqueues 2 numrxqueues 2";
        dut.ip_batch(&format!(
            "link add {DUT_DEV} {queues} type veth peer name {GEN_DEV} {queues} netns {gen}\n\
             link add {OUT_DEV} {queues} type veth peer name {OUT_PEER_DEV} {queues}\n\
             link set {DUT_DEV} address {node_mac}\n\
             addr add {UNDERLAY_V4}/24 dev {DUT_DEV}\n\
             addr add {VIP_V4}/32 dev lo\n\
             addr add {CLIENT_V4}/32 dev lo\n",
            gen = generator.name(),
            node_mac = mac(NODE_MAC),
        ))
        .context("creating the veth pairs")?;
        // No IPv6 on the links: its neighbour discovery and router solicitations would be
        // packets of their own in the measured programs' and the sinks' counts.
        dut.sh(&format!(
            "for d in {DUT_DEV} {OUT_DEV} {OUT_PEER_DEV}; do \
             sysctl -qw net.ipv6.conf.$d.disable_ipv6=1; done"
        ))?;
        generator.sh(&format!(
            "sysctl -qw net.ipv6.conf.{GEN_DEV}.disable_ipv6=1"
        ))?;
        dut.ip_batch(&format!(
            "link set {DUT_DEV} up\nlink set {OUT_DEV} up\nlink set {OUT_PEER_DEV} up\n"
        ))?;
        generator.ip(&["link", "set", GEN_DEV, "up"])?;
        // A decapsulated packet comes from a client address that is local here (the client
        // end of the benchmark's connection lives in this namespace): let the stack accept it
        // like a packet from outside, so that the owner-accept row delivers it to its socket.
        dut.sh("sysctl -qw net.ipv4.conf.all.accept_local=1 net.ipv4.conf.all.rp_filter=0")?;
        Ok(Self {
            gen_if: generator.ifindex(GEN_DEV)?,
            dut_if: dut.ifindex(DUT_DEV)?,
            out_if: dut.ifindex(OUT_DEV)?,
            out_peer_if: dut.ifindex(OUT_PEER_DEV)?,
            generator,
            dut,
        })
    }
}
