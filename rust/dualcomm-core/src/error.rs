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

    pub fn protocol(peer: usize, detail: impl Into<String>) -> Self {
        Error::Protocol {
            peer,
            detail: detail.into(),
        }
    }
}
