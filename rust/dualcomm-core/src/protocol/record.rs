//! Token records on the wire: a 16-byte header, then the operation's sections back to back.
//! The header lets a forwarder pass a token on without asking anyone where it goes.

use crate::error::{Error, Result};
use crate::topology::LocalMask;

/// The element type of a record's rows, as ranks tell each other (fault 3 of the hardening
/// issue: equal record sizes are not enough, the ranks must agree on what the bytes mean).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    /// Opaque bytes (a caller that does not say).
    Bytes = 0,
    Bool = 1,
    U8 = 2,
    I8 = 3,
    I16 = 4,
    I32 = 5,
    I64 = 6,
    F16 = 7,
    Bf16 = 8,
    F32 = 9,
    F64 = 10,
    F8E4M3 = 11,
    F8E5M2 = 12,
}

const ELEM_NAMES: [(ElemType, &str); 13] = [
    (ElemType::Bytes, "bytes"),
    (ElemType::Bool, "bool"),
    (ElemType::U8, "uint8"),
    (ElemType::I8, "int8"),
    (ElemType::I16, "int16"),
    (ElemType::I32, "int32"),
    (ElemType::I64, "int64"),
    (ElemType::F16, "float16"),
    (ElemType::Bf16, "bfloat16"),
    (ElemType::F32, "float32"),
    (ElemType::F64, "float64"),
    (ElemType::F8E4M3, "float8_e4m3fn"),
    (ElemType::F8E5M2, "float8_e5m2"),
];

impl ElemType {
    /// From a torch dtype's name (`"bfloat16"`, `"torch.float32"`, ...).
    pub fn parse(argument: &str, name: &str) -> Result<Self> {
        let bare = name.strip_prefix("torch.").unwrap_or(name);
        ELEM_NAMES
            .iter()
            .find(|(_, n)| *n == bare)
            .map(|(t, _)| *t)
            .ok_or_else(|| {
                let known: Vec<&str> = ELEM_NAMES.iter().map(|(_, n)| *n).collect();
                Error::invalid(argument, format!("one of {}", known.join(", ")), name)
            })
    }

    pub fn name(self) -> &'static str {
        ELEM_NAMES[self as usize].1
    }

    fn from_code(code: u32) -> Option<Self> {
        ELEM_NAMES.get(code as usize).map(|(t, _)| *t)
    }
}

/// What a record of an operation carries, beyond its size: every rank of an operation must
/// send and expect the same, and the metadata that opens the operation carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordFormat {
    pub dtype: ElemType,
    /// Elements per row.
    pub hidden: u32,
    /// FP8 scale columns per row (0 without scales).
    pub scale_cols: u32,
    /// Top-k entries per record (0 without top-k).
    pub topk: u32,
}

pub const FORMAT_BYTES: usize = 16;

impl RecordFormat {
    pub fn encode(&self) -> [u8; FORMAT_BYTES] {
        let mut b = [0u8; FORMAT_BYTES];
        b[0..4].copy_from_slice(&(self.dtype as u32).to_le_bytes());
        b[4..8].copy_from_slice(&self.hidden.to_le_bytes());
        b[8..12].copy_from_slice(&self.scale_cols.to_le_bytes());
        b[12..16].copy_from_slice(&self.topk.to_le_bytes());
        b
    }

    pub fn decode(peer: usize, b: &[u8]) -> Result<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let dtype = ElemType::from_code(u32_at(0))
            .ok_or_else(|| Error::protocol(peer, format!("unknown element type {}", u32_at(0))))?;
        Ok(Self {
            dtype,
            hidden: u32_at(4),
            scale_cols: u32_at(8),
            topk: u32_at(12),
        })
    }
}

impl std::fmt::Display for RecordFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rows of hidden {}", self.dtype.name(), self.hidden)?;
        if self.scale_cols > 0 {
            write!(f, " with {} scale columns", self.scale_cols)?;
        }
        if self.topk > 0 {
            write!(f, ", top-{}", self.topk)?;
        } else {
            write!(f, ", no top-k")?;
        }
        Ok(())
    }
}

pub const HEADER_BYTES: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src_rank: u32,
    pub src_idx: u32,
    /// Local ranks of the destination node that need this token (dispatch only).
    pub mask: LocalMask,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&self.src_rank.to_le_bytes());
        out[4..8].copy_from_slice(&self.src_idx.to_le_bytes());
        out[8..24].copy_from_slice(&self.mask.to_le_bytes());
        out
    }

    pub fn decode(record: &[u8]) -> Self {
        Header {
            src_rank: u32::from_le_bytes(record[0..4].try_into().unwrap()),
            src_idx: u32::from_le_bytes(record[4..8].try_into().unwrap()),
            mask: LocalMask::from_le_bytes(record[8..24].try_into().expect("16 bytes")),
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
