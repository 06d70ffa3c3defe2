//! Digests of what every node of a cluster must agree on, so that disagreement can be seen
//! (`status`, the `cdn_steer_config_digest` metric and its alert).
//!
//! [`cluster_digest`] covers the `[cluster]` and `[[services]]` sections, which every node must
//! carry identically; `[node]`, `[bgp]` and `[metrics]` differ per node and are left out. It is
//! computed from the checked configuration, not from the text, so comments, formatting, the
//! order of keys, the order of members and services (neither changes steering: Maglev sorts
//! its members by name, services are found by their VIPs) and whether a default is written out
//! or left implicit make no difference, while every value does.
//!
//! The encoding is a list of records `path = value`, each path and value length-prefixed, in
//! a fixed order, hashed with SHA-256. Every field is taken apart with an exhaustive pattern,
//! so a key added to the configuration does not compile here until it is given its record.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use super::schema::{
    ClusterSettings, Config, DEFAULT_LEARNED_IDLE_MS, HealthCheck, HealthProbe, MemberSettings,
    QuicSettings, ServiceSettings,
};

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Bits of [`Digest::prefix`]: as many as an `f64` (the type of every Prometheus value)
    /// holds exactly, rounded down to whole hex digits.
    pub const PREFIX_BITS: u32 = 48;

    /// The first [`Self::PREFIX_BITS`] bits as a number: the value the digest metrics export.
    /// Its hex form is the first 12 hex digits of the digest. Two different digests share it
    /// with probability 2^-48.
    pub fn prefix(&self) -> u64 {
        let mut word = [0u8; 8];
        word[2..].copy_from_slice(&self.0[..6]);
        u64::from_be_bytes(word)
    }

    /// The prefix as the metrics export it: exact, since it is below 2^53.
    pub fn prefix_f64(&self) -> f64 {
        self.prefix() as f64
    }

    /// The first 12 hex digits: [`Digest::prefix`] as `status` prints it.
    pub fn short(&self) -> String {
        format!("{:012x}", self.prefix())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A digest's text was not 64 hex digits.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a digest is 64 hex digits")]
pub struct DigestParseError;

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || !s.is_ascii() {
            return Err(DigestParseError);
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
            // ASCII was checked, so the pair is valid UTF-8.
            let pair = std::str::from_utf8(pair).map_err(|_| DigestParseError)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| DigestParseError)?;
        }
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Builds a digest from records; each record is one `path = value`.
pub struct Records {
    hasher: Sha256,
}

impl Records {
    /// A new digest, for records of the kind `domain` names: digests of different kinds never
    /// coincide.
    pub fn new(domain: &str) -> Self {
        let mut records = Records {
            hasher: Sha256::new(),
        };
        records.bytes(domain.as_bytes());
        records
    }

