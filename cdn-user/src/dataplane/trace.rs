//! Reading the live trace's events from the program's `TRACE_EVENTS` ring buffer.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::maps::{MapData, ring_buf::RingBuf};
use cdn_common::trace::TraceEvent;

/// The consumer side of `TRACE_EVENTS`. There is one per loaded data plane: the kernel keeps
/// one consumer position per ring, so two readers would steal each other's events.
pub struct TraceReader {
    ring: RingBuf<MapData>,
}

impl TraceReader {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// The next event, `None` once the ring is empty. Records of another size (which only a
    /// program of another build could write) are skipped.
    pub fn next_event(&mut self) -> Option<TraceEvent> {
        loop {
            let item = self.ring.next()?;
            if item.len() >= size_of::<TraceEvent>() {
                // SAFETY: the record holds at least a TraceEvent's bytes; TraceEvent is plain
                // integers, valid for every bit pattern; read_unaligned needs no alignment.
                return Some(unsafe { item.as_ptr().cast::<TraceEvent>().read_unaligned() });
            }
        }
    }

    /// Throws away every event waiting in the ring (left by an earlier trace).
    pub fn discard_pending(&mut self) -> usize {
        let mut n = 0;
        while self.ring.next().is_some() {
            n += 1;
        }
        n
    }
}

/// Readable when events are waiting: for `tokio::io::unix::AsyncFd` or any poller.
impl AsFd for TraceReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for TraceReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
