//! `cdn-steer trace`: the daemon lends the ring buffer's reader to one trace at a time, sets
//! the filter and the `NODE_TRACE` flag, and streams every event to the client until it
//! disconnects or has its `count`. The flag is cleared whenever the trace ends, however it
//! ends (the lease's `Drop`), and when the daemon stops.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use cdn_common::{
    counters::{Action, Reason},
    maps::NO_MEMBER,
    trace::{
        TRACE_EV_FLOW, TRACE_EV_STEERED, TRACE_EV_UNDERLAY_V6, TRACE_EV_V6, TRACE_MATCH_CLIENT,
        TRACE_MATCH_PORT, TRACE_MATCH_V6, TRACE_MATCH_VIP, TraceEvent, TraceFilter,
    },
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use super::core::Shared;
use crate::{
    dataplane::{TraceReader, monotonic_ns},
    operator::control::{Response, TraceHandler, TraceRecord, TraceSpec, TraceStream},
};

/// Events handed over per wake-up before the loop looks at the client and the clock again.
const BATCH: usize = 256;
/// How often lost events are checked and reported.
const LOST_CHECK: Duration = Duration::from_secs(1);

/// The control socket's `trace` handler. A trace ends, with its last line sent, when `stop`
/// turns true (the daemon is stopping).
pub(super) fn handler(shared: Shared, stop: watch::Receiver<bool>) -> TraceHandler {
    Arc::new(move |spec, stream| Box::pin(session(shared.clone(), spec, stream, stop.clone())))
}

/// The kernel filter for `spec`.
pub(super) fn filter_of(spec: &TraceSpec) -> Result<TraceFilter> {
    let mut f = TraceFilter::default();
    let mut family = None;
    for (addr, field, bit) in [
        (spec.vip, &mut f.vip, TRACE_MATCH_VIP),
        (spec.client, &mut f.client, TRACE_MATCH_CLIENT),
    ] {
        let Some(addr) = addr else { continue };
        let v6 = addr.is_ipv6();
        if family.is_some_and(|f| f != v6) {
            bail!("--vip and --client must be of the same address family");
        }
        family = Some(v6);
        match addr {
            IpAddr::V4(a) => field[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => *field = a.octets(),
        }
        f.fields |= bit;
    }
    if family == Some(true) {
        f.fields |= TRACE_MATCH_V6;
    }
    if let Some(port) = spec.port {
        f.port = port;
        f.fields |= TRACE_MATCH_PORT;
    }
    for name in &spec.reasons {
        let reason = Reason::ALL
            .iter()
            .find(|r| r.name() == name && r.is_verdict())
            .with_context(|| {
                let names: Vec<&str> = Reason::ALL
                    .iter()
                    .filter(|r| r.is_verdict())
                    .map(|r| r.name())
                    .collect();
                format!("unknown reason {name:?}; reasons: {}", names.join(", "))
            })?;
        f.reasons |= 1 << *reason as u32;
    }
    Ok(f)
}

/// The ring buffer's reader, lent to the running trace. Dropping it ends the trace: the flag
/// is cleared and the reader goes back to the data plane.
struct Lease {
    shared: Shared,
    reader: Option<AsyncFd<TraceReader>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut core = self.shared.lock();
        core.tracing = false;
        if let Err(e) = core.write_node_config() {
            log::error!("trace: clearing the trace flag: {e:#}");
        }
        if let Some(fd) = self.reader.take() {
            core.dp.return_trace_reader(fd.into_inner());
        }
        log::info!("trace stopped");
    }
}

/// What the records need from the daemon's state, copied at the start.
struct Names {
    members: HashMap<u16, String>,
    interfaces: HashMap<u32, String>,
}

impl Names {
    fn interface(&mut self, ifindex: u32) -> String {
        self.interfaces
            .entry(ifindex)
            .or_insert_with(|| interface_name(ifindex).unwrap_or_else(|| ifindex.to_string()))
            .clone()
    }
}

fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname requires; on success it
    // holds a NUL-terminated name.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: see above.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Takes the reader, sets the filter and turns tracing on.
