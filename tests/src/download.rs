//! Rate-limited HTTP downloads from inside the lab's client namespace, each on its own thread,
//! recording how they ended: complete with the right SHA-256, reset, stalled, or cut short.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use socket2::{Domain, Socket, Type};

use crate::content;

/// How one download ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub id: usize,
    pub client_port: u16,
    /// All bytes received and their SHA-256 matched.
    pub ok: bool,
    /// The connection was reset (ECONNRESET / EPIPE): the failure anycast steering prevents.
    pub reset: bool,
    pub error: Option<String>,
    /// The `X-Served-By` header of the answer: the node whose web server served it, if the
    /// headers arrived.
    pub served_by: Option<String>,
    pub bytes: usize,
    /// Longest time without any byte arriving.
    pub longest_stall: Duration,
    pub elapsed: Duration,
}

/// What a set of downloads came to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Downloads that received every byte with the right SHA-256.
    pub complete: usize,
    /// Downloads whose connection was reset.
    pub resets: usize,
    /// The longest time any download waited without a byte.
    pub longest_stall: Duration,
}

impl Tally {
    pub fn of(outcomes: &[Outcome]) -> Self {
        Self {
            complete: outcomes.iter().filter(|o| o.ok).count(),
            resets: outcomes.iter().filter(|o| o.reset).count(),
            longest_stall: outcomes
                .iter()
                .map(|o| o.longest_stall)
                .max()
                .unwrap_or_default(),
        }
    }
}

/// Counters shared with a live view while downloads run.
#[derive(Default)]
pub struct Live {
    pub running: AtomicUsize,
    pub done: AtomicUsize,
    pub resets: AtomicUsize,
    pub failed: AtomicUsize,
    /// (download id, client port) of every connection attempted so far.
    pub ports: std::sync::Mutex<Vec<(usize, u16)>>,
    /// Connections established so far.
    pub connected: AtomicUsize,
    /// Set to make downloads in flight stop at their next read (Ctrl-C in the lab).
    pub abort: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub vip: IpAddr,
    pub port: u16,
    pub size: usize,
    pub seed: u64,
    /// Bytes per second each download reads at most.
    pub rate: usize,
    /// A download is abandoned after this long.
    pub timeout: Duration,
}

/// Runs `count` downloads concurrently, each on a thread that joins the network namespace at
/// `netns_path` first. Returns when all have finished.
pub fn run_all(netns_path: &str, count: usize, spec: &Spec, live: Arc<Live>) -> Vec<Outcome> {
    let expected = content::sha256_hex(&content::generate(spec.size, spec.seed));
    let handles: Vec<_> = (0..count)
        .map(|id| {
            let spec = spec.clone();
            let expected = expected.clone();
            let live = live.clone();
            let path = netns_path.to_string();
            std::thread::spawn(move || {
                live.running.fetch_add(1, Ordering::Relaxed);
                let outcome = match crate::netns::join(&path) {
                    Ok(()) => download(id, &spec, &expected, &live),
                    Err(e) => failed(id, format!("joining the client namespace: {e}")),
                };
                live.running.fetch_sub(1, Ordering::Relaxed);
                live.done.fetch_add(1, Ordering::Relaxed);
                if outcome.reset {
                    live.resets.fetch_add(1, Ordering::Relaxed);
                }
                if !outcome.ok {
                    live.failed.fetch_add(1, Ordering::Relaxed);
                }
                outcome
            })
        })
        .collect();
    handles
        .into_iter()
        .enumerate()
        .map(|(id, h)| {
            h.join()
                .unwrap_or_else(|_| failed(id, "download thread panicked".into()))
        })
        .collect()
}

fn failed(id: usize, error: String) -> Outcome {
    Outcome {
        id,
        client_port: 0,
        ok: false,
        reset: false,
        error: Some(error),
        served_by: None,
        bytes: 0,
        longest_stall: Duration::ZERO,
        elapsed: Duration::ZERO,
    }
}

/// The value of the `X-Served-By` header in a response head.
fn served_by(head: &[u8]) -> Option<String> {
    String::from_utf8_lossy(head).lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("x-served-by")
            .then(|| value.trim().to_string())
    })
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

/// One download. The socket's receive buffer is kept small so that the sender is paced by our
/// reading: packets keep flowing through the whole download, across every route change.
pub fn download(id: usize, spec: &Spec, expected_sha: &str, live: &Live) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        id,
        client_port: 0,
        ok: false,
        reset: false,
        error: None,
        served_by: None,
        bytes: 0,
        longest_stall: Duration::ZERO,
        elapsed: Duration::ZERO,
    };
    let result = (|| -> std::io::Result<(usize, String)> {
        let addr = SocketAddr::new(spec.vip, spec.port);
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_recv_buffer_size(64 * 1024)?;
        // Bind first, so that even a connection that never completes has a known port.
        let any: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        socket.bind(&any.into())?;
        outcome.client_port = socket.local_addr()?.as_socket().map_or(0, |a| a.port());
        if let Ok(mut ports) = live.ports.lock() {
            ports.push((id, outcome.client_port));
        }
        socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        live.connected.fetch_add(1, Ordering::Relaxed);
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            stream,
            "GET /file HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
        )?;
        let mut hasher = Sha256::new();
        let mut head = Vec::new();
        let mut body_len = 0usize;
        let mut in_body = false;
        let mut buf = vec![0u8; 8192];
        let mut last_data = Instant::now();
        let chunk_time = Duration::from_secs_f64(buf.len() as f64 / spec.rate as f64);
        loop {
            if started.elapsed() > spec.timeout {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "download timed out",
                ));
            }
            let n = match stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    outcome.longest_stall = outcome.longest_stall.max(last_data.elapsed());
                    continue;
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            outcome.longest_stall = outcome.longest_stall.max(last_data.elapsed());
            last_data = Instant::now();
            let mut data = &buf[..n];
            if !in_body {
                head.extend_from_slice(data);
                match head.windows(4).position(|w| w == b"\r\n\r\n") {
                    Some(end) => {
                        in_body = true;
                        let rest = head.split_off(end + 4);
                        outcome.served_by = served_by(&head);
                        hasher.update(&rest);
                        body_len += rest.len();
                        data = &[];
                    }
                    None => continue,
                }
            }
            hasher.update(data);
            body_len += data.len();
            std::thread::sleep(chunk_time.mul_f64(n as f64 / buf.len() as f64));
        }
        Ok((body_len, content::hex(&hasher.finalize())))
    })();
    outcome.elapsed = started.elapsed();
    match result {
        Ok((len, sha)) => {
            outcome.bytes = len;
            if len == spec.size && sha == expected_sha {
                outcome.ok = true;
            } else {
                outcome.error = Some(format!(
                    "received {len} of {} bytes, sha256 {}",
                    spec.size,
                    if sha == expected_sha { "ok" } else { "WRONG" }
                ));
            }
        }
        Err(e) => {
            outcome.reset = is_reset(&e);
            outcome.error = Some(e.to_string());
        }
    }
    outcome
}
