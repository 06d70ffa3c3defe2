//! HTTP/3 downloads, many at once, from inside a network namespace (the lab's client), each
//! on a QUIC endpoint of its own (its own UDP port, hence its own 4-tuple and flow hash), read
//! slowly so that they stay in flight for seconds. Each records how it ended: complete with the
//! right SHA-256, or failed by a stateless reset, a timeout or something else.
//!
//! A download can also migrate: after some bytes it moves its endpoint to a new UDP socket on
//! a chosen port ([`quinn::Endpoint::rebind`]), the path change a NAT rebinding causes.
//!
//! Everything runs on one thread with a current-thread tokio runtime: the thread joins the
//! namespace first, so every UDP socket it creates (also those made for a migration) lives
//! there.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::Buf as _;
use sha2::{Digest as _, Sha256};

use super::{SERVER_NAME, client_tls};
use crate::{content, download::Live};

/// What to download, from where, how fast.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The server (in the lab: VIP:443).
    pub target: SocketAddr,
    /// The expected content: `content::generate(size, seed)`.
    pub size: usize,
    pub seed: u64,
    /// Bytes per second each download reads at most.
    pub rate: usize,
    /// A download is abandoned after this long.
    pub timeout: Duration,
    /// QUIC idle timeout: how soon a connection whose server went silent fails.
    pub idle_timeout: Duration,
    /// The server certificate (DER), the only one trusted.
    pub cert: Vec<u8>,
}

/// Picks the port a download migrates to, from the server that serves it (`x-served-by`)
/// and the download's current port; `None` keeps the port.
pub type PortChooser = dyn Fn(&str, u16) -> Option<u16> + Send + Sync;

/// A migration of every download, once it has received `after_bytes`.
#[derive(Clone)]
pub struct Migration {
    pub after_bytes: usize,
    pub choose: Arc<PortChooser>,
}

/// Why a download failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection was closed by a stateless reset: a server that does not hold it got
    /// its packets (QUIC's equivalent of a TCP RST after a misroute).
    StatelessReset,
    /// The connection went silent (idle timeout) or the download ran over its time.
    TimedOut,
    /// Anything else (connection refused, TLS, HTTP/3, short or wrong content).
    Other,
}

/// How one download ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub id: usize,
    /// The local UDP port it started from.
    pub client_port: u16,
    /// The port it migrated to, if it did.
    pub migrated_to: Option<u16>,
    /// All bytes received and their SHA-256 matched.
    pub ok: bool,
    pub failure: Option<Failure>,
    pub error: Option<String>,
    /// The `x-served-by` header: the node whose server served it.
    pub served_by: Option<String>,
    pub bytes: usize,
    pub elapsed: Duration,
}

