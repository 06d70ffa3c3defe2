//! `cdn-steer status` as text: the node, its attachments, BGP, members, services, drift and
//! QUIC sections, and the non-zero data-plane counters. `status --json` prints the same
//! report (`control::StatusReport`) as it is.

use std::fmt::{self, Write as _};

use super::{
    control::{DriftReport, StatusReport},
    quic,
};

/// The text `status` prints.
pub fn render(s: &StatusReport) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_status(&mut out, s);
    out
}

fn write_status(out: &mut String, s: &StatusReport) -> fmt::Result {
    writeln!(out, "node {} ({})", s.node, s.config_path)?;
    for a in &s.attachments {
        writeln!(
            out,
            "  XDP on {} in {} mode{}",
            a.interface,
            a.mode,
            if a.replaced {
                " (taken over from a previous run)"
            } else {
                ""
            }
        )?;
    }
    writeln!(
        out,
        "  state: {}{}",
        if s.ready { "ready" } else { "not ready" },
        if s.draining { ", DRAINING" } else { "" }
    )?;
    for b in &s.bgp {
        writeln!(
            out,
            "  BGP: protocol {} {}, BIRD {}{}",
            b.protocol,
            match b.announced {
                Some(true) => "announced",
                Some(false) => "withdrawn",
                None => "unknown",
            },
            if b.bird_reachable {
                "reachable"
            } else {
                "UNREACHABLE"
            },
            b.last_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        )?;
    }
    writeln!(
        out,
        "  reloads: {} ok, {} refused",
        s.reloads_ok, s.reloads_failed
    )?;
    let local: Vec<String> = (s.health_checks.local_errors.iter())
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    if !local.is_empty() {
        writeln!(
            out,
            "  health checks failed locally (not counted against members): {}",
            local.join(", ")
        )?;
    }
    if !s.health_checks.held_members.is_empty() {
        writeln!(
            out,
            "  MASS FLAP: every member went down within one check round; the table keeps {}",
            s.health_checks.held_members.join(", ")
        )?;
    }
    writeln!(out, "services ({} buckets per table):", s.table_size)?;
    for svc in &s.services {
        writeln!(
            out,
            "  {:<16} generation {:<6} slot {} half {}  udp {:<9}  {}",
            svc.name,
            svc.generation,
            svc.slot,
            svc.active_half,
            svc.udp_mode,
            svc.vips.join(", ")
        )?;
    }
    writeln!(out, "members:")?;
    writeln!(
        out,
        "  {:<4} {:<16} {:<28} {:>6} {:<8} {:>8} {:>7} {:>12} {:>14}",
        "id", "name", "underlay", "weight", "health", "check", "share", "fwd packets", "fwd bytes"
    )?;
    for m in &s.members {
        let health = match m.healthy {
            Some(true) => "up",
            Some(false) => "DOWN",
            None => "?",
        };
        writeln!(
            out,
            "  {:<4} {:<16} {:<28} {:>6} {:<8} {:>8} {:>6.2}% {:>12} {:>14}{}{}",
            m.id,
            m.name,
            m.underlay,
            m.weight,
            health,
            m.last_check_ms
                .map(|ms| format!("{ms:.1}ms"))
                .unwrap_or_else(|| "-".into()),
            m.share * 100.0,
            m.forwarded_packets,
            m.forwarded_bytes,
            if m.is_self { "  (this node)" } else { "" },
            m.last_error
                .as_ref()
                .filter(|_| m.healthy == Some(false))
                .map(|e| format!("  {e}"))
                .unwrap_or_default()
        )?;
    }
    write_pops(out, s)?;
    if let Some(drift) = &s.drift {
        write_drift(out, drift)?;
    }
    write!(out, "{}", quic::render_status(s))?;
    writeln!(out, "data plane counters (packets, reason/action):")?;
    for (name, n) in s.counters.iter().filter(|(_, n)| *n > 0) {
        writeln!(out, "  {name:<26} {n}")?;
    }
    Ok(())
}

/// One line per PoP; nothing without PoPs.
fn write_pops(out: &mut String, s: &StatusReport) -> fmt::Result {
    if s.pops.is_empty() {
        return Ok(());
    }
    writeln!(out, "PoPs:")?;
    for p in &s.pops {
        writeln!(
            out,
            "  {:<2} {:<16} {} members, {} healthy, table over {}{}{}",
            p.index,
            p.name,
            p.members,
            p.healthy,
            p.eligible,
            if p.own { "  (this node's)" } else { "" },
            match (p.fallback, &p.fallback_to) {
                (true, Some(to)) => format!(
                    "  FALLBACK: no member of this PoP is eligible, new connections go to PoP {to}"
                ),
                (true, None) => "  FALLBACK: no member of this PoP is eligible".to_owned(),
                _ => String::new(),
            }
        )?;
    }
    if let Some(l) = &s.learned {
        writeln!(
            out,
            "  learned flows: {} (added {}, expired {}); claims sent {}, received {}, \
             rejected {}",
            l.entries,
            l.added,
            l.expired,
            l.claims_sent,
            l.claims_received,
            l.rejected_total()
        )?;
        let found: u64 = l.search_hops.iter().map(|(_, n)| n).sum();
        if found > 0 {
            let hops: u64 = l.search_hops.iter().map(|(h, n)| u64::from(*h) * n).sum();
            let max = l.search_hops.iter().map(|(h, _)| *h).max().unwrap_or(0);
            writeln!(
                out,
                "  searches accepted here: {found}, {:.2} hops on average, {max} at most",
                hops as f64 / found as f64
            )?;
        }
    }
    Ok(())
}

/// The digests and how the peers' compare: one line per peer, then one per disagreement.
fn write_drift(out: &mut String, d: &DriftReport) -> fmt::Result {
    let tables: Vec<String> = d
        .ours
        .tables
        .iter()
        .map(|(service, digest)| format!("{service} {}", digest.short()))
        .collect();
    writeln!(
        out,
        "digests: config {}, tables: {}",
        d.ours.config.short(),
        if tables.is_empty() {
            "none".to_owned()
        } else {
            tables.join(", ")
        }
    )?;
    for p in &d.peers {
        let verdict = match (&p.digests, &p.error) {
            (_, Some(error)) => format!("not asked: {error}"),
            (Some(_), None) if d.disagreements.iter().any(|x| x.peer == p.member) => {
                "DISAGREES".to_owned()
            }
            (Some(_), None) => "agrees".to_owned(),
            (None, None) => "no answer".to_owned(),
        };
        writeln!(out, "  peer {:<16} {:<24} {verdict}", p.member, p.address)?;
    }
    let short = |digest: &Option<crate::config::Digest>| {
        digest.map_or_else(|| "none".to_owned(), |d| d.short())
    };
    for x in &d.disagreements {
        writeln!(
            out,
            "  DRIFT: {} differs on {}: ours {}, theirs {}",
            x.peer,
            x.digest,
            short(&x.ours),
            short(&x.theirs)
        )?;
    }
    Ok(())
}
