//! The interpreter's memory: separate regions (the XDP context, the packet buffer, one stack per
//! call frame, map values, sockets), each bounds-checked on every access.
//!
//! A pointer is a plain 64-bit register value that names its region: the region's number + 1
//! in the high 32 bits and `BASE + offset` in the low 32. Pointer arithmetic is ordinary integer
//! arithmetic on it, comparisons between pointers into one region (`data + n > data_end`) come
//! out as on real addresses, small negative offsets stay inside the region's 4 GiB window (and
//! are refused as out of bounds), and no valid pointer is 0, so NULL checks work.

use super::InterpError;

const BASE: u64 = 0x8000_0000;

/// Headroom the kernel's BPF_PROG_TEST_RUN gives an XDP frame (XDP_PACKET_HEADROOM).
pub const HEADROOM: usize = 256;
/// Size of the page the test run places the frame in, and the `skb_shared_info` it keeps at
/// the end (SKB_DATA_ALIGN(sizeof(struct skb_shared_info)) on x86-64): the frame's tail can
/// grow up to the page minus that.
pub const FRAME_SIZE: usize = 4096;
pub const TAILROOM: usize = 320;
/// Room `bpf_xdp_adjust_head` keeps free at the start of the buffer for the `struct xdp_frame`
/// the kernel writes there when it sends the frame on.
pub const XDP_FRAME_STRUCT: usize = 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `struct xdp_md`: its `data*` fields read as packet pointers.
    Context,
    Packet,
    /// The stack of the call frame at this depth (0: the program's own frame).
    Stack(usize),
    /// A map handle (the value of `LD_IMM64 map`): has no bytes, only a name for helpers.
    MapHandle(usize),
    /// A copy of one map value, or a data section.
    MapValue(usize),
    /// A `struct bpf_sock` returned by a socket lookup.
    Socket,
    /// A record reserved in a ring buffer map, until it is submitted or discarded.
    RingRecord(usize),
}

struct Region {
    kind: Kind,
    bytes: Vec<u8>,
    writable: bool,
    /// False once a stack frame returned or a socket was released.
    live: bool,
}

/// Where the packet's pointers stand inside the packet buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub meta: usize,
    pub data: usize,
    pub end: usize,
}

pub struct Memory {
    regions: Vec<Region>,
    pub packet: usize,
    pub ctx: usize,
    pub window: Window,
    /// `ingress_ifindex`, `rx_queue_index`, `egress_ifindex` of the context.
    pub ctx_fields: [u32; 3],
}

/// Offsets of `struct xdp_md`'s fields.
const CTX_DATA: i64 = 0;
const CTX_DATA_END: i64 = 4;
const CTX_DATA_META: i64 = 8;
const CTX_INGRESS_IFINDEX: i64 = 12;
const CTX_SIZE: i64 = 24;

