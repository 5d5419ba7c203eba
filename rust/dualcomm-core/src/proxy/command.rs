//! One proxy command: 64 little-endian bytes (a cache line, written by one GPU thread).
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | seq: the command's position in the ring's stream (a stale or torn slot shows) |
//! | 8..12 | kind (1: write with immediate, 2: flush) |
//! | 12..16 | peer rank |
//! | 16..20 | destination region (`RegionId`) |
//! | 20..24 | immediate |
//! | 24..28 | length in bytes |
//! | 28..32 | reserved, zero |
//! | 32..40 | source offset in the registered send buffer |
//! | 40..48 | destination offset in the peer's region |
//! | 48..64 | reserved, zero |

use crate::error::{Error, Result};
use crate::transport::RegionId;

pub const COMMAND_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// `len` bytes at `src_offset` of the send buffer to `peer`'s `region` at `dst_offset`,
    /// then `imm` (the transport contract's write with immediate).
    Write = 1,
    /// Every write posted so far has left the send buffer once the proxy acknowledges this
    /// (its sources may be reused): the contract's `flush`.
    Flush = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub seq: u64,
    pub kind: CommandKind,
    pub peer: u32,
    pub region: RegionId,
    pub imm: u32,
    pub len: u32,
    pub src_offset: u64,
    pub dst_offset: u64,
}

impl Command {
    pub fn write(
        seq: u64,
        peer: u32,
        region: RegionId,
        src_offset: u64,
        dst_offset: u64,
        len: u32,
        imm: u32,
    ) -> Self {
        Self {
            seq,
            kind: CommandKind::Write,
            peer,
            region,
            imm,
            len,
            src_offset,
            dst_offset,
        }
    }

    pub fn flush(seq: u64) -> Self {
        Self {
            seq,
            kind: CommandKind::Flush,
            peer: 0,
            region: RegionId::RdmaRings,
            imm: 0,
            len: 0,
            src_offset: 0,
            dst_offset: 0,
        }
    }

    pub fn encode(&self) -> [u8; COMMAND_BYTES] {
        let mut b = [0u8; COMMAND_BYTES];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[12..16].copy_from_slice(&self.peer.to_le_bytes());
        b[16..20].copy_from_slice(&(self.region as u32).to_le_bytes());
        b[20..24].copy_from_slice(&self.imm.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.src_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.dst_offset.to_le_bytes());
        b
    }

    /// Decodes a slot, which a kernel wrote: an unknown kind or region is an internal error
    /// of this rank (a kernel bug), never acted on.
    pub fn decode(rank: usize, b: &[u8; COMMAND_BYTES]) -> Result<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let bad = |what: String| Error::Internal {
            rank,
            detail: format!("proxy command {}: {what}", u64_at(0)),
        };
        let kind = match u32_at(8) {
            1 => CommandKind::Write,
            2 => CommandKind::Flush,
            k => return Err(bad(format!("unknown kind {k}"))),
        };
        let region = RegionId::from_index(u32_at(16) as usize)
            .ok_or_else(|| bad(format!("unknown region {}", u32_at(16))))?;
        Ok(Self {
            seq: u64_at(0),
            kind,
            peer: u32_at(12),
            region,
            imm: u32_at(20),
            len: u32_at(24),
            src_offset: u64_at(32),
            dst_offset: u64_at(40),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(seq: u64, peer: u32, region in 0usize..4, imm: u32, len: u32, src: u64, dst: u64, flush: bool) {
            let region = RegionId::from_index(region).unwrap();
            let c = if flush {
                Command { seq, ..Command::flush(seq) }
            } else {
                Command::write(seq, peer, region, src, dst, len, imm)
            };
            prop_assert_eq!(Command::decode(0, &c.encode()).unwrap(), c);
        }
    }

    #[test]
    fn unknown_kinds_and_regions_are_internal_errors() {
        let mut b = Command::flush(7).encode();
        b[8] = 9;
        let e = Command::decode(3, &b).unwrap_err();
        assert!(
            matches!(e, Error::Internal { rank: 3, .. })
                && e.to_string().contains("unknown kind 9"),
            "{e}"
        );
        let mut b = Command::flush(7).encode();
        b[16] = 4;
        assert!(
            Command::decode(3, &b)
                .unwrap_err()
                .to_string()
                .contains("unknown region 4")
        );
    }
}
