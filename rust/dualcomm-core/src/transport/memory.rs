//! The pieces every transport that lives in host memory shares: registered regions that
//! peers write into at disjoint ranges, and the completion queue that orders those bytes
//! before the immediate that announces them.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::{Completion, MAX_SGE, MemKey, NUM_REGIONS, Notify, RegionId, Sge};
use crate::error::{Error, Result};

/// Heap bytes written by peers and read by the owner at disjoint ranges (see `Transport::local`).
pub struct RegionMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the memory is owned for the struct's lifetime; concurrent access is to disjoint
// ranges, ordered by the completion queue's lock (the protocol's credit rules guarantee it).
unsafe impl Send for RegionMem {}
unsafe impl Sync for RegionMem {}

impl RegionMem {
    /// `len` zeroed bytes, or an error (not an abort) when memory is short.
    pub fn new(len: usize) -> Result<Self> {
        let mut v: Vec<u8> = Vec::new();
        v.try_reserve_exact(len).map_err(|e| Error::Os {
            what: format!("allocating a {len}-byte region"),
            detail: e.to_string(),
        })?;
        v.resize(len, 0);
        let ptr = Box::into_raw(v.into_boxed_slice()) as *mut u8;
        Ok(Self { ptr, len })
    }

    /// One region per length.
    pub fn all(lens: [usize; NUM_REGIONS]) -> Result<[Self; NUM_REGIONS]> {
        let mut made = Vec::with_capacity(NUM_REGIONS);
        for len in lens {
            made.push(Self::new(len)?);
        }
        let mut made = made.into_iter();
        Ok(std::array::from_fn(|_| {
            made.next().expect("one region per length")
        }))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The protocol computes every range from region lengths it knows, so one outside the
    /// region is a bug on this rank (`rank`), never a caller's argument.
    pub fn check(&self, rank: usize, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(out_of_bounds(rank, offset, len, self.len));
        }
        Ok(())
    }

    /// Mutable access to a checked range.
    ///
    /// # Safety
    /// The caller owns `[offset, offset + len)` (protocol credits): nobody reads or writes it
    /// concurrently.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut(&self, rank: usize, offset: usize, len: usize) -> Result<&mut [u8]> {
        self.check(rank, offset, len)?;
        // SAFETY: in bounds; exclusivity is the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) })
    }

    /// Read access to a checked range (see `Transport::local` for the concurrency contract).
    pub fn range(&self, rank: usize, offset: usize, len: usize) -> Result<&[u8]> {
        self.check(rank, offset, len)?;
        // SAFETY: in bounds; writers only touch ranges the reader does not hold.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) })
    }
}

/// A write the wiring does not allow, refused by the writer's own transport: a bug on
/// this rank (`rank`), never a caller's argument.
pub fn outside_slots(
    rank: usize,
    peer: usize,
    region: RegionId,
    offset: usize,
    len: usize,
) -> Error {
    Error::Internal {
        rank,
        detail: format!(
            "a write of {len} bytes at offset {offset} of rank {peer}'s {region:?}, outside \
             the slots this rank owns there"
        ),
    }
}

pub fn out_of_bounds(rank: usize, offset: usize, len: usize, cap: usize) -> Error {
    Error::Internal {
        rank,
        detail: format!(
            "a range of {len} bytes at offset {offset} lies outside a {cap}-byte region"
        ),
    }
}

impl Drop for RegionMem {
    fn drop(&mut self) {
        // SAFETY: reconstructs exactly the box leaked in `new`.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr, self.len,
            )))
        };
    }
}

#[derive(Default)]
struct Queue {
    completions: VecDeque<Completion>,
    /// Bumped whenever a peer goes away, so sleeping pollers re-check their peers.
    wakeups: u64,
    /// Completions queued per source and not yet taken (see `push_within`).
    unreaped: Vec<usize>,
}

/// A rank's incoming completions.
#[derive(Default)]
pub struct CompletionQueue {
    queue: Mutex<Queue>,
    ready: Condvar,
    notify: Mutex<Option<Notify>>,
}

impl CompletionQueue {
    pub fn push(&self, c: Completion) {
        self.queue.lock().unwrap().completions.push_back(c);
        self.ready.notify_all();
        let notify = self.notify.lock().unwrap().clone();
        if let Some(f) = notify {
            f();
        }
    }

