//! Packet rate through real veth links in native XDP (`cargo xtask bench --rate`).
//!
//! A live-frames generator ([`live`]) sends one frame again and again into a veth whose peer
//! runs the measured program in native XDP ([`topology`]). `cdn_steer` is loaded and configured
//! through its controller API ([`Scenario`]: the same tables as the data-plane tests), and each
//! row is measured next to a bare program doing only the row's action (XDP_TX, a devmap
//! redirect, XDP_PASS) on the same interface in the same round. The rate is what the measured
//! program itself counted (its verdict counters, or the bare program's per-CPU count) over the
//! wall time of the run; forwarded frames are also counted where they arrive, by a sink on the
//! far end of the link they went out of, and a run that delivers nothing fails.

pub mod live;
pub mod topology;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, xdp::DevMap},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use cdn_common::{
    counters::{Action, PacketCounts, Reason},
    maps::{
        BENCH_FRAME_BYTES, BENCH_GEN_IFINDEX, BENCH_GEN_LEN, BENCH_GEN_PROGRAM_NAME,
        BENCH_PASS_PROGRAM_NAME, BENCH_REDIRECT_PROGRAM_NAME, BENCH_SINK_PROGRAM_NAME,
        BENCH_SLOT_BARE, BENCH_SLOT_GEN, BENCH_SLOT_SINK, BENCH_TX_PROGRAM_NAME, Link,
        MAP_BENCH_COUNTS, MAP_BENCH_DEVICES, MAP_BENCH_GEN_CONF, MAP_BENCH_GEN_FRAME,
    },
};

use crate::{
    packets::{Flow, Tcp, Vlan, frame, ip_packet, steering_frame},
    scenario::{CLIENT_V4, SELF_ID, STEER_PORT, Scenario, UNDERLAY_V4, VIP_V4, addr, member_addr},
};
use topology::Topology;

/// Frame size of every row, Ethernet header included (no FCS), as in the measurement.
pub const FRAME_LEN: usize = 120;

/// Member the established flow is forwarded to with XDP_TX (out of the receiving interface).
const TX_MEMBER: u16 = 2;
/// Member the redirected flow is forwarded to, out of the second veth pair.
const REDIRECT_MEMBER: u16 = 4;

/// What a row's bare program does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bare {
    Tx,
    Redirect,
    Pass,
}

impl Bare {
    fn program(self) -> &'static str {
        match self {
            Bare::Tx => BENCH_TX_PROGRAM_NAME,
            Bare::Redirect => BENCH_REDIRECT_PROGRAM_NAME,
            Bare::Pass => BENCH_PASS_PROGRAM_NAME,
        }
    }

    /// `cdn_steer`'s action on the row's frame.
    fn action(self) -> Action {
        match self {
            Bare::Tx => Action::Tx,
            Bare::Redirect => Action::Redirect,
            Bare::Pass => Action::Pass,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bare::Tx => "bare XDP_TX",
            Bare::Redirect => "bare redirect",
            Bare::Pass => "bare XDP_PASS",
        }
    }
}

/// One path of `cdn_steer` and its frame.
pub struct Row {
    pub name: &'static str,
    pub frame: Vec<u8>,
    /// `cdn_steer`'s verdict on the frame (with the bare program's action).
    pub reason: Reason,
    pub bare: Bare,
}

/// Which program a measurement runs on the device under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Steer,
    Bare,
}

/// One measurement.
#[derive(Debug)]
pub struct Measured {
    /// Packets the measured program handled with the row's action (and, for `cdn_steer`,
    /// verdict).
    pub handled: u64,
    /// Packets the sinks received (forwarding rows).
    pub sunk: u64,
    /// Frames the generator ran on.
    pub generated: u64,
    pub elapsed: Duration,
    /// `cdn_steer` only: the verdicts counted, with their actions.
    pub verdicts: Vec<(Reason, Action, u64)>,
}

