//! QUIC for operators: `cdn-steer lookup --cid`, which decodes a connection ID under each QUIC
//! service's QUIC-LB configuration and names the member it routes to, the QUIC part of a flow
//! lookup, and the QUIC lines of `status`. Live, the daemon resolves server IDs through the
//! `QUIC_SERVERS` map; offline, through the configuration's `quic_server_id`s. Both go through
//! [`decode`], so they can only differ where the map and the configuration do.

use std::fmt::Write as _;

use cdn_common::quic_lb::{MAX_CID_LEN, UNROUTABLE_CONFIG_ID};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    config::{Config, QuicSettings},
    operator::{
        control::StatusReport,
        lookup::{LookupDocument, MemberRef, Source},
    },
};

/// A service's QUIC settings as status, lookup and metrics show them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuicStatus {
    pub ports: Vec<u16>,
    pub config_id: u8,
    pub server_id_len: u8,
    pub cid_len: u8,
}

impl From<&QuicSettings> for QuicStatus {
    fn from(q: &QuicSettings) -> Self {
        QuicStatus {
            ports: q.ports.clone(),
            config_id: q.config_id,
            server_id_len: q.server_id_len,
            cid_len: q.cid_len,
        }
    }
}

/// One member's server ID in `status`: configured, and what the live map holds for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuicServerStatus {
    pub server_id: u32,
    pub member: String,
    /// The member `QUIC_SERVERS` names for this server ID (`None`: not set).
    pub mapped_to: Option<u16>,
}

/// Why a connection ID given on the command line cannot be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CidError {
    #[error("a connection ID is hex digits, two per octet: {0:?} is not")]
    NotHex(String),
    #[error("a connection ID has 1 to {MAX_CID_LEN} octets, {0:?} has {1}")]
    Length(String, usize),
}

/// Parses a connection ID written in hex (`:` or `-` between octets allowed).
pub fn parse_cid(text: &str) -> Result<Vec<u8>, CidError> {
    let digits: String = text.chars().filter(|c| !matches!(c, ':' | '-')).collect();
    if !digits.len().is_multiple_of(2) || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CidError::NotHex(text.to_owned()));
    }
    let cid = (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| CidError::NotHex(text.to_owned()))?;
    if cid.is_empty() || cid.len() > MAX_CID_LEN {
        return Err(CidError::Length(text.to_owned(), cid.len()));
    }
    Ok(cid)
}

/// `lookup --cid --json`: one connection ID, decoded for every QUIC service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CidDocument {
    pub source: Source,
    /// The connection ID, lowercase hex.
    pub cid: String,
    /// Its first octet's config rotation bits (7: unroutable).
    pub config_id: u8,
    /// The length its first octet encodes (low five bits plus one).
    pub encoded_len: u8,
    pub services: Vec<CidService>,
}

/// How one QUIC service places a packet whose destination connection ID is the one asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CidService {
    pub service: String,
    pub quic: QuicStatus,
    /// The server ID the CID carries under this service's layout; `null` when it is not a CID
    /// of this service (length or config id).
    pub server_id: Option<u32>,
    /// The member that server ID routes to; `null`: placed by flow hash.
    pub member: Option<MemberRef>,
    /// The placement in words.
    pub placement: String,
}

/// Decodes `cid` for every QUIC service of `cfg`, resolving server IDs with `resolve` (the
/// live map, or the configuration).
pub fn decode(
    cfg: &Config,
    source: Source,
    cid: &[u8],
    resolve: impl Fn(u32) -> Option<u16>,
) -> CidDocument {
    let first = cid.first().copied().unwrap_or(0);
    let services = cfg
        .services
        .iter()
        .filter_map(|s| s.quic.as_ref().map(|q| (s, q)))
        .map(|(s, q)| {
            let lb = q.lb();
            let server_id = lb.decode(cid);
            let member = server_id.and_then(&resolve).map(|id| MemberRef {
                id,
                name: cfg
                    .member(id)
                    .map_or_else(|| "(unknown)".to_owned(), |m| m.name.clone()),
            });
            let placement = match (server_id, &member) {
                (Some(sid), Some(m)) => format!(
                    "by connection ID: server ID {sid} is {} (id {}), which gets it healthy or \
                     not (quic_cid_forwarded, or quic_cid_accept there)",
                    m.name, m.id
                ),
                (Some(sid), None) => format!(
                    "by flow hash: server ID {sid} names no member (counted as \
                     quic_unknown_server)"
                ),
                (None, _) if cid.len() != usize::from(q.cid_len) => format!(
                    "by flow hash: {} octets, this service's connection IDs have {} (a client's \
                     first flight carries a DCID of its own choosing)",
                    cid.len(),
                    q.cid_len
                ),
                (None, _) if first >> 5 == UNROUTABLE_CONFIG_ID => {
                    "by flow hash: config id 7 marks an unroutable connection ID".to_owned()
                }
                (None, _) => format!(
                    "by flow hash: config id {} is not this service's {}",
                    first >> 5,
                    q.config_id
                ),
            };
            CidService {
                service: s.name.clone(),
                quic: QuicStatus::from(q),
                server_id,
                member,
                placement,
            }
        })
        .collect();
    CidDocument {
        source,
        cid: cid.iter().map(|b| format!("{b:02x}")).collect(),
        config_id: first >> 5,
        encoded_len: (first & 0x1f) + 1,
        services,
    }
}