    /// Queues `c` unless its source already has `depth` completions waiting (it ignored
    /// the receives posted for it); returns whether it was queued.
    pub fn push_within(&self, c: Completion, depth: usize) -> bool {
        {
            let mut q = self.queue.lock().unwrap();
            if q.unreaped.len() <= c.src {
                q.unreaped.resize(c.src + 1, 0);
            }
            if q.unreaped[c.src] >= depth {
                return false;
            }
            q.unreaped[c.src] += 1;
        }
        self.push(c);
        true
    }

    /// See `Transport::set_notify`.
    pub fn set_notify(&self, f: Notify) {
        *self.notify.lock().unwrap() = Some(f);
    }

    /// Wakes pollers without a completion (a peer left).
    pub fn wake(&self) {
        self.queue.lock().unwrap().wakeups += 1;
        self.ready.notify_all();
    }

    /// Moves completions into `out`; blocks until there is one, a wake-up, or `deadline`.
    pub fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> usize {
        let mut q = self.queue.lock().unwrap();
        let seen_wakeups = q.wakeups;
        loop {
            if !q.completions.is_empty() {
                let n = q.completions.len();
                out.extend(q.completions.drain(..));
                q.unreaped.fill(0);
                return n;
            }
            let now = Instant::now();
            if now >= deadline || q.wakeups != seen_wakeups {
                return 0;
            }
            q = self.ready.wait_timeout(q, deadline - now).unwrap().0;
        }
    }
}

/// Memory registered as a source of writes (beyond a rank's own regions, whose keys are
/// fixed): what a memory-region table is to a NIC. Every entry of a write is checked
/// against it, so a source the caller did not register is refused, not read.
#[derive(Default)]
pub struct Registry {
    /// Indexed by key minus the region keys; `None` once deregistered.
    table: Mutex<Vec<Option<(usize, usize)>>>,
}

impl Registry {
    /// # Safety
    /// See `Transport::register`.
    pub unsafe fn register(&self, ptr: *const u8, len: usize) -> MemKey {
        let mut t = self.table.lock().unwrap();
        let slot = match t.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                t.push(None);
                t.len() - 1
            }
        };
        t[slot] = Some((ptr as usize, len));
        MemKey((NUM_REGIONS + slot) as u32)
    }

    pub fn deregister(&self, key: MemKey) {
        if let Some(slot) = (key.0 as usize).checked_sub(NUM_REGIONS)
            && let Some(e) = self.table.lock().unwrap().get_mut(slot)
        {
            *e = None;
        }
    }

    /// The bytes of each entry of `src`: own regions through `own`, the rest from the table.
    /// `rank` is this rank, for errors (a bad source is a bug here, not a peer's fault).
    pub fn gather<'a>(
        &'a self,
        rank: usize,
        src: &[Sge],
        own: impl Fn(RegionId, usize, usize) -> Result<&'a [u8]>,
    ) -> Result<Vec<&'a [u8]>> {
        if src.len() > MAX_SGE {
            return Err(Error::Internal {
                rank,
                detail: format!("a write of {} entries (at most {MAX_SGE})", src.len()),
            });
        }
        let t = self.table.lock().unwrap();
        src.iter()
            .map(|e| match e.key.as_region() {
                Some(region) => own(region, e.offset, e.len),
                None => {
                    let slot = e.key.0 as usize - NUM_REGIONS;
                    let (ptr, len) =
                        t.get(slot)
                            .copied()
                            .flatten()
                            .ok_or_else(|| Error::Internal {
                                rank,
                                detail: format!(
                                    "a write from unregistered memory (key {})",
                                    e.key.0
                                ),
                            })?;
                    if e.offset.checked_add(e.len).is_none_or(|end| end > len) {
                        return Err(out_of_bounds(rank, e.offset, e.len, len));
                    }
                    // SAFETY: registered and in bounds; the registrant keeps it valid until
                    // it deregisters (`Transport::register`), which it does after the write.
                    Ok(unsafe {
                        std::slice::from_raw_parts((ptr as *const u8).add(e.offset), e.len)
                    })
                }
            })
            .collect()
    }
}
