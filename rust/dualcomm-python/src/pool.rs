//! A pool of large output buffers, so that steady training steps neither fault in fresh
//! pages nor have the kernel zero them on every call (issue 12: a 2x2 world at 2048 tokens per
//! rank allocates ~100 MiB of receive rows per rank per call, past malloc's mmap threshold,
//! and spent most of its time in page faults).
//!
//! An output array of at least `POOLED_MIN` bytes borrows a buffer from the pool; the array's
//! base object (a `Lease`) gives it back when NumPy and torch drop their last reference. Free
//! buffers are kept up to `DUALCOMM_RECV_POOL_BYTES` per process (default: a sixteenth of the
//! machine's memory, at most 4 GiB, for each rank living in the process, so that a loopback
//! world of several ranks in one process keeps every rank's outputs, up to a quarter of
//! memory; 0 turns pooling off), by
//! size class (sizes rounded up to a quarter power of two, so varying receive counts reuse
//! them). Buffers go back uninitialised: every output is fully written by its operation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use pyo3::prelude::*;

/// Outputs below this come from NumPy as before (malloc reuses small blocks well).
pub const POOLED_MIN: usize = 1 << 20;
/// Physical memory in bytes, where the system says.
fn physical_memory() -> Option<usize> {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && page > 0).then(|| (pages as u128 * page as u128).min(usize::MAX as u128) as usize)
}

/// Ranks (endpoints) alive in this process.
static RANKS: AtomicUsize = AtomicUsize::new(0);

/// Held by each endpoint for its life: the default bound grows with the ranks of the process.
pub struct RankShare(());

impl RankShare {
    pub fn new() -> Self {
        RANKS.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Drop for RankShare {
    fn drop(&mut self) {
        RANKS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A sixteenth of physical memory, at most 4 GiB (1 GiB where the size is unknown), per rank
/// of this process (one host usually runs a process per rank), at most a quarter of memory.
fn default_limit() -> usize {
    let ranks = RANKS.load(Ordering::Relaxed).max(1);
    match physical_memory() {
        Some(mem) => (mem / 16).min(4 << 30).saturating_mul(ranks).min(mem / 4),
        None => (1usize << 30).saturating_mul(ranks),
    }
}

/// Free buffers by size class, and the bytes they hold.
type FreeLists = (HashMap<usize, Vec<Box<[u64]>>>, usize);

struct Pool {
    free: Mutex<FreeLists>,
    /// `DUALCOMM_RECV_POOL_BYTES`, when set.
    explicit: Option<usize>,
}

impl Pool {
    fn limit(&self) -> usize {
        self.explicit.unwrap_or_else(default_limit)
    }
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        free: Mutex::new((HashMap::new(), 0)),
        explicit: std::env::var("DUALCOMM_RECV_POOL_BYTES")
            .ok()
            .and_then(|v| v.parse().ok()),
    })
}

/// `bytes` rounded up to a quarter power of two (a multiple of 8).
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(8);
    let top = usize::BITS - 1 - bytes.leading_zeros();
    let step = 1usize << top.saturating_sub(2).max(3);
    bytes.div_ceil(step).saturating_mul(step)
}

/// Whether outputs of `bytes` come from the pool.
pub fn pooled(bytes: usize) -> bool {
    bytes >= POOLED_MIN && pool().limit() > 0
}

/// A buffer of at least `bytes`, 8-aligned: a free one of its class, or a new one (zeroed
/// lazily by the system); an error, never an abort, when memory is short.
pub fn take(bytes: usize) -> Result<Box<[u64]>, dualcomm_core::Error> {
    let class = size_class(bytes);
    let reused = {
        let mut free = pool().free.lock().unwrap();
        let got = free.0.get_mut(&class).and_then(Vec::pop);
        if got.is_some() {
            free.1 -= class;
        }
        got
    };
    if let Some(buf) = reused {
        return Ok(buf);
    }
    let words = class / 8;
    let short = || dualcomm_core::Error::Os {
        what: format!("allocating an output buffer of {class} bytes"),
        detail: "out of memory".into(),
    };
    let layout = std::alloc::Layout::array::<u64>(words).map_err(|_| short())?;
    // SAFETY: a non-zero layout (POOLED_MIN and up); the zeroed words are valid u64s, owned
    // by the box made from them (allocated with the global allocator and this layout).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut u64;
        if ptr.is_null() {
            return Err(short());
        }
        Ok(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
            ptr, words,
        )))
    }
}

fn give_back(buf: Box<[u64]>) {
    let class = buf.len() * 8;
    let p = pool();
    let limit = p.limit();
    let mut free = p.free.lock().unwrap();
    if free.1 + class <= limit {
        free.1 += class;
        free.0.entry(class).or_default().push(buf);
    }
}

/// The base object of a pooled NumPy array: returns its buffer to the pool when dropped.
#[pyclass(module = "dualcomm._native", frozen)]
pub struct Lease {
    buf: Mutex<Option<Box<[u64]>>>,
}

impl Lease {
    pub fn new(buf: Box<[u64]>) -> Self {
        Self {
            buf: Mutex::new(Some(buf)),
        }
    }

    /// The buffer's start (valid while the lease lives).
    pub fn ptr(&self) -> *mut u8 {
        self.buf
            .lock()
            .unwrap()
            .as_mut()
            .map_or(std::ptr::null_mut(), |b| b.as_mut_ptr() as *mut u8)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.lock().unwrap().take() {
            give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_by_at_most_a_quarter() {
        for bytes in [1usize << 20, (1 << 20) + 1, 3 << 20, 100_000_000, 8, 9] {
            let c = size_class(bytes);
            assert!(c >= bytes && c % 8 == 0, "{bytes} -> {c}");
            assert!(c as f64 <= bytes as f64 * 1.25 + 8.0, "{bytes} -> {c}");
        }
        assert_eq!(size_class(100_000_000), size_class(99_000_000));
    }
}