impl Memory {
    /// A packet buffer laid out as the kernel's test run lays it out: `HEADROOM` bytes, the
    /// frame, and room up to the page's usable end.
    pub fn new(frame: &[u8], ingress_ifindex: u32) -> Result<Self, InterpError> {
        let usable = FRAME_SIZE - TAILROOM;
        if HEADROOM + frame.len() > usable {
            return Err(InterpError::Input(format!(
                "frame of {} bytes is larger than the test run's {} bytes",
                frame.len(),
                usable - HEADROOM
            )));
        }
        let mut buf = vec![0u8; usable];
        buf[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
        let mut mem = Self {
            regions: Vec::new(),
            packet: 0,
            ctx: 0,
            window: Window {
                meta: HEADROOM,
                data: HEADROOM,
                end: HEADROOM + frame.len(),
            },
            ctx_fields: [ingress_ifindex, 0, 0],
        };
        mem.packet = mem.alloc(Kind::Packet, buf, true);
        mem.ctx = mem.alloc(Kind::Context, vec![0; CTX_SIZE as usize], false);
        Ok(mem)
    }

    pub fn alloc(&mut self, kind: Kind, bytes: Vec<u8>, writable: bool) -> usize {
        self.regions.push(Region {
            kind,
            bytes,
            writable,
            live: true,
        });
        self.regions.len() - 1
    }

    pub fn pointer(&self, region: usize, off: usize) -> u64 {
        ((region as u64 + 1) << 32) + BASE + off as u64
    }

    pub fn kill(&mut self, region: usize) {
        if let Some(r) = self.regions.get_mut(region) {
            r.live = false;
        }
    }

    pub fn is_live(&self, region: usize) -> bool {
        self.regions.get(region).is_some_and(|r| r.live)
    }

    /// The region an address points into and its offset there (possibly out of bounds).
    pub fn locate(&self, addr: u64) -> Option<(usize, i64, Kind)> {
        let region = usize::try_from((addr >> 32).checked_sub(1)?).ok()?;
        let r = self.regions.get(region)?;
        Some((region, (addr & 0xffff_ffff) as i64 - BASE as i64, r.kind))
    }

    /// Checks an access of `len` bytes at `addr` and returns (region, offset).
    fn check(&self, addr: u64, len: usize, write: bool) -> Result<(usize, usize), InterpError> {
        let oob = |why: &'static str| InterpError::Access {
            addr,
            len,
            write,
            why,
        };
        let (region, off, kind) = self.locate(addr).ok_or(oob("not a pointer"))?;
        let r = &self.regions[region];
        if !r.live {
            return Err(oob(
                "region no longer live (returned frame or released socket)",
            ));
        }
        if write && !r.writable {
            return Err(oob("region is read-only"));
        }
        let (lo, hi) = match kind {
            // The verifier lets a program touch the packet only between data_meta and
            // data_end, whatever lies around it in the buffer.
            Kind::Packet => (self.window.meta, self.window.end),
            _ => (0, r.bytes.len()),
        };
        let start = usize::try_from(off).map_err(|_| oob("before the region"))?;
        if start < lo || start + len > hi {
            return Err(oob("outside the region"));
        }
        Ok((region, start))
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<&[u8], InterpError> {
        let (region, off) = self.check(addr, len, false)?;
        Ok(&self.regions[region].bytes[off..off + len])
    }

    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), InterpError> {
        let (region, off) = self.check(addr, bytes.len(), true)?;
        self.regions[region].bytes[off..off + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    /// A little-endian load of 1, 2, 4 or 8 bytes, zero-extended.
    pub fn load(&self, addr: u64, size: usize) -> Result<u64, InterpError> {
        if let Some((region, off, Kind::Context)) = self.locate(addr) {
            return self.load_ctx(region, off, size, addr);
        }
        let bytes = self.read(addr, size)?;
        let mut word = [0u8; 8];
        word[..size].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(word))
    }

    pub fn store(&mut self, addr: u64, size: usize, value: u64) -> Result<(), InterpError> {
        self.write(addr, &value.to_le_bytes()[..size])
    }

    /// The verifier rewrites loads of `xdp_md.data*` into loads of the real pointers; the
    /// other fields are plain 32-bit values.
    fn load_ctx(
        &self,
        region: usize,
        off: i64,
        size: usize,
        addr: u64,
    ) -> Result<u64, InterpError> {
        let bad = InterpError::Access {
            addr,
            len: size,
            write: false,
            why: "xdp_md fields are read whole, as 32-bit loads",
        };
        if size != 4 || off % 4 != 0 || !(0..CTX_SIZE).contains(&off) || !self.is_live(region) {
            return Err(bad);
        }
        let w = self.window;
        Ok(match off {
            CTX_DATA => self.pointer(self.packet, w.data),
            CTX_DATA_END => self.pointer(self.packet, w.end),
            CTX_DATA_META => self.pointer(self.packet, w.meta),
            _ => u64::from(self.ctx_fields[((off - CTX_INGRESS_IFINDEX) / 4) as usize]),
        })
    }

    /// The packet buffer (all of it, headroom and tailroom included).
    pub fn packet_bytes(&self) -> &[u8] {
        &self.regions[self.packet].bytes
    }

    pub fn packet_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.regions[self.packet].bytes
    }

    /// What the kernel's test run copies out: from `data_meta` to `data_end`.
    pub fn frame_out(&self) -> Vec<u8> {
        self.packet_bytes()[self.window.meta..self.window.end].to_vec()
    }
}
