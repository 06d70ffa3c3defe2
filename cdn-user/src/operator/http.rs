//! A deliberately tiny HTTP/1.1 server for the metrics endpoint.
//!
//! The controller only needs to answer a handful of `GET` requests from a Prometheus scraper, so
//! instead of pulling in hyper (and with it a good share of the binary) this module reads one
//! request head per connection, hands it to a handler, writes one response with
//! `Connection: close` and closes. No keep-alive, no request bodies, no chunked encoding.
//!
//! Robustness rules, because the port may be reachable by anything on the management network:
//! the request head is capped at [`MAX_HEAD`] bytes and must arrive within [`HEAD_TIMEOUT`], the
//! number of connections served at once is capped at [`MAX_CONNECTIONS`], and every per-connection
//! problem is logged at debug level and ends only that connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Largest request head (request line and headers) accepted; larger ones get `431`.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client gets to send its complete request head; slower ones get `408`.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client gets to take the response off our hands.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once. Further clients wait in the listen backlog, so a flood of idle
/// connections cannot make the controller allocate without bound.
pub const MAX_CONNECTIONS: usize = 64;
/// After the response, how long we keep reading (and discarding) what the client still sends.
/// Closing a socket with unread input makes the kernel send a reset, which can destroy the
/// response before the client has read it (e.g. a `POST` whose body we never read).
const LINGER: Duration = Duration::from_secs(1);
/// At most this much is discarded while lingering.
const LINGER_MAX: usize = 64 * 1024;
/// How long in-flight connections may finish after shutdown was signalled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Method as sent (methods are case-sensitive).
    pub method: String,
    /// Path of the target, without the query string.
    pub path: String,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// All values of header `name` (case-insensitive), joined with `, ` as RFC 9110 allows for
    /// list-valued headers such as `Accept`; `None` when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .peekable();
        values.peek()?;
        Some(values.collect::<Vec<_>>().join(", "))
    }

    /// `GET` or `HEAD`, the methods of every resource this server has.
    pub fn is_get_or_head(&self) -> bool {
        self.method == "GET" || self.method == "HEAD"
    }
}

/// A complete response. `Content-Length` and `Connection: close` are added when writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Extra headers, e.g. `Content-Type` or `Allow`.
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: vec![("Content-Type", content_type.to_owned())],
            body: body.into(),
        }
    }

    /// A short plain-text response, for errors.
    pub fn text(status: u16, body: &str) -> Self {
        Self::new(status, "text/plain; charset=utf-8", format!("{body}\n"))
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The serialized status line and headers.
    fn head(&self) -> String {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        for (name, value) in &self.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("Content-Length: ");
        head.push_str(&self.body.len().to_string());
        head.push_str("\r\nConnection: close\r\n\r\n");
        head
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Why a request head was refused; each maps to the status code answered.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("unsupported HTTP version")]
    Version,
}

impl RequestError {
    fn response(&self) -> Response {
        match self {
            RequestError::Malformed(_) => Response::text(400, "bad request"),
            RequestError::TooLarge => Response::text(431, "request head too large"),
            RequestError::Version => Response::text(505, "only HTTP/1.0 and HTTP/1.1"),
        }
    }
}