    /// Length-prefixed, so that no two different record lists give the same byte stream.
    fn bytes(&mut self, bytes: &[u8]) {
        self.hasher.update((bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    /// Adds the record `path = value`.
    pub fn record(&mut self, path: &str, value: impl fmt::Display) {
        self.bytes(path.as_bytes());
        self.bytes(value.to_string().as_bytes());
    }

    /// Adds raw bytes as the value of `path`.
    pub fn raw(&mut self, path: &str, value: &[u8]) {
        self.bytes(path.as_bytes());
        self.bytes(value);
    }

    pub fn finish(self) -> Digest {
        Digest(self.hasher.finalize().into())
    }
}

/// The value of an optional setting: `none` and `some:<value>` cannot be confused.
fn optional<T: fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "none".to_owned(), |v| format!("some:{v}"))
}

/// The digest of the configuration's `[cluster]` and `[[services]]`; see the module's doc.
pub fn cluster_digest(cfg: &Config) -> Digest {
    let mut r = Records::new("cdn-steer cluster configuration v1");
    cluster(&mut r, &cfg.cluster);
    let mut services: Vec<&ServiceSettings> = cfg.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    r.record("services", services.len());
    for s in services {
        service(&mut r, s);
    }
    r.finish()
}

fn cluster(r: &mut Records, c: &ClusterSettings) {
    let ClusterSettings {
        hash_key,
        steer_port,
        table_size,
        hop_budget,
        steer_auth,
        history_sync,
        learned_idle,
        members,
    } = c;
    r.record(
        "cluster.hash_key",
        format_args!("{:016x}{:016x}", hash_key[0], hash_key[1]),
    );
    r.record("cluster.steer_port", steer_port);
    r.record("cluster.table_size", table_size);
    r.record("cluster.hop_budget", hop_budget);
    // Recorded only when on, so that nodes from before the setting existed, which cannot
    // have it on, keep the digest of their peers.
    if *steer_auth {
        r.record("cluster.steer_auth", steer_auth);
    }
    r.record(
        "cluster.history_sync_ms",
        optional(history_sync.map(|d| d.as_millis())),
    );
    // Recorded only when not the default, so that nodes from before the setting existed keep
    // the digest of their peers.
    if learned_idle.as_millis() != DEFAULT_LEARNED_IDLE_MS.into() {
        r.record("cluster.learned_idle_ms", learned_idle.as_millis());
    }
    let mut members: Vec<&MemberSettings> = members.iter().collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    r.record("cluster.members", members.len());
    for m in members {
        member(r, m);
    }
}

fn member(r: &mut Records, m: &MemberSettings) {
    let MemberSettings {
        name,
        id,
        underlay,
        weight,
        health,
        sync,
        quic_server_id,
        pop,
    } = m;
    let path = |key: &str| format!("cluster.members[{name}].{key}");
    r.record(&path("name"), name);
    r.record(&path("id"), id);
    r.record(&path("underlay"), underlay);
    r.record(&path("weight"), weight);
    r.record(&path("sync"), optional(sync.as_ref()));
    // Recorded only when it differs from the default (the id), so that nodes from before QUIC
    // routing, which cannot set it, keep the digest of their peers.
    if *quic_server_id != u32::from(*id) {
        r.record(&path("quic_server_id"), quic_server_id);
    }
    // Recorded only when set, so that a cluster without PoPs keeps the digest it had before
    // PoPs existed.
    if let Some(pop) = pop {
        r.record(&path("pop"), pop);
    }
    let HealthCheck {
        probe,
        port,
        interval,
        timeout,
        rise,
        fall,
        reset,
    } = health;
    match probe {
        HealthProbe::Tcp => r.record(&path("health.kind"), "tcp"),
        HealthProbe::Http { path: url, host } => {
            r.record(&path("health.kind"), "http");
            r.record(&path("health.path"), url);
            // Left out, the Host header is the member's underlay address: the same request.
            let host = host.clone().unwrap_or_else(|| underlay.to_string());
            r.record(&path("health.host"), host);
        }
    }
    r.record(&path("health.port"), port);
    r.record(&path("health.interval_ms"), interval.as_millis());
    r.record(&path("health.timeout_ms"), timeout.as_millis());
    r.record(&path("health.rise"), rise);
    r.record(&path("health.fall"), fall);
    r.record(&path("health.reset"), reset);
}

fn service(r: &mut Records, s: &ServiceSettings) {
    let ServiceSettings {
        name,
        vips,
        tcp_ports,
        udp_ports,
        udp_mode,
        quic,
    } = s;
    let path = |key: &str| format!("services[{name}].{key}");
    r.record(&path("name"), name);
    // Prefixes and ports are sets to the data plane: their order changes nothing.
    let mut vips: Vec<String> = vips.iter().map(ToString::to_string).collect();
    vips.sort();
    r.record(&path("vips"), vips.join(" "));
    for (key, ports) in [("tcp_ports", tcp_ports), ("udp_ports", udp_ports)] {
        let mut ports = ports.clone();
        ports.sort_unstable();
        let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
        r.record(&path(key), ports.join(" "));
    }
    r.record(&path("udp_mode"), udp_mode.name());
    // Only when set, for the same reason as `quic_server_id`.
    if let Some(QuicSettings {
        ports,
        config_id,
        server_id_len,
        cid_len,
    }) = quic
    {
        let mut ports = ports.clone();
        ports.sort_unstable();
        let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
        r.record(&path("quic.ports"), ports.join(" "));
        r.record(&path("quic.config_id"), config_id);
        r.record(&path("quic.server_id_len"), server_id_len);
        r.record(&path("quic.cid_len"), cid_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EXAMPLE, parse};

    fn digest(text: &str) -> Digest {
        cluster_digest(&parse(text).unwrap_or_else(|e| panic!("{e}\n{text}")))
    }

    /// The example with the first occurrence of each `from` replaced by its `to`.
    fn edited(edits: &[(&str, &str)]) -> String {
        let mut text = EXAMPLE.to_owned();
        for (from, to) in edits {
            assert!(text.contains(from), "example has no {from:?}");
            text = text.replacen(from, to, 1);
        }
        text
    }

    /// The example with its comments and blank lines gone, keys of each table reversed,
    /// members and services in reverse order, written-out defaults removed, lists reordered and
    /// addresses spelled differently: the same configuration for every node.
    fn reformatted() -> String {
        // Split into tables (a header line and its keys), without comments and blank lines.
        let mut tables: Vec<(String, Vec<String>)> = Vec::new();
        for line in EXAMPLE.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('[') {
                tables.push((line.to_owned(), Vec::new()));
            } else if let Some((_, keys)) = tables.last_mut() {
                keys.push(line.to_owned());
            }
        }
        // A member is its header with its health table; reverse the members and the services.
        let mut members: Vec<Vec<(String, Vec<String>)>> = Vec::new();
        let mut services: Vec<Vec<(String, Vec<String>)>> = Vec::new();
        let mut rest = Vec::new();
        for (header, mut keys) in tables {
            keys.reverse();
            // Written-out defaults (the example writes several) changes nothing.
            keys.retain(|k| k != "hop_budget = 3" && k != "steer_port = 6080");
            match header.as_str() {
                "[[cluster.members]]" => members.push(vec![(header, keys)]),
                "[cluster.members.health]" => members
                    .last_mut()
                    .expect("a health table follows its member")
                    .push((header, keys)),
                "[[services]]" => services.push(vec![(header, keys)]),
                "[services.quic]" => services
                    .last_mut()
                    .expect("a quic table follows its service")
                    .push((header, keys)),
                _ => rest.push((header, keys)),
            }
        }
        members.reverse();
        services.reverse();
        let mut out = String::new();
        let mut write = |(header, keys): &(String, Vec<String>)| {
            out.push_str(&format!("{header}\n"));
            for key in keys {
                let key = key
                    // Not [443, 80]: the first TCP port is the default health check port.
                    .replace("[80, 443]", "[ 80,443 ]")
                    .replace(
                        "[\"192.0.2.1/32\", \"2001:db8::1/128\"]",
                        "['2001:0db8:0::1/128','192.0.2.1/32']",
                    )
                    .replace(" = ", "=");
                out.push_str(&format!("{key}   # reformatted\n"));
            }
            out.push('\n');
        };
        rest.iter().for_each(&mut write);
        members.iter().flatten().for_each(&mut write);
        services.iter().flatten().for_each(&mut write);
        out
    }

    #[test]
    fn digest_ignores_formatting_order_and_implicit_defaults() {
        let text = reformatted();
        assert_ne!(text, EXAMPLE);
        assert_eq!(digest(&text), digest(EXAMPLE), "\n{text}");
    }

    #[test]
    fn digest_ignores_the_per_node_sections() {
        let other_node = edited(&[
            ("name = \"node-a\"", "name = \"node-b\""),
            ("underlay_v4 = \"10.0.0.1\"", "underlay_v4 = \"10.0.0.2\""),
            ("max_frame = 1514", "max_frame = 9000"),
            ("xdp_mode = \"native\"", "xdp_mode = \"generic\""),
        ]);
        assert_eq!(digest(&other_node), digest(EXAMPLE));
    }

    #[test]
    fn digest_changes_with_every_steering_value() {
        let base = digest(EXAMPLE);
        let changes: &[&[(&str, &str)]] = &[
            &[("weight = 50", "weight = 51")],
            &[(
                "hash_key = \"00112233445566778899aabbccddeeff\"",
                "hash_key = \"00112233445566778899aabbccddeefe\"",
            )],
            &[("steer_port = 6080", "steer_port = 6081")],
            &[("table_size = 65537", "table_size = 65521")],
            &[("hop_budget = 3", "hop_budget = 2")],
            &[("history_sync_ms = 5000", "history_sync_ms = 0")],
            &[("tcp_ports = [80, 443]", "tcp_ports = [80, 444]")],
            &[("tcp_ports = [80, 443]", "tcp_ports = [80]")],
            &[("\"192.0.2.1/32\", ", "\"192.0.2.2/32\", ")],
            &[("name = \"web\"", "name = \"www\"")],
            &[("id = 2", "id = 7")],
            &[("underlay = \"10.0.0.3\"", "underlay = \"10.0.0.4\"")],
            &[("sync = \"10.0.0.1:9466\"", "sync = \"10.0.0.1:9467\"")],
            &[("rise = 2", "rise = 3")],
            &[("path = \"/healthz\"", "path = \"/health\"")],
            &[("quic_server_id = 12", "quic_server_id = 13")],
            &[("cid_len = 8", "cid_len = 9")],
            &[("config_id = 0", "config_id = 1")],
            &[("server_id_len = 2", "server_id_len = 1")],
            &[
                ("udp_ports = [443]", "udp_ports = [443, 53]"),
                ("\nports = [443]", "\nports = [443, 53]"),
            ],
        ];
        let mut seen = vec![base];
        for edits in changes {
            let d = digest(&edited(edits));
            assert!(!seen.contains(&d), "{edits:?} did not change the digest");
            seen.push(d);
        }
    }

    #[test]
    fn digest_prefix_is_its_first_48_bits_and_exact_in_f64() {
        let mut bytes = [0u8; 32];
        bytes[..7].copy_from_slice(&[0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa, 0x99]);
        let d = Digest(bytes);
        assert_eq!(d.prefix(), 0xffee_ddcc_bbaa);
        assert_eq!(d.short(), "ffeeddccbbaa");
        assert!(d.to_string().starts_with(&d.short()));
        assert_eq!(d.prefix_f64() as u64, d.prefix());
        let text = serde_json::to_string(&d).unwrap();
        assert_eq!(text, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&text).unwrap(), d);
        assert!("abc".parse::<Digest>().is_err());
        assert!("zz".repeat(32).parse::<Digest>().is_err());
    }
}
