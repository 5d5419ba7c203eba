//! Carrying NumPy memory into progress-engine jobs.
//!
//! A job runs on the engine's thread after the call that submitted it has returned, so it
//! cannot borrow the arrays; it takes their addresses instead and holds a reference to
//! each array until it ends, so the memory outlives every access (the DeepEP contract on
//! top: do not modify inputs or read outputs before the operation's event completes).

use std::time::{SystemTime, UNIX_EPOCH};

use dualcomm_core::{Error, RawBuffer};
use numpy::{Element, PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// Array memory a job reads or writes (the core's, so the binding only fills it in).
pub type Raw<T> = RawBuffer<T>;

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
    // SAFETY: the job holds the returned reference to the array until it ends, and NumPy
    // does not resize arrays that others reference.
    let raw = unsafe { Raw::from_raw_parts(s.as_ptr() as *mut T, s.len()) };
    Ok((raw, arr.as_any().clone().unbind()))
}

/// A 1-D output array of `n` elements and its memory. It is not zeroed: the operation
/// writes every element before its event completes. Large ones come from the receive pool
/// (see `pool`); the others through `numpy.empty`, so a size the machine cannot hold raises
/// `MemoryError` here instead of aborting the process.
pub fn output<'py, T: Element>(
    py: Python<'py>,
    n: usize,
) -> PyResult<(Bound<'py, PyArray1<T>>, Raw<T>)> {
    let bytes = n.saturating_mul(std::mem::size_of::<T>());
    let arr: Bound<'py, PyArray1<T>> = if n == 0 {
        // An empty array made this way has stride 0, which torch cannot view as another dtype.
        PyArray1::from_vec(py, Vec::new())
    } else if crate::pool::pooled(bytes) {
        let buf = crate::pool::take(bytes).map_err(crate::errors::to_py)?;
        let lease = Bound::new(py, crate::pool::Lease::new(buf))?;
        let ptr = lease.get().ptr() as *const T;
        // SAFETY: the lease holds at least `bytes` 8-aligned bytes (T is at most 8-aligned)
        // and is the array's base object, so the memory lives as long as the array.
        unsafe {
            let view = numpy::ndarray::ArrayView1::from_shape_ptr(n, ptr);
            PyArray1::borrow_from_array(&view, lease.into_any())
        }
    } else {
        let made = py
            .import("numpy")
            .and_then(|np| np.getattr("empty"))
            .and_then(|empty| empty.call1((n, T::get_dtype(py))));
        made.map_err(|e| {
            crate::errors::to_py(Error::Os {
                what: format!("allocating an output array of {n} elements"),
                detail: e.to_string(),
            })
        })?
        .cast_into::<PyArray1<T>>()?
    };
    // SAFETY: as in `input`; the array is new and only the job writes it.
    let raw = unsafe { Raw::from_raw_parts(arr.data(), arr.len()) };
    Ok((arr, raw))
}

/// A fresh output array of `rows` rows of `row` elements whose first `used` rows the job
/// writes (its memory is returned for those only); the rest is set to `pad` here (DeepEP's
/// `num_worst_tokens` padding).
pub fn padded_output<'py, T: Element + Copy>(
    py: Python<'py>,
    rows: usize,
    used: usize,
    row: usize,
    pad: T,
) -> PyResult<(Bound<'py, PyArray1<T>>, Raw<T>)> {
    let total = rows.checked_mul(row).ok_or_else(|| {
        crate::errors::to_py(Error::Os {
            what: format!("allocating an output of {rows} rows of {row} elements"),
            detail: "the size overflows".into(),
        })
    })?;
    let (arr, whole) = output::<T>(py, total)?;
    // SAFETY: the array is new and holds `rows * row >= used * row` elements; the job will
    // touch only the first `used * row`, and this rank fills the rest before it returns.
    unsafe {
        let all = whole.slice_mut();
        all[used * row..].fill(pad);
        Ok((arr, Raw::from_raw_parts(all.as_mut_ptr(), used * row)))
    }
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