/// RFC 9110 `tchar`: what method and header names are made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses a request head (everything before the empty line, line ends `\r\n` or `\n`).
pub fn parse_head(head: &[u8]) -> Result<Request, RequestError> {
    // Header values may in theory carry non-UTF-8 octets; nothing this server serves needs them.
    let head = std::str::from_utf8(head).map_err(|_| RequestError::Malformed("not UTF-8"))?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));

    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed("request line"));
    };
    if !is_token(method) {
        return Err(RequestError::Malformed("method"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.len() == 8
            && v.starts_with("HTTP/")
            && v.as_bytes()[5].is_ascii_digit()
            && v.as_bytes()[6] == b'.'
            && v.as_bytes()[7].is_ascii_digit() =>
        {
            return Err(RequestError::Version);
        }
        _ => return Err(RequestError::Malformed("version")),
    };
    let path = request_path(target)?;

    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            // Obsolete line folding: RFC 9112 lets a server reject it, which is simplest.
            return Err(RequestError::Malformed("folded header"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(RequestError::Malformed("header without colon"));
        };
        // Whitespace between name and colon is forbidden (request smuggling vector).
        if !is_token(name) {
            return Err(RequestError::Malformed("header name"));
        }
        headers.push((
            name.to_ascii_lowercase(),
            value.trim_matches([' ', '\t']).to_owned(),
        ));
    }
    if http11 && !headers.iter().any(|(n, _)| n == "host") {
        // RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
        return Err(RequestError::Malformed("no Host header"));
    }
    Ok(Request {
        method: method.to_owned(),
        path,
        headers,
    })
}

/// The path of a request target: origin form (`/metrics?x`), absolute form
/// (`http://host/metrics`, which servers must accept) or asterisk form (`*`).
fn request_path(target: &str) -> Result<String, RequestError> {
    let lower = target.to_ascii_lowercase();
    let rest = if let Some(after_scheme) = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
    {
        // Skip the authority; keep the original spelling of the path.
        let offset = target.len() - after_scheme.len();
        match after_scheme.find(['/', '?']) {
            Some(i) if after_scheme.as_bytes()[i] == b'/' => &target[offset + i..],
            _ => "/",
        }
    } else if target.starts_with('/') || target == "*" {
        target
    } else {
        return Err(RequestError::Malformed("request target"));
    };
    if rest.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(RequestError::Malformed("request target"));
    }
    let path = rest.split(['?', '#']).next().unwrap_or_default();
    Ok(path.to_owned())
}

/// Where the head ends: index just past the empty line, or `None` if not complete yet.
fn head_end(buf: &[u8]) -> Option<usize> {
    // Bare `\n` line ends are tolerated (RFC 9112 section 2.2), so look for either form.
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if buf[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else if buf[i..].starts_with(b"\n\r\n") {
            Some(i + 3)
        } else {
            None
        }
    })
}

/// Outcome of reading a request head.
enum Head {
    Complete(Vec<u8>),
    /// The client closed before sending anything: a port check, nothing to answer.
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> Result<Head, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) => {
                debug!("metrics http: read error: {e}");
                return Ok(Head::Closed);
            }
        };
        if n == 0 {
            return if buf.is_empty() {
                Ok(Head::Closed)
            } else {
                Err(RequestError::Malformed(
                    "connection closed inside the request head",
                ))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        // RFC 9112 section 2.2: ignore empty lines before the request line.
        let leading = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        buf.drain(..leading);
        if let Some(end) = head_end(&buf) {
            if end > MAX_HEAD {
                return Err(RequestError::TooLarge);
            }
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() >= MAX_HEAD {
            return Err(RequestError::TooLarge);
        }
    }
}

/// Serves one connection: one request, one response, close.
async fn handle_connection<H, F>(mut stream: TcpStream, peer: SocketAddr, handler: H)
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    // `head_only`: a HEAD request, answered with the headers a GET would get but no body.
    let (head_only, response) = match timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Err(_elapsed) => {
            debug!("metrics http: {peer}: no complete request within {HEAD_TIMEOUT:?}");
            (false, Response::text(408, "request timeout"))
        }
        Ok(Ok(Head::Closed)) => return,
        Ok(Err(e)) => {
            debug!("metrics http: {peer}: {e}");
            (false, e.response())
        }
        Ok(Ok(Head::Complete(head))) => match parse_head(&head) {
            Ok(request) => {
                let head_only = request.method == "HEAD";
                (head_only, handler(request).await)
            }
            Err(e) => {
                debug!("metrics http: {peer}: {e}");
                (false, e.response())
            }
        },
    };

    let write = async {
        stream.write_all(response.head().as_bytes()).await?;
        if !head_only {
            stream.write_all(&response.body).await?;
        }
        stream.shutdown().await
    };
    match timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!("metrics http: {peer}: write error: {e}");
            return;
        }
        Err(_elapsed) => {
            debug!(
                "metrics http: {peer}: client did not take the response within {WRITE_TIMEOUT:?}"
            );
            return;
        }
    }
    linger(&mut stream).await;
}

