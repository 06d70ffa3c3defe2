//! The QUIC-LB connection-ID generator the lab's HTTP/3 server uses, without the lab: its
//! output against `QuicLbConfig::decode` on 10,000 random configurations and server IDs, and
//! a real quinn + h3 server and client on loopback, with a relay in between that reads the
//! connection IDs off the wire: every CID the server's packets and the client's packets carry
//! for the server names the server's ID, also after the client migrates to a new port.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use cdn_common::quic_lb::{MAX_SERVER_ID_LEN, MIN_NONCE_LEN, QuicLbConfig};
use cdn_tests::{
    content,
    download::Live,
    h3::{
        Identity,
        cid::QuicLbCidGenerator,
        client::{self, Migration},
        server::{self, ServerSpec},
    },
};
use quinn_proto::ConnectionIdGenerator as _;
use rand::Rng as _;

#[test]
fn generated_cids_decode_to_their_server_id() {
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let server_id_len = rng.random_range(1..=MAX_SERVER_ID_LEN as u8);
        let config = QuicLbConfig {
            config_id: rng.random_range(0..=6),
            server_id_len,
            cid_len: rng.random_range(1 + server_id_len + MIN_NONCE_LEN as u8..=20),
        };
        let server_id = rng.random_range(0..=config.max_server_id());
        let mut generator = QuicLbCidGenerator::new(config, server_id).expect("valid config");
        let cid = generator.generate_cid();
        assert_eq!(cid.len(), usize::from(config.cid_len), "{config:?}");
        assert_eq!(generator.cid_len(), usize::from(config.cid_len));
        assert_eq!(cid[0], config.first_octet(), "{config:?}");
        assert_eq!(config.decode(&cid), Some(server_id), "{config:?} {cid:?}");
        assert!(generator.validate(&cid).is_ok());
        // A CID of another config rotation, or of another length, is not one of ours.
        let mut other = cid[..].to_vec();
        other[0] ^= 0x20;
        assert!(
            generator
                .validate(&quinn_proto::ConnectionId::new(&other))
                .is_err()
        );
        assert!(
            generator
                .validate(&quinn_proto::ConnectionId::new(&cid[..cid.len() - 1]))
                .is_err()
        );
    }
    // Random nonces: two CIDs of one server differ.
    let config = QuicLbConfig {
        config_id: 0,
        server_id_len: 2,
        cid_len: 8,
    };
    let mut generator = QuicLbCidGenerator::new(config, 3).expect("valid");
    assert_ne!(generator.generate_cid(), generator.generate_cid());
    assert!(QuicLbCidGenerator::new(config, 1 << 16).is_err());
}

/// The connection IDs a relay saw: the destination CIDs of the client's packets (the first
/// packet of each datagram) and the source CIDs of the server's long-header packets.
#[derive(Default)]
struct Wire {
    client_dcids: Vec<Vec<u8>>,
    server_scids: Vec<Vec<u8>>,
    client_ports: BTreeSet<u16>,
}

