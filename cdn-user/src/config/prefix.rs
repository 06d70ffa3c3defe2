//! IP prefixes (`192.0.2.0/24`), the form VIPs are written in.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::Deserialize;
use thiserror::Error;

/// An IP prefix with all host bits zero, such as `192.0.2.0/24` or `2001:db8::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why a string is not a [`Prefix`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PrefixError {
    #[error("{0:?} has no prefix length (write it as address/length, e.g. 192.0.2.1/32)")]
    MissingLength(String),
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
    #[error("{0:?} is not a prefix length")]
    BadLength(String),
    #[error("prefix length {len} is longer than {max} for {addr}")]
    TooLong { addr: IpAddr, len: u8, max: u8 },
    #[error("{addr}/{len} has host bits set (did you mean {network}?)")]
    HostBitsSet {
        addr: IpAddr,
        len: u8,
        network: Prefix,
    },
}

impl Prefix {
    /// A prefix of `len` bits at `addr`; `addr` must have no bit set beyond the first `len`.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let max = max_len(addr);
        if len > max {
            return Err(PrefixError::TooLong { addr, len, max });
        }
        let network = Prefix {
            addr: mask(addr, len),
            len,
        };
        if network.addr != addr {
            return Err(PrefixError::HostBitsSet { addr, len, network });
        }
        Ok(network)
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` lies in this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// Whether some address lies in both prefixes (one of them then contains the other).
    pub fn overlaps(&self, other: &Prefix) -> bool {
        let (wide, narrow) = if self.len <= other.len {
            (self, other)
        } else {
            (other, self)
        };
        wide.contains(narrow.addr)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with every bit after the first `len` cleared; `len` at most the family's width.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a)
                .checked_shr(32 - u32::from(len))
                .unwrap_or(0)
                .checked_shl(32 - u32::from(len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a)
                .checked_shr(128 - u32::from(len))
                .unwrap_or(0)
                .checked_shl(128 - u32::from(len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| PrefixError::MissingLength(s.to_owned()))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| PrefixError::BadAddress(addr.to_owned()))?;
        // u8::from_str accepts a leading '+'; a prefix length is plain digits.
        let len: u8 = len
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| len.parse().ok())
            .flatten()
            .ok_or_else(|| PrefixError::BadLength(len.to_owned()))?;
        Prefix::new(addr, len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Strict: a configuration file's prefixes are checked as text before deserialisation (see
/// `document.rs`), so that every bad one is reported with its field path, not just the first.
impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