/// Reads and discards until the client closes (or [`LINGER`] / [`LINGER_MAX`] run out), so
/// closing does not reset the connection under a response the client has not read yet.
async fn linger(stream: &mut TcpStream) {
    let drain = async {
        let mut chunk = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_MAX {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    // Running out of time here is fine: the response has been sent.
    let _ = timeout(LINGER, drain).await;
}

/// Resolves once `shutdown` holds `true`, or its sender is gone (then nobody could ever stop
/// the server, and the daemon is going away anyway).
async fn shutdown_signalled(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Accepts connections on `listener` and answers each with `handler` until `shutdown` becomes
/// `true`. Per-connection errors are logged at debug level and never end the server. On
/// shutdown, connections in flight get [`SHUTDOWN_GRACE`] to finish before they are dropped.
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: watch::Receiver<bool>)
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    match listener.local_addr() {
        Ok(addr) => info!("serving HTTP on {addr}"),
        Err(e) => debug!("metrics http: listener has no local address: {e}"),
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let stop = shutdown_signalled(shutdown);
    tokio::pin!(stop);

    loop {
        // Reap finished connections so the set does not grow with the number ever served.
        while let Some(done) = connections.try_join_next() {
            if let Err(e) = done {
                debug!("metrics http: connection task failed: {e}");
            }
        }
        let permit = tokio::select! {
            biased;
            () = &mut stop => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; if it were, there is nothing left to serve.
                Err(_closed) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!("metrics http: accept failed: {e}");
                    if needs_backoff(&e) {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            },
        };
        let handler = handler.clone();
        connections.spawn(async move {
            handle_connection(stream, peer, handler).await;
            drop(permit);
        });
    }

    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        debug!("metrics http: dropping connections still open after {SHUTDOWN_GRACE:?}");
    }
    // Dropping the set aborts whatever is left.
}

/// Errors after which retrying at once would only fail again (resource exhaustion), as opposed
/// to a client that reset its connection before we accepted it.
fn needs_backoff(e: &io::Error) -> bool {
    !matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, RequestError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn parses_a_scrape() {
        let r = parse(
            "GET /metrics?x=1 HTTP/1.1\r\nHost: a:9465\r\nAccept: text/plain\r\n\
             accept: application/openmetrics-text\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/metrics");
        assert_eq!(
            r.header("ACCEPT").as_deref(),
            Some("text/plain, application/openmetrics-text")
        );
        assert_eq!(r.header("user-agent"), None);
        assert!(r.is_get_or_head());
    }

    #[test]
    fn accepts_bare_newlines_http10_and_absolute_targets() {
        let r = parse("HEAD http://example.org:80/metrics?q HTTP/1.0\n\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("HEAD", "/metrics"));
        let r = parse("GET HTTP://example.org HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(r.path, "/");
        let r = parse("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(r.path, "*");
    }

    #[test]
    fn rejects_malformed_heads() {
        for bad in [
            "",
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\nHost: x\r\n\r\n",
            "G(T /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /metrics FTP/1.1\r\nHost: x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\nA: b\r\n c\r\n\r\n",
            "\u{1}\u{2}\u{3}",
        ] {
            assert!(
                matches!(parse(bad), Err(RequestError::Malformed(_))),
                "{bad:?} -> {:?}",
                parse(bad)
            );
        }
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n"),
            Err(RequestError::Malformed("not UTF-8"))
        );
        assert_eq!(parse("GET / HTTP/2.0\r\n\r\n"), Err(RequestError::Version));
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nbody"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\r\n"), Some(17));
    }

    #[test]
    fn serializes_responses_with_length_and_close() {
        let r = Response::text(404, "not found").with_header("X-A", "b");
        assert_eq!(
            r.head(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nX-A: b\r\n\
             Content-Length: 10\r\nConnection: close\r\n\r\n"
        );
    }
}