/// `lookup --cid --offline`: `text` decoded with the configuration's server IDs.
pub fn offline(cfg: &Config, text: &str) -> Result<CidDocument, CidError> {
    let cid = parse_cid(text)?;
    Ok(decode(cfg, Source::Offline, &cid, |sid| {
        configured_member(cfg, sid)
    }))
}

/// The configuration's own resolution of a server ID: the member whose `quic_server_id` it is.
pub fn configured_member(cfg: &Config, server_id: u32) -> Option<u16> {
    cfg.cluster
        .members
        .iter()
        .find(|m| m.quic_server_id == server_id)
        .map(|m| m.id)
}

/// The answer as text.
pub fn render(doc: &CidDocument) -> String {
    let mut out = String::new();
    let origin = match doc.source {
        Source::Live => "live, from the QUIC_SERVERS map",
        Source::Offline => "OFFLINE, from the configuration",
    };
    let _ = writeln!(
        out,
        "connection ID {} ({} octets; first octet: config id {}, encoded length {}) ({origin})",
        doc.cid,
        doc.cid.len() / 2,
        doc.config_id,
        doc.encoded_len
    );
    if doc.services.is_empty() {
        out.push_str("no service has QUIC routing ([services.quic])\n");
    }
    for s in &doc.services {
        let _ = writeln!(
            out,
            "service {} (QUIC ports {}; config id {}, server_id_len {}, cid_len {}): {}",
            s.service,
            ports(&s.quic.ports),
            s.quic.config_id,
            s.quic.server_id_len,
            s.quic.cid_len,
            s.placement
        );
    }
    out
}

fn ports(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    ports.join(",")
}

/// The QUIC part of a flow lookup: the QUIC settings when the flow is UDP to a QUIC port of its
/// service, `None` otherwise. Sets how the flow is placed (`accepted_by`).
pub fn flow(doc: &mut LookupDocument, quic: Option<&QuicStatus>) {
    let Some(quic) = quic.filter(|q| doc.proto == "udp" && q.ports.contains(&doc.dst.port()))
    else {
        return;
    };
    let owner = doc.owner.as_ref().map_or_else(
        || "nobody (the bucket is empty)".to_owned(),
        |o| o.name.clone(),
    );
    doc.accepted_by = format!(
        "QUIC: a packet whose destination connection ID carries a configured server ID (config \
         id {}, {} octets) goes to the member it names; a first flight (the client's own DCID) \
         or an unknown server ID goes by flow hash to {owner}, the owner",
        quic.config_id, quic.cid_len
    );
    doc.quic = Some(crate::operator::lookup::QuicFlow {
        settings: quic.clone(),
        cid: None,
    });
}

/// Narrows a QUIC flow lookup to the packets carrying `cid` as their destination connection ID.
pub fn flow_with_cid(doc: &mut LookupDocument, cid: &CidDocument) {
    let Some(quic) = &mut doc.quic else {
        return;
    };
    let Some(service) = cid.services.iter().find(|s| s.service == doc.service) else {
        return;
    };
    doc.accepted_by = match (&service.member, &doc.owner) {
        (Some(m), _) => format!("{} (id {}), by connection ID {}", m.name, m.id, cid.cid),
        (None, Some(owner)) => format!(
            "{}, the owner, by flow hash (connection ID {}: {})",
            owner.name, cid.cid, service.placement
        ),
        (None, None) => format!(
            "nobody: placed by flow hash and the bucket is empty ({})",
            service.placement
        ),
    };
    quic.cid = Some(service.clone());
}

/// Counter names of the QUIC reasons, in the order `status` shows them.
const QUIC_REASONS: [&str; 7] = [
    "quic_cid_forwarded",
    "quic_cid_accept",
    "quic_hash_forwarded",
    "quic_hash_accept",
    "quic_unknown_server",
    "quic_truncated",
    "quic_invalid",
];

