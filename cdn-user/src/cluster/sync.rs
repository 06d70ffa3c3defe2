//! History sync: a starting controller copies the steering tables' hop history from a running
//! member, so that it knows every member that may hold a flow, including flows that began
//! while it was away or before it first started.
//!
//! This module holds all of it:
//! - the route: every controller serves `GET /table/<service>` on its HTTP endpoint
//!   ([`table_answer`]): the active table, 6 bytes per bucket (three member ids,
//!   little-endian), its length in `Content-Length` and its generation in
//!   `X-Table-Generation`;
//! - the client: [`fetch`] one table, [`fetch_all`] of a peer's tables;
//! - the schedule: [`take_over`] once at start-up, then [`gossip`] with one peer in turn;
//! - drift: every controller also serves `GET /digests` ([`NodeDigests`] as JSON: the digest of
//!   its cluster configuration and of each service's table), which `status` fetches from the
//!   peers ([`fetch_digests`]) and [`compare`]s with its own.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use cdn_common::maps::{Bucket, MAX_HOPS};
use hyper::StatusCode;
use hyper::header::HeaderName;
use log::warn;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cluster::peer_http::{self as http, ClientError, Get};
use crate::config::{Digest, Records};

/// Bytes per bucket on the wire.
pub const BUCKET_BYTES: usize = 2 * MAX_HOPS;

/// The header with the generation of the table served.
pub const GENERATION_HEADER: HeaderName = HeaderName::from_static("x-table-generation");
/// The `User-Agent` of table fetches.
const USER_AGENT: &str = "cdn-steer-sync";

