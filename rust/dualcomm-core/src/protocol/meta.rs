//! Metadata records: what a rank tells its linked peers when an operation starts.
//!
//! Metadata travels only over the protocol's links, in two steps. First every rank sends an
//! rdma record to each twin (the ranks of its local index on other nodes): its token count
//! and how many of its tokens go to each rank of the twin's node. Then, once it holds its
//! twins' records, it sends an nvl record to each rank of its own node: for every node, the
//! count of the one source it forwards from there (itself, for its own node). So each rank
//! learns the count of every source from `nodes - 1 + ranks_per_node - 1` records, with no
//! full mesh: this is DeepEP's two-level notify, and what keeps a 256-rank job at
//! `nodes - 1` network connections per rank.

use super::op::OpKind;
use super::record::{FORMAT_BYTES, RecordFormat};
use crate::error::{Error, Result};

/// Bytes of an abort's reason that travel (longer ones are cut at a character boundary).
pub const REASON_BYTES: usize = 96;
/// kind u32 | record_bytes u32 | format | tag | origin | tokens | node_count | reason.
const FIXED_BYTES: usize = 8 + FORMAT_BYTES + 4 * 8 + REASON_BYTES;

/// Bytes of a record a rank sends its twin: one count per rank of the twin's node.
pub fn rdma_meta_bytes(ranks_per_node: usize) -> usize {
    FIXED_BYTES + 8 * ranks_per_node
}

/// Bytes of a record a rank sends within its node: (count, tokens) per node.
pub fn nvl_meta_bytes(num_nodes: usize) -> usize {
    FIXED_BYTES + 16 * num_nodes
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: OpKind,
    pub record_bytes: u32,
    pub format: RecordFormat,
    /// Combine: the operation number of the dispatch whose handle it reverses. Abort: the
    /// kind of operation the aborting rank was asked for.
    pub tag: u64,
    /// Abort: the rank that rejected its arguments (forwarders relay their twins' aborts).
    pub origin: u64,
    /// Over rdma: the sender's token count, and how many of them go to the receiver's node.
    pub tokens: u64,
    pub node_count: u64,
    /// Over rdma: tokens for each local rank of the receiver's node. Over nvl: per node,
    /// the tokens for the receiver of the source the sender forwards from that node, and
    /// that source's token count (interleaved).
    pub counts: Vec<u64>,
    pub reason: String,
}

impl Meta {
    /// A record of `kind` that carries nothing but its format (counts are filled in after).
    pub fn new(kind: OpKind, record_bytes: u32, format: RecordFormat) -> Self {
        Self {
            kind,
            record_bytes,
            format,
            tag: 0,
            origin: 0,
            tokens: 0,
            node_count: 0,
            counts: Vec::new(),
            reason: String::new(),
        }
    }

    pub fn encode(&self, bytes: usize) -> Vec<u8> {
        let mut out = vec![0u8; bytes];
        out[0..4].copy_from_slice(&(self.kind as u32).to_le_bytes());
        out[4..8].copy_from_slice(&self.record_bytes.to_le_bytes());
        out[8..8 + FORMAT_BYTES].copy_from_slice(&self.format.encode());
        let mut at = 8 + FORMAT_BYTES;
        for v in [self.tag, self.origin, self.tokens, self.node_count] {
            out[at..at + 8].copy_from_slice(&v.to_le_bytes());
            at += 8;
        }
        let mut cut = self.reason.len().min(REASON_BYTES);
        while !self.reason.is_char_boundary(cut) {
            cut -= 1;
        }
        out[at..at + cut].copy_from_slice(&self.reason.as_bytes()[..cut]);
        at += REASON_BYTES;
        for (i, v) in self.counts.iter().enumerate().take((bytes - at) / 8) {
            out[at + 8 * i..at + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Decodes a record of `b.len()` bytes sent by `peer`; every count it holds comes along.
    pub fn decode(peer: usize, b: &[u8]) -> Result<Self> {
        if b.len() < FIXED_BYTES || (b.len() - FIXED_BYTES) % 8 != 0 {
            return Err(Error::protocol(
                peer,
                format!("a metadata record of {} bytes", b.len()),
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let kind = OpKind::from_u32(u32_at(0))
            .ok_or_else(|| Error::protocol(peer, format!("unknown operation {}", u32_at(0))))?;
        let at = 8 + FORMAT_BYTES;
        let reason = &b[at + 32..at + 32 + REASON_BYTES];
        let end = reason.iter().position(|&c| c == 0).unwrap_or(reason.len());
        let counts_at = at + 32 + REASON_BYTES;
        Ok(Self {
            kind,
            record_bytes: u32_at(4),
            format: RecordFormat::decode(peer, &b[8..8 + FORMAT_BYTES])?,
            tag: u64_at(at),
            origin: u64_at(at + 8),
            tokens: u64_at(at + 16),
            node_count: u64_at(at + 24),
            counts: (counts_at..b.len()).step_by(8).map(u64_at).collect(),
            reason: String::from_utf8_lossy(&reason[..end]).into_owned(),
        })
    }
}

/// Offsets of fields inside an encoded record, for tests that tamper with them.
pub mod offsets {
    use super::FORMAT_BYTES;
    pub const KIND: usize = 0;
    pub const RECORD_BYTES: usize = 4;
    pub const DTYPE: usize = 8;
    pub const HIDDEN: usize = 12;
    pub const TAG: usize = 8 + FORMAT_BYTES;
    pub const TOKENS: usize = TAG + 16;
    pub const NODE_COUNT: usize = TAG + 24;
    /// The first count.
    pub const COUNTS: usize = TAG + 32 + super::REASON_BYTES;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::record::ElemType;

    #[test]
    fn round_trips_and_cuts_long_reasons_at_a_character() {
        let format = RecordFormat {
            dtype: ElemType::Bf16,
            hidden: 7168,
            scale_cols: 56,
            topk: 8,
        };
        let mut m = Meta::new(OpKind::Dispatch, 14400, format);
        m.tag = 3;
        m.origin = 9;
        m.tokens = 4096;
        m.node_count = 17;
        m.counts = vec![1, 2, 3, 4];
        m.reason = "é".repeat(60);
        let bytes = m.encode(rdma_meta_bytes(4));
        let back = Meta::decode(0, &bytes).unwrap();
        assert_eq!(back.reason.len(), 96);
        assert_eq!(
            Meta {
                reason: back.reason.clone(),
                ..m
            },
            back
        );
        assert!(Meta::decode(0, &bytes[..bytes.len() - 3]).is_err());
    }
}
