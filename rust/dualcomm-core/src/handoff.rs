//! What passes between a caller's thread and the progress engine while operations are
//! queued: the handle of a dispatch that later operations name before it has run, and the
//! receive buffers a caller allocates once the engine knows how many tokens arrive (DeepEP's
//! "the CPU waits for the receive count, then allocates"). Bindings only fill these in.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::protocol::dispatch::{DispatchHandle, RecvBuffers, RecvShape, RecvSink};

/// The handle of a dispatch that may not have run yet (one endpoint's, or a `ChannelHandle`
/// over channels). Operations queued behind that dispatch may name it; it resolves when
/// they run.
#[derive(Debug)]
pub struct PendingHandle<H = DispatchHandle>(Arc<OnceLock<Arc<H>>>);

impl<H> Clone for PendingHandle<H> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<H> Default for PendingHandle<H> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<H> PendingHandle<H> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The handle, once its dispatch has succeeded.
    pub fn get(&self) -> Option<&Arc<H>> {
        self.0.get()
    }

    pub(crate) fn resolve(&self) -> Result<&H> {
        self.0.get().map(|h| &**h).ok_or_else(|| {
            Error::invalid(
                "handle",
                "the handle of a dispatch that succeeded",
                "one whose dispatch failed",
            )
        })
    }

    pub(crate) fn fill(&self, h: &Arc<H>) {
        let _ = self.0.set(Arc::clone(h));
    }
}

/// Memory a job reads or writes after the call that submitted it has returned: an address
/// and a length, valid while the caller keeps the owner alive (see `RecvHandoff`).
#[derive(Debug)]
pub struct RawBuffer<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for RawBuffer<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for RawBuffer<T> {}

// SAFETY: the memory belongs to an owner the job keeps alive (see `from_raw_parts`).
unsafe impl<T> Send for RawBuffer<T> {}

impl<T> RawBuffer<T> {
    pub fn empty() -> Self {
        Self {
            ptr: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
        }
    }

