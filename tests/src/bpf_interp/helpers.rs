//! The kernel helpers the XDP program calls, emulated with the kernel's own rules (argument
//! checks, return codes, how the packet window moves). Maps are the real ones (see
//! [`super::kmaps`]); sockets and the FIB answer from a per-run description ([`SocketTable`],
//! [`Fib`]), since what the path depends on is only whether a socket exists and in what state.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{
    InterpError,
    exec::Machine,
    memory::{FRAME_SIZE, Kind, TAILROOM, XDP_FRAME_STRUCT},
};

// Helper ids (include/uapi/linux/bpf.h).
pub const MAP_LOOKUP_ELEM: u32 = 1;
pub const KTIME_GET_NS: u32 = 5;
pub const GET_SMP_PROCESSOR_ID: u32 = 8;
pub const REDIRECT: u32 = 23;
pub const XDP_ADJUST_HEAD: u32 = 44;
pub const REDIRECT_MAP: u32 = 51;
pub const XDP_ADJUST_TAIL: u32 = 65;
pub const FIB_LOOKUP: u32 = 69;
pub const SK_LOOKUP_TCP: u32 = 84;
pub const SK_LOOKUP_UDP: u32 = 85;
pub const SK_RELEASE: u32 = 86;
pub const SKC_LOOKUP_TCP: u32 = 99;
pub const RINGBUF_RESERVE: u32 = 131;
pub const RINGBUF_SUBMIT: u32 = 132;
pub const RINGBUF_DISCARD: u32 = 133;
pub const TCP_CHECK_SYNCOOKIE: u32 = 100;
pub const KTIME_GET_BOOT_NS: u32 = 125;
pub const KTIME_GET_COARSE_NS: u32 = 160;
pub const XDP_GET_BUFF_LEN: u32 = 188;
pub const XDP_LOAD_BYTES: u32 = 189;
pub const XDP_STORE_BYTES: u32 = 190;

/// The helper's name, for reports.
pub fn name(id: u32) -> &'static str {
    match id {
        MAP_LOOKUP_ELEM => "map_lookup_elem",
        KTIME_GET_NS => "ktime_get_ns",
        GET_SMP_PROCESSOR_ID => "get_smp_processor_id",
        REDIRECT => "redirect",
        XDP_ADJUST_HEAD => "xdp_adjust_head",
        REDIRECT_MAP => "redirect_map",
        XDP_ADJUST_TAIL => "xdp_adjust_tail",
        FIB_LOOKUP => "fib_lookup",
        SK_LOOKUP_TCP => "sk_lookup_tcp",
        SK_LOOKUP_UDP => "sk_lookup_udp",
        SK_RELEASE => "sk_release",
        SKC_LOOKUP_TCP => "skc_lookup_tcp",
        RINGBUF_RESERVE => "ringbuf_reserve",
        RINGBUF_SUBMIT => "ringbuf_submit",
        RINGBUF_DISCARD => "ringbuf_discard",
        TCP_CHECK_SYNCOOKIE => "tcp_check_syncookie",
        KTIME_GET_BOOT_NS => "ktime_get_boot_ns",
        KTIME_GET_COARSE_NS => "ktime_get_coarse_ns",
        XDP_GET_BUFF_LEN => "xdp_get_buff_len",
        XDP_LOAD_BYTES => "xdp_load_bytes",
        XDP_STORE_BYTES => "xdp_store_bytes",
        _ => "?",
    }
}

const EINVAL: i64 = 22;
const ENOENT: i64 = 2;
const EFAULT: i64 = 14;
const ETH_HLEN: i64 = 14;
const XDP_ABORTED: u64 = 0;
const XDP_TX: u64 = 3;
const XDP_REDIRECT: u64 = 4;
/// `BPF_FIB_LKUP_RET_NOT_FWDED`: what the kernel answers when it has no route.
pub const FIB_NOT_FWDED: u64 = 4;

