//! The lab's web server: serves `/file` (the deterministic content of `cdn_tests::content`)
//! and `/health` on every address given, one thread per connection; `/file` answers carry
//! `X-Served-By: NAME` (`--name`). With `--udp`, it also
//! answers every UDP datagram on that address with `--name`, from one unconnected socket, the
//! way QUIC and DNS servers serve: the lab uses it to see which node accepted a UDP flow.
//!
//! `cdn-lab-httpd --size BYTES --seed N --listen ADDR:PORT [--listen ...] [--udp ADDR:PORT
//! --name NAME] [--udp ...]`

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use cdn_common::quic_lb::QuicLbConfig;
use cdn_tests::{
    content,
    h3::{Identity, cid::QuicLbCidGenerator, server},
};

/// The HTTP/3 options.
struct H3Options {
    listen: Vec<SocketAddr>,
    server_id: Option<u32>,
    lb: QuicLbConfig,
    cert: Option<String>,
    key: Option<String>,
    reset_key: Option<[u8; 32]>,
}

fn main() -> Result<()> {
    let mut size = 4 << 20;
    let mut seed = 1;
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut udp: Vec<SocketAddr> = Vec::new();
    let mut name = String::from("cdn-lab-httpd");
    let mut h3 = H3Options {
        listen: Vec::new(),
        server_id: None,
        lb: QuicLbConfig {
            config_id: 0,
            server_id_len: 2,
            cid_len: 8,
        },
        cert: None,
        key: None,
        reset_key: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--size" => size = value()?.parse().context("--size")?,
            "--seed" => seed = value()?.parse().context("--seed")?,
            "--listen" => listen.push(value()?.parse().context("--listen")?),
            "--udp" => udp.push(value()?.parse().context("--udp")?),
            "--name" => name = value()?,
            "--h3" => h3.listen.push(value()?.parse().context("--h3")?),
            "--quic-server-id" => h3.server_id = Some(value()?.parse().context(a.clone())?),
            "--quic-config-id" => h3.lb.config_id = value()?.parse().context(a.clone())?,
            "--quic-server-id-len" => h3.lb.server_id_len = value()?.parse().context(a.clone())?,
            "--quic-cid-len" => h3.lb.cid_len = value()?.parse().context(a.clone())?,
            "--tls-cert" => h3.cert = Some(value()?),
            "--tls-key" => h3.key = Some(value()?),
            "--reset-key" => h3.reset_key = Some(parse_key(&value()?)?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if listen.is_empty() {
        bail!("give at least one --listen ADDR:PORT");
    }
    let body = Arc::new(content::generate(size, seed));
    let served_by: Arc<str> = Arc::from(name.as_str());
    let mut threads = Vec::new();
    if !h3.listen.is_empty() {
        let spec = h3_spec(&h3, &body, &name)?;
        let listen = std::mem::take(&mut h3.listen);
        // Bound here, so that a port in use fails the start rather than a thread.
        let sockets = listen
            .iter()
            .map(|a| UdpSocket::bind(a).with_context(|| format!("binding HTTP/3 {a}")))
            .collect::<Result<Vec<_>>>()?;
        threads.push(std::thread::spawn(move || {
            if let Err(e) = serve_h3(spec, sockets) {
                eprintln!("HTTP/3 server: {e:#}");
            }
        }));
    }
    for addr in udp {
        let socket = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            answer_udp(&socket, name.as_bytes())
        }));
    }
    for addr in listen {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let body = body.clone();
        let served_by = served_by.clone();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let body = body.clone();
                let served_by = served_by.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &body, &served_by);
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn parse_key(hex: &str) -> Result<[u8; 32]> {
    ensure!(hex.len() == 64, "--reset-key needs 64 hex digits");
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).context("--reset-key")?;
    }
    Ok(key)
}

fn h3_spec(h3: &H3Options, body: &[u8], name: &str) -> Result<server::ServerSpec> {
    let server_id = h3
        .server_id
        .context("--h3 needs --quic-server-id (the member's QUIC server ID)")?;
    let generator = QuicLbCidGenerator::new(h3.lb, server_id)
        .map_err(|e| anyhow::anyhow!("QUIC-LB configuration: {e}"))?;
    let identity = match (&h3.cert, &h3.key) {
        (Some(cert), Some(key)) => Identity::read(cert.as_ref(), key.as_ref())?,
        (None, None) => Identity::self_signed()?,
        _ => bail!("give both --tls-cert and --tls-key, or neither"),
    };
    let reset_key = match h3.reset_key {
        Some(key) => key,
        None => {
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
            key
        }
    };
    Ok(server::ServerSpec {
        body: bytes::Bytes::copy_from_slice(body),
        name: name.to_owned(),
        identity,
        generator,
        reset_key,
    })
}

/// Serves HTTP/3 on every socket, from one thread: the lab's load is small.
fn serve_h3(spec: server::ServerSpec, sockets: Vec<UdpSocket>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let spec = Arc::new(spec);
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for socket in sockets {
            let endpoint = server::endpoint(&spec, socket)?;
            tasks.push(tokio::spawn(server::serve(endpoint, spec.clone())));
        }
        for t in tasks {
            let _ = t.await;
        }
        anyhow::Ok(())
    })
}

/// Answers every datagram with `name`, to whoever sent it. Errors (a client gone, an ICMP
/// error reported on the socket) concern one datagram only.
fn answer_udp(socket: &UdpSocket, name: &[u8]) {
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(name, peer);
        }
    }
}

/// Serves one request. `/file` says who served it (`X-Served-By: NAME`): the chaos run
/// blames a broken download on the member that served it.
fn serve(stream: TcpStream, body: &[u8], name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Slow clients are the point of the lab: writes may wait long for the window to open.
    stream.set_write_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let mut out = stream;
    match path {
        "/file" => {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nX-Served-By: {name}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            for chunk in body.chunks(16 * 1024) {
                out.write_all(chunk)?;
            }
        }
        "/health" => {
            out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")?
        }
        _ => out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
    }
    out.flush()
}