    /// # Safety
    /// `ptr` addresses `len` initialised `T`s that stay allocated, and are not resized,
    /// for as long as any job that uses this buffer holds the owner alive.
    pub unsafe fn from_raw_parts(ptr: *mut T, len: usize) -> Self {
        Self { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// # Safety
    /// The owner is alive (see `from_raw_parts`) and nobody writes the memory meanwhile.
    pub unsafe fn slice<'a>(self) -> &'a [T] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// # Safety
    /// As `slice`, and nobody else reads or writes the memory while the job runs.
    pub unsafe fn slice_mut<'a>(self) -> &'a mut [T] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Receive buffers a caller made for one dispatch, with `keep`, what keeps them alive.
pub struct RecvMemory<K> {
    pub x: RawBuffer<u8>,
    pub scales: RawBuffer<u8>,
    pub topk_idx: RawBuffer<i64>,
    pub topk_weights: RawBuffer<f32>,
    pub keep: K,
}

/// The caller's end: learns the receive shape, answers with memory (or why it has none).
pub struct RecvRequest<K> {
    shapes: Receiver<RecvShape>,
    replies: Sender<std::result::Result<RecvMemory<K>, String>>,
}

/// What `RecvRequest::shape_for` found.
#[derive(Debug)]
pub enum ShapeWait {
    Known(RecvShape),
    /// The job ended without it (it failed: its error is the job's result).
    Failed,
    /// Not yet.
    Pending,
}

impl<K> RecvRequest<K> {
    /// Blocks until the engine knows the shape, or `None` if the job ended without it (it
    /// failed: its error is the job's result).
    pub fn shape(&self) -> Option<RecvShape> {
        self.shapes.recv().ok()
    }

    /// As `shape`, for at most `limit` (so that a caller can look at other things, such as
    /// a user's interrupt, and wait again).
    pub fn shape_for(&self, limit: Duration) -> ShapeWait {
        match self.shapes.recv_timeout(limit) {
            Ok(s) => ShapeWait::Known(s),
            Err(mpsc::RecvTimeoutError::Disconnected) => ShapeWait::Failed,
            Err(mpsc::RecvTimeoutError::Timeout) => ShapeWait::Pending,
        }
    }

    /// Hands the memory over (a job that gave up waiting reports its own error).
    pub fn answer(self, memory: std::result::Result<RecvMemory<K>, String>) {
        let _ = self.replies.send(memory);
    }
}

/// The engine's end, a [`RecvSink`] for the dispatch: asks for the memory and holds what
/// keeps it alive until the job ends.
pub struct RecvHandoff<K> {
    shapes: Option<Sender<RecvShape>>,
    replies: Receiver<std::result::Result<RecvMemory<K>, String>>,
    timeout: Duration,
    rank: usize,
    held: Vec<K>,
}

/// A connected pair: the sink for the engine's job, the request for the caller.
pub fn recv_handoff<K>(rank: usize, timeout: Duration) -> (RecvHandoff<K>, RecvRequest<K>) {
    let (shape_tx, shape_rx) = mpsc::channel();
    let (reply_tx, reply_rx) = mpsc::channel();
    (
        RecvHandoff {
            shapes: Some(shape_tx),
            replies: reply_rx,
            timeout,
            rank,
            held: Vec::new(),
        },
        RecvRequest {
            shapes: shape_rx,
            replies: reply_tx,
        },
    )
}

impl<K> RecvHandoff<K> {
    /// Keeps `k` (an input's owner) alive until this job ends.
    pub fn hold(&mut self, k: K) {
        self.held.push(k);
    }
}

impl<K> RecvSink for RecvHandoff<K> {
    fn prepare(&mut self, shape: RecvShape) -> Result<RecvBuffers<'_>> {
        let gone = || Error::Internal {
            rank: self.rank,
            detail: "the caller stopped waiting for the receive buffers".into(),
        };
        let num_recv = shape.num_recv;
        self.shapes
            .take()
            .ok_or_else(gone)?
            .send(shape.clone())
            .map_err(|_| gone())?;
        let memory = self
            .replies
            .recv_timeout(self.timeout)
            .map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => Error::Timeout {
                    what: "the caller to allocate the receive buffers".into(),
                    timeout: self.timeout,
                },
                mpsc::RecvTimeoutError::Disconnected => gone(),
            })?
            .map_err(|detail| Error::Os {
                what: format!("allocating the receive buffers for {num_recv} tokens"),
                detail,
            })?;
        self.held.push(memory.keep);
        // SAFETY: `held` keeps the memory alive until this job ends; the buffers were made
        // for this job alone.
        unsafe {
            Ok(RecvBuffers::contiguous(
                &shape,
                memory.x.slice_mut(),
                memory.scales.slice_mut(),
                memory.topk_idx.slice_mut(),
                memory.topk_weights.slice_mut(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize) -> RecvShape {
        RecvShape {
            num_recv: n,
            x_row_bytes: 4,
            scale_row_bytes: 0,
            num_topk: 1,
            recv_per_src: vec![n as u64],
            ..RecvShape::default()
        }
    }

    #[test]
    fn the_caller_allocates_once_the_shape_is_known() {
        type Owned = (Vec<u8>, Vec<i64>, Vec<f32>);
        let (mut sink, request) = recv_handoff::<Owned>(0, Duration::from_secs(5));
        let caller = std::thread::spawn(move || {
            let s = request.shape().expect("a shape");
            let mut x = vec![0u8; s.num_recv * s.x_row_bytes];
            let mut idx = vec![0i64; s.num_recv];
            let mut w = vec![0f32; s.num_recv];
            // SAFETY: the vectors move into `keep` (their heap memory stays where it is) and
            // live until the sink drops.
            let memory = unsafe {
                RecvMemory {
                    x: RawBuffer::from_raw_parts(x.as_mut_ptr(), x.len()),
                    scales: RawBuffer::empty(),
                    topk_idx: RawBuffer::from_raw_parts(idx.as_mut_ptr(), idx.len()),
                    topk_weights: RawBuffer::from_raw_parts(w.as_mut_ptr(), w.len()),
                    keep: (x, idx, w),
                }
            };
            request.answer(Ok(memory));
        });
        let mut bufs = sink.prepare(shape(3)).unwrap();
        assert_eq!((bufs.x[0].len(), bufs.topk_idx[0].len()), (12, 3));
        bufs.x[0].fill(7);
        caller.join().unwrap();
    }

    #[test]
    fn a_caller_that_cannot_allocate_is_an_os_error_not_an_abort() {
        let (mut sink, request) = recv_handoff::<()>(2, Duration::from_secs(5));
        let caller = std::thread::spawn(move || {
            request.shape().unwrap();
            request.answer(Err("MemoryError: 64 GiB".into()));
        });
        let err = sink.prepare(shape(1 << 30)).err().unwrap();
        assert!(
            matches!(&err, Error::Os { detail, .. } if detail.contains("64 GiB")),
            "{err}"
        );
        caller.join().unwrap();
    }

    #[test]
    fn a_caller_that_goes_away_is_an_internal_error() {
        let (mut sink, request) = recv_handoff::<()>(1, Duration::from_secs(5));
        drop(request);
        let err = sink.prepare(shape(1)).err().unwrap();
        assert!(matches!(err, Error::Internal { rank: 1, .. }), "{err}");
    }

    #[test]
    fn a_pending_handle_resolves_once_filled() {
        let p: PendingHandle = PendingHandle::new();
        assert!(matches!(p.resolve(), Err(Error::InvalidArgument { .. })));
        assert!(p.get().is_none());
    }
}
