//! The lab's HTTP/3 server: quinn + h3 on one unconnected UDP socket per address, serving
//! `/file` (the lab's content) with `x-served-by: NAME`, and `/health`. Its connection IDs
//! come from [`QuicLbCidGenerator`], so they name this server's QUIC-LB server ID; its
//! stateless-reset key is shared by every server of the lab (see [`ServerSpec::reset_key`]).

use std::{net::UdpSocket, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Response, StatusCode};

use super::{Identity, cid::QuicLbCidGenerator, server_tls};

/// What one server serves and how it identifies itself.
#[derive(Clone)]
pub struct ServerSpec {
    /// The body of `/file`.
    pub body: Bytes,
    /// The `x-served-by` header.
    pub name: String,
    pub identity: Identity,
    pub generator: QuicLbCidGenerator,
    /// Key of the stateless resets. The lab's servers share one: a server that receives a
    /// packet whose CID another server issued answers with a reset the client recognises (the
    /// token is derived from the key and the CID), so a misrouted connection ends at once and
    /// visibly (`ConnectionError::Reset`) rather than by idle timeout.
    pub reset_key: [u8; 32],
}

/// How long a connection may be silent before the server forgets it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A quinn endpoint serving on `socket` (call from inside a tokio runtime).
pub fn endpoint(spec: &ServerSpec, socket: UdpSocket) -> Result<quinn::Endpoint> {
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &spec.reset_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    let generator = spec.generator;
    config.cid_generator(move || Box::new(generator));
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls(&spec.identity)?));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .context("idle timeout out of range")?,
    ));
    server.transport_config(Arc::new(transport));
    // Clients that change address keep their connection (QUIC connection migration).
    server.migration(true);
    quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))
        .context("starting the QUIC endpoint")
}

/// Accepts connections on `endpoint` until it is closed; each connection and each request
/// runs in a task of its own. A failed connection or request concerns that one client only.
pub async fn serve(endpoint: quinn::Endpoint, spec: Arc<ServerSpec>) {
    while let Some(incoming) = endpoint.accept().await {
        let spec = spec.clone();
        tokio::spawn(async move {
            if let Ok(connection) = incoming.await {
                let _ = serve_connection(connection, spec).await;
            }
        });
    }
}

async fn serve_connection(connection: quinn::Connection, spec: Arc<ServerSpec>) -> Result<()> {
    let mut h3 = h3::server::Connection::new(h3_quinn::Connection::new(connection)).await?;
    while let Some(resolver) = h3.accept().await? {
        let spec = spec.clone();
        tokio::spawn(async move {
            let _ = async {
                let (request, mut stream) = resolver.resolve_request().await?;
                let (status, body) = match request.uri().path() {
                    "/file" => (StatusCode::OK, spec.body.clone()),
                    "/health" => (StatusCode::OK, Bytes::from_static(b"ok\n")),
                    _ => (StatusCode::NOT_FOUND, Bytes::new()),
                };
                let response = Response::builder()
                    .status(status)
                    .header("content-length", body.len())
                    .header("x-served-by", spec.name.as_str())
                    .body(())?;
                stream.send_response(response).await?;
                // Chunks that share the body's buffer; the stream's flow control paces them
                // to the client's reading.
                let mut at = 0;
                while at < body.len() {
                    let end = (at + 16 * 1024).min(body.len());
                    stream.send_data(body.slice(at..end)).await?;
                    at = end;
                }
                stream.finish().await?;
                anyhow::Ok(())
            }
            .await;
        });
    }
    Ok(())
}
