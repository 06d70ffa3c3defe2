//! The server side of every listener: the accept loop, one hyper connection per request,
//! the limits of [`Limits`] and the places of [`gate::Gate`], lingering after the response,
//! and a graceful shutdown.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, info};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use super::gate::{Gate, Reporter, Ticket};
use super::{
    Body, Limits, MAX_HEAD, Members, Peer, Plane, Request, Response, read_request_body, text,
    wants_body,
};

/// Most bytes hyper buffers per connection, on either side (its minimum is 8 KiB).
const MAX_BUF: usize = 16 * 1024;
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
/// The answer to a client that did not send its request head in time. hyper just closes such
/// connections; telling the client why costs one write.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
    Content-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\nConnection: close\r\n\r\n\
    request timeout\n";
/// Accepts connections on `listener` and answers each request with `handler` until `shutdown`
/// becomes `true`, without member places. Per-connection errors are logged at debug level and
/// never end the server. On shutdown, idle connections close at once and those in flight get
/// [`SHUTDOWN_GRACE`] to finish before they are dropped.
pub async fn serve_with<H, F>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let (_none, members) = watch::channel(BTreeSet::new());
    accept_loop(listener, limits, "http", members, handler, shutdown).await;
}

/// [`serve_with`] with the limits of `plane` and `members`' places.
pub(super) async fn serve_gated<H, F>(
    listener: TcpListener,
    plane: Plane,
    members: Members,
    handler: H,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    accept_loop(
        listener,
        plane.limits(),
        plane.name(),
        members,
        handler,
        shutdown,
    )
    .await;
}

async fn accept_loop<H, F>(
    listener: TcpListener,
    limits: Limits,
    name: &'static str,
    members: Members,
    handler: H,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    // Shared by all connections; an `Arc` also makes their services `Unpin`, which polling a
    // connection without shutting it down requires.
    let handler = Arc::new(handler);
    match listener.local_addr() {
        Ok(addr) => info!(listener = name; "serving HTTP on {addr}"),
        Err(e) => debug!("http: listener has no local address: {e}"),
    }
    let gate = Gate::new(limits.slots);
    let mut reporter = Reporter::new(name);
    let mut report = tokio::time::interval(Reporter::EVERY);
    let mut connections = JoinSet::new();
    let stop = shutdown_signalled(shutdown.clone());
    tokio::pin!(stop);

    loop {
        // Reap finished connections so the set does not grow with the number ever served.
        while let Some(done) = connections.try_join_next() {
            if let Err(e) = done {
                debug!("http: connection task failed: {e}");
            }
        }
        reporter.tick(&gate);
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut stop => break,
            _ = report.tick() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!("http: accept failed: {e}");
                    if needs_backoff(&e) {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            },
        };
        // An IPv4 client of a listener on `[::]` arrives as `::ffff:a.b.c.d`.
        let source = peer.ip().to_canonical();
        let member = members.borrow().contains(&source);
        let Some(ticket) = gate.admit(Some(source), member) else {
            debug!("http: {peer}: refused, every place is busy");
            continue;
        };
        let handler = Arc::clone(&handler);
        let shutdown = shutdown.clone();
        connections.spawn(serve_connection(
            stream, peer, limits, handler, ticket, shutdown,
        ));
        // Let the new connection read the request it most likely has sent already, and so
        // become busy, before the next newcomer may evict it.
        tokio::task::yield_now().await;
    }

    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        debug!("http: dropping connections still open after {SHUTDOWN_GRACE:?}");
    }
    // Dropping the set aborts whatever is left.
}

/// hyper's settings for one server connection.
fn server_builder(limits: Limits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_header_size(MAX_HEAD)
        .max_buf_size(MAX_BUF)
        .keep_alive(false)
        // A client may shut down its sending side once the request is out; it still gets
        // its answer.
        .half_close(true)
        // The header spelling the hand-written server had, for eyes reading raw answers.
        .title_case_headers(true);
    builder
}