// Kernel socket states (include/net/tcp_states.h), as `bpf_sock.state` shows them.
pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_CLOSE: u32 = 7;
pub const TCP_LISTEN: u32 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A socket as the lookup helpers see it.
#[derive(Clone, Debug)]
pub struct Socket {
    pub proto: Proto,
    pub local: SocketAddr,
    /// The peer of a connected socket; `None` for listeners and unconnected UDP sockets.
    pub remote: Option<SocketAddr>,
    pub state: u32,
}

/// The sockets of the namespace a run looks into, and whether a SYN cookie check passes.
#[derive(Clone, Debug, Default)]
pub struct SocketTable {
    pub sockets: Vec<Socket>,
    pub syncookies_valid: bool,
}

impl SocketTable {
    /// A connected socket for the exact 4-tuple first, then one bound to the destination
    /// (a listener, or an unconnected UDP socket), as the kernel's lookups order them.
    fn lookup(&self, proto: Proto, client: SocketAddr, server: SocketAddr) -> Option<&Socket> {
        let family = |a: &SocketAddr| a.is_ipv4() == server.is_ipv4();
        let mine = self
            .sockets
            .iter()
            .filter(|s| s.proto == proto && family(&s.local));
        let exact = mine
            .clone()
            .find(|s| s.remote == Some(client) && s.local == server);
        exact.or_else(|| {
            mine.clone().find(|s| {
                s.remote.is_none()
                    && s.local.port() == server.port()
                    && (s.local.ip() == server.ip() || s.local.ip().is_unspecified())
            })
        })
    }
}

