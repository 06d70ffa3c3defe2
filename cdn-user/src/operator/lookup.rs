//! `cdn-steer lookup`: which member owns a flow. Live, the daemon reads its tables (the
//! `Lookup` request); offline, the owner is computed here from the configuration alone, with
//! the data plane's flow hash and the daemon's Maglev build, as if every member were healthy
//! and no bucket had a history. Both answers become one [`LookupDocument`], the `--json`
//! output.

use std::net::{IpAddr, SocketAddr};

use cdn_common::{
    hash::{PROTO_TCP, PROTO_UDP, flow_hash_v4, flow_hash_v6, ports_word, v4_word, v6_words},
    maps::NO_MEMBER,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    cluster::{
        maglev::{MaglevError, MaglevMember},
        pops,
    },
    config::{Config, UdpMode},
    operator::{
        control::LookupReport,
        quic::{self, CidService, QuicStatus},
    },
};

/// What an offline answer assumes, shown with it.
pub const OFFLINE_ASSUMPTION: &str = "assuming all members healthy, no history";

/// Where an answer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The running daemon's tables.
    Live,
    /// Computed from the configuration file.
    Offline,
}

/// A member in an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRef {
    pub id: u16,
    pub name: String,
}

/// `lookup --json`: one flow's owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupDocument {
    pub source: Source,
    /// What an offline answer assumes ([`OFFLINE_ASSUMPTION`]); `null` when live.
    pub assumption: Option<String>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `"tcp"` or `"udp"`.
    pub proto: String,
    /// The service whose VIP prefixes hold `dst`.
    pub service: String,
    /// The flow hash (SipHash-1-3 with the cluster key), as the data plane computes it.
    pub hash: u64,
    /// `hash` modulo the table size.
    pub bucket: u32,
    /// The generation of the table read; `null` offline.
    pub table_generation: Option<u32>,
    /// The bucket's current owner; `null` when the bucket is empty.
    pub owner: Option<MemberRef>,
    /// Every hop of the bucket, the owner first, then the previous owners (offline: the owner
    /// only).
    pub hops: Vec<MemberRef>,
    /// Who accepts the flow, as the service's placement decides it.
    pub accepted_by: String,
    /// For UDP to a QUIC port of the service: its QUIC settings and, with `--cid`, how that
    /// connection ID is placed; `null` otherwise.
    #[serde(default)]
    pub quic: Option<QuicFlow>,
    /// With PoPs: the bucket's chain in every PoP's table (offline: each PoP's owner); left
    /// out without PoPs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pops: Vec<PopLookup>,
    /// Live, with PoPs: the member a claim taught this node for the flow, if any; left out
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned: Option<crate::operator::control::LearnedFlow>,
}

/// A flow's bucket in one PoP's table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopLookup {
    pub pop: String,
    /// This node's own PoP: `hops` above is this chain.
    pub own: bool,
    /// The PoP's owner first, then its previous owners (offline: the owner only).
    pub hops: Vec<MemberRef>,
}

/// The QUIC part of a flow lookup (see [`crate::operator::quic::flow`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuicFlow {
    pub settings: QuicStatus,
    /// The connection ID asked with `--cid`, decoded under this service's settings.
    pub cid: Option<CidService>,
}

/// Why a flow cannot be looked up.
#[derive(Debug, Error)]
pub enum LookupError {
    #[error("source and destination must be of the same address family")]
    MixedFamilies,
    #[error("{0} is not in any service's VIP prefixes")]
    NotAVip(IpAddr),
    #[error("building the table: {0}")]
    Table(#[from] MaglevError),
}

/// The data plane's hash of a flow.
pub fn flow_hash(
    key: &[u64; 2],
    src: SocketAddr,
    dst: SocketAddr,
    udp: bool,
) -> Result<u64, LookupError> {
    let proto = if udp { PROTO_UDP } else { PROTO_TCP };
    let ports = ports_word(src.port(), dst.port());
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ok(flow_hash_v4(
            key,
            v4_word(s.octets()),
            v4_word(d.octets()),
            ports,
            proto,
        )),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ok(flow_hash_v6(
            key,
            v6_words(s.octets()),
            v6_words(d.octets()),
            ports,
            proto,
        )),
        _ => Err(LookupError::MixedFamilies),
    }
}

/// Who accepts a flow whose bucket's owner is `owner`, under the service's UDP placement.
pub fn accepted_by(udp: bool, mode: UdpMode, owner: Option<&str>) -> String {
    match (udp, mode, owner) {
        (true, UdpMode::Local, _) => "the node the packet lands on (udp_mode local)".into(),
        (_, _, None) => "nobody: the bucket is empty".into(),
        (true, UdpMode::Owner, Some(owner)) => format!("{owner}, the owner (udp_mode owner)"),
        (true, UdpMode::Connected, Some(_)) => "the first hop with a connected socket for the \
             flow, else the last hop (udp_mode connected)"
            .into(),
        (false, _, Some(owner)) => format!(
            "a new connection: {owner}, the owner; an established one: the hop whose socket \
             holds it"
        ),
    }
}

fn proto_name(udp: bool) -> String {
    if udp { "udp" } else { "tcp" }.to_owned()
}