/// Runs `count` downloads concurrently on one thread that joins the network namespace at
/// `netns_path` first (`None`: stay in the caller's). Returns when all have finished.
pub fn run_all(
    netns_path: Option<&str>,
    count: usize,
    spec: &Spec,
    migration: Option<Migration>,
    live: Arc<Live>,
) -> Result<Vec<Outcome>> {
    let spec = Arc::new(spec.clone());
    let path = netns_path.map(str::to_owned);
    let thread = std::thread::spawn(move || -> Result<Vec<Outcome>> {
        if let Some(path) = &path {
            crate::netns::join(path).context("joining the client namespace")?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the client's runtime")?;
        runtime.block_on(async move {
            let expected = content::sha256_hex(&content::generate(spec.size, spec.seed));
            let config = client_config(&spec)?;
            let tasks: Vec<_> = (0..count)
                .map(|id| {
                    let job = Job {
                        id,
                        spec: spec.clone(),
                        config: config.clone(),
                        migration: migration.clone(),
                        expected: expected.clone(),
                        live: live.clone(),
                    };
                    tokio::spawn(job.run())
                })
                .collect();
            let mut outcomes = Vec::with_capacity(count);
            for (id, task) in tasks.into_iter().enumerate() {
                outcomes.push(task.await.unwrap_or_else(|e| Outcome {
                    error: Some(format!("download task failed: {e}")),
                    failure: Some(Failure::Other),
                    ..Outcome::new(id)
                }));
            }
            Ok(outcomes)
        })
    });
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the download thread panicked"))?
}

fn client_config(spec: &Spec) -> Result<quinn::ClientConfig> {
    let mut config = quinn::ClientConfig::new(Arc::new(client_tls(&spec.cert)?));
    let mut transport = quinn::TransportConfig::default();
    // Small windows: the server can only send as fast as the client reads, so that packets
    // keep flowing through the whole download.
    transport.stream_receive_window(quinn::VarInt::from_u32(64 * 1024));
    transport.receive_window(quinn::VarInt::from_u32(128 * 1024));
    transport.max_idle_timeout(Some(
        spec.idle_timeout
            .try_into()
            .context("idle timeout out of range")?,
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

impl Outcome {
    fn new(id: usize) -> Self {
        Self {
            id,
            client_port: 0,
            migrated_to: None,
            ok: false,
            failure: None,
            error: None,
            served_by: None,
            bytes: 0,
            elapsed: Duration::ZERO,
        }
    }
}

struct Job {
    id: usize,
    spec: Arc<Spec>,
    config: quinn::ClientConfig,
    migration: Option<Migration>,
    expected: String,
    live: Arc<Live>,
}

impl Job {
    async fn run(self) -> Outcome {
        let started = Instant::now();
        let live = self.live.clone();
        live.running.fetch_add(1, Ordering::Relaxed);
        let mut outcome = Outcome::new(self.id);
        let mut connection = None;
        let result = tokio::time::timeout(
            self.spec.timeout,
            self.download(&mut outcome, &mut connection),
        )
        .await;
        outcome.elapsed = started.elapsed();
        let failure = match &result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                outcome.error = Some(format!("{e:#}"));
                Some(classify(connection.as_ref()))
            }
            Err(_) => {
                outcome.error = Some("download timed out".into());
                Some(Failure::TimedOut)
            }
        };
        if let Some(c) = &connection {
            c.close(0u32.into(), b"done");
        }
        outcome.ok = failure.is_none();
        outcome.failure = failure;
        live.running.fetch_sub(1, Ordering::Relaxed);
        live.done.fetch_add(1, Ordering::Relaxed);
        if failure == Some(Failure::StatelessReset) {
            live.resets.fetch_add(1, Ordering::Relaxed);
        }
        if !outcome.ok {
            live.failed.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    async fn download(
        &self,
        outcome: &mut Outcome,
        connection: &mut Option<quinn::Connection>,
    ) -> Result<()> {
        let target = self.spec.target;
        let socket = bind(target, 0)?;
        outcome.client_port = socket.local_addr()?.port();
        if let Ok(mut ports) = self.live.ports.lock() {
            ports.push((self.id, outcome.client_port));
        }
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        endpoint.set_default_client_config(self.config.clone());
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            endpoint.connect(target, SERVER_NAME)?,
        )
        .await
        .context("QUIC handshake timed out")??;
        *connection = Some(conn.clone());
        self.live.connected.fetch_add(1, Ordering::Relaxed);
        let (mut driver, mut requests) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        // The connection's control streams need polling for the whole download.
        let driver = tokio::spawn(async move { driver.wait_idle().await });
        let request = http::Request::get(format!("https://{SERVER_NAME}/file")).body(())?;
        let mut stream = requests.send_request(request).await?;
        stream.finish().await?;
        let response = stream.recv_response().await?;
        outcome.served_by = response
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if response.status() != http::StatusCode::OK {
            bail!("HTTP status {}", response.status());
        }
        let mut hasher = Sha256::new();
        while let Some(mut chunk) = stream.recv_data().await? {
            let n = chunk.remaining();
            while chunk.has_remaining() {
                let part = chunk.chunk();
                hasher.update(part);
                let len = part.len();
                chunk.advance(len);
            }
            outcome.bytes += n;
            self.maybe_migrate(outcome, &endpoint)?;
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / self.spec.rate as f64)).await;
        }
        driver.abort();
        let sha = content::hex(&hasher.finalize());
        if outcome.bytes != self.spec.size || sha != self.expected {
            bail!(
                "received {} of {} bytes, sha256 {}",
                outcome.bytes,
                self.spec.size,
                if sha == self.expected { "ok" } else { "WRONG" }
            );
        }
        Ok(())
    }

    /// Moves the endpoint to a new local port once, when the migration says so.
    fn maybe_migrate(&self, outcome: &mut Outcome, endpoint: &quinn::Endpoint) -> Result<()> {
        let Some(m) = &self.migration else {
            return Ok(());
        };
        if outcome.migrated_to.is_some() || outcome.bytes < m.after_bytes {
            return Ok(());
        }
        let served_by = outcome.served_by.as_deref().unwrap_or_default();
        if let Some(port) = (m.choose)(served_by, outcome.client_port) {
            let socket = bind(self.spec.target, port)?;
            endpoint
                .rebind(socket)
                .with_context(|| format!("rebinding to port {port}"))?;
            outcome.migrated_to = Some(port);
        }
        Ok(())
    }
}

/// An unconnected UDP socket of `target`'s family on `port` (0: any).
fn bind(target: SocketAddr, port: u16) -> Result<UdpSocket> {
    let any: SocketAddr = if target.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, port).into()
    };
    UdpSocket::bind(any).with_context(|| format!("binding UDP {any}"))
}

/// What closed the connection, as quinn saw it.
fn classify(connection: Option<&quinn::Connection>) -> Failure {
    match connection.and_then(quinn::Connection::close_reason) {
        Some(quinn::ConnectionError::Reset) => Failure::StatelessReset,
        Some(quinn::ConnectionError::TimedOut) => Failure::TimedOut,
        _ => Failure::Other,
    }
}