/// What `bpf_fib_lookup` answers in a run.
#[derive(Clone, Copy, Debug)]
pub enum Fib {
    /// No route (`BPF_FIB_LKUP_RET_NOT_FWDED`), as in the benchmark's namespace.
    Miss,
    /// A route and a resolved neighbour.
    Forward {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn neg(errno: i64) -> u64 {
    (-errno) as u64
}

impl Machine<'_> {
    fn err(&self, id: u32, what: impl Into<String>) -> InterpError {
        InterpError::Helper {
            helper: name(id),
            what: what.into(),
        }
    }

    fn expect_ctx(&self, id: u32, reg: u64) -> Result<(), InterpError> {
        match self.mem.locate(reg) {
            Some((r, 0, Kind::Context)) if r == self.mem.ctx => Ok(()),
            _ => Err(self.err(id, "argument is not the program's context")),
        }
    }

    /// Runs helper `id` with the arguments in r1-r5; returns r0.
    pub(super) fn call_helper(&mut self, id: u32) -> Result<u64, InterpError> {
        let [_, r1, r2, r3, r4, r5, ..] = self.regs;
        match id {
            MAP_LOOKUP_ELEM => self.map_lookup(r1, r2),
            KTIME_GET_NS => Ok(clock(libc::CLOCK_MONOTONIC)),
            KTIME_GET_COARSE_NS => Ok(clock(libc::CLOCK_MONOTONIC_COARSE)),
            KTIME_GET_BOOT_NS => Ok(clock(libc::CLOCK_BOOTTIME)),
            GET_SMP_PROCESSOR_ID => Ok(0),
            XDP_ADJUST_HEAD => {
                self.expect_ctx(id, r1)?;
                Ok(self.adjust_head(r2 as i32 as i64))
            }
            XDP_ADJUST_TAIL => {
                self.expect_ctx(id, r1)?;
                Ok(self.adjust_tail(r2 as i32 as i64))
            }
            REDIRECT => Ok(if r2 != 0 { XDP_ABORTED } else { XDP_REDIRECT }),
            REDIRECT_MAP => self.redirect_map(r1, r2 as u32, r3),
            FIB_LOOKUP => self.fib_lookup(r1, r2, r3, r4),
            SK_LOOKUP_TCP | SKC_LOOKUP_TCP => self.sk_lookup(id, Proto::Tcp, [r1, r2, r3, r5]),
            SK_LOOKUP_UDP => self.sk_lookup(id, Proto::Udp, [r1, r2, r3, r5]),
            SK_RELEASE => self.sk_release(r1),
            RINGBUF_RESERVE => self.ringbuf_reserve(r1, r2, r3),
            RINGBUF_SUBMIT | RINGBUF_DISCARD => self.ringbuf_commit(id, r1, r2),
            TCP_CHECK_SYNCOOKIE => {
                self.expect_socket(id, r1)?;
                if !matches!(r3, 20 | 40) || r5 < 20 {
                    return Err(self.err(id, format!("header lengths {r3} and {r5}")));
                }
                self.mem.read(r2, r3 as usize)?;
                self.mem.read(r4, r5 as usize)?;
                Ok(if self.env.sockets.syncookies_valid {
                    0
                } else {
                    neg(ENOENT)
                })
            }
            XDP_GET_BUFF_LEN => {
                self.expect_ctx(id, r1)?;
                let w = self.mem.window;
                Ok((w.end - w.data) as u64)
            }
            XDP_LOAD_BYTES | XDP_STORE_BYTES => {
                self.expect_ctx(id, r1)?;
                let (off, len) = (r2 as u32 as usize, r4 as u32 as usize);
                let w = self.mem.window;
                if w.data + off + len > w.end {
                    return Ok(neg(EFAULT));
                }
                let at = w.data + off;
                if id == XDP_LOAD_BYTES {
                    let bytes = self.mem.packet_bytes()[at..at + len].to_vec();
                    self.mem.write(r3, &bytes)?;
                } else {
                    let bytes = self.mem.read(r3, len)?.to_vec();
                    self.mem.packet_bytes_mut()[at..at + len].copy_from_slice(&bytes);
                }
                Ok(0)
            }
            _ => Err(InterpError::UnknownHelper(id)),
        }
    }

    fn map_of(&self, id: u32, handle: u64) -> Result<usize, InterpError> {
        match self.mem.locate(handle) {
            Some((_, 0, Kind::MapHandle(map))) => Ok(map),
            _ => Err(self.err(id, "argument is not a map")),
        }
    }

    fn map_lookup(&mut self, handle: u64, key_ptr: u64) -> Result<u64, InterpError> {
        let map = self.map_of(MAP_LOOKUP_ELEM, handle)?;
        let kmap = self
            .env
            .maps
            .0
            .get(map)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                self.err(
                    MAP_LOOKUP_ELEM,
                    format!(
                        "map {} is not one of the loaded program's maps",
                        self.prog.maps[map].name
                    ),
                )
            })?;
        let key = self.mem.read(key_ptr, kmap.key_size)?.to_vec();
        // One copy per (map, key) and run, so a value written through one lookup is seen by
        // the next. The copy is never written back: the kernel's maps stay as configured.
        if let Some(region) = self.values.get(&(map, key.clone())) {
            return Ok(self.mem.pointer(*region, 0));
        }
        let Some(value) = kmap.lookup(&key)? else {
            return Ok(0);
        };
        let region = self.mem.alloc(Kind::MapValue(map), value, true);
        self.values.insert((map, key), region);
        Ok(self.mem.pointer(region, 0))
    }

    fn redirect_map(&mut self, handle: u64, key: u32, flags: u64) -> Result<u64, InterpError> {
        let map = self.map_of(REDIRECT_MAP, handle)?;
        let kmap = self
            .env
            .maps
            .0
            .get(map)
            .and_then(Option::as_ref)
            .ok_or_else(|| self.err(REDIRECT_MAP, "map is not one of the loaded program's maps"))?;
        // The low bits of the flags are the action on a miss; anything above XDP_TX aborts.
        if flags > XDP_TX {
            return Ok(XDP_ABORTED);
        }
        Ok(match kmap.lookup(&key.to_ne_bytes())? {
            Some(_) => XDP_REDIRECT,
            None => flags,
        })
    }

    /// `bpf_xdp_adjust_head`: moves `data` (and the metadata before it) by `delta`, keeping
    /// room for the kernel's `xdp_frame` in front and an Ethernet header behind.
    fn adjust_head(&mut self, delta: i64) -> u64 {
        let w = self.mem.window;
        let meta_len = w.data - w.meta;
        let data = w.data as i64 + delta;
        if data < (XDP_FRAME_STRUCT + meta_len) as i64 || data > w.end as i64 - ETH_HLEN {
            return neg(EINVAL);
        }
        let data = data as usize;
        if meta_len > 0 {
            self.mem
                .packet_bytes_mut()
                .copy_within(w.meta..w.data, data - meta_len);
        }
        self.mem.window.meta = data - meta_len;
        self.mem.window.data = data;
        0
    }

    /// `bpf_xdp_adjust_tail`: moves `data_end`; a grown tail reads as zeros.
    fn adjust_tail(&mut self, delta: i64) -> u64 {
        let w = self.mem.window;
        let end = w.end as i64 + delta;
        if end > (FRAME_SIZE - TAILROOM) as i64 || end < w.data as i64 + ETH_HLEN {
            return neg(EINVAL);
        }
        let end = end as usize;
        if end > w.end {
            self.mem.packet_bytes_mut()[w.end..end].fill(0);
        }
        self.mem.window.end = end;
        0
    }

    fn fib_lookup(
        &mut self,
        ctx: u64,
        params: u64,
        len: u64,
        flags: u64,
    ) -> Result<u64, InterpError> {
        self.expect_ctx(FIB_LOOKUP, ctx)?;
        // struct bpf_fib_lookup is 64 bytes; ifindex at 8, smac at 52, dmac at 58.
        if len != 64 || flags != 0 {
            return Err(self.err(FIB_LOOKUP, format!("size {len}, flags {flags:#x}")));
        }
        self.mem.read(params, 64)?;
        match self.env.fib {
            Fib::Miss => Ok(FIB_NOT_FWDED),
            Fib::Forward {
                ifindex,
                smac,
                dmac,
            } => {
                self.mem.store(params + 8, 4, u64::from(ifindex))?;
                self.mem.write(params + 52, &smac)?;
                self.mem.write(params + 58, &dmac)?;
                Ok(0)
            }
        }
    }

    /// `bpf_ringbuf_reserve(map, size, flags)`: a fresh zeroed record the program writes in
    /// place. The ring is never full here (the kernel's ring is not touched: the run leaves
    /// the maps as configured), so a path that reports an event always gets its record.
    fn ringbuf_reserve(&mut self, handle: u64, size: u64, flags: u64) -> Result<u64, InterpError> {
        let map = self.map_of(RINGBUF_RESERVE, handle)?;
        let is_ring = self
            .env
            .maps
            .0
            .get(map)
            .and_then(Option::as_ref)
            .is_some_and(|k| k.map_type == aya::maps::MapType::RingBuf);
        if !is_ring {
            return Err(self.err(RINGBUF_RESERVE, "map is not a loaded ring buffer"));
        }
        if flags != 0 || size == 0 || size > 1 << 20 {
            return Err(self.err(RINGBUF_RESERVE, format!("size {size}, flags {flags:#x}")));
        }
        let region = self
            .mem
            .alloc(Kind::RingRecord(map), vec![0; size as usize], true);
        self.held.push(region);
        Ok(self.mem.pointer(region, 0))
    }

    /// `bpf_ringbuf_submit`/`bpf_ringbuf_discard(data, flags)`: ends the record's life (the
    /// verifier insists every reserved record is released, like a socket).
    fn ringbuf_commit(&mut self, id: u32, data: u64, flags: u64) -> Result<u64, InterpError> {
        let region = match self.mem.locate(data) {
            Some((r, 0, Kind::RingRecord(_))) if self.mem.is_live(r) => r,
            _ => return Err(self.err(id, "argument is not a reserved ring record")),
        };
        if flags != 0 {
            return Err(self.err(id, format!("flags {flags:#x}")));
        }
        self.mem.kill(region);
        self.held.retain(|r| *r != region);
        Ok(0)
    }

    fn expect_socket(&self, id: u32, sk: u64) -> Result<usize, InterpError> {
        match self.mem.locate(sk) {
            Some((r, 0, Kind::Socket)) if self.mem.is_live(r) => Ok(r),
            _ => Err(self.err(id, "argument is not a held socket")),
        }
    }

    /// The socket lookups: `args` are (ctx, tuple, tuple size, flags).
    fn sk_lookup(&mut self, id: u32, proto: Proto, args: [u64; 4]) -> Result<u64, InterpError> {
        let [ctx, tuple, size, flags] = args;
        self.expect_ctx(id, ctx)?;
        if flags != 0 {
            return Err(self.err(id, format!("flags {flags:#x}")));
        }
        // struct bpf_sock_tuple: the size tells the family.
        let t = self.mem.read(tuple, size as usize)?.to_vec();
        let port = |at: usize| u16::from_be_bytes([t[at], t[at + 1]]);
        let (client, server) = match size {
            12 => {
                let addr =
                    |at: usize| IpAddr::V4(Ipv4Addr::new(t[at], t[at + 1], t[at + 2], t[at + 3]));
                (
                    SocketAddr::new(addr(0), port(8)),
                    SocketAddr::new(addr(4), port(10)),
                )
            }
            36 => {
                let addr = |at: usize| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&t[at..at + 16]);
                    IpAddr::V6(Ipv6Addr::from(a))
                };
                (
                    SocketAddr::new(addr(0), port(32)),
                    SocketAddr::new(addr(16), port(34)),
                )
            }
            _ => return Err(self.err(id, format!("tuple size {size}"))),
        };
        let Some(sock) = self.env.sockets.lookup(proto, client, server) else {
            return Ok(0);
        };
        let bytes = bpf_sock(sock);
        let region = self.mem.alloc(Kind::Socket, bytes, false);
        self.held.push(region);
        Ok(self.mem.pointer(region, 0))
    }

    fn sk_release(&mut self, sk: u64) -> Result<u64, InterpError> {
        let region = self.expect_socket(SK_RELEASE, sk)?;
        self.mem.kill(region);
        self.held.retain(|r| *r != region);
        Ok(0)
    }
}

