//! The command ring: a single-producer (a GPU kernel's one pushing thread; a CPU thread in
//! tests) single-consumer (the proxy) ring of 64-byte commands in memory both can reach
//! (pinned host memory mapped into the GPU). The producer writes a slot, then publishes its
//! tail with release order; the consumer reads the tail with acquire order, copies the slots
//! out, checks each one's sequence number (a stale or torn slot is caught, not acted on) and
//! hands the space back through its head. The proxy reports back through two more words: a
//! status (nonzero: the proxy stopped, the kernel must stop waiting) and the last flush it
//! acknowledged.
//!
//! Layout (also `cuda/command_ring.cuh`): tail u64 at 0, head u64 at 64, status u32 at 128,
//! flushed u64 at 136, slots from 192; words on their own cache lines where both sides poll.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::command::{COMMAND_BYTES, Command};
use crate::error::{Error, Result};

pub const HEADER_BYTES: usize = 192;
const TAIL: usize = 0;
const HEAD: usize = 64;
const STATUS: usize = 128;
const FLUSHED: usize = 136;

/// `status` values.
pub const STATUS_OK: u32 = 0;
pub const STATUS_FAILED: u32 = 1;

pub struct CommandRing {
    base: *mut u8,
    capacity: u64,
    rank: usize,
    /// Memory this ring allocated itself (CPU use), kept alive with it.
    _owned: Option<Vec<u64>>,
}

// SAFETY: shared words are atomics; slots are written by the one producer before the tail
// that publishes them and read by the one consumer after, as the ring's protocol orders.
unsafe impl Send for CommandRing {}
unsafe impl Sync for CommandRing {}

impl CommandRing {
    /// Bytes a ring of `capacity` commands occupies.
    pub fn bytes_for(capacity: u64) -> usize {
        HEADER_BYTES + capacity as usize * COMMAND_BYTES
    }

