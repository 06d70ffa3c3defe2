//! History sync: a starting controller copies the steering tables' hop history from a running
//! member, so that it knows every member that may hold a flow, including flows that began
//! while it was away or before it first started.
//!
//! Served by every controller at `GET /table/<service>` on its metrics endpoint: the active
//! table, 6 bytes per bucket (three member ids, little-endian), with the table size and
//! generation in headers.

use std::{net::SocketAddr, time::Duration};

use cdn_common::maps::{Bucket, MAX_HOPS};
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Bytes per bucket on the wire.
pub const BUCKET_BYTES: usize = 2 * MAX_HOPS;

#[derive(Debug, Error)]
pub enum SyncError {
    #[error("{addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: no answer within {0:?}", .timeout)]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("{addr}: {reason}")]
    Bad { addr: SocketAddr, reason: String },
}

pub fn encode(buckets: &[Bucket]) -> Vec<u8> {
    let mut out = Vec::with_capacity(buckets.len() * BUCKET_BYTES);
    for b in buckets {
        for hop in b.hops {
            out.extend_from_slice(&hop.to_le_bytes());
        }
    }
    out
}

pub fn decode(bytes: &[u8]) -> Option<Vec<Bucket>> {
    if !bytes.len().is_multiple_of(BUCKET_BYTES) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(BUCKET_BYTES)
            .map(|c| {
                let mut b = Bucket::EMPTY;
                for (i, hop) in b.hops.iter_mut().enumerate() {
                    *hop = u16::from_le_bytes([c[2 * i], c[2 * i + 1]]);
                }
                b
            })
            .collect(),
    )
}

/// Fetches `service`'s table of `size` buckets from the controller at `addr`.
pub async fn fetch(
    addr: SocketAddr,
    service: &str,
    size: u32,
    timeout: Duration,
) -> Result<Vec<Bucket>, SyncError> {
    let io = |source| SyncError::Io { addr, source };
    let bad = |reason: String| SyncError::Bad { addr, reason };
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(io)?;
        let request = format!(
            "GET /table/{service} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cdn-steer-sync\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let limit = size as usize * BUCKET_BYTES + 64 * 1024;
        let mut response = Vec::new();
        (&mut stream)
            .take(limit as u64)
            .read_to_end(&mut response)
            .await
            .map_err(io)?;
        Ok(response)
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| SyncError::Timeout { addr, timeout })??;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no complete HTTP head".into()))?;
    let head = String::from_utf8_lossy(&response[..end]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(bad(format!("HTTP status {status} for /table/{service}")));
    }
    let body = &response[end + 4..];
    let buckets = decode(body).ok_or_else(|| bad("body is not whole buckets".into()))?;
    if buckets.len() != size as usize {
        return Err(bad(format!(
            "table of {} buckets, this node uses {size}",
            buckets.len()
        )));
    }
    Ok(buckets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let buckets = vec![
            Bucket {
                hops: [1, 2, u16::MAX],
                _pad: 0,
            },
            Bucket::EMPTY,
            Bucket {
                hops: [1023, 0, 7],
                _pad: 0,
            },
        ];
        let bytes = encode(&buckets);
        assert_eq!(bytes.len(), 18);
        assert_eq!(&bytes[..6], &[1, 0, 2, 0, 0xff, 0xff]);
        assert_eq!(decode(&bytes), Some(buckets));
        assert_eq!(decode(&bytes[..5]), None);
    }
}