type Answering = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// Serves one connection: one request, one response, close.
async fn serve_connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    limits: Limits,
    handler: Arc<H>,
    ticket: Ticket,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let ticket = Arc::new(ticket);
    // Told when the response is ready: from then on the client has `write_timeout` to take it.
    let responded = Arc::new(Notify::new());
    let service = {
        let responded = Arc::clone(&responded);
        let ticket = Arc::clone(&ticket);
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| -> Answering {
            let handler = Arc::clone(&handler);
            let responded = Arc::clone(&responded);
            // The request is complete: from now on this connection is not idle.
            ticket.busy();
            Box::pin(async move {
                let (mut request, body) = request.into_parts();
                request.extensions.insert(Peer(peer));
                if wants_body(&request) {
                    let body = read_request_body(body, limits).await;
                    request.extensions.insert(Body(body));
                }
                let mut response = match refuse(&request) {
                    Some(refusal) => refusal,
                    None => handler(request).await,
                };
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                responded.notify_one();
                Ok(response)
            })
        })
    };
    let mut conn = server_builder(limits).serve_connection(TokioIo::new(stream), service);

    let mut write_deadline = None;
    let mut stopping = false;
    let served = loop {
        let write_expired = async {
            match write_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break Some(result),
            () = responded.notified(), if write_deadline.is_none() => {
                write_deadline = Some(Instant::now() + limits.write_timeout);
            }
            _ = shutdown.wait_for(|stop| *stop), if !stopping => {
                // An idle connection ends now; a request in progress is still answered.
                stopping = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
            () = write_expired => break None,
            () = ticket.evicted(), if write_deadline.is_none() => {
                debug!("http: {peer}: closed to make room for a newer connection");
                return;
            }
        }
    };
    // Answered (or given up on): a newer connection may take this one's place.
    ticket.idle();

    // What we still write ourselves, and whether the client got an answer at all.
    let (answer, answered) = match served {
        None => {
            let took = limits.write_timeout;
            debug!("http: {peer}: client did not take the response within {took:?}");
            return;
        }
        // Without a response: the client closed without asking, or shutdown closed it idle.
        Some(Ok(())) => (None, write_deadline.is_some()),
        Some(Err(e)) if e.is_timeout() => {
            let took = limits.head_timeout;
            debug!("http: {peer}: no complete request within {took:?}");
            (Some(REQUEST_TIMEOUT), true)
        }
        // hyper has answered these itself (400, 431).
        Some(Err(e)) if e.is_parse() => {
            debug!("http: {peer}: {e}");
            (None, true)
        }
        Some(Err(e)) => {
            debug!("http: {peer}: {e}");
            return;
        }
    };
    let mut stream = conn.into_parts().io.into_inner();
    let finish = async {
        if let Some(answer) = answer {
            stream.write_all(answer).await?;
        }
        stream.shutdown().await
    };
    match timeout(limits.write_timeout, finish).await {
        // Lingering is idle time: a newcomer that needs the place ends it.
        Ok(Ok(())) if answered => {
            tokio::select! {
                () = linger(&mut stream) => {}
                () = ticket.evicted() => {}
            }
        }
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("http: {peer}: write error: {e}"),
        Err(_elapsed) => debug!("http: {peer}: client did not take the response in time"),
    }
}

/// Answers to requests hyper accepts but no handler should see.
fn refuse(request: &Request) -> Option<Response> {
    // RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
    let no_host =
        request.version == Version::HTTP_11 && !request.headers.contains_key(header::HOST);
    // Origin form (`/metrics`), absolute form (`http://host/metrics`, which has a path too) and
    // asterisk form; not the authority form, which only `CONNECT` uses.
    let path = request.uri.path();
    let bad_target = !(path.starts_with('/') || path == "*");
    if no_host || bad_target {
        debug!("http: refusing {} {}", request.method, request.uri);
        return Some(text(StatusCode::BAD_REQUEST, "bad request"));
    }
    None
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