/// Why a table could not be taken from a peer; every variant names the peer.
#[derive(Debug, Error)]
pub enum SyncError {
    /// No answer, or not a readable one (the address is in the message).
    #[error(transparent)]
    Http(#[from] ClientError),
    #[error("{addr}: HTTP status {status} for /table/{service}")]
    Status {
        addr: SocketAddr,
        status: u16,
        service: String,
    },
    #[error("{addr}: HTTP status {status} for {DIGESTS_PATH}")]
    DigestStatus { addr: SocketAddr, status: u16 },
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

/// Fetches `service`'s table of `size` buckets from the controller at `addr`, within `timeout`.
pub async fn fetch(
    addr: SocketAddr,
    service: &str,
    size: u32,
    timeout: Duration,
) -> Result<Vec<Bucket>, SyncError> {
    let bad = |reason: String| SyncError::Bad { addr, reason };
    let path = format!("/table/{service}");
    let host = addr.to_string();
    let request = Get {
        path: &path,
        host: &host,
        user_agent: USER_AGENT,
        // Exactly the table we expect: anything longer is wrong, however it ends.
        body_limit: size as usize * BUCKET_BYTES,
    };
    let answer = http::get(addr, &request, timeout).await?;
    if answer.status != StatusCode::OK {
        return Err(SyncError::Status {
            addr,
            status: answer.status.as_u16(),
            service: service.to_owned(),
        });
    }
    let body = answer.body?;
    let buckets = decode(&body).ok_or_else(|| bad("body is not whole buckets".into()))?;
    if buckets.len() != size as usize {
        return Err(bad(format!(
            "table of {} buckets, this node uses {size}",
            buckets.len()
        )));
    }
    Ok(buckets)
}

/// Time one table fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// What to sync with, as the node sees it now.
#[derive(Clone, Debug, Default)]
pub struct SyncPlan {
    /// Healthy members other than this node, with their endpoints: `(name, address)`.
    pub peers: Vec<(String, SocketAddr)>,
    /// Every configured table, by table name (`config::table_name`: the service's name, or
    /// `"<service>@<pop>"` with PoPs).
    pub services: Vec<String>,
    /// Buckets per table.
    pub table_size: u32,
}

/// Every service's table from the peer at `addr`: all of them, or the first error.
pub async fn fetch_all(
    addr: SocketAddr,
    services: &[String],
    size: u32,
) -> Result<Vec<(String, Vec<Bucket>)>, SyncError> {
    let mut tables = Vec::with_capacity(services.len());
    for service in services {
        tables.push((
            service.clone(),
            fetch(addr, service, size, FETCH_TIMEOUT).await?,
        ));
    }
    Ok(tables)
}

/// Start-up: the tables of the first peer that answers for every service, with its name.
/// `None` when no peer does (a cold start of the whole cluster): our own pinned history is then
/// all there is.
pub async fn take_over(plan: &SyncPlan) -> Option<(String, Vec<(String, Vec<Bucket>)>)> {
    for (name, addr) in &plan.peers {
        match fetch_all(*addr, &plan.services, plan.table_size).await {
            Ok(tables) => {
                log::info!("hop history taken over from {name} ({addr})");
                return Some((name.clone(), tables));
            }
            Err(e) => warn!("history sync from {name}: {e}"),
        }
    }
    log::info!("no running member to take the hop history from: starting from our own");
    None
}

/// Every `every`, fetches one peer's tables (peers in turn, as `plan` lists them at that
/// moment) and hands what it got to `absorb` on the blocking pool, with the peer's name, so
/// that owners one node saw and another did not end up in both histories. Runs until aborted.
pub async fn gossip<P, A>(every: Duration, plan: P, absorb: A)
where
    P: Fn() -> SyncPlan,
    A: Fn(&str, &[(String, Vec<Bucket>)]) + Clone + Send + 'static,
{
    let mut turn = 0usize;
    loop {
        tokio::time::sleep(every).await;
        let plan = plan();
        if plan.peers.is_empty() {
            continue;
        }
        turn = turn.wrapping_add(1);
        let (name, addr) = plan.peers[turn % plan.peers.len()].clone();
        // Whatever tables came, even if some service failed: each is merged on its own.
        let mut tables = Vec::new();
        for service in &plan.services {
            match fetch(addr, service, plan.table_size, FETCH_TIMEOUT).await {
                Ok(buckets) => tables.push((service.clone(), buckets)),
                Err(e) => log::debug!("history gossip with {name}: {e}"),
            }
        }
        let absorb = absorb.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || absorb(&name, &tables)).await {
            log::error!("history gossip task failed: {e}");
        }
    }
}

/// A service's active table, encoded for `/table/<service>`, with its generation; `None` for an
/// unknown service. Called on tokio's blocking pool, so it may take locks.
pub type TableSource = Arc<dyn Fn(&str) -> Option<(u32, Vec<u8>)> + Send + Sync>;

/// What `GET /table/<service>` answers; the HTTP server turns it into a response.
#[derive(Debug, PartialEq, Eq)]
pub enum TableAnswer {
    /// The encoded table and its generation (sent as [`GENERATION_HEADER`]).
    Table { generation: u32, body: Vec<u8> },
    /// No service of that name (404).
    UnknownService,
    /// The export itself failed (500); logged here.
    Failed,
}

/// The answer to `GET /table/<service>`: the table from `source`.
pub async fn table_answer(service: String, source: TableSource) -> TableAnswer {
    match tokio::task::spawn_blocking(move || source(&service)).await {
        Ok(Some((generation, body))) => TableAnswer::Table { generation, body },
        Ok(None) => TableAnswer::UnknownService,
        Err(e) => {
            warn!("table export failed: {e}");
            TableAnswer::Failed
        }
    }
}

// --- Drift: the digests nodes compare -------------------------------------------------------

/// Path of the digests route.
pub const DIGESTS_PATH: &str = "/digests";
/// Largest `/digests` answer read: a few dozen services' digests fit many times over.
const DIGESTS_LIMIT: usize = 64 * 1024;

/// The digest of a steering table: every bucket's owner, then the other members its history
/// lists, as a set. Two nodes whose tables send every flow to the same owner and know the same
/// members that may hold it get the same digest. The order of the history is left out: nodes
/// that learnt the same owners in another order (each merges a peer's history after its own,
/// see [`crate::cluster::history::merge`]) keep different orders for good, and the data plane
/// finds a flow along either.
pub fn table_digest(buckets: &[Bucket]) -> Digest {
    let mut bytes = Vec::with_capacity(buckets.len() * BUCKET_BYTES);
    for bucket in buckets {
        let mut hops = bucket.hops;
        // Empty slots (`NO_MEMBER`, the largest id) stay last.
        hops[1..].sort_unstable();
        for hop in hops {
            bytes.extend_from_slice(&hop.to_le_bytes());
        }
    }
    let mut records = Records::new("cdn-steer steering table v1");
    records.raw("buckets", &bytes);
    records.finish()
}

/// What a node answers at `/digests`, as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDigests {
    /// The node's name (`node.name`).
    pub node: String,
    /// Digest of its `[cluster]` and `[[services]]` ([`crate::config::cluster_digest`]).
    pub config: Digest,
    /// Per service whose table is installed: the [`table_digest`] of the active table.
    pub tables: BTreeMap<String, Digest>,
}

