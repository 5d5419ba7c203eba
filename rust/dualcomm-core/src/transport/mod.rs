//! The transport contract, shaped like RDMA so that InfiniBand verbs drops in later:
//! every rank registers memory regions; a peer writes bytes one-sidedly into them at an
//! offset and attaches a 32-bit immediate that the owner sees (as a completion) only after
//! those bytes are visible. Nothing else crosses a transport.

pub mod loopback;
pub mod memory;
pub mod shm;
pub mod tcp;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::error::Result;

/// The two link classes of a GPU cluster: `Nvl` inside a node (NVLink, or shared memory
/// without GPUs), `Rdma` between nodes (InfiniBand, or TCP without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Nvl = 0,
    Rdma = 1,
}

impl Tier {
    pub fn from_index(i: u8) -> Option<Self> {
        match i {
            0 => Some(Self::Nvl),
            1 => Some(Self::Rdma),
            _ => None,
        }
    }
}

/// The regions every rank registers. Fixed ids keep the wire format free of handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionId {
    /// Receive rings for peers on the same node.
    NvlRings = 0,
    /// Receive rings for peers on other nodes.
    RdmaRings = 1,
    /// Per-operation metadata (token counts), double-buffered by operation parity.
    Meta = 2,
}

pub const NUM_REGIONS: usize = 3;

impl RegionId {
    pub fn from_index(i: usize) -> Option<Self> {
        match i {
            0 => Some(Self::NvlRings),
            1 => Some(Self::RdmaRings),
            2 => Some(Self::Meta),
            _ => None,
        }
    }
}

/// A rank's registered regions and, per sender, the byte ranges of each region that sender
/// owns (its rings and metadata slots). A receiver that sees writes before they land (tcp)
/// refuses any write outside the sender's ranges, so a faulty peer cannot touch the slots of
/// another peer or of the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteWindows {
    lens: [usize; NUM_REGIONS],
    /// `[sender][region]`: the ranges that sender may write.
    windows: Vec<[Vec<Range<usize>>; NUM_REGIONS]>,
}

impl WriteWindows {
    /// Regions of `lens` bytes, each writable whole by every one of `world` senders.
    pub fn whole(lens: [usize; NUM_REGIONS], world: usize) -> Self {
        let all = lens.map(|l| std::iter::once(0..l).collect());
        Self {
            lens,
            windows: vec![all; world],
        }
    }

    /// Regions of `lens` bytes where no sender may write yet (see `allow`).
    pub fn closed(lens: [usize; NUM_REGIONS], world: usize) -> Self {
        Self {
            lens,
            windows: vec![Default::default(); world],
        }
    }

    pub fn allow(&mut self, sender: usize, region: RegionId, range: Range<usize>) {
        self.windows[sender][region as usize].push(range);
    }

    pub fn region_lens(&self) -> [usize; NUM_REGIONS] {
        self.lens
    }

    pub fn world_size(&self) -> usize {
        self.windows.len()
    }

    /// Whether `sender` may write `len` bytes at `offset` of `region` (a zero-length write,
    /// an immediate alone, is always allowed).
    pub fn allows(&self, sender: usize, region: RegionId, offset: usize, len: usize) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        len == 0 && offset <= self.lens[region as usize]
            || self.windows.get(sender).is_some_and(|w| {
                w[region as usize]
                    .iter()
                    .any(|r| r.start <= offset && end <= r.end)
            })
    }
}

/// What the owner of a region learns about one completed incoming write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub src: usize,
    pub tier: Tier,
    pub region: RegionId,
    pub offset: usize,
    pub len: usize,
    pub imm: u32,
}

/// Bytes sent per tier. Transports count every byte they put on a link (wire bytes);
/// the protocol keeps a second set that counts only token payload.
#[derive(Debug, Default)]
pub struct TierCounters([AtomicU64; 2]);

impl TierCounters {
    pub fn add(&self, tier: Tier, bytes: usize) {
        self.0[tier as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn get(&self, tier: Tier) -> u64 {
        self.0[tier as usize].load(Ordering::Relaxed)
    }
}

/// Why and when a peer left. A peer that left after completing the operation a rank is in
/// owes that rank nothing for it; one that left earlier is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    pub reason: String,
    /// Operations the peer completed, when it said goodbye (unknown if it crashed).
    pub completed_ops: Option<u64>,
}

/// One rank's view of the fabric.
///
/// Ordering guarantee (the one RDMA gives with write-with-immediate on a reliable
/// connection): completions from one source arrive in the order that source posted them,
/// and a completion is delivered only after its bytes are readable in the region.
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;

    /// Size in bytes of this rank's own region `region`.
    fn region_len(&self, region: RegionId) -> usize;

    /// Writes the concatenation of `segments` into `peer`'s region at `offset`, then makes
    /// `imm` visible to `peer`. The transport refuses writes outside the region.
    fn write_with_imm(
        &self,
        peer: usize,
        tier: Tier,
        region: RegionId,
        offset: usize,
        segments: &[&[u8]],
        imm: u32,
    ) -> Result<()>;

    /// Moves pending completions into `out`. Blocks until at least one is there or until
    /// `deadline`; returns how many were added (0 on deadline).
    fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize>;

    /// Read access to `len` bytes of this rank's own region at `offset` (bounds are checked).
    ///
    /// # Safety
    /// Peers write into these regions one-sidedly, with no lock this rank could hold, so the
    /// borrow is sound only while no peer writes the range: the caller reads only ranges
    /// whose completion it has seen and whose space it has not handed back (ring credits),
    /// and a peer that writes there anyway breaks the protocol. Transports that can refuse
    /// such writes do (tcp: see `WriteWindows`); over shared memory a peer that ignores its
    /// credits can still race the reader, which is why records are copied out and validated
    /// before they are used, and never trusted after their credits are returned.
    unsafe fn local(&self, region: RegionId, offset: usize, len: usize) -> Result<&[u8]>;

    /// How `peer` left, if it did. Polls wake up when a peer goes.
    fn peer_gone(&self, peer: usize) -> Option<Departure>;

    /// Marks this rank as gone after `completed_ops` operations; its later calls fail and
    /// peers see `peer_gone`.
    fn shutdown(&self, completed_ops: u64);

    /// Every byte this rank has written, per tier.
    fn wire_bytes(&self) -> &TierCounters;

    /// Where peers reach this rank, for transports with addresses.
    fn address(&self) -> Option<String> {
        None
    }

    /// Incoming connections refused (failed authentication or malformed), where that applies.
    fn rejected_connections(&self) -> u64 {
        0
    }
}