impl Measured {
    /// Million packets per second the measured program handled.
    pub fn mpps(&self) -> f64 {
        self.handled as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// Limits of one measurement.
#[derive(Clone, Debug)]
pub struct Budget {
    pub duration: Duration,
    /// Frames per generator thread at most.
    pub frames: u64,
    /// Set (by a signal handler) to end the measurement with an error, so that everything is
    /// cleaned up on the way out.
    pub stop: Arc<AtomicBool>,
}

/// Everything loaded and attached for the benchmark. Build it on a thread inside the device
/// under test's namespace (see [`Topology`]), and use it there: XDP attachments name
/// interfaces of the calling thread's namespace.
pub struct RateLab<'t> {
    scenario: Scenario,
    /// A second copy of the object for the generator, the bare programs and the sink, with maps
    /// of its own: `cdn_steer`'s maps stay exactly as the controller API wrote them.
    bench: Ebpf,
    counts: PerCpuArray<MapData, u64>,
    gen_frame: Array<MapData, [u8; BENCH_FRAME_BYTES]>,
    gen_conf: Array<MapData, u32>,
    /// The established connection the owner-accept row's packets belong to.
    _connection: (TcpListener, TcpStream, TcpStream),
    pub rows: Vec<Row>,
    topo: &'t Topology,
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name} in the object"))?
        .try_into()?;
    Ok(program)
}

/// A frame of exactly [`FRAME_LEN`] bytes built by `build` from a payload length.
fn sized(build: impl Fn(usize) -> Result<Vec<u8>>) -> Result<Vec<u8>> {
    let bare = build(0)?.len();
    ensure!(bare <= FRAME_LEN, "headers alone take {bare} bytes");
    let out = build(FRAME_LEN - bare)?;
    ensure!(out.len() == FRAME_LEN, "frame of {} bytes", out.len());
    Ok(out)
}

