//! One error type for the whole core. The binding crate maps each variant to one Python
//! exception class in a single place, so the variants are the public error vocabulary.

use std::time::Duration;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A caller-supplied value is wrong. The message names the argument, what was expected
    /// and what was given.
    #[error("{argument}: expected {expected}, got {got}")]
    InvalidArgument {
        argument: String,
        expected: String,
        got: String,
    },

    /// A wait ran past its deadline.
    #[error("timed out after {:.3}s waiting for {what}", timeout.as_secs_f64())]
    Timeout { what: String, timeout: Duration },

    /// A peer went away (destroyed its buffer, exited, or its link broke).
    #[error("rank {peer} is gone: {reason}")]
    PeerLost { peer: usize, reason: String },

    /// A peer sent something the protocol does not allow. Nothing it sent was used.
    #[error("protocol violation by rank {peer}: {detail}")]
    Protocol { peer: usize, detail: String },

    /// The buffer was destroyed; it cannot be used again.
    #[error("this buffer was destroyed; create a new one")]
    Destroyed,

    /// The ranks of one world were configured differently.
    #[error("configuration mismatch between ranks: {0}")]
    ConfigMismatch(String),

    /// A peer rejected its own arguments to the operation this rank is in and told every
    /// rank so; nothing of the operation was sent, and the buffer stays usable.
    #[error("rank {peer} aborted the {op}: {reason}")]
    PeerAborted {
        peer: usize,
        op: String,
        reason: String,
    },

    /// This rank's own buffer stopped at an earlier failure and refuses further work.
    #[error("this buffer stopped at an earlier failure ({reason}); destroy it and make a new one")]
    Broken { reason: String },

    /// A call into the operating system failed on this rank (memory, threads, sockets).
    #[error("{what} failed on this rank: {detail}")]
    Os { what: String, detail: String },

    /// The transport asked for cannot work on this machine or with this configuration.
    #[error("transport {transport} is unavailable: {reason}")]
    TransportUnavailable { transport: String, reason: String },

    /// A bug in dualcomm itself (a panic caught at the engine boundary).
    #[error("internal error on rank {rank}: {detail}")]
    Internal { rank: usize, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(
        argument: impl Into<String>,
        expected: impl Into<String>,
        got: impl ToString,
    ) -> Self {
        Error::InvalidArgument {
            argument: argument.into(),
            expected: expected.into(),
            got: got.to_string(),
        }
    }

    /// A failed OS call, with the errno text of the last error.
    pub fn os(what: impl Into<String>) -> Self {
        Self::os_from(what, std::io::Error::last_os_error())
    }

    pub fn os_from(what: impl Into<String>, e: std::io::Error) -> Self {
        Error::Os {
            what: what.into(),
            detail: e.to_string(),
        }
    }

    /// Whether the ranks are still in step after this error: bad arguments are found before
    /// anything is sent, and an aborted operation is abandoned by every rank together.
    pub fn keeps_ranks_in_step(&self) -> bool {
        matches!(
            self,
            Error::InvalidArgument { .. } | Error::PeerAborted { .. }
        )
    }

    /// A broken invariant of dualcomm's own state on `rank` (not anything a peer sent).
    pub fn internal(rank: usize, detail: impl Into<String>) -> Self {
        Error::Internal {
            rank,
            detail: detail.into(),
        }
    }

    pub fn protocol(peer: usize, detail: impl Into<String>) -> Self {
        Error::Protocol {
            peer,
            detail: detail.into(),
        }
    }
}
