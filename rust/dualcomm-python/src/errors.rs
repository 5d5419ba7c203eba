//! The one place where core errors become Python exceptions.

use dualcomm_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

// A RuntimeError, as DeepEP's checks (EP_HOST_ASSERT) raise: callers written for DeepEP
// that catch RuntimeError catch dualcomm's errors too.
create_exception!(
    _native,
    DualcommError,
    PyRuntimeError,
    "Base class of every dualcomm error (a RuntimeError, as DeepEP's errors are)."
);
create_exception!(
    _native,
    InvalidArgumentError,
    DualcommError,
    "An argument is wrong; the message names it, what was expected and what was given."
);
create_exception!(
    _native,
    CommTimeoutError,
    DualcommError,
    "A wait ran past its deadline (the Buffer's `timeout`)."
);
create_exception!(
    _native,
    PeerLostError,
    DualcommError,
    "A peer rank went away, or this buffer stopped at an earlier failure."
);
create_exception!(
    _native,
    ProtocolError,
    DualcommError,
    "A peer sent something the protocol does not allow (often: ranks made different calls)."
);
create_exception!(
    _native,
    BufferDestroyedError,
    DualcommError,
    "The buffer was destroyed."
);
create_exception!(
    _native,
    TransportUnavailableError,
    DualcommError,
    "The requested transport cannot work here; the message says why."
);
create_exception!(
    _native,
    ConfigMismatchError,
    DualcommError,
    "Ranks of one world were configured differently."
);

create_exception!(
    _native,
    PeerAbortedError,
    DualcommError,
    "A peer rejected its own arguments to the operation and every rank abandoned it; the \
     buffer stays usable."
);
create_exception!(
    _native,
    BufferBrokenError,
    DualcommError,
    "This buffer stopped at an earlier failure and refuses further work; make a new one."
);
create_exception!(
    _native,
    SystemResourceError,
    DualcommError,
    "A call into the operating system failed on this rank (memory, threads, sockets, shared memory)."
);
create_exception!(
    _native,
    InternalError,
    DualcommError,
    "A bug in dualcomm (a panic caught at the engine boundary); please report it."
);

pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument { .. } => InvalidArgumentError::new_err(msg),
        Error::Timeout { .. } => CommTimeoutError::new_err(msg),
        Error::PeerLost { .. } => PeerLostError::new_err(msg),
        Error::Protocol { .. } => ProtocolError::new_err(msg),
        Error::Destroyed => BufferDestroyedError::new_err(msg),
        Error::ConfigMismatch(_) => ConfigMismatchError::new_err(msg),
        Error::PeerAborted { .. } => PeerAbortedError::new_err(msg),
        Error::Broken { .. } => BufferBrokenError::new_err(msg),
        Error::Os { .. } => SystemResourceError::new_err(msg),
        Error::TransportUnavailable { .. } => TransportUnavailableError::new_err(msg),
        Error::Internal { .. } => InternalError::new_err(msg),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("DualcommError", py.get_type::<DualcommError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    m.add("CommTimeoutError", py.get_type::<CommTimeoutError>())?;
    m.add("PeerLostError", py.get_type::<PeerLostError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add(
        "BufferDestroyedError",
        py.get_type::<BufferDestroyedError>(),
    )?;
    m.add("ConfigMismatchError", py.get_type::<ConfigMismatchError>())?;
    m.add(
        "TransportUnavailableError",
        py.get_type::<TransportUnavailableError>(),
    )?;
    m.add("PeerAbortedError", py.get_type::<PeerAbortedError>())?;
    m.add("BufferBrokenError", py.get_type::<BufferBrokenError>())?;
    m.add("SystemResourceError", py.get_type::<SystemResourceError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}