fn start(shared: &Shared, spec: &TraceSpec) -> Result<(Lease, Names, u64)> {
    let filter = filter_of(spec)?;
    let reader = shared.lock().dp.take_trace_reader().context(
        "a trace is already running on this node (one at a time): stop it, or wait for it to end",
    )?;
    let mut lease = Lease {
        shared: shared.clone(),
        reader: None,
    };
    let mut reader = reader;
    let stale = reader.discard_pending();
    if stale > 0 {
        log::debug!("trace: discarded {stale} events left from an earlier trace");
    }
    // SAFETY: the reader owns the ring buffer map's fd; it stays open and is never replaced
    // while the AsyncFd owns the reader (the map lives as long as the reader).
    let fd = match unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            // Give the reader back before failing.
            let (reader, e) = e.into_parts();
            shared.lock().dp.return_trace_reader(reader);
            return Err(e).context("watching the trace ring buffer");
        }
    };
    lease.reader = Some(fd);
    let mut core = shared.lock();
    core.dp.set_trace_filter(&filter)?;
    let lost_before = core.dp.trace_lost()?;
    core.tracing = true;
    core.write_node_config()?;
    let names = Names {
        members: core
            .cfg
            .cluster
            .members
            .iter()
            .map(|m| (m.id, m.name.clone()))
            .collect(),
        interfaces: HashMap::new(),
    };
    drop(core);
    log::info!("trace started: {spec:?}");
    Ok((lease, names, lost_before))
}

async fn session(
    shared: Shared,
    spec: TraceSpec,
    mut stream: TraceStream,
    mut stop: watch::Receiver<bool>,
) {
    let (mut lease, mut names, lost_before) = match start(&shared, &spec) {
        Ok(started) => started,
        Err(e) => {
            let _ = stream
                .out
                .send(&Response::Error {
                    message: format!("{e:#}"),
                })
                .await;
            return;
        }
    };
    let mut events = 0u64;
    let mut lost = 0u64;
    let ended = stream_events(
        &shared,
        &mut lease,
        &mut names,
        &mut stream,
        &mut stop,
        &spec,
        lost_before,
        &mut events,
        &mut lost,
    )
    .await;
    // The flag goes off before the last line, so a client that sees the end sees it off.
    drop(lease);
    let reason = match ended {
        Ok(reason) => reason.to_string(),
        Err(e) => format!("{e:#}"),
    };
    let _ = stream
        .out
        .send(&Response::TraceEnd {
            events,
            lost,
            reason,
        })
        .await;
}

#[allow(clippy::too_many_arguments)]
async fn stream_events(
    shared: &Shared,
    lease: &mut Lease,
    names: &mut Names,
    stream: &mut TraceStream,
    stop: &mut watch::Receiver<bool>,
    spec: &TraceSpec,
    lost_before: u64,
    events: &mut u64,
    lost: &mut u64,
) -> Result<&'static str> {
    let reader = lease.reader.as_mut().context("trace reader missing")?;
    let mut tick = tokio::time::interval(LOST_CHECK);
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            ready = reader.readable_mut() => {
                let mut guard = ready.context("waiting for trace events")?;
                while batch.len() < BATCH {
                    match guard.get_inner_mut().next_event() {
                        Some(event) => batch.push(event),
                        None => {
                            guard.clear_ready();
                            break;
                        }
                    }
                }
            }
            () = stream.hangup.wait() => return Ok("client disconnected"),
            // The guard `wait_for` returns is not Send: drop it inside.
            () = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
                return Ok("the daemon is stopping");
            }
            _ = tick.tick() => {
                let now = shared.lock().dp.trace_lost()?.wrapping_sub(lost_before);
                if now != *lost {
                    *lost = now;
                    stream.out.send(&Response::TraceLost { lost: now }).await?;
                }
            }
        }
        for event in &batch {
            let record = record(event, names);
            stream.out.send(&Response::Trace(Box::new(record))).await?;
            *events += 1;
            if spec.count.is_some_and(|n| *events >= n) {
                *lost = shared.lock().dp.trace_lost()?.wrapping_sub(lost_before);
                return Ok("count reached");
            }
        }
    }
}

/// `bytes` as an address of the family `v6` says (IPv4 in the first four bytes).
fn address(bytes: [u8; 16], v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// The flow's step on this node, from the verdict's reason.
fn hop(reason: Reason) -> Option<&'static str> {
    Some(match reason {
        Reason::Forwarded | Reason::IcmpForwarded => "first hop",
        Reason::PassedOn => "pass-on",
        Reason::DrainPassOn => "pass-on (draining)",
        Reason::SynRedirect => "owner redirect",
        Reason::LocalAccept
        | Reason::OwnerAccept
        | Reason::LastHopAccept
        | Reason::UdpLocalAccept
        | Reason::UdpOwnerAccept
        | Reason::IcmpLocal => "accepted here",
        _ => return None,
    })
}

fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

fn tcp_flags(flags: u8) -> String {
    const NAMES: [(u8, char); 6] = [
        (0x02, 'S'),
        (0x10, 'A'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x08, 'P'),
        (0x20, 'U'),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, c)| *c)
        .collect()
}

/// Unix time of a CLOCK_MONOTONIC instant in the recent past.
fn unix_time(monotonic: u64) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let ago = monotonic_ns().saturating_sub(monotonic) as f64 / 1e9;
    now - ago
}

fn record(e: &TraceEvent, names: &mut Names) -> TraceRecord {
    let reason = Reason::ALL.get(e.reason as usize).copied();
    let flow = e.flags & TRACE_EV_FLOW != 0;
    let v6 = e.flags & TRACE_EV_V6 != 0;
    let steered = e.flags & TRACE_EV_STEERED != 0;
    let underlay_v6 = e.flags & TRACE_EV_UNDERLAY_V6 != 0;
    let member_id = (e.target != NO_MEMBER).then_some(e.target);
    TraceRecord {
        time: unix_time(e.time_ns),
        interface: names.interface(e.ifindex),
        ifindex: e.ifindex,
        proto: if flow {
            proto_name(e.proto)
        } else {
            "-".into()
        },
        src: flow.then(|| address(e.src, v6)),
        src_port: e.src_port,
        dst: flow.then(|| address(e.dst, v6)),
        dst_port: e.dst_port,
        tcp_flags: (flow && e.proto == 6).then(|| tcp_flags(e.tcp_flags)),
        reason: reason.map_or_else(|| format!("reason#{}", e.reason), |r| r.name().into()),
        action: Action::from_xdp(u32::from(e.action)).name().into(),
        info: Reason::INFO
            .iter()
            .filter(|r| e.info & 1 << r.info_index() != 0)
            .map(|r| r.name().to_string())
            .collect(),
        hop: reason.and_then(hop).map(str::to_string),
        member_id,
        member: member_id.map(|id| {
            names
                .members
                .get(&id)
                .cloned()
                .unwrap_or_else(|| "(unknown)".into())
        }),
        egress: (e.egress_ifindex != 0).then(|| names.interface(e.egress_ifindex)),
        underlay_src: steered.then(|| address(e.underlay_src, underlay_v6)),
        underlay_dst: steered.then(|| address(e.underlay_dst, underlay_v6)),
        steer_budget: steered.then_some(e.steer_budget),
        steer_hops: e
            .steer_hops
            .iter()
            .copied()
            .filter(|h| steered && *h != NO_MEMBER)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_from_specs() -> Result<()> {
        let spec = TraceSpec {
            vip: Some("192.0.2.1".parse()?),
            port: Some(443),
            reasons: vec!["forwarded".into(), "port_miss".into()],
            ..TraceSpec::default()
        };
        let f = filter_of(&spec)?;
        assert_eq!(f.fields, TRACE_MATCH_VIP | TRACE_MATCH_PORT);
        assert_eq!(f.vip[..4], [192, 0, 2, 1]);
        assert_eq!(f.vip[4..], [0; 12]);
        assert_eq!(f.port, 443);
        assert_eq!(
            f.reasons,
            1 << Reason::Forwarded as u32 | 1 << Reason::PortMiss as u32
        );

        let v6 = TraceSpec {
            client: Some("2001:db8::7".parse()?),
            ..TraceSpec::default()
        };
        let f = filter_of(&v6)?;
        assert_eq!(f.fields, TRACE_MATCH_CLIENT | TRACE_MATCH_V6);
        assert_eq!(f.reasons, 0, "no reason given: every reason");

        let mixed = TraceSpec {
            vip: Some("192.0.2.1".parse()?),
            client: Some("2001:db8::7".parse()?),
            ..TraceSpec::default()
        };
        assert!(filter_of(&mixed).is_err());
        let bad = TraceSpec {
            reasons: vec!["fib_miss".into()],
            ..TraceSpec::default()
        };
        let e = filter_of(&bad).expect_err("informational reasons are no verdict");
        assert!(e.to_string().contains("port_miss"), "{e}");
        Ok(())
    }
}
