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

use anyhow::{Context as _, Result, bail};
use cdn_tests::content;

fn main() -> Result<()> {
    let mut size = 4 << 20;
    let mut seed = 1;
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut udp: Vec<SocketAddr> = Vec::new();
    let mut name = String::from("cdn-lab-httpd");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--size" => size = value()?.parse().context("--size")?,
            "--seed" => seed = value()?.parse().context("--seed")?,
            "--listen" => listen.push(value()?.parse().context("--listen")?),
            "--udp" => udp.push(value()?.parse().context("--udp")?),
            "--name" => name = value()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if listen.is_empty() {
        bail!("give at least one --listen ADDR:PORT");
    }
    let body = Arc::new(content::generate(size, seed));
    let served_by: Arc<str> = Arc::from(name.as_str());
    let mut threads = Vec::new();
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
