//! QUIC-LB plaintext connection IDs (draft-ietf-quic-load-balancers, "plaintext" algorithm):
//! the layout a QUIC server's connection IDs follow so that the XDP program can read, from the
//! destination connection ID of any packet after the client's first flight, which member
//! holds the connection.
//!
//! ```text
//!  octet 0                      1 ..= server_id_len          .. cid_len
//! +--------------+-------------+-----------------------------+-----------------+
//! | config id (3)| length-1 (5)| server id (big-endian)      | nonce (>= 4)    |
//! +--------------+-------------+-----------------------------+-----------------+
//! ```
//!
//! The first octet's top three bits are the *config rotation* bits (config id 0..=6; 7 marks
//! an unroutable CID); its low five bits self-encode the CID length minus one, as the draft
//! allows. Server IDs are at most [`MAX_SERVER_ID_LEN`] octets here: the program maps a server
//! ID to a member by direct index into an array of 65,536 entries (`QUIC_SERVERS`), which is
//! one array lookup per packet and covers far more IDs than a cluster has members.
//!
//! Both sides use this module: the kernel's decoding (`cdn-ebpf`) is tested against
//! [`QuicLbConfig::encode`], and servers generate their connection IDs with it.

/// Longest connection ID QUIC version 1 allows.
pub const MAX_CID_LEN: usize = 20;
/// Shortest nonce the draft allows.
pub const MIN_NONCE_LEN: usize = 4;
/// Longest server ID this implementation routes (see the module documentation).
pub const MAX_SERVER_ID_LEN: usize = 2;
/// Config rotation value the draft reserves for connection IDs that carry no routing
/// information.
pub const UNROUTABLE_CONFIG_ID: u8 = 7;
/// Entries of the `QUIC_SERVERS` array: every server ID of [`MAX_SERVER_ID_LEN`] octets.
pub const QUIC_SERVER_IDS: u32 = 1 << (8 * MAX_SERVER_ID_LEN);

/// Why a QUIC-LB configuration cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuicLbError {
    /// Config id outside 0..=6.
    ConfigId(u8),
    /// Server ID length outside 1..=[`MAX_SERVER_ID_LEN`].
    ServerIdLen(u8),
    /// CID length outside `1 + server_id_len + MIN_NONCE_LEN ..= MAX_CID_LEN`.
    CidLen(u8),
    /// A server ID that does not fit `server_id_len` octets.
    ServerId(u32),
}

impl core::fmt::Display for QuicLbError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::ConfigId(v) => write!(f, "config_id {v} is outside 0..=6 (7 means unroutable)"),
            Self::ServerIdLen(v) => write!(
                f,
                "server_id_len {v} is outside 1..={MAX_SERVER_ID_LEN} (the program indexes \
                 server IDs directly)"
            ),
            Self::CidLen(v) => write!(
                f,
                "cid_len {v} must leave room for the first octet, the server ID and a nonce of \
                 at least {MIN_NONCE_LEN} octets, and be at most {MAX_CID_LEN}"
            ),
            Self::ServerId(v) => write!(f, "server ID {v} does not fit server_id_len octets"),
        }
    }
}

/// One QUIC-LB plaintext configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuicLbConfig {
    /// Config rotation bits, 0..=6.
    pub config_id: u8,
    /// Octets of server ID, 1..=[`MAX_SERVER_ID_LEN`].
    pub server_id_len: u8,
    /// Octets of the whole connection ID.
    pub cid_len: u8,
}

impl QuicLbConfig {
    /// Checks the ranges the draft and this implementation allow.
    pub const fn validate(&self) -> Result<(), QuicLbError> {
        if self.config_id >= UNROUTABLE_CONFIG_ID {
            return Err(QuicLbError::ConfigId(self.config_id));
        }
        if self.server_id_len == 0 || self.server_id_len as usize > MAX_SERVER_ID_LEN {
            return Err(QuicLbError::ServerIdLen(self.server_id_len));
        }
        let min = 1 + self.server_id_len as usize + MIN_NONCE_LEN;
        if (self.cid_len as usize) < min || self.cid_len as usize > MAX_CID_LEN {
            return Err(QuicLbError::CidLen(self.cid_len));
        }
        Ok(())
    }

