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
/// Experts per rank whose receive counts travel in the metadata (DeepEP's
/// `num_recv_tokens_per_expert_list`, known when a dispatch returns): a record has room for
/// this many per destination rank, so the slot sizes stay fixed for the life of a buffer.
pub const MAX_LOCAL_EXPERTS: usize = 256;
/// kind u32 | record_bytes u32 | format | tag | origin | tokens | node_count |
/// local_experts u32 | count entries u32 | reason.
const FIXED_BYTES: usize = 8 + FORMAT_BYTES + 4 * 8 + 8 + REASON_BYTES;

/// Bytes of a record a rank sends its twin: one count per rank of the twin's node, and the
/// tokens for each expert of each of those ranks.
pub fn rdma_meta_bytes(ranks_per_node: usize) -> usize {
    FIXED_BYTES + 8 * ranks_per_node + 4 * MAX_LOCAL_EXPERTS * ranks_per_node
}

/// Bytes of a record a rank sends within its node: (count, tokens) per node, the sender's
/// own tokens for each rank of the node, and the tokens for each of the receiver's experts
/// that the sender accounts for (its own and its twins').
pub fn nvl_meta_bytes(num_nodes: usize, ranks_per_node: usize) -> usize {
    FIXED_BYTES + 16 * num_nodes + 8 * ranks_per_node + 4 * MAX_LOCAL_EXPERTS
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
    /// that source's token count (interleaved), then the sender's own tokens for each rank
    /// of the node.
    pub counts: Vec<u64>,
    /// Experts per rank this operation counts tokens for (0: it does not).
    pub local_experts: u32,
    /// Tokens per expert, `local_experts` per destination rank (see the record sizes). A
    /// decoded record holds every entry its slot has room for; readers take their share.
    pub expert_counts: Vec<u32>,
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
            local_experts: 0,
            expert_counts: Vec::new(),
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
        let counts_room = (bytes - FIXED_BYTES) / 8;
        let n_counts = self.counts.len().min(counts_room);
        out[at..at + 4].copy_from_slice(&self.local_experts.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&(n_counts as u32).to_le_bytes());
        at += 8;
        let mut cut = self.reason.len().min(REASON_BYTES);
        while !self.reason.is_char_boundary(cut) {
            cut -= 1;
        }
        out[at..at + cut].copy_from_slice(&self.reason.as_bytes()[..cut]);
        at += REASON_BYTES;
        for v in &self.counts[..n_counts] {
            out[at..at + 8].copy_from_slice(&v.to_le_bytes());
            at += 8;
        }
        for v in self.expert_counts.iter().take((bytes - at) / 4) {
            out[at..at + 4].copy_from_slice(&v.to_le_bytes());
            at += 4;
        }
        out
    }

    /// Decodes a record of `b.len()` bytes sent by `peer`; every count it holds comes along.
    pub fn decode(peer: usize, b: &[u8]) -> Result<Self> {
        if b.len() < FIXED_BYTES || (b.len() - FIXED_BYTES) % 4 != 0 {
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
        let n_counts = u32_at(at + 36) as usize;
        let reason = &b[at + 40..at + 40 + REASON_BYTES];
        let end = reason.iter().position(|&c| c == 0).unwrap_or(reason.len());
        let counts_at = at + 40 + REASON_BYTES;
        if n_counts > (b.len() - counts_at) / 8 {
            return Err(Error::protocol(
                peer,
                format!(
                    "a metadata record of {} bytes with {n_counts} counts",
                    b.len()
                ),
            ));
        }
        let experts_at = counts_at + 8 * n_counts;
        Ok(Self {
            kind,
            record_bytes: u32_at(4),
            format: RecordFormat::decode(peer, &b[8..8 + FORMAT_BYTES])?,
            tag: u64_at(at),
            origin: u64_at(at + 8),
            tokens: u64_at(at + 16),
            node_count: u64_at(at + 24),
            counts: (counts_at..experts_at).step_by(8).map(u64_at).collect(),
            local_experts: u32_at(at + 32),
            expert_counts: (experts_at..b.len()).step_by(4).map(u32_at).collect(),
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
    pub const LOCAL_EXPERTS: usize = TAG + 32;
    pub const NUM_COUNTS: usize = TAG + 36;
    /// The first count.
    pub const COUNTS: usize = TAG + 40 + super::REASON_BYTES;
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
        m.local_experts = 2;
        m.expert_counts = vec![5, 6, 7, 8, 9, 10, 11, 12];
        m.reason = "é".repeat(60);
        let bytes = m.encode(rdma_meta_bytes(4));
        let back = Meta::decode(0, &bytes).unwrap();
        assert_eq!(back.reason.len(), 96);
        assert_eq!(back.expert_counts.len(), 4 * MAX_LOCAL_EXPERTS);
        assert_eq!(back.expert_counts[..8], m.expert_counts[..]);
        assert_eq!(
            Meta {
                reason: back.reason.clone(),
                expert_counts: m.expert_counts.clone(),
                ..m.clone()
            },
            Meta {
                expert_counts: back.expert_counts[..8].to_vec(),
                ..back
            }
        );
        assert!(Meta::decode(0, &bytes[..bytes.len() - 3]).is_err());
        // A count entry total beyond the record is refused, not read out of bounds.
        let mut bad = bytes.clone();
        bad[offsets::NUM_COUNTS..offsets::NUM_COUNTS + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Meta::decode(0, &bad).is_err());
    }
}