/// This node's digests at the time of asking. Called on tokio's blocking pool, so it may take
/// locks.
pub type DigestSource = Arc<dyn Fn() -> NodeDigests + Send + Sync>;

/// The body of the answer to `GET /digests`; `None` if the source failed (logged here).
pub async fn digests_answer(source: DigestSource) -> Option<Vec<u8>> {
    match tokio::task::spawn_blocking(move || serde_json::to_vec(&source())).await {
        Ok(Ok(body)) => Some(body),
        Ok(Err(e)) => {
            warn!("digest export failed: {e}");
            None
        }
        Err(e) => {
            warn!("digest export failed: {e}");
            None
        }
    }
}

/// The digests of the controller at `addr`, within `timeout`.
pub async fn fetch_digests(addr: SocketAddr, timeout: Duration) -> Result<NodeDigests, SyncError> {
    let host = addr.to_string();
    let request = Get {
        path: DIGESTS_PATH,
        host: &host,
        user_agent: USER_AGENT,
        body_limit: DIGESTS_LIMIT,
    };
    let answer = http::get(addr, &request, timeout).await?;
    if answer.status != StatusCode::OK {
        return Err(SyncError::DigestStatus {
            addr,
            status: answer.status.as_u16(),
        });
    }
    let body = answer.body?;
    serde_json::from_slice(&body).map_err(|e| SyncError::Bad {
        addr,
        reason: format!("unreadable digests: {e}"),
    })
}

/// One digest on which a peer and this node differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disagreement {
    /// The peer's member name.
    pub peer: String,
    /// Which digest: `config`, or `table/<service>`.
    pub digest: String,
    /// Ours; `None` where we have no such table.
    pub ours: Option<Digest>,
    /// The peer's; `None` where it has no such table.
    pub theirs: Option<Digest>,
}