    /// Largest server ID that fits `server_id_len` octets.
    pub const fn max_server_id(&self) -> u32 {
        (1u32 << (8 * self.server_id_len as u32)) - 1
    }

    /// The first octet of every connection ID of this configuration.
    pub const fn first_octet(&self) -> u8 {
        (self.config_id << 5) | ((self.cid_len - 1) & 0x1f)
    }

    /// Writes a connection ID for `server_id` into `out[..cid_len]`, the nonce taken from
    /// `nonce` (its first `cid_len - 1 - server_id_len` octets; the rest is ignored).
    /// Returns the CID's length.
    pub fn encode(
        &self,
        server_id: u32,
        nonce: &[u8; MAX_CID_LEN],
        out: &mut [u8; MAX_CID_LEN],
    ) -> Result<usize, QuicLbError> {
        self.validate()?;
        if server_id > self.max_server_id() {
            return Err(QuicLbError::ServerId(server_id));
        }
        let sid_len = self.server_id_len as usize;
        let len = self.cid_len as usize;
        out[0] = self.first_octet();
        let sid = server_id.to_be_bytes();
        out[1..1 + sid_len].copy_from_slice(&sid[4 - sid_len..]);
        let nonce_len = len - 1 - sid_len;
        out[1 + sid_len..len].copy_from_slice(&nonce[..nonce_len]);
        Ok(len)
    }

    /// The server ID a connection ID of this configuration carries, or `None` if `cid` is
    /// not one (wrong length or config rotation bits).
    pub fn decode(&self, cid: &[u8]) -> Option<u32> {
        if cid.len() != self.cid_len as usize || cid[0] >> 5 != self.config_id {
            return None;
        }
        let sid_len = self.server_id_len as usize;
        Some(
            cid[1..1 + sid_len]
                .iter()
                .fold(0u32, |acc, b| (acc << 8) | u32::from(*b)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: QuicLbConfig = QuicLbConfig {
        config_id: 2,
        server_id_len: 2,
        cid_len: 8,
    };

    #[test]
    fn encodes_the_draft_layout() {
        let mut out = [0; MAX_CID_LEN];
        let nonce = [0xa0; MAX_CID_LEN];
        let len = CFG.encode(0x0102, &nonce, &mut out).expect("valid");
        assert_eq!(len, 8);
        assert_eq!(&out[..8], &[0x47, 0x01, 0x02, 0xa0, 0xa0, 0xa0, 0xa0, 0xa0]);
        assert_eq!(CFG.decode(&out[..8]), Some(0x0102));
    }

    #[test]
    fn rejects_other_configs_and_lengths() {
        let mut out = [0; MAX_CID_LEN];
        CFG.encode(7, &[1; MAX_CID_LEN], &mut out).expect("valid");
        assert_eq!(CFG.decode(&out[..7]), None);
        out[0] = (3 << 5) | 7;
        assert_eq!(CFG.decode(&out[..8]), None);
    }

    #[test]
    fn validates_ranges() {
        let bad = |config_id, server_id_len, cid_len| {
            QuicLbConfig {
                config_id,
                server_id_len,
                cid_len,
            }
            .validate()
        };
        assert_eq!(bad(7, 2, 8), Err(QuicLbError::ConfigId(7)));
        assert_eq!(bad(0, 0, 8), Err(QuicLbError::ServerIdLen(0)));
        assert_eq!(bad(0, 3, 8), Err(QuicLbError::ServerIdLen(3)));
        assert_eq!(bad(0, 2, 6), Err(QuicLbError::CidLen(6)));
        assert_eq!(bad(0, 2, 21), Err(QuicLbError::CidLen(21)));
        assert_eq!(bad(6, 1, 6), Ok(()));
        let one = QuicLbConfig {
            config_id: 0,
            server_id_len: 1,
            cid_len: 8,
        };
        let mut out = [0; MAX_CID_LEN];
        assert_eq!(
            one.encode(256, &[0; MAX_CID_LEN], &mut out),
            Err(QuicLbError::ServerId(256))
        );
    }
}