impl<'t> RateLab<'t> {
    pub fn new(topo: &'t Topology) -> Result<Self> {
        let mut scenario = Scenario::new()?;
        // A real established connection, so that the owner finds the steered flow's socket.
        let listener = TcpListener::bind(SocketAddr::new(addr(VIP_V4), 443))?;
        let client = {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.bind(&SocketAddr::new(addr(CLIENT_V4), 41000).into())?;
            sock.connect(&SocketAddr::new(addr(VIP_V4), 443).into())?;
            TcpStream::from(sock)
        };
        let (mut server, _) = listener.accept()?;
        (&client).write_all(b"x")?;
        server.read_exact(&mut [0u8; 1])?;

        // Next hops through this topology's links: the scenario's MACs (the first twelve
        // bytes of the entry's header template), pointed at the veths.
        let dp = &mut scenario.dp;
        for (member, ifindex) in [(TX_MEMBER, topo.dut_if), (REDIRECT_MEMBER, topo.out_if)] {
            let header = dp.next_hop(member)?.header;
            let mac = |at: usize| -> Result<[u8; 6]> {
                header
                    .get(at..at + 6)
                    .and_then(|b| b.try_into().ok())
                    .context("next-hop header shorter than two MACs")
            };
            let link = Link {
                ifindex,
                dst_mac: mac(0)?,
                src_mac: mac(6)?,
            };
            if !dp.set_next_hop(member, &link)? {
                bail!("member {member}: the scenario gave it no underlay address");
            }
        }
        dp.add_device(topo.out_if)?;

        // Flows in distinct buckets of the scenario's small table.
        let established = Flow::tcp(CLIENT_V4, 41000, VIP_V4, 443);
        let mut used = vec![scenario.bucket_index(&established)];
        let mut flow = |from: u16| -> Result<Flow> {
            (from..from + 1000)
                .map(|sport| Flow::tcp(CLIENT_V4, sport, VIP_V4, 443))
                .find(|f| {
                    let b = scenario.bucket_index(f);
                    let free = !used.contains(&b);
                    if free {
                        used.push(b);
                    }
                    free
                })
                .context("a free bucket")
        };
        let forward_tx = flow(40000)?;
        let forward_redirect = flow(40000)?;
        scenario.set_hops(&forward_tx, &[TX_MEMBER, REDIRECT_MEMBER])?;
        scenario.set_hops(&forward_redirect, &[REDIRECT_MEMBER, TX_MEMBER])?;
        scenario.set_hops(&established, &[SELF_ID, TX_MEMBER])?;

        let plain = |f: &Flow| sized(|n| Ok(frame(f, Tcp::ACK, Vlan::None, &vec![0u8; n])));
        let steered = sized(|n| {
            let inner = frame(&established, Tcp::ACK, Vlan::None, &vec![0u8; n]);
            steering_frame(
                member_addr(TX_MEMBER),
                addr(UNDERLAY_V4),
                STEER_PORT,
                2,
                &[REDIRECT_MEMBER],
                ip_packet(&inner, Vlan::None),
            )
        })?;
        let non_vip = Flow::tcp(CLIENT_V4, 1, "203.0.113.1", 443);
        let rows = vec![
            Row {
                name: "established forward, XDP_TX",
                reason: Reason::Forwarded,
                frame: plain(&forward_tx)?,
                bare: Bare::Tx,
            },
            Row {
                name: "forward, redirect to another interface",
                reason: Reason::Forwarded,
                frame: plain(&forward_redirect)?,
                bare: Bare::Redirect,
            },
            Row {
                name: "owner accept (decapsulate, pass)",
                reason: Reason::OwnerAccept,
                frame: steered,
                bare: Bare::Pass,
            },
            Row {
                name: "non-VIP pass",
                reason: Reason::NonVipPass,
                frame: plain(&non_vip)?,
                bare: Bare::Pass,
            },
        ];

        let mut bench = EbpfLoader::new()
            .load(cdn_user::dataplane::object::bytes())
            .context("loading the benchmark programs")?;
        for name in [
            BENCH_GEN_PROGRAM_NAME,
            BENCH_TX_PROGRAM_NAME,
            BENCH_REDIRECT_PROGRAM_NAME,
            BENCH_PASS_PROGRAM_NAME,
            BENCH_SINK_PROGRAM_NAME,
        ] {
            xdp(&mut bench, name)?
                .load()
                .with_context(|| format!("loading {name}"))?;
        }
        let take = |bench: &mut Ebpf, name: &str| {
            bench
                .take_map(name)
                .with_context(|| format!("no map {name} in the object"))
        };
        let mut devices: DevMap<MapData> = take(&mut bench, MAP_BENCH_DEVICES)?.try_into()?;
        devices.set(0, topo.out_if, None, 0)?;
        let counts = take(&mut bench, MAP_BENCH_COUNTS)?.try_into()?;
        let gen_frame = take(&mut bench, MAP_BENCH_GEN_FRAME)?.try_into()?;
        let mut gen_conf: Array<MapData, u32> = take(&mut bench, MAP_BENCH_GEN_CONF)?.try_into()?;
        gen_conf.set(BENCH_GEN_IFINDEX, topo.gen_if, 0)?;

        // The sinks stay attached for the whole run; the links go with `bench`.
        let sink = xdp(&mut bench, BENCH_SINK_PROGRAM_NAME)?;
        sink.attach_to_if_index(topo.out_peer_if, XdpMode::Driver)
            .context("attaching the sink in native XDP mode (needs a kernel with veth XDP)")?;
        topo.generator
            .enter(|| sink.attach_to_if_index(topo.gen_if, XdpMode::Driver))?
            .context("attaching the sink on the generator's veth")?;

        Ok(Self {
            scenario,
            bench,
            counts,
            gen_frame,
            gen_conf,
            _connection: (listener, client, server),
            rows,
            topo,
        })
    }

    fn count(&self, slot: u32) -> Result<u64> {
        let per_cpu = self.counts.get(&slot, 0)?;
        Ok(per_cpu.iter().sum())
    }

    fn steer_counts(&self) -> Result<PacketCounts> {
        Ok(self.scenario.dp.counters()?)
    }

    /// Attaches `subject`'s program for `row` to the device under test.
    fn attach(&mut self, row: usize, subject: Subject) -> Result<XdpLinkId> {
        let dut_if = self.topo.dut_if;
        let program = match subject {
            Subject::Steer => self.scenario.dp.program()?,
            Subject::Bare => xdp(&mut self.bench, self.rows[row].bare.program())?,
        };
        program
            .attach_to_if_index(dut_if, XdpMode::Driver)
            .context("attaching in native XDP mode")
    }

