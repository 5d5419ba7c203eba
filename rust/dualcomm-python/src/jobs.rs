//! Carrying NumPy memory into progress-engine jobs.
//!
//! A job runs on the engine's thread after the call that submitted it has returned, so it
//! cannot borrow the arrays; it takes their addresses instead and holds a reference to
//! each array until it ends, so the memory outlives every access (the DeepEP contract on
//! top: do not modify inputs or read outputs before the operation's event completes).

use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dualcomm_core::{Error, RecvBuffers, RecvShape, RecvSink, Result};
use numpy::{Element, PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// Address and length of array memory a job reads or writes.
#[derive(Clone, Copy)]
pub struct Raw<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the memory belongs to an array the job keeps alive (see the module comment).
unsafe impl<T> Send for Raw<T> {}

impl<T> Raw<T> {
    pub fn empty() -> Self {
        Self {
            ptr: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
        }
    }

    /// # Safety
    /// The array this came from is alive and not resized (NumPy forbids resizing arrays
    /// that others reference).
    pub unsafe fn slice<'a>(self) -> &'a [T] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// # Safety
    /// As `slice`, and no one else writes this memory while the job runs.
    pub unsafe fn slice_mut<'a>(self) -> &'a mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// An input array: its memory and a reference that keeps it alive.
pub fn input<T: Element>(
    arr: &PyReadonlyArray2<'_, T>,
    name: &str,
) -> PyResult<(Raw<T>, Py<PyAny>)> {
    let s = arr.as_slice().map_err(|_| {
        crate::errors::to_py(Error::invalid(
            name,
            "a C-contiguous array",
            "a strided view",
        ))
    })?;
    let raw = Raw {
        ptr: s.as_ptr() as *mut T,
        len: s.len(),
    };
    Ok((raw, arr.as_any().clone().unbind()))
}

/// A fresh 1-D output array of `n` elements and its memory. It is not zeroed: the
/// operation writes every element before its event completes (NumPy's `empty`). Made
/// through `numpy.empty`, so a size the machine cannot hold raises `MemoryError` here
/// instead of aborting the process.
pub fn output<'py, T: Element>(
    py: Python<'py>,
    n: usize,
) -> PyResult<(Bound<'py, PyArray1<T>>, Raw<T>)> {
    let arr: Bound<'py, PyArray1<T>> = if n == 0 {
        // An empty array made this way has stride 0, which torch cannot view as another dtype.
        PyArray1::from_vec(py, Vec::new())
    } else {
        py.import("numpy")?
            .getattr("empty")?
            .call1((n, T::get_dtype(py)))?
            .cast_into::<PyArray1<T>>()?
    };
    let raw = Raw {
        ptr: arr.data(),
        len: arr.len(),
    };
    Ok((arr, raw))
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Receive buffers handed over by the caller once the counts are known, or why the caller
/// could not make them.
pub type RecvReply = std::result::Result<RecvRaw, String>;

pub struct RecvRaw {
    pub x: Raw<u8>,
    pub scales: Raw<u8>,
    pub topk_idx: Raw<i64>,
    pub topk_weights: Raw<f32>,
    /// Keeps the arrays alive for as long as the job can write them.
    pub keep: Vec<Py<PyAny>>,
}

/// A sink that asks the submitting thread for buffers: it sends the shape and waits for
/// the memory (DeepEP's "CPU waits for the receive count, then allocates").
pub struct ChannelSink {
    pub shapes: Option<Sender<RecvShape>>,
    pub buffers: Receiver<RecvReply>,
    pub timeout: Duration,
    pub held: Vec<Py<PyAny>>,
    pub rank: usize,
}

impl RecvSink for ChannelSink {
    fn prepare(&mut self, shape: RecvShape) -> Result<RecvBuffers<'_>> {
        let gone = || Error::Internal {
            rank: self.rank,
            detail: "the caller stopped waiting for the receive buffers".into(),
        };
        self.shapes
            .take()
            .ok_or_else(gone)?
            .send(shape)
            .map_err(|_| gone())?;
        let raw = self
            .buffers
            .recv_timeout(self.timeout)
            .map_err(|_| gone())?
            .map_err(|detail| Error::Os {
                what: format!(
                    "allocating the receive buffers for {} tokens",
                    shape.num_recv
                ),
                detail,
            })?;
        self.held.extend(raw.keep);
        // SAFETY: the arrays are held in `self.held` until the job ends; only this job
        // writes them (they were just created for it).
        unsafe {
            Ok(RecvBuffers {
                x: raw.x.slice_mut(),
                scales: raw.scales.slice_mut(),
                topk_idx: raw.topk_idx.slice_mut(),
                topk_weights: raw.topk_weights.slice_mut(),
            })
        }
    }
}
