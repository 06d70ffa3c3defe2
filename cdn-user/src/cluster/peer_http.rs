//! The one HTTP client of the controller, for talking to peers: a single `GET` with `Connection: close`, used by the
//! health probes and the history sync, and a `POST` of a small body ([`post`], the claims and PoP drains). One timeout bounds the whole exchange, connect included;
//! the answer's head and body are bounded by size; errors name the peer.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{StatusCode, Uri};
use hyper_util::rt::TokioIo;
use log::debug;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

/// Largest response head read (status line and headers).
const MAX_BUF: usize = 16 * 1024;

/// A `GET` request for [`get`].
#[derive(Clone, Copy, Debug)]
pub struct Get<'a> {
    /// Path and query, e.g. `/ready?full=1`.
    pub path: &'a str,
    /// The `Host` header.
    pub host: &'a str,
    pub user_agent: &'static str,
    /// Most body bytes read; a longer body is [`Failure::BodyTooLarge`].
    pub body_limit: usize,
}

/// The answer to a [`get`].
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body, or why it could not be read whole; separate because some callers only need
    /// the status, which is known before the body.
    pub body: Result<Bytes, ClientError>,
}

/// Why a [`get`] failed, with the peer it was sent to.
#[derive(Debug, thiserror::Error)]
#[error("{addr}: {failure}")]
pub struct ClientError {
    pub addr: SocketAddr,
    pub failure: Failure,
}

/// What went wrong in a [`get`]. The texts are short: they end up in status reports.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The TCP connection could not be established.
    #[error("{}", describe_io(.0))]
    Connect(#[source] io::Error),
    /// The exchange, connect included, took longer than the timeout.
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    /// The path or host would not make a valid request (the configuration checks prevent it).
    #[error("invalid HTTP {0}: must be non-empty, without whitespace or control characters")]
    InvalidRequest(&'static str),
    /// The peer's answer is not HTTP/1.x, or not within the size limits.
    #[error("malformed HTTP answer: {0}")]
    Malformed(#[source] hyper::Error),
    /// The request could not be sent or the answer not read (e.g. the peer closed early).
    #[error("HTTP exchange failed: {}", describe_chain(.0.as_ref()))]
    Exchange(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The body is longer than the caller accepts.
    #[error("answer body larger than {0} bytes")]
    BodyTooLarge(usize),
}

/// Short text of a socket error: the well-known kinds by name ("connection refused", not
/// "Connection refused (os error 111)"), the rest in full.
fn describe_io(error: &io::Error) -> String {
    use io::ErrorKind::*;
    match error.kind() {
        kind @ (ConnectionRefused | ConnectionReset | ConnectionAborted | HostUnreachable
        | NetworkUnreachable | NetworkDown | AddrNotAvailable | TimedOut | BrokenPipe
        | NotConnected) => kind.to_string(),
        _ => error.to_string(),
    }
}

/// An error and, if one caused it, the socket error at the bottom (hyper's own texts do not
/// show their cause).
fn describe_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error.source();
    while let Some(inner) = cause {
        if let Some(io) = inner.downcast_ref::<io::Error>() {
            return format!("{error}: {}", describe_io(io));
        }
        cause = inner.source();
    }
    error.to_string()
}

/// Whether `text` can go into a request line or header as it is.
fn is_token_safe(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Sends `request` to `addr` with `Connection: close` and reads the answer. `limit` bounds
/// everything, connect included: when it runs out before the answer's head, the result is
/// [`Failure::Timeout`]; when it runs out in the body, the [`Answer::body`] is.
pub async fn get(
    addr: SocketAddr,
    request: &Get<'_>,
    limit: Duration,
) -> Result<Answer, ClientError> {
    let error = |failure| ClientError { addr, failure };
    let deadline = Instant::now() + limit;
    let stream = timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| error(Failure::Timeout(limit)))?
        .map_err(|e| error(Failure::Connect(e)))?;
    get_on(stream, addr, request, deadline, limit).await
}

/// As [`get`], on a connection the caller set up (the health probes connect themselves, to
/// tell local faults apart); `deadline` bounds the exchange, `limit` is what errors report.
pub async fn get_on(
    stream: TcpStream,
    addr: SocketAddr,
    request: &Get<'_>,
    deadline: Instant,
    limit: Duration,
) -> Result<Answer, ClientError> {
    let error = |failure| ClientError { addr, failure };
    let prepared = prepare(request).map_err(error)?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .title_case_headers(true)
        .max_buf_size(MAX_BUF)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| error(exchange_failure(e)))?;
    // The connection does the reading and writing while the request waits for its answer.
    let mut conn = pin!(conn);
    let mut conn_done = false;

    let head = drive(conn.as_mut(), &mut conn_done, sender.send_request(prepared));
    let answer = timeout_at(deadline, head)
        .await
        .map_err(|_| error(Failure::Timeout(limit)))?
        .map_err(|e| error(exchange_failure(e)))?;
    let (head, incoming) = answer.into_parts();
    let body = drive(
        conn,
        &mut conn_done,
        read_body(incoming, request.body_limit),
    );
    let body = match timeout_at(deadline, body).await {
        Ok(body) => body,
        Err(_elapsed) => Err(Failure::Timeout(limit)),
    };
    // Dropping the connection closes it: cleanly once the whole answer was read, with a reset
    // otherwise, which is what a peer that sends more than asked for gets.
    Ok(Answer {
        status: head.status,
        headers: head.headers,
        body: body.map_err(error),
    })
}

/// The request for `get`, checked so that a stray CR/LF cannot inject headers or split it.
fn prepare(get: &Get<'_>) -> Result<hyper::Request<Empty<Bytes>>, Failure> {
    if !is_token_safe(get.path) {
        return Err(Failure::InvalidRequest("path"));
    }
    if !is_token_safe(get.host) {
        return Err(Failure::InvalidRequest("host"));
    }
    let uri: Uri = get
        .path
        .parse()
        .map_err(|_| Failure::InvalidRequest("path"))?;
    let host = HeaderValue::from_str(get.host).map_err(|_| Failure::InvalidRequest("host"))?;
    let mut request = hyper::Request::new(Empty::new());
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(header::HOST, host);
    headers.insert(header::USER_AGENT, HeaderValue::from_static(get.user_agent));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    Ok(request)
}

/// Runs `work` while polling the client connection `conn` (unless it has finished already).
async fn drive<C, T>(conn: Pin<&mut C>, conn_done: &mut bool, work: impl Future<Output = T>) -> T
where
    C: Future<Output = hyper::Result<()>>,
{
    let mut work = pin!(work);
    if !*conn_done {
        tokio::select! {
            out = &mut work => return out,
            ended = conn => {
                *conn_done = true;
                if let Err(e) = ended {
                    debug!("http client: connection ended: {e}");
                }
            }
        }
    }
    // The connection is over: `work` now ends with what it got, or an error.
    work.await
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Failure> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(Failure::BodyTooLarge(limit)),
        Err(e) => Err(match e.downcast::<hyper::Error>() {
            Ok(e) => exchange_failure(*e),
            Err(other) => Failure::Exchange(other),
        }),
    }
}