/// The owner of a flow computed from `cfg` alone: every member with a weight healthy, no node
/// draining, no hop history.
pub fn offline(
    cfg: &Config,
    src: SocketAddr,
    dst: SocketAddr,
    udp: bool,
) -> Result<LookupDocument, LookupError> {
    let hash = flow_hash(&cfg.cluster.hash_key, src, dst, udp)?;
    let service = cfg
        .services
        .iter()
        .find(|s| s.vips.iter().any(|v| v.contains(dst.ip())))
        .ok_or(LookupError::NotAVip(dst.ip()))?;
    let members: Vec<MaglevMember<'_>> = cfg
        .cluster
        .members
        .iter()
        .filter(|m| m.weight > 0)
        .map(|m| MaglevMember {
            id: m.id,
            name: &m.name,
            weight: m.weight,
        })
        .collect();
    let bucket = (hash % u64::from(cfg.cluster.table_size)) as u32;
    // Every PoP's table over its members (the one table without PoPs), as the daemon builds
    // them with every member healthy.
    let tables = pops::build(cfg, &members, Vec::new())?;
    let member_ref = |id: u16| MemberRef {
        id,
        name: cfg
            .member(id)
            .map_or_else(|| "(unknown)".to_owned(), |m| m.name.clone()),
    };
    let owner_in = |table: &Vec<u16>| {
        table
            .get(bucket as usize)
            .copied()
            .filter(|id| *id != NO_MEMBER)
            .map(member_ref)
    };
    let own = cfg.self_pop_index();
    let owner = tables.owners.get(own).and_then(owner_in);
    let pop_lookups = cfg
        .pops()
        .into_iter()
        .zip(&tables.owners)
        .enumerate()
        .map(|(index, (pop, table))| PopLookup {
            pop: pop.to_owned(),
            own: index == own,
            hops: owner_in(table).into_iter().collect(),
        })
        .collect();
    let mut doc = LookupDocument {
        source: Source::Offline,
        assumption: Some(OFFLINE_ASSUMPTION.to_owned()),
        src,
        dst,
        proto: proto_name(udp),
        service: service.name.clone(),
        hash,
        bucket,
        table_generation: None,
        accepted_by: accepted_by(
            udp,
            service.udp_mode,
            owner.as_ref().map(|o| o.name.as_str()),
        ),
        hops: owner.iter().cloned().collect(),
        owner,
        quic: None,
        pops: pop_lookups,
        learned: None,
    };
    quic::flow(
        &mut doc,
        service.quic.as_ref().map(QuicStatus::from).as_ref(),
    );
    Ok(doc)
}

/// The daemon's answer as a document.
pub fn live(report: LookupReport, src: SocketAddr, dst: SocketAddr, udp: bool) -> LookupDocument {
    let hops: Vec<MemberRef> = report
        .hops
        .into_iter()
        .map(|(id, name)| MemberRef { id, name })
        .collect();
    let mut doc = LookupDocument {
        source: Source::Live,
        assumption: None,
        src,
        dst,
        proto: proto_name(udp),
        service: report.service,
        hash: report.hash,
        bucket: report.bucket,
        table_generation: Some(report.table_generation),
        owner: hops.first().cloned(),
        hops,
        accepted_by: report.accepted_by,
        quic: None,
        pops: report
            .pops
            .into_iter()
            .map(|chain| PopLookup {
                pop: chain.pop,
                own: chain.own,
                hops: chain
                    .hops
                    .into_iter()
                    .map(|(id, name)| MemberRef { id, name })
                    .collect(),
            })
            .collect(),
        learned: report.learned,
    };
    quic::flow(&mut doc, report.quic.as_ref());
    doc
}

/// The answer as text.
pub fn render(doc: &LookupDocument) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let origin = match (doc.source, doc.table_generation) {
        (Source::Live, Some(generation)) => format!("table generation {generation}"),
        (Source::Live, None) => "live".to_owned(),
        (Source::Offline, _) => format!(
            "OFFLINE, from the configuration: {}",
            doc.assumption.as_deref().unwrap_or(OFFLINE_ASSUMPTION)
        ),
    };
    let _ = writeln!(
        out,
        "{} -> {} {}: service {}, hash {:#018x}, bucket {} ({origin})",
        doc.src, doc.dst, doc.proto, doc.service, doc.hash, doc.bucket
    );
    match doc.hops.split_first() {
        None => out.push_str("no owner: the bucket is empty\n"),
        Some((owner, rest)) => {
            let _ = writeln!(out, "owner: {} (id {})", owner.name, owner.id);
            for (i, m) in rest.iter().enumerate() {
                let _ = writeln!(out, "previous owner {}: {} (id {})", i + 1, m.name, m.id);
            }
        }
    }
    if let Some(quic) = &doc.quic {
        let _ = writeln!(
            out,
            "QUIC port (config id {}, server_id_len {}, cid_len {})",
            quic.settings.config_id, quic.settings.server_id_len, quic.settings.cid_len
        );
        if let Some(cid) = &quic.cid {
            let server = cid
                .server_id
                .map_or_else(|| "none".to_owned(), |sid| sid.to_string());
            let _ = writeln!(
                out,
                "connection ID server ID: {server}; placed {}",
                cid.placement
            );
        }
    }
    for pop in &doc.pops {
        let chain: Vec<String> = pop
            .hops
            .iter()
            .map(|m| format!("{} (id {})", m.name, m.id))
            .collect();
        let chain = if chain.is_empty() {
            "no owner".to_owned()
        } else {
            chain.join(", then ")
        };
        let own = if pop.own { ", this node's" } else { "" };
        let _ = writeln!(out, "PoP {}{own}: {chain}", pop.pop);
    }
    if let Some(l) = &doc.learned {
        let _ = writeln!(
            out,
            "learned: {} (id {}), {} packets sent there on it",
            l.name, l.member, l.packets
        );
    }
    let _ = writeln!(out, "accepted by: {}", doc.accepted_by);
    out
}