    /// A ring in memory of its own (zeroed), for a producer on the CPU.
    pub fn owned(rank: usize, capacity: u64) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::invalid("capacity", "at least one command", 0));
        }
        let words = Self::bytes_for(capacity).div_ceil(8);
        let mut mem = crate::protocol::dispatch::try_zeroed::<u64>("a command ring", words)?;
        let base = mem.as_mut_ptr() as *mut u8;
        Ok(Self {
            base,
            capacity,
            rank,
            _owned: Some(mem),
        })
    }

    /// A ring over `len` bytes at `base` (pinned host memory a GPU also maps), zeroed by the
    /// caller before any producer starts.
    ///
    /// # Safety
    /// The memory stays valid, 8-aligned, for the ring's life; only this ring consumes it and
    /// one producer fills it.
    pub unsafe fn over(rank: usize, base: *mut u8, len: usize, capacity: u64) -> Result<Self> {
        if capacity == 0 || len < Self::bytes_for(capacity) || (base as usize) % 8 != 0 {
            return Err(Error::invalid(
                "command ring",
                format!(
                    "8-aligned memory of {} bytes for {capacity} commands",
                    Self::bytes_for(capacity)
                ),
                format!("{len} bytes at {base:p}"),
            ));
        }
        Ok(Self {
            base,
            capacity,
            rank,
            _owned: None,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn word64(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is one of the header's 8-aligned words inside the ring's memory.
        unsafe { &*(self.base.add(at) as *const AtomicU64) }
    }

    fn slot(&self, pos: u64) -> *mut u8 {
        // SAFETY: the slot index is below `capacity`, inside the memory `bytes_for` sized.
        unsafe {
            self.base
                .add(HEADER_BYTES + (pos % self.capacity) as usize * COMMAND_BYTES)
        }
    }

    /// Pushes `cmd` at the tail (its `seq` is set to its position), waiting up to `timeout`
    /// while the ring is full. For the one producer.
    pub fn push(&self, cmd: &Command, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let tail = self.word64(TAIL).load(Ordering::Relaxed);
        while tail - self.word64(HEAD).load(Ordering::Acquire) >= self.capacity {
            if self.status() != STATUS_OK {
                return Err(Error::Internal {
                    rank: self.rank,
                    detail: "the proxy stopped while commands were still being pushed".into(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "the proxy to make room in the command ring".into(),
                    timeout,
                });
            }
            std::thread::yield_now();
        }
        let bytes = Command { seq: tail, ..*cmd }.encode();
        // SAFETY: the slot is the producer's until the tail below publishes it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.slot(tail), COMMAND_BYTES) };
        self.word64(TAIL).store(tail + 1, Ordering::Release);
        Ok(())
    }

    /// Moves every published command into `out`, checked, and hands their slots back.
    /// For the one consumer (the proxy).
    pub fn pop(&self, out: &mut Vec<Command>) -> Result<usize> {
        let head = self.word64(HEAD).load(Ordering::Relaxed);
        let tail = self.word64(TAIL).load(Ordering::Acquire);
        if tail < head || tail - head > self.capacity {
            return Err(Error::Internal {
                rank: self.rank,
                detail: format!(
                    "command ring tail {tail} with head {head} and {} slots",
                    self.capacity
                ),
            });
        }
        for pos in head..tail {
            let mut bytes = [0u8; COMMAND_BYTES];
            // SAFETY: published by the tail read above (acquire), not reused before the head
            // below hands it back.
            unsafe {
                std::ptr::copy_nonoverlapping(self.slot(pos), bytes.as_mut_ptr(), COMMAND_BYTES)
            };
            let cmd = Command::decode(self.rank, &bytes)?;
            if cmd.seq != pos {
                return Err(Error::Internal {
                    rank: self.rank,
                    detail: format!(
                        "command slot {pos} holds command {} (stale or torn)",
                        cmd.seq
                    ),
                });
            }
            out.push(cmd);
        }
        self.word64(HEAD).store(tail, Ordering::Release);
        Ok((tail - head) as usize)
    }

    pub fn status(&self) -> u32 {
        // SAFETY: the status word is 4-aligned inside the header.
        unsafe { &*(self.base.add(STATUS) as *const AtomicU32) }.load(Ordering::Acquire)
    }

    /// Tells the producer the proxy stopped (it must not wait for room or acknowledgements).
    pub fn set_status(&self, status: u32) {
        // SAFETY: as in `status`.
        unsafe { &*(self.base.add(STATUS) as *const AtomicU32) }.store(status, Ordering::Release);
    }

    /// The flush command through which every write has left the send buffer.
    pub fn acknowledge_flush(&self, seq: u64) {
        self.word64(FLUSHED).store(seq + 1, Ordering::Release);
    }

    /// How many commands' flushes are acknowledged (a flush at `seq` makes this `seq + 1`).
    pub fn flushed(&self) -> u64 {
        self.word64(FLUSHED).load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::RegionId;
    use std::sync::Arc;

    fn far() -> Duration {
        Duration::from_secs(20)
    }

    #[test]
    fn commands_arrive_in_order_across_many_wraps() {
        let ring = Arc::new(CommandRing::owned(0, 8).unwrap());
        let producer = {
            let ring = Arc::clone(&ring);
            std::thread::spawn(move || {
                for i in 0..10_000u64 {
                    let c = Command::write(0, 1, RegionId::RdmaRings, i * 3, i * 5, 7, i as u32);
                    ring.push(&c, far()).unwrap();
                }
            })
        };
        let mut got = Vec::new();
        while got.len() < 10_000 {
            ring.pop(&mut got).unwrap();
        }
        producer.join().unwrap();
        for (i, c) in got.iter().enumerate() {
            let i = i as u64;
            assert_eq!(
                (c.seq, c.src_offset, c.dst_offset, c.imm),
                (i, i * 3, i * 5, i as u32)
            );
        }
    }

    #[test]
    fn a_full_ring_waits_for_room_until_its_deadline() {
        let ring = CommandRing::owned(0, 2).unwrap();
        ring.push(&Command::flush(0), far()).unwrap();
        ring.push(&Command::flush(0), far()).unwrap();
        let e = ring
            .push(&Command::flush(0), Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        ring.set_status(STATUS_FAILED);
        let e = ring.push(&Command::flush(0), far()).unwrap_err();
        assert!(e.to_string().contains("the proxy stopped"), "{e}");
    }

    #[test]
    fn stale_slots_and_corrupt_tails_are_caught() {
        let ring = CommandRing::owned(2, 4).unwrap();
        ring.push(&Command::flush(0), far()).unwrap();
        // A slot rewritten with an old sequence number (a torn or stale write).
        let stale = Command::flush(9).encode();
        unsafe { std::ptr::copy_nonoverlapping(stale.as_ptr(), ring.slot(0), COMMAND_BYTES) };
        let e = ring.pop(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("slot 0 holds command 9"), "{e}");
        let ring = CommandRing::owned(2, 4).unwrap();
        ring.word64(TAIL).store(99, Ordering::Release);
        let e = ring.pop(&mut Vec::new()).unwrap_err();
        assert!(
            matches!(e, Error::Internal { rank: 2, .. }) && e.to_string().contains("tail 99"),
            "{e}"
        );
    }

    #[test]
    fn foreign_memory_must_fit_the_ring() {
        let mut mem = vec![0u64; 8];
        let e = unsafe { CommandRing::over(0, mem.as_mut_ptr() as *mut u8, 64, 4) }
            .err()
            .unwrap();
        assert!(e.to_string().contains("for 4 commands"), "{e}");
    }
}
