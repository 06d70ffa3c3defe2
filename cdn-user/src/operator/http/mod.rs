//! The controller's HTTP, on hyper's HTTP/1.1: the servers of the operator and peer endpoints
//! (`/metrics`, `/ready`, `/table/<service>`, `/digests`, an index page), and the one client the health
//! probes and the history sync both use.
//!
//! The endpoints are split over two listeners ([`Plane`]): the *peer plane* (`/ready`,
//! `/table/<service>`, `/digests`: what the other members' health checks and history syncs
//! need) and the *metrics* listener (`/metrics` and the index), so that no scraper or flood on
//! one can starve the other. A configuration that puts both on one address gets one listener
//! serving everything ([`Plane::Shared`]), still with the members' reserved places.
//!
//! Everything that arrives from the network is treated as hostile, because the port may be
//! reachable by anything on the management network. The server reads one request per
//! connection and closes (no keep-alive; request bodies are never read but the claims', up to
//! the listener's [`Limits::max_body`]); the request head is
//! capped at [`MAX_HEAD`] bytes and must arrive within [`Limits::head_timeout`], the client must
//! take the response within [`Limits::write_timeout`], and who is served at once is decided by
//! the listener's [`gate::Gate`] (places reserved for members, a share per source address, a
//! full listener closing its oldest idle connection). Every per-connection problem is logged
//! at debug level and ends only that connection. The client is [`crate::cluster::peer_http`].

pub mod gate;
mod limits;
mod server;

use self::server::serve_gated;
pub use self::server::serve_with;

pub use self::limits::{
    HEAD_TIMEOUT, Limits, MAX_BODY, MAX_CONNECTIONS, MEMBER_CONNECTIONS, Members,
    PEER_HEAD_TIMEOUT, PER_SOURCE, Plane, WRITE_TIMEOUT,
};

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};
use log::{debug, warn};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::timeout;

use crate::cluster::sync::{self, DigestSource, TableSource};
use crate::cluster::{claims, peer_control};
use crate::operator::metrics::{self, Format, Snapshot};

/// Largest request head (request line and headers) accepted; larger ones get `431`.
pub const MAX_HEAD: usize = 8 * 1024;
const TEXT: &str = "text/plain; charset=utf-8";

/// The head of a request, as the handlers see it. Its extensions hold the client's address
/// ([`Peer`]) and, for the requests that have one ([`wants_body`]), the body ([`Body`]).
pub type Request = hyper::http::request::Parts;

/// The client's address, in every [`Request`]'s extensions.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// The body of a request that has one ([`wants_body`]), or why it could not be read.
#[derive(Clone, Debug)]
pub struct Body(pub Result<Bytes, BodyError>);

/// Why a request body was not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("request body not received in time")]
    Timeout,
    #[error("request body unreadable")]
    Broken,
}

/// Whether the server reads the body of `request` (within the listener's `max_body`): the
/// `POST`s of claims and PoP drains only. Every other body is left unread.
pub fn wants_body(request: &Request) -> bool {
    request.method == Method::POST
        && matches!(
            request.uri.path(),
            claims::CLAIMS_PATH | peer_control::DRAIN_PATH | peer_control::UNDRAIN_PATH
        )
}

/// Receives a claim body from a peer and answers it (on the blocking pool: it takes locks
/// and writes BPF maps).
pub type ClaimSink = Arc<dyn Fn(SocketAddr, Result<Bytes, BodyError>) -> Response + Send + Sync>;

/// Receives a PoP drain (`true`, `POST /drain`) or undrain from a peer and answers it (on the
/// blocking pool, as claims).
pub type DrainSink =
    Arc<dyn Fn(SocketAddr, bool, Result<Bytes, BodyError>) -> Response + Send + Sync>;

async fn read_request_body(body: Incoming, limits: Limits) -> Result<Bytes, BodyError> {
    if limits.max_body == 0 {
        return Err(BodyError::TooLarge(0));
    }
    let read =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limits.max_body));
    match timeout(limits.head_timeout, read).await {
        Err(_elapsed) => Err(BodyError::Timeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(BodyError::TooLarge(limits.max_body))
        }
        Ok(Err(_)) => Err(BodyError::Broken),
    }
}
/// A complete response; `Content-Length` and `Connection: close` are added when writing.
pub type Response = hyper::Response<Full<Bytes>>;