/// The QUIC lines of `status`: nothing when no service has QUIC.
pub fn render_status(s: &StatusReport) -> String {
    let mut out = String::new();
    let quic: Vec<_> = s
        .services
        .iter()
        .filter_map(|svc| svc.quic.as_ref().map(|q| (svc, q)))
        .collect();
    if quic.is_empty() {
        return out;
    }
    out.push_str("QUIC (QUIC-LB plaintext connection IDs):\n");
    for (svc, q) in quic {
        let _ = writeln!(
            out,
            "  {:<16} ports {:<12} config id {}, server_id_len {}, cid_len {}",
            svc.name,
            ports(&q.ports),
            q.config_id,
            q.server_id_len,
            q.cid_len
        );
    }
    let servers: Vec<String> = s
        .quic_servers
        .iter()
        .map(|q| match q.mapped_to {
            Some(id) => format!("{} -> {} (id {id})", q.server_id, q.member),
            None => format!("{} -> {} (NOT IN THE MAP)", q.server_id, q.member),
        })
        .collect();
    let _ = writeln!(out, "  server IDs: {}", servers.join(", "));
    let counts: Vec<String> = QUIC_REASONS
        .iter()
        .map(|reason| {
            let n: u64 = s
                .counters
                .iter()
                .filter(|(name, _)| name.split('/').next() == Some(reason))
                .map(|(_, n)| n)
                .sum();
            format!("{reason} {n}")
        })
        .collect();
    let _ = writeln!(out, "  packets: {}", counts.join(", "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EXAMPLE, parse};
    use cdn_common::quic_lb::QuicLbConfig;

    #[test]
    fn cids_parse_from_hex() {
        assert_eq!(parse_cid("0a0b"), Ok(vec![0x0a, 0x0b]));
        assert_eq!(parse_cid("0A:0b-0C"), Ok(vec![0x0a, 0x0b, 0x0c]));
        assert!(matches!(parse_cid("0a0"), Err(CidError::NotHex(_))));
        assert!(matches!(parse_cid("0g"), Err(CidError::NotHex(_))));
        assert!(matches!(parse_cid("+1"), Err(CidError::NotHex(_))));
        assert!(matches!(parse_cid(""), Err(CidError::Length(_, 0))));
        assert!(matches!(
            parse_cid(&"00".repeat(21)),
            Err(CidError::Length(_, 21))
        ));
    }

    #[test]
    fn decodes_the_server_id_and_names_the_member() {
        let cfg = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
        let lb = QuicLbConfig {
            config_id: 0,
            server_id_len: 2,
            cid_len: 8,
        };
        let mut out = [0; MAX_CID_LEN];
        let len = lb
            .encode(12, &[0x5a; MAX_CID_LEN], &mut out)
            .expect("valid");
        let cid = &out[..len].to_vec();
        let doc = decode(&cfg, Source::Offline, cid, |sid| {
            configured_member(&cfg, sid)
        });
        assert_eq!(doc.cid, "07000c5a5a5a5a5a");
        assert_eq!((doc.config_id, doc.encoded_len), (0, 8));
        let web = &doc.services[0];
        assert_eq!(web.server_id, Some(12));
        assert_eq!(
            web.member,
            Some(MemberRef {
                id: 2,
                name: "node-c".into()
            })
        );
        assert!(
            web.placement
                .starts_with("by connection ID: server ID 12 is node-c")
        );
        // Server ID 13 is nobody's; another config id and another length are not decoded.
        let unknown = lb
            .encode(13, &[1; MAX_CID_LEN], &mut out)
            .map(|l| out[..l].to_vec());
        let unknown = unknown.expect("valid");
        let doc = decode(&cfg, Source::Offline, &unknown, |sid| {
            configured_member(&cfg, sid)
        });
        assert_eq!(doc.services[0].member, None);
        assert!(doc.services[0].placement.contains("names no member"));
        let mut other = cid.to_vec();
        other[0] |= 1 << 5;
        let doc = decode(&cfg, Source::Offline, &other, |sid| {
            configured_member(&cfg, sid)
        });
        assert_eq!(doc.services[0].server_id, None);
        assert!(doc.services[0].placement.contains("config id 1 is not"));
        let doc = decode(&cfg, Source::Offline, &cid[..7], |_| Some(0));
        assert!(doc.services[0].placement.contains("7 octets"), "{doc:?}");
        // The rendering names the member.
        let text = render(&decode(&cfg, Source::Offline, cid, |sid| {
            configured_member(&cfg, sid)
        }));
        assert!(text.contains("service web (QUIC ports 443;"), "{text}");
        assert!(text.contains("node-c (id 2)"), "{text}");
    }
}
