//! QUIC-LB connection IDs for quinn: a [`quinn_proto::ConnectionIdGenerator`] that issues plaintext
//! QUIC-LB CIDs (`cdn_common::quic_lb`) naming this server, so that cdn-steer's XDP program
//! sends every packet of the connection after the client's first flight to this server,
//! whatever node the packet lands on and whatever address the client sends from.
//!
//! For operators of Rust servers on quinn, this file is meant to be copied (it depends on
//! quinn and `cdn_common::quic_lb` only):
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use cdn_common::quic_lb::QuicLbConfig;
//! # use cdn_tests::h3::cid::QuicLbCidGenerator;
//! // The service's `quic` table and this member's `quic_server_id` (default: its member id).
//! let lb = QuicLbConfig { config_id: 0, server_id_len: 2, cid_len: 8 };
//! let generator = QuicLbCidGenerator::new(lb, 3).expect("server id fits the config");
//! let mut endpoint_config = quinn::EndpointConfig::default();
//! endpoint_config.cid_generator(move || Box::new(generator.clone()));
//! ```
//!
//! The nonce is random (the draft asks for unpredictable nonces in plaintext mode; the server
//! ID itself is visible to an observer: plaintext CIDs link a connection to its server).

use std::time::Duration;

use cdn_common::quic_lb::{MAX_CID_LEN, QuicLbConfig, QuicLbError};
use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use rand::RngCore as _;

/// Issues QUIC-LB plaintext connection IDs carrying one server ID.
#[derive(Clone, Copy, Debug)]
pub struct QuicLbCidGenerator {
    config: QuicLbConfig,
    server_id: u32,
    lifetime: Option<Duration>,
}

impl QuicLbCidGenerator {
    /// A generator for `server_id` under `config`; fails if the config is invalid or the
    /// server ID does not fit its `server_id_len`.
    pub fn new(config: QuicLbConfig, server_id: u32) -> Result<Self, QuicLbError> {
        config.validate()?;
        if server_id > config.max_server_id() {
            return Err(QuicLbError::ServerId(server_id));
        }
        Ok(Self {
            config,
            server_id,
            lifetime: None,
        })
    }

    /// Retires issued CIDs after `lifetime` (quinn then issues fresh ones): limits how long
    /// one CID links a client's packets together.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    pub fn config(&self) -> QuicLbConfig {
        self.config
    }

    pub fn server_id(&self) -> u32 {
        self.server_id
    }

    /// One connection ID: the configuration's first octet, the server ID, a random nonce.
    pub fn cid_bytes(&self) -> ([u8; MAX_CID_LEN], usize) {
        let mut nonce = [0u8; MAX_CID_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = [0u8; MAX_CID_LEN];
        // `new` checked the config and the server ID, the only ways encode can fail.
        let len = self
            .config
            .encode(self.server_id, &nonce, &mut out)
            .unwrap_or(0);
        (out, len)
    }
}

impl ConnectionIdGenerator for QuicLbCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let (bytes, len) = self.cid_bytes();
        ConnectionId::new(&bytes[..len])
    }

    /// Accepts every CID of this configuration, also those naming a sibling server: a
    /// packet with another server's CID that reaches this one (its routing was lost) then gets
    /// a stateless reset, which tells the client at once, instead of being dropped, which
    /// leaves it waiting for its idle timeout. With a reset key shared by all servers the
    /// client recognises that reset.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        self.config.decode(cid).map(|_| ()).ok_or(InvalidCid)
    }

    fn cid_len(&self) -> usize {
        usize::from(self.config.cid_len)
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}