fn exchange_failure(e: hyper::Error) -> Failure {
    if e.is_parse() {
        Failure::Malformed(e)
    } else {
        Failure::Exchange(Box::new(e))
    }
}

/// Most body bytes of a [`post`]'s answer read: the peer plane answers posts with a word.
const POST_ANSWER_LIMIT: usize = 1024;

/// Sends `body` to `addr` as `POST path` with `Connection: close` and returns the answer (its
/// body read up to 1 KiB). `limit` bounds the whole exchange, connect included.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    user_agent: &'static str,
    limit: Duration,
) -> Result<Answer, ClientError> {
    let error = |failure| ClientError { addr, failure };
    if !is_token_safe(path) {
        return Err(error(Failure::InvalidRequest("path")));
    }
    let uri: Uri = path
        .parse()
        .map_err(|_| error(Failure::InvalidRequest("path")))?;
    let host = HeaderValue::from_str(&addr.to_string())
        .map_err(|_| error(Failure::InvalidRequest("host")))?;
    let mut request = hyper::Request::new(Full::new(body));
    *request.method_mut() = hyper::Method::POST;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(header::HOST, host);
    headers.insert(header::USER_AGENT, HeaderValue::from_static(user_agent));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let deadline = Instant::now() + limit;
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(Failure::Connect)?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .max_buf_size(MAX_BUF)
            .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(exchange_failure)?;
        let mut conn = pin!(conn);
        let mut conn_done = false;
        let answer = drive(conn.as_mut(), &mut conn_done, sender.send_request(request))
            .await
            .map_err(exchange_failure)?;
        let (head, incoming) = answer.into_parts();
        let body = drive(conn, &mut conn_done, read_body(incoming, POST_ANSWER_LIMIT)).await;
        Ok(Answer {
            status: head.status,
            headers: head.headers,
            body: body.map_err(|failure| ClientError { addr, failure }),
        })
    };
    timeout_at(deadline, exchange)
        .await
        .map_err(|_| error(Failure::Timeout(limit)))?
        .map_err(error)
}
