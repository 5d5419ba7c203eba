//! Token records on the wire: a 16-byte header, then the operation's sections back to back.
//! The header lets a forwarder pass a token on without asking anyone where it goes.

use crate::error::{Error, Result};

pub const HEADER_BYTES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src_rank: u32,
    pub src_idx: u32,
    /// Local ranks of the destination node that need this token (dispatch only).
    pub mask: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&self.src_rank.to_le_bytes());
        out[4..8].copy_from_slice(&self.src_idx.to_le_bytes());
        out[8..16].copy_from_slice(&self.mask.to_le_bytes());
        out
    }

    pub fn decode(record: &[u8]) -> Self {
        Header {
            src_rank: u32::from_le_bytes(record[0..4].try_into().unwrap()),
            src_idx: u32::from_le_bytes(record[4..8].try_into().unwrap()),
            mask: u64::from_le_bytes(record[8..16].try_into().unwrap()),
        }
    }
}

/// Byte ranges of a record's sections, after the header.
#[derive(Debug, Clone)]
pub struct Layout {
    sections: Vec<usize>,
}

impl Layout {
    pub fn new(section_bytes: &[usize]) -> Self {
        Self {
            sections: section_bytes.to_vec(),
        }
    }

    pub fn record_bytes(&self) -> usize {
        HEADER_BYTES + self.sections.iter().sum::<usize>()
    }

    /// Splits a record into its sections (the header excluded).
    pub fn split<'a>(&self, record: &'a [u8]) -> Vec<&'a [u8]> {
        let mut rest = &record[HEADER_BYTES..];
        self.sections
            .iter()
            .map(|&n| {
                let (a, b) = rest.split_at(n);
                rest = b;
                a
            })
            .collect()
    }
}

/// Tracks that one source's tokens arrive in strictly increasing index order, below the
/// source's token count: the check that makes receive order deterministic and a duplicate
/// or invented token impossible.
#[derive(Debug, Clone)]
pub struct SourceOrder {
    next_min: Vec<u64>,
    limit: Vec<u64>,
}

impl SourceOrder {
    pub fn new(limits: Vec<u64>) -> Self {
        Self {
            next_min: vec![0; limits.len()],
            limit: limits,
        }
    }

    /// The token count of source `s`.
    pub fn limit(&self, s: usize) -> u64 {
        self.limit[s]
    }

    pub fn accept(&mut self, via: usize, h: &Header) -> Result<()> {
        let s = h.src_rank as usize;
        let idx = h.src_idx as u64;
        if s >= self.limit.len() {
            return Err(Error::protocol(via, format!("token from unknown rank {s}")));
        }
        if idx < self.next_min[s] || idx >= self.limit[s] {
            return Err(Error::protocol(
                via,
                format!(
                    "token {idx} of rank {s} out of order or out of range (next at least {}, \
                     rank {s} has {} tokens)",
                    self.next_min[s], self.limit[s]
                ),
            ));
        }
        self.next_min[s] = idx + 1;
        Ok(())
    }
}