/// Every digest on which `theirs` (the digests of member `peer`) differs from `ours`: the
/// configuration first, then the tables by service name, a table only one of the two has
/// included.
pub fn compare(peer: &str, ours: &NodeDigests, theirs: &NodeDigests) -> Vec<Disagreement> {
    let mut out = Vec::new();
    if ours.config != theirs.config {
        out.push(Disagreement {
            peer: peer.to_owned(),
            digest: "config".to_owned(),
            ours: Some(ours.config),
            theirs: Some(theirs.config),
        });
    }
    let mut services: Vec<&String> = ours.tables.keys().chain(theirs.tables.keys()).collect();
    services.sort();
    services.dedup();
    for service in services {
        let (a, b) = (ours.tables.get(service), theirs.tables.get(service));
        if a != b {
            out.push(Disagreement {
                peer: peer.to_owned(),
                digest: format!("table/{service}"),
                ours: a.copied(),
                theirs: b.copied(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::net::TcpListener;
    use tokio::sync::watch;

    use crate::operator::http::{self as server, Limits};

    fn buckets(n: u16) -> Vec<Bucket> {
        (0..n)
            .map(|i| Bucket {
                hops: [i, i + 1, u16::MAX],
                _pad: 0,
            })
            .collect()
    }

    /// Serves `/table/<service>` from `source` (the way the daemon's HTTP endpoint routes it)
    /// until the returned sender is dropped.
    async fn peer(source: TableSource) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = watch::channel(false);
        let handler = move |request: server::Request| {
            let source = Arc::clone(&source);
            async move {
                match request.uri.path().strip_prefix("/table/") {
                    Some(service) => {
                        server::table_response(table_answer(service.to_owned(), source).await)
                    }
                    None => server::text(StatusCode::NOT_FOUND, "not found"),
                }
            }
        };
        tokio::spawn(server::serve_with(
            listener,
            Limits::DEFAULT,
            handler,
            stopped,
        ));
        (addr, stop)
    }

    /// A peer with table `web` of `n` buckets (generation 9), and a table `odd` whose body is
    /// not whole buckets.
    async fn peer_with_web(n: u16) -> (SocketAddr, watch::Sender<bool>) {
        peer(Arc::new(move |service: &str| match service {
            "web" => Some((9, encode(&buckets(n)))),
            "odd" => Some((1, vec![1, 2, 3, 4, 5, 6, 7])),
            _ => None,
        }))
        .await
    }

    const PATIENCE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn fetch_takes_a_served_table() {
        let (addr, _stop) = peer_with_web(5).await;
        assert_eq!(fetch(addr, "web", 5, PATIENCE).await.unwrap(), buckets(5));

        // What the route sends besides the table.
        let request = Get {
            path: "/table/web",
            host: "peer",
            user_agent: USER_AGENT,
            body_limit: 1024,
        };
        let answer = http::get(addr, &request, PATIENCE).await.unwrap();
        assert_eq!(answer.headers.get(GENERATION_HEADER).unwrap(), "9");
        assert_eq!(
            answer.headers.get("content-type").unwrap(),
            "application/octet-stream"
        );
    }

    #[tokio::test]
    async fn fetch_refuses_what_is_not_the_expected_table() {
        let (addr, _stop) = peer_with_web(5).await;
        let peer = addr.to_string();

        let e = fetch(addr, "mail", 5, PATIENCE).await.unwrap_err();
        assert!(matches!(&e, SyncError::Status { status: 404, .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("{peer}: HTTP status 404 for /table/mail")
        );

        // Larger than this node's table: refused before it is read whole.
        let e = fetch(addr, "web", 4, PATIENCE).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{peer}: answer body larger than 24 bytes")
        );
        let e = fetch(addr, "web", 6, PATIENCE).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{peer}: table of 5 buckets, this node uses 6")
        );
        let e = fetch(addr, "odd", 2, PATIENCE).await.unwrap_err();
        assert_eq!(e.to_string(), format!("{peer}: body is not whole buckets"));
    }

    #[tokio::test]
    async fn fetch_gives_up_on_silent_and_absent_peers() {
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let silent_addr = silent.local_addr().expect("local addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
            }
        });
        let limit = Duration::from_millis(100);
        let e = fetch(silent_addr, "web", 5, limit).await.unwrap_err();
        assert_eq!(e.to_string(), format!("{silent_addr}: timeout after 100ms"));

        let (absent_addr, stop) = peer_with_web(5).await;
        drop(stop);
        // The server stops accepting once told; wait until its port is closed.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let e = loop {
            let e = fetch(absent_addr, "web", 5, PATIENCE).await.unwrap_err();
            if e.to_string().contains("refused") || tokio::time::Instant::now() > deadline {
                break e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(e.to_string(), format!("{absent_addr}: connection refused"));
    }

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

    fn bucket(hops: [u16; MAX_HOPS]) -> Bucket {
        Bucket { hops, _pad: 0 }
    }

    #[test]
    fn table_digest_covers_owners_and_history_sets_but_not_history_order() {
        const NONE: u16 = u16::MAX;
        let table = vec![
            bucket([1, 2, 3]),
            bucket([2, NONE, NONE]),
            bucket([3, 1, NONE]),
        ];
        let base = table_digest(&table);
        assert_eq!(table_digest(&table.clone()), base);

        // The same members, learnt in another order.
        let mut reordered = table.clone();
        reordered[0] = bucket([1, 3, 2]);
        assert_eq!(table_digest(&reordered), base);

        let changes = [
            // Another owner.
            (0, bucket([2, 1, 3])),
            // A member more in the history.
            (1, bucket([2, 1, NONE])),
            // A member less.
            (2, bucket([3, NONE, NONE])),
            // Another member.
            (2, bucket([3, 4, NONE])),
            (1, Bucket::EMPTY),
        ];
        for (i, changed) in changes {
            let mut other = table.clone();
            other[i] = changed;
            assert_ne!(table_digest(&other), base, "bucket {i} -> {changed:?}");
        }
        // One bucket more or less is another table.
        assert_ne!(table_digest(&table[..2]), base);
        let mut longer = table.clone();
        longer.push(Bucket::EMPTY);
        assert_ne!(table_digest(&longer), base);
    }

    fn digests(node: &str, config: u8, tables: &[(&str, u8)]) -> NodeDigests {
        NodeDigests {
            node: node.to_owned(),
            config: Digest([config; 32]),
            tables: tables
                .iter()
                .map(|(s, d)| ((*s).to_owned(), Digest([*d; 32])))
                .collect(),
        }
    }

    #[test]
    fn compare_names_every_digest_that_differs() {
        let ours = digests("a", 1, &[("dns", 3), ("web", 2)]);
        assert!(compare("b", &ours, &digests("b", 1, &[("dns", 3), ("web", 2)])).is_empty());

        let theirs = digests("b", 9, &[("mail", 4), ("web", 5)]);
        let found = compare("b", &ours, &theirs);
        let summary: Vec<(&str, Option<u8>, Option<u8>)> = found
            .iter()
            .map(|d| {
                assert_eq!(d.peer, "b");
                (
                    d.digest.as_str(),
                    d.ours.map(|x| x.0[0]),
                    d.theirs.map(|x| x.0[0]),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("config", Some(1), Some(9)),
                ("table/dns", Some(3), None),
                ("table/mail", None, Some(4)),
                ("table/web", Some(2), Some(5)),
            ]
        );
    }

    /// Serves `/digests` the way the daemon's HTTP endpoint routes it.
    async fn digests_peer(source: DigestSource) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = watch::channel(false);
        let endpoints = server::Endpoints {
            metrics: Arc::new(|| panic!("not scraped here")),
            ready: None,
            table: None,
            digests: Some(source),
            claims: None,
            drain: None,
        };
        let (_, members) = watch::channel(Default::default());
        tokio::spawn(server::serve(
            listener,
            server::Plane::Peer,
            endpoints,
            members,
            stopped,
        ));
        (addr, stop)
    }

    #[tokio::test]
    async fn digests_are_fetched_from_the_route() {
        let served = digests("node-b", 7, &[("web", 8)]);
        let copy = served.clone();
        let (addr, _stop) = digests_peer(Arc::new(move || copy.clone())).await;
        assert_eq!(fetch_digests(addr, PATIENCE).await.unwrap(), served);

        // A peer without the route (an older controller) is named with what it answered.
        let (old, _stop_old) = peer_with_web(5).await;
        let e = fetch_digests(old, PATIENCE).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{old}: HTTP status 404 for /digests")
        );
    }
}