/// A UDP relay on loopback between one client (whatever port it sends from: it follows the
/// client's latest address, as a server follows a migrating client) and `server`.
struct Relay {
    addr: SocketAddr,
    wire: Arc<Mutex<Wire>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(server: SocketAddr, cid_len: usize) -> Result<Self> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(server)?;
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
        }
        let addr = front.local_addr()?;
        let wire = Arc::new(Mutex::new(Wire::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (front2, back2) = (front.try_clone()?, back.try_clone()?);
        let up = {
            let (wire, stop, client) = (wire.clone(), stop.clone(), client.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    let p = &buf[..n];
                    let dcid = if p[0] & 0x80 == 0 {
                        p.get(1..1 + cid_len)
                    } else {
                        p.get(5).and_then(|&len| p.get(6..6 + usize::from(len)))
                    };
                    if let Ok(mut w) = wire.lock() {
                        w.client_dcids.extend(dcid.map(<[u8]>::to_vec));
                        w.client_ports.insert(from.port());
                    }
                    if let Ok(mut c) = client.lock() {
                        *c = Some(from);
                    }
                    let _ = back.send(p);
                }
            })
        };
        let down = {
            let (wire, stop) = (wire.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = back2.recv(&mut buf) else {
                        continue;
                    };
                    let p = &buf[..n];
                    if p[0] & 0x80 != 0 {
                        let scid = p.get(5).and_then(|&dlen| {
                            let at = 6 + usize::from(dlen);
                            let slen = usize::from(*p.get(at)?);
                            p.get(at + 1..at + 1 + slen)
                        });
                        if let Ok(mut w) = wire.lock() {
                            w.server_scids.extend(scid.map(<[u8]>::to_vec));
                        }
                    }
                    let to = client.lock().ok().and_then(|c| *c);
                    if let Some(to) = to {
                        let _ = front2.send_to(p, to);
                    }
                }
            })
        };
        Ok(Self {
            addr,
            wire,
            stop,
            threads: vec![up, down],
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A real HTTP/3 server on loopback, stopped when dropped.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(spec: ServerSpec) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        let addr = socket.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async move {
                let endpoint = match server::endpoint(&spec, socket) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    () = server::serve(endpoint.clone(), Arc::new(spec)) => {}
                    _ = stopped => endpoint.close(0u32.into(), b"bye"),
                }
            });
        });
        ready.recv().context("server thread")??;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_real_server_issues_only_cids_naming_itself_also_across_migration() -> Result<()> {
    const SERVER_ID: u32 = 0x0203;
    const SIZE: usize = 1 << 20;
    let lb = QuicLbConfig {
        config_id: 1,
        server_id_len: 2,
        cid_len: 8,
    };
    let identity = Identity::self_signed()?;
    let server = Server::start(ServerSpec {
        body: content::generate(SIZE, 5).into(),
        name: "loopback".into(),
        identity: identity.clone(),
        generator: QuicLbCidGenerator::new(lb, SERVER_ID).expect("valid"),
        reset_key: [7; 32],
    })?;
    let relay = Relay::start(server.addr, usize::from(lb.cid_len))?;
    let spec = client::Spec {
        target: relay.addr,
        size: SIZE,
        seed: 5,
        rate: 4 << 20,
        timeout: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(5),
        cert: identity.cert.clone(),
    };
    // The download moves to a fresh port a quarter of the way in.
    let migration = Migration {
        after_bytes: SIZE / 4,
        choose: Arc::new(|_: &str, _: u16| {
            UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .ok()
                .map(|a| a.port())
        }),
    };
    let outcomes = client::run_all(None, 1, &spec, Some(migration), Arc::new(Live::default()))?;
    for o in &outcomes {
        ensure!(o.ok, "download {} failed: {o:?}", o.id);
        ensure!(o.served_by.as_deref() == Some("loopback"), "{o:?}");
        ensure!(o.migrated_to.is_some(), "download {} did not migrate", o.id);
    }
    let wire = relay.wire.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    // The server's CIDs: every destination CID of the client's length-8 packets (the client's
    // own first Initial DCID is 20 octets long in quinn) and every source CID of the server.
    let server_cids: BTreeSet<&Vec<u8>> = wire
        .client_dcids
        .iter()
        .filter(|c| c.len() == usize::from(lb.cid_len))
        .chain(&wire.server_scids)
        .collect();
    ensure!(
        server_cids.len() >= 2,
        "too few server CIDs on the wire ({}): a migrating client takes a fresh one",
        server_cids.len()
    );
    for cid in &server_cids {
        ensure!(
            lb.decode(cid) == Some(SERVER_ID),
            "CID {} on the wire does not name server {SERVER_ID:#x}",
            content::hex(cid)
        );
    }
    ensure!(
        wire.client_ports.len() == 2,
        "the relay saw {} client ports, expected 2 (before and after the migration)",
        wire.client_ports.len()
    );
    println!(
        "h3 loopback: download ok, {} distinct server CIDs on the wire all name {SERVER_ID:#x}, \
         {} client ports",
        server_cids.len(),
        wire.client_ports.len()
    );
    Ok(())
}