/// A response of `status` with `body` of type `content_type`.
pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response {
    let mut response = hyper::Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A short plain-text response, for errors.
pub fn text(status: StatusCode, message: &str) -> Response {
    response(status, TEXT, format!("{message}\n"))
}

/// The listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for HTTP on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// Binds the listener of the HTTP endpoints.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

// --- The endpoints -------------------------------------------------------------------------

/// Produces a [`Snapshot`] at scrape time. Called on tokio's blocking pool, so it may take
/// locks or read BPF maps.
pub type SnapshotSource = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// Whether this node takes new flows: `Ok` or the reason it does not. Other members' health
/// checks ask for it at `/ready`, which is how a drained node leaves their tables.
pub type ReadySource = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the controller serves.
#[derive(Clone)]
pub struct Endpoints {
    /// `/metrics`.
    pub metrics: SnapshotSource,
    /// `/ready`: 200 while it says so, 503 with the reason otherwise; 404 without it.
    pub ready: Option<ReadySource>,
    /// `/table/<service>`: the hop history, for starting members; 404 without it.
    pub table: Option<TableSource>,
    /// `/digests`: the digests of the configuration and the tables, which the peers' `status`
    /// compares with theirs; 404 without it.
    pub digests: Option<DigestSource>,
    /// `POST /claims` (cluster with PoPs): learned owners from peers; 404 without it.
    pub claims: Option<ClaimSink>,
    /// `POST /drain` and `POST /undrain` (cluster with PoPs): PoP drains from peers; 404
    /// without it.
    pub drain: Option<DrainSink>,
}

/// Serves the endpoints of `plane` on `listener` until `shutdown` becomes `true` (or its
/// sender is dropped). Never fails: client and per-request problems are logged and answered.
pub async fn serve(
    listener: TcpListener,
    plane: Plane,
    endpoints: Endpoints,
    members: Members,
    shutdown: watch::Receiver<bool>,
) {
    let handler = move |request| route(request, plane, endpoints.clone());
    serve_gated(listener, plane, members, handler, shutdown).await;
}

const INDEX: &str = "<!DOCTYPE html>\n<html><head><title>cdn-steer</title></head>\n\
    <body><h1>cdn-steer</h1><p><a href=\"/metrics\">Metrics</a></p></body></html>\n";

/// The HTTP form of a `/table/<service>` answer.
pub fn table_response(answer: sync::TableAnswer) -> Response {
    match answer {
        sync::TableAnswer::Table { generation, body } => {
            let mut table = response(StatusCode::OK, "application/octet-stream", body);
            table
                .headers_mut()
                .insert(sync::GENERATION_HEADER, HeaderValue::from(generation));
            table
        }
        sync::TableAnswer::UnknownService => text(StatusCode::NOT_FOUND, "no such service"),
        sync::TableAnswer::Failed => text(StatusCode::INTERNAL_SERVER_ERROR, "table export failed"),
    }
}

/// The HTTP form of a `/digests` answer: JSON, or 500 if the export failed.
pub fn digests_response(answer: Option<Vec<u8>>) -> Response {
    match answer {
        Some(body) => response(StatusCode::OK, "application/json", body),
        None => text(StatusCode::INTERNAL_SERVER_ERROR, "digest export failed"),
    }
}

async fn route(request: Request, plane: Plane, mut endpoints: Endpoints) -> Response {
    // Every resource here is read-only but `/claims`, which is routed on its own below.
    let readable = request.method == Method::GET || request.method == Method::HEAD;
    let path = request.uri.path();
    if !plane.serves_peers() {
        endpoints.ready = None;
        endpoints.table = None;
        endpoints.digests = None;
        endpoints.claims = None;
        endpoints.drain = None;
    }
    if path == claims::CLAIMS_PATH {
        let sink = endpoints.claims;
        return post_to(&request, sink.is_some(), move |peer, body| {
            sink.map(|sink| sink(peer, body))
        })
        .await;
    }
    if path == peer_control::DRAIN_PATH || path == peer_control::UNDRAIN_PATH {
        let drain = path == peer_control::DRAIN_PATH;
        let sink = endpoints.drain;
        return post_to(&request, sink.is_some(), move |peer, body| {
            sink.map(|sink| sink(peer, drain, body))
        })
        .await;
    }
    if !plane.serves_metrics() && matches!(path, "/metrics" | "/") {
        return text(
            StatusCode::NOT_FOUND,
            "not found (served on the metrics listener)",
        );
    }
    if let (Some(service), true, Some(table)) =
        (path.strip_prefix("/table/"), readable, endpoints.table)
    {
        return table_response(sync::table_answer(service.to_owned(), table).await);
    }
    match (path, readable) {
        ("/metrics", true) => scrape(&request, endpoints.metrics).await,
        (sync::DIGESTS_PATH, true) => match endpoints.digests {
            Some(digests) => digests_response(sync::digests_answer(digests).await),
            None => text(StatusCode::NOT_FOUND, "not found"),
        },
        ("/ready", true) => match endpoints.ready {
            Some(ready) => match tokio::task::spawn_blocking(move || ready()).await {
                Ok(Ok(())) => text(StatusCode::OK, "ready"),
                Ok(Err(reason)) => text(StatusCode::SERVICE_UNAVAILABLE, &reason),
                Err(e) => {
                    warn!("readiness check failed: {e}");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "readiness check failed")
                }
            },
            None => text(StatusCode::NOT_FOUND, "not found"),
        },
        ("/", true) => response(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        ("/metrics" | "/" | "/ready" | sync::DIGESTS_PATH, false) => {
            debug!("http: method {} not allowed", request.method);
            let mut refused = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            refused
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            refused
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Answers a `POST` endpoint whose `handler` (`served`: whether there is one) takes the peer
/// and the body, on the blocking pool (it takes locks and writes BPF maps).
async fn post_to(
    request: &Request,
    served: bool,
    handler: impl FnOnce(SocketAddr, Result<Bytes, BodyError>) -> Option<Response> + Send + 'static,
) -> Response {
    if !served {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    if request.method != Method::POST {
        let mut refused = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        refused
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return refused;
    }
    let peer = request.extensions.get::<Peer>().map(|p| p.0);
    let body = request.extensions.get::<Body>().map(|b| b.0.clone());
    let (Some(peer), Some(body)) = (peer, body) else {
        return text(StatusCode::BAD_REQUEST, "bad request");
    };
    match tokio::task::spawn_blocking(move || handler(peer, body)).await {
        Ok(Some(answer)) => answer,
        Ok(None) => text(StatusCode::NOT_FOUND, "not found"),
        Err(e) => {
            warn!(path = request.uri.path(); "peer handler failed: {e}");
            text(StatusCode::INTERNAL_SERVER_ERROR, "handler failed")
        }
    }
}

async fn scrape(request: &Request, source: SnapshotSource) -> Response {
    // All `Accept` lines together, as RFC 9110 allows for list-valued headers.
    let accept: Vec<&str> = request
        .headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let accept = accept.join(", ");
    let format = Format::negotiate(Some(accept.as_str()).filter(|a| !a.is_empty()));
    // The source may block (map reads, locks), so it runs off the async workers; a panic in it
    // surfaces here as a join error instead of taking a worker down.
    match tokio::task::spawn_blocking(move || metrics::render(source(), format)).await {
        Ok(Ok(body)) => {
            let mut scraped = response(StatusCode::OK, format.content_type(), body);
            // The body depends on `Accept`; caches in between must know.
            scraped
                .headers_mut()
                .insert(header::VARY, HeaderValue::from_static("Accept"));
            scraped
        }
        // These are controller bugs, not client noise, hence louder than debug.
        Ok(Err(e)) => {
            warn!("metrics scrape failed: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics",
            )
        }
        Err(e) => {
            warn!("metrics scrape failed: the snapshot source failed: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot collect the metrics",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::gate::Slots;
    use super::*;
    use crate::cluster::peer_http::{Failure, Get};
    use std::collections::BTreeSet;
    use std::io::{Read, Write};
    use std::net::TcpStream as StdTcpStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant as StdInstant, UNIX_EPOCH};
    use tokio::io::AsyncWriteExt;
    use tokio::time::Instant;

    use cdn_common::counters::PacketCounts;

    use crate::config::Digest;
    use crate::operator::metrics::{MemberReport, ServiceMetrics};

    fn snapshot() -> Snapshot {
        Snapshot {
            counters: PacketCounts::default(),
            members: vec![MemberReport {
                id: 1,
                name: "node-a".into(),
                healthy: Some(true),
                last_check_ms: Some(2.0),
                forwarded_packets: 7,
                forwarded_bytes: 7000,
                share: 1.0,
                weight: 100,
                is_self: true,
                ..MemberReport::default()
            }],
            services: vec![ServiceMetrics {
                name: "web".into(),
                table_generation: 3,
                buckets: 251,
                udp_mode: "owner".into(),
                table_digest: Digest([7; 32]),
                quic: None,
            }],
            draining: false,
            attach_mode: "native".into(),
            interfaces: vec!["eth0".into()],
            bgp: None,
            config_digest: Digest([9; 32]),
            config_reloads_ok: 1,
            config_reloads_failed: 0,
            start_time: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            health_checks: Default::default(),
            pops: Vec::new(),
            learned: None,
        }
    }

    fn endpoints() -> Endpoints {
        Endpoints {
            metrics: Arc::new(snapshot),
            ready: None,
            table: None,
            digests: None,
            claims: None,
            drain: None,
        }
    }

    /// A server on 127.0.0.1:0 in a thread with its own runtime, so the tests can use plain
    /// blocking sockets as clients.
    struct TestServer {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TestServer {
        fn start(endpoints: Endpoints) -> TestServer {
            Self::with_limits(Limits::DEFAULT, endpoints)
        }

        fn with_limits(limits: Limits, endpoints: Endpoints) -> TestServer {
            let (stop, stopped) = watch::channel(false);
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
                    addr_tx.send(listener.local_addr().unwrap()).unwrap();
                    let handler = move |request| route(request, Plane::Shared, endpoints.clone());
                    serve_with(listener, limits, handler, stopped).await;
                });
            });
            let addr = addr_rx.recv().unwrap();
            TestServer {
                addr,
                stop,
                thread: Some(thread),
            }
        }

        /// Signals shutdown and waits for `serve` to return.
        fn shut_down(mut self) -> Duration {
            let started = StdInstant::now();
            self.stop.send_replace(true);
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
            started.elapsed()
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.send_replace(true);
            if let Some(thread) = self.thread.take() {
                // Do not hide the original failure behind a second panic.
                let _ = thread.join();
            }
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn body(&self) -> &str {
            std::str::from_utf8(&self.body).unwrap()
        }
    }

    fn connect(addr: SocketAddr) -> StdTcpStream {
        let stream = StdTcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        stream
    }

    /// Sends `raw` on a fresh connection and reads the response until the server closes.
    fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
        let mut stream = connect(addr);
        stream.write_all(raw).unwrap();
        read_reply(&mut stream)
    }

    fn read_reply(stream: &mut StdTcpStream) -> Reply {
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        parse_reply(&response)
    }

    fn parse_reply(response: &[u8]) -> Reply {
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(response)));
        let head = std::str::from_utf8(&response[..split]).unwrap();
        let body = response[split + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|s| s.get(2..5))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_owned(), v.to_owned())
            })
            .collect();
        Reply {
            status,
            headers,
            body,
        }
    }

    fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Reply {
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{accept}\r\n");
        exchange(addr, request.as_bytes())
    }

    #[test]
    fn bind_names_the_address_on_failure() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = taken.local_addr().unwrap();
            let err = bind(addr).await.unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(&addr.to_string()) && message.contains("in use"),
                "{message}"
            );
        });
    }

    #[test]
    fn server_answers_scrapes_in_both_formats() {
        let server = TestServer::start(endpoints());
        let reply = get(
            server.addr,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        assert_eq!(reply.header("connection"), Some("close"));
        assert_eq!(reply.header("vary"), Some("Accept"));
        assert_eq!(
            reply.header("content-length"),
            Some(reply.body.len().to_string().as_str())
        );
        assert_eq!(reply.body(), metrics::encode(&snapshot()).unwrap());

        let reply = get(server.addr, "/metrics?debug=1", None);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = metrics::encode_as(&snapshot(), Format::PrometheusText).unwrap();
        assert_eq!(reply.body(), text);

        // `Accept` split over two lines counts as one list.
        let reply = exchange(
            server.addr,
            b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: text/plain;q=0.5\r\n\
              Accept: application/openmetrics-text\r\n\r\n",
        );
        assert!(reply.body().ends_with("# EOF\n"), "{reply:?}");

        // HEAD: the same headers, no body.
        let reply = exchange(server.addr, b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(reply.body.is_empty(), "{reply:?}");
        let length: usize = reply.header("content-length").unwrap().parse().unwrap();
        assert_eq!(length, text.len(), "{reply:?}");

        // HTTP/1.0, absolute form, bare line ends.
        let reply = exchange(server.addr, b"GET http://x:9465/metrics HTTP/1.0\n\n");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body(), text);
    }

    #[test]
    fn server_status_codes() {
        let ready = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&ready);
        let server = TestServer::start(Endpoints {
            ready: Some(Arc::new(move || {
                if flag.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("draining".into())
                }
            })),
            ..endpoints()
        });
        let addr = server.addr;

        let index = get(addr, "/", None);
        assert_eq!(index.status, 200, "{index:?}");
        assert_eq!(
            index.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert!(index.body().contains("href=\"/metrics\""), "{index:?}");

        let up = get(addr, "/ready", None);
        assert_eq!((up.status, up.body()), (200, "ready\n"));
        ready.store(false, Ordering::SeqCst);
        let down = get(addr, "/ready", None);
        assert_eq!((down.status, down.body()), (503, "draining\n"));

        assert_eq!(get(addr, "/nope", None).status, 404);
        assert_eq!(get(addr, "/metrics/", None).status, 404);
        // No table source: no tables.
        assert_eq!(get(addr, "/table/web", None).status, 404);
        // No digest source: no digests.
        assert_eq!(get(addr, "/digests", None).status, 404);

        let post = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert_eq!(post.status, 405, "{post:?}");
        assert_eq!(post.header("allow"), Some("GET, HEAD"));
        assert_eq!(
            exchange(addr, b"DELETE / HTTP/1.1\r\nHost: t\r\n\r\n").status,
            405
        );

        for garbage in [
            &b"hello\r\n\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: t\r\nbroken header\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nA: b\r\n c\r\n\r\n",
            // hyper knows HTTP/1.x only; it answers other versions as malformed.
            b"GET /metrics HTTP/3.0\r\n\r\n",
        ] {
            let reply = exchange(addr, garbage);
            assert_eq!(reply.status, 400, "{garbage:?} -> {reply:?}");
        }

        let mut huge = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Pad: ".to_vec();
        huge.resize(MAX_HEAD + 100, b'a');
        huge.extend_from_slice(b"\r\n\r\n");
        assert_eq!(exchange(addr, &huge).status, 431);

        // Still serving after all that.
        assert_eq!(get(addr, "/metrics", None).status, 200);
    }

    #[test]
    fn server_answers_a_client_that_closed_its_sending_side() {
        let server = TestServer::start(endpoints());
        let mut stream = connect(server.addr);
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(read_reply(&mut stream).status, 200);
    }

    /// Limits short enough for tests.
    const QUICK: Limits = Limits {
        slots: Slots {
            members: 0,
            others: 4,
            per_source: 0,
        },
        head_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
        max_body: 0,
    };

    #[test]
    fn server_times_out_slow_clients() {
        let server = TestServer::with_limits(QUICK, endpoints());
        let started = StdInstant::now();
        // A head without its final empty line, and a client that sends nothing at all.
        let partial = exchange(server.addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n");
        let elapsed = started.elapsed();
        let silent = read_reply(&mut connect(server.addr));
        for reply in [&partial, &silent] {
            assert_eq!(reply.status, 408, "{reply:?}");
            assert_eq!(reply.body(), "request timeout\n");
            assert_eq!(reply.header("content-length"), Some("16"));
        }
        assert!(
            elapsed >= QUICK.head_timeout - Duration::from_millis(50)
                && elapsed < QUICK.head_timeout + Duration::from_secs(1),
            "{elapsed:?}"
        );
        // With the default limits, the timeout is the documented one.
        assert_eq!(Limits::DEFAULT.head_timeout, HEAD_TIMEOUT);
    }

    #[test]
    fn claim_bodies_are_read_up_to_the_limit_with_the_peer_address() {
        let sink: ClaimSink = Arc::new(|peer, body| match body {
            Ok(b) => text(
                StatusCode::OK,
                &format!("{} bytes from {}", b.len(), peer.ip()),
            ),
            Err(e) => text(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
        });
        let server = TestServer::start(Endpoints {
            claims: Some(sink),
            ..endpoints()
        });
        let post = |len: usize| {
            let mut raw =
                format!("POST /claims HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n")
                    .into_bytes();
            raw.extend(std::iter::repeat_n(b'x', len));
            exchange(server.addr, &raw)
        };
        let ok = post(5);
        assert_eq!((ok.status, ok.body()), (200, "5 bytes from 127.0.0.1\n"));
        let most = post(MAX_BODY);
        assert_eq!(most.status, 200, "{}", most.body());
        let over = post(MAX_BODY + 1);
        assert_eq!(over.status, 413, "{}", over.body());
        let get = exchange(server.addr, b"GET /claims HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!((get.status, get.header("allow")), (405, Some("POST")));
        // Without a sink (no PoPs), and on the metrics listener: not there.
        let none = TestServer::start(endpoints());
        let raw = b"POST /claims HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(exchange(none.addr, raw).status, 404);
    }

    #[test]
    fn a_full_server_closes_its_oldest_idle_connection_for_a_newcomer() {
        let server = TestServer::with_limits(
            Limits {
                // Long enough that the idle connections hold their places for the whole test.
                head_timeout: Duration::from_secs(30),
                ..QUICK
            },
            endpoints(),
        );
        let addr = server.addr;
        let places = QUICK.slots.others;
        let mut idle: Vec<StdTcpStream> = (0..places).map(|_| connect(addr)).collect();
        std::thread::sleep(Duration::from_millis(100));
        // A client that asks is served at once, however many idle connections there are...
        let started = StdInstant::now();
        assert_eq!(get(addr, "/metrics", None).status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // ...and the oldest idle connection made room for it: closed without an answer.
        let oldest = &mut idle[0];
        oldest
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        assert_eq!(oldest.read_to_end(&mut rest).unwrap(), 0, "{rest:?}");
        // The others are still open (nothing to read yet).
        let newest = &mut idle[places - 1];
        newest
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8; 1];
        let still = newest.read(&mut byte);
        assert!(
            still
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "{still:?}"
        );
    }

    #[test]
    fn peer_and_metrics_planes_serve_their_own_endpoints() {
        let ready: ReadySource = Arc::new(|| Ok(()));
        let endpoints = Endpoints {
            ready: Some(ready),
            digests: Some(Arc::new(|| sync::NodeDigests {
                node: "node-a".into(),
                config: Digest([1; 32]),
                tables: Default::default(),
            })),
            ..endpoints()
        };
        let planes = [Plane::Peer, Plane::Metrics, Plane::Shared].map(|plane| {
            let endpoints = endpoints.clone();
            let (stop, stopped) = watch::channel(false);
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
                    addr_tx.send(listener.local_addr().unwrap()).unwrap();
                    let (_members_tx, members) = watch::channel(BTreeSet::new());
                    serve(listener, plane, endpoints, members, stopped).await;
                });
            });
            let addr = addr_rx.recv().unwrap();
            (plane, addr, stop, thread)
        });
        for (plane, addr, _, _) in &planes {
            let status = |path| get(*addr, path, None).status;
            let peer = if *plane == Plane::Metrics { 404 } else { 200 };
            let metrics = if *plane == Plane::Peer { 404 } else { 200 };
            assert_eq!(status("/ready"), peer, "{plane:?}");
            assert_eq!(status("/digests"), peer, "{plane:?}");
            assert_eq!(status("/metrics"), metrics, "{plane:?}");
            assert_eq!(status("/"), metrics, "{plane:?}");
        }
        for (_, _, stop, thread) in planes {
            stop.send_replace(true);
            thread.join().unwrap();
        }
    }

    #[test]
    fn server_gives_up_on_clients_that_do_not_read() {
        // A table far larger than the socket buffers, to a client that never reads.
        const SIZE: usize = 64 * 1024 * 1024;
        let server = TestServer::with_limits(
            QUICK,
            Endpoints {
                table: Some(Arc::new(|_: &str| Some((1, vec![0u8; SIZE])))),
                ..endpoints()
            },
        );
        let mut stream = connect(server.addr);
        stream
            .write_all(b"GET /table/web HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        std::thread::sleep(QUICK.write_timeout * 4);
        // The server has dropped the connection: what arrived is far less than the table.
        let mut received = Vec::new();
        let end = stream.read_to_end(&mut received);
        assert!(received.len() < SIZE, "{} bytes, {end:?}", received.len());
    }

    #[test]
    fn server_serves_many_clients_at_once() {
        // Every client here comes from 127.0.0.1: without the share per source address, which
        // would refuse more than PER_SOURCE busy at once.
        let limits = Limits {
            slots: Slots {
                per_source: 0,
                ..Limits::DEFAULT.slots
            },
            ..Limits::DEFAULT
        };
        let server = TestServer::with_limits(limits, endpoints());
        let addr = server.addr;
        // Idle connections must not hold up the others.
        let idle: Vec<StdTcpStream> = (0..8).map(|_| connect(addr)).collect();
        let clients: Vec<_> = (0..40)
            .map(|i| {
                std::thread::spawn(move || {
                    let path = if i % 4 == 0 { "/" } else { "/metrics" };
                    get(addr, path, None).status
                })
            })
            .collect();
        for client in clients {
            assert_eq!(client.join().unwrap(), 200);
        }
        drop(idle);
    }

    #[test]
    fn server_survives_a_failing_source() {
        let failed_once = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&failed_once);
        let server = TestServer::start(Endpoints {
            metrics: Arc::new(move || {
                if !flag.swap(true, Ordering::SeqCst) {
                    panic!("snapshot source failure (expected by the test)");
                }
                snapshot()
            }),
            ..endpoints()
        });
        assert_eq!(get(server.addr, "/metrics", None).status, 500);
        assert!(failed_once.load(Ordering::SeqCst));
        assert_eq!(get(server.addr, "/metrics", None).status, 200);
    }

    #[test]
    fn server_stops_on_shutdown() {
        let server = TestServer::start(endpoints());
        let addr = server.addr;
        assert_eq!(get(addr, "/", None).status, 200);
        // An idle connection does not hold the shutdown up: it is closed without an answer.
        let mut idle = connect(addr);
        std::thread::sleep(Duration::from_millis(100));
        let took = server.shut_down();
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert!(StdTcpStream::connect(addr).is_err(), "still accepting");
        let mut rest = Vec::new();
        assert_eq!(idle.read_to_end(&mut rest).unwrap(), 0);
    }

    // --- The client ------------------------------------------------------------------------

    fn request(path: &str) -> Get<'_> {
        Get {
            path,
            host: "peer",
            user_agent: "cdn-steer-test",
            body_limit: 64 * 1024,
        }
    }

    #[tokio::test]
    async fn client_reads_status_headers_and_body() {
        let server = TestServer::start(endpoints());
        let answer = crate::cluster::peer_http::get(
            server.addr,
            &request("/metrics"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.headers.get(header::CONTENT_TYPE).unwrap(),
            Format::PrometheusText.content_type()
        );
        let text = metrics::encode_as(&snapshot(), Format::PrometheusText).unwrap();
        assert_eq!(answer.body.unwrap(), text.as_bytes());

        let missing =
            crate::cluster::peer_http::get(server.addr, &request("/nope"), Duration::from_secs(5))
                .await
                .unwrap();
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn client_errors_name_the_peer() {
        let server = TestServer::start(endpoints());
        let small = Get {
            body_limit: 100,
            ..request("/metrics")
        };
        let answer = crate::cluster::peer_http::get(server.addr, &small, Duration::from_secs(5))
            .await
            .unwrap();
        let e = answer.body.unwrap_err();
        assert!(matches!(e.failure, Failure::BodyTooLarge(100)), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("{}: answer body larger than 100 bytes", server.addr)
        );

        for (path, host, what) in [("/a b", "peer", "path"), ("/", "pe\r\ner", "host")] {
            let bad = Get {
                host,
                ..request(path)
            };
            let e = crate::cluster::peer_http::get(server.addr, &bad, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(
                matches!(e.failure, Failure::InvalidRequest(w) if w == what),
                "{e:?}"
            );
        }

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let e = crate::cluster::peer_http::get(addr, &request("/"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), format!("{addr}: connection refused"));
    }

    #[tokio::test]
    async fn client_times_out_in_the_head_and_in_the_body() {
        // One server sends nothing, the other a head and half its body.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let half = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let half_addr = half.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    Ok((stream, _)) = silent.accept() => held.push(stream),
                    Ok((mut stream, _)) = half.accept() => {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
                            .await;
                        held.push(stream);
                    }
                }
            }
        });
        let limit = Duration::from_millis(200);
        let started = Instant::now();
        let e = crate::cluster::peer_http::get(silent_addr, &request("/"), limit)
            .await
            .unwrap_err();
        assert!(
            matches!(e.failure, Failure::Timeout(t) if t == limit),
            "{e:?}"
        );
        assert!(started.elapsed() < limit * 3, "{:?}", started.elapsed());

        let answer = crate::cluster::peer_http::get(half_addr, &request("/"), limit)
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        let e = answer.body.unwrap_err();
        assert!(matches!(e.failure, Failure::Timeout(_)), "{e:?}");
    }
}