    fn detach(&mut self, row: usize, subject: Subject, link: XdpLinkId) -> Result<()> {
        let program = match subject {
            Subject::Steer => self.scenario.dp.program()?,
            Subject::Bare => xdp(&mut self.bench, self.rows[row].bare.program())?,
        };
        program.detach(link)?;
        Ok(())
    }

    /// Sends `row`'s frame through `subject` from one generator thread per CPU of `cpus`, and
    /// checks that it went where it should.
    pub fn measure(
        &mut self,
        row: usize,
        subject: Subject,
        cpus: &[usize],
        budget: &Budget,
    ) -> Result<Measured> {
        let frame = self.rows[row].frame.clone();
        let mut stored = [0u8; BENCH_FRAME_BYTES];
        stored[..frame.len()].copy_from_slice(&frame);
        self.gen_frame.set(0, stored, 0)?;
        self.gen_conf.set(BENCH_GEN_LEN, frame.len() as u32, 0)?;

        let link = self.attach(row, subject)?;
        let result = self.run(row, subject, cpus, budget, &frame);
        self.detach(row, subject, link)?;
        let measured = result?;
        self.check(row, subject, &measured)?;
        Ok(measured)
    }

    fn run(
        &mut self,
        row: usize,
        subject: Subject,
        cpus: &[usize],
        budget: &Budget,
        frame: &[u8],
    ) -> Result<Measured> {
        let steer_before = self.steer_counts()?;
        let bare_before = self.count(BENCH_SLOT_BARE)?;
        let sink_before = self.count(BENCH_SLOT_SINK)?;
        let gen_before = self.count(BENCH_SLOT_GEN)?;
        let generator = xdp(&mut self.bench, BENCH_GEN_PROGRAM_NAME)?;
        let sent = live::generate(
            generator,
            &self.topo.generator.path(),
            self.topo.gen_if,
            frame,
            cpus,
            budget,
        )?;
        // Frames still queued on a veth when the generator returns are handled within
        // microseconds; they are not worth a term in the rate.
        std::thread::sleep(Duration::from_millis(20));
        let verdicts: Vec<_> = self
            .steer_counts()?
            .moved_since(&steer_before)
            .filter(|(r, _, _)| r.is_verdict())
            .collect();
        let (reason, action) = (self.rows[row].reason, self.rows[row].bare.action());
        let handled = match subject {
            Subject::Steer => verdicts
                .iter()
                .filter(|(r, a, _)| (*r, *a) == (reason, action))
                .map(|(_, _, n)| n)
                .sum(),
            Subject::Bare => self.count(BENCH_SLOT_BARE)? - bare_before,
        };
        Ok(Measured {
            handled,
            sunk: self.count(BENCH_SLOT_SINK)? - sink_before,
            generated: self.count(BENCH_SLOT_GEN)? - gen_before,
            elapsed: sent.elapsed,
            verdicts,
        })
    }

    /// Fails loudly on a measurement that did not measure the path.
    fn check(&self, row: usize, subject: Subject, m: &Measured) -> Result<()> {
        let r = &self.rows[row];
        let what = match subject {
            Subject::Steer => format!("{}: cdn_steer", r.name),
            Subject::Bare => format!("{}: {}", r.name, r.bare.name()),
        };
        if m.generated == 0 {
            bail!("{what}: the generator ran on no frame");
        }
        if m.handled == 0 {
            bail!(
                "{what}: the program handled none of {} frames sent (verdicts {:?}); is native \
                 XDP on veth supported here?",
                m.generated,
                m.verdicts
            );
        }
        if subject == Subject::Steer {
            let all: u64 = m.verdicts.iter().map(|(_, _, n)| n).sum();
            if m.handled * 100 < all * 99 {
                bail!(
                    "{what}: {} of {all} packets got the row's verdict {} with {}, verdicts {:?}",
                    m.handled,
                    r.reason.name(),
                    r.bare.action().name(),
                    m.verdicts
                );
            }
        }
        if r.bare != Bare::Pass && m.sunk * 10 < m.handled * 9 {
            bail!(
                "{what}: {} packets forwarded but only {} arrived at the sink",
                m.handled,
                m.sunk
            );
        }
        Ok(())
    }
}
