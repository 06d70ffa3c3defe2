//! UDP flows through the lab: one client socket per flow, one datagram per question, and the
//! name of the node whose server answered (the lab's web server answers UDP with its node
//! name). The sockets are kept, so asking again reuses the same flows (same 4-tuples).

use std::{
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};

/// Client sockets in the lab's client namespace, all sending to one VIP address and port.
pub struct UdpFlows {
    sockets: Vec<UdpSocket>,
    target: SocketAddr,
}

impl UdpFlows {
    /// Opens `count` sockets on distinct ephemeral ports inside the namespace at `netns_path`.
    /// A socket belongs to the namespace it was created in, wherever it is used later.
    pub fn open(netns_path: &str, target: SocketAddr, count: usize) -> Result<Self> {
        let path = netns_path.to_string();
        let sockets = thread::spawn(move || -> Result<Vec<UdpSocket>> {
            crate::netns::join(&path)?;
            let any: SocketAddr = if target.is_ipv6() {
                "[::]:0".parse()?
            } else {
                "0.0.0.0:0".parse()?
            };
            (0..count)
                .map(|_| {
                    let socket = UdpSocket::bind(any).context("binding a client UDP socket")?;
                    socket.set_nonblocking(true)?;
                    Ok(socket)
                })
                .collect()
        })
        .join()
        .map_err(|_| anyhow!("the socket-opening thread panicked"))??;
        Ok(Self { sockets, target })
    }

    /// Each flow's client port, in order.
    pub fn local_ports(&self) -> Result<Vec<u16>> {
        self.sockets
            .iter()
            .map(|s| Ok(s.local_addr()?.port()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Asks every flow once, re-asking the unanswered ones up to `attempts` times (a datagram
    /// may be lost while routes move); each attempt waits `wait` for answers. Returns, per
    /// flow in order, the name that answered, or `None`.
    pub fn ask(&self, attempts: usize, wait: Duration) -> Result<Vec<Option<String>>> {
        let mut answers: Vec<Option<String>> = vec![None; self.sockets.len()];
        let mut buf = [0u8; 256];
        for _ in 0..attempts {
            for (socket, answer) in self.sockets.iter().zip(&answers) {
                if answer.is_none() {
                    match socket.send_to(b"who", self.target) {
                        Ok(_) => {}
                        // A full socket buffer or an ICMP error from an earlier datagram: the
                        // next attempt tries again.
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => {}
                    }
                }
            }
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline && answers.iter().any(Option::is_none) {
                for (socket, answer) in self.sockets.iter().zip(answers.iter_mut()) {
                    if answer.is_some() {
                        continue;
                    }
                    match socket.recv_from(&mut buf) {
                        Ok((n, from)) if from == self.target => {
                            *answer = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                        }
                        // Anything else (another source, no datagram yet, an ICMP error) is
                        // not an answer.
                        Ok(_) | Err(_) => {}
                    }
                }
                thread::sleep(Duration::from_millis(5));
            }
            if answers.iter().all(Option::is_some) {
                break;
            }
        }
        Ok(answers)
    }
}