/// `struct bpf_sock` (include/uapi/linux/bpf.h) for `sock`: ports and addresses as the kernel
/// exposes them (local port in host order, remote port in network order).
fn bpf_sock(sock: &Socket) -> Vec<u8> {
    let mut b = vec![0u8; 80];
    let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
    let (family, typ, protocol) = match (sock.local.is_ipv4(), sock.proto) {
        (true, Proto::Tcp) => (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_TCP),
        (true, Proto::Udp) => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDP),
        (false, Proto::Tcp) => (libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP),
        (false, Proto::Udp) => (libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDP),
    };
    put(4, &(family as u32).to_ne_bytes());
    put(8, &(typ as u32).to_ne_bytes());
    put(12, &(protocol as u32).to_ne_bytes());
    let addr = |a: IpAddr| -> (usize, Vec<u8>) {
        match a {
            IpAddr::V4(a) => (0, a.octets().to_vec()),
            IpAddr::V6(a) => (4, a.octets().to_vec()),
        }
    };
    // src_ip4 at 24, src_ip6 at 28; dst_ip4 at 52, dst_ip6 at 56.
    let (shift, local) = addr(sock.local.ip());
    put(24 + shift, &local);
    put(44, &u32::from(sock.local.port()).to_ne_bytes());
    if let Some(remote) = sock.remote {
        put(48, &remote.port().to_be_bytes());
        let (shift, peer) = addr(remote.ip());
        put(52 + shift, &peer);
    }
    put(72, &sock.state.to_ne_bytes());
    b
}
