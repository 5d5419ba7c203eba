//! The transport contract, shaped like RDMA so that InfiniBand verbs drops in later:
//! every rank registers memory regions; a peer writes bytes one-sidedly into them at an
//! offset and attaches a 32-bit immediate that the owner sees (as a completion) only after
//! those bytes are visible. Nothing else crosses a transport.

pub mod loopback;
pub mod memory;
pub mod shm;
pub mod tcp;
pub mod tiered;
#[cfg(feature = "verbs")]
pub mod verbs;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// The regions every rank registers. Fixed ids keep the wire format free of handles. Each
/// region belongs to one tier, so that one transport per tier can hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionId {
    /// Receive rings for peers on the same node.
    NvlRings = 0,
    /// Receive rings for twins on other nodes.
    RdmaRings = 1,
    /// Per-operation metadata from peers on the same node, double-buffered by parity.
    NvlMeta = 2,
    /// Per-operation metadata from twins, double-buffered by parity.
    RdmaMeta = 3,
}

pub const NUM_REGIONS: usize = 4;

impl RegionId {
    pub const ALL: [RegionId; NUM_REGIONS] = [
        RegionId::NvlRings,
        RegionId::RdmaRings,
        RegionId::NvlMeta,
        RegionId::RdmaMeta,
    ];

    pub fn from_index(i: usize) -> Option<Self> {
        Self::ALL.get(i).copied()
    }

    /// The tier whose links write this region.
    pub fn tier(self) -> Tier {
        match self {
            RegionId::NvlRings | RegionId::NvlMeta => Tier::Nvl,
            RegionId::RdmaRings | RegionId::RdmaMeta => Tier::Rdma,
        }
    }
}

/// What transports are told about the protocol: region sizes, which ranks are linked (and
/// over which tier), and where each sender may write. A transport connects only linked
/// ranks and refuses writes outside the sender's slots wherever it sees a write's target
/// (tcp at the receiver; shared memory and loopback at the writer, against the plan).
pub trait Wiring: Send + Sync {
    fn world_size(&self) -> usize;

    fn region_lens(&self) -> [usize; NUM_REGIONS];

    /// The tier that links `a` and `b`, if any.
    fn link(&self, a: usize, b: usize) -> Option<Tier>;

    /// Whether `sender` may write `len` bytes at `offset` of `receiver`'s `region`.
    fn allows(
        &self,
        receiver: usize,
        sender: usize,
        region: RegionId,
        offset: usize,
        len: usize,
    ) -> bool;
}

/// Every pair of ranks linked over every tier, whole regions writable by anyone: for
/// transport benchmarks and tests that exercise a transport without the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenWiring {
    pub lens: [usize; NUM_REGIONS],
    pub world: usize,
    pub tier: Tier,
}

impl Wiring for OpenWiring {
    fn world_size(&self) -> usize {
        self.world
    }

    fn region_lens(&self) -> [usize; NUM_REGIONS] {
        self.lens
    }

    fn link(&self, a: usize, b: usize) -> Option<Tier> {
        (a != b).then_some(self.tier)
    }

    fn allows(&self, _: usize, _: usize, region: RegionId, offset: usize, len: usize) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.lens[region as usize])
    }
}

/// How many peers `rank` is linked to over each tier (`[nvl, rdma]`).
pub fn links_per_tier(wiring: &dyn Wiring, rank: usize) -> [usize; 2] {
    let mut n = [0; 2];
    for p in 0..wiring.world_size() {
        if let Some(t) = wiring.link(rank, p) {
            n[t as usize] += 1;
        }
    }
    n
}

/// What the owner of a region learns about one completed incoming write: exactly what a
/// receive completion of an RDMA write with immediate says. Where the bytes landed follows
/// from the protocol's ring state (which region and tier: from the link to `src`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub src: usize,
    pub imm: u32,
    pub len: usize,
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

    /// `[nvl, rdma]`.
    pub fn both(&self) -> [u64; 2] {
        [self.get(Tier::Nvl), self.get(Tier::Rdma)]
    }
}

/// The part of a plan one transport of a composed pair carries: the links and regions of
/// `tier` (the other tier's regions are empty).
pub struct TierWiring {
    pub inner: Arc<dyn Wiring>,
    pub tier: Tier,
}

impl Wiring for TierWiring {
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn region_lens(&self) -> [usize; NUM_REGIONS] {
        let lens = self.inner.region_lens();
        std::array::from_fn(|i| {
            if RegionId::ALL[i].tier() == self.tier {
                lens[i]
            } else {
                0
            }
        })
    }

    fn link(&self, a: usize, b: usize) -> Option<Tier> {
        self.inner.link(a, b).filter(|&t| t == self.tier)
    }

    fn allows(
        &self,
        receiver: usize,
        sender: usize,
        region: RegionId,
        offset: usize,
        len: usize,
    ) -> bool {
        region.tier() == self.tier && self.inner.allows(receiver, sender, region, offset, len)
    }
}

/// A handle on local memory a transport may take the bytes of a write from (an RDMA memory
/// region's key). A rank's own regions have fixed keys (`MemKey::region`); more memory (the
/// caller's tensors, headers, staging) is registered per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemKey(pub u32);

impl MemKey {
    pub fn region(region: RegionId) -> Self {
        MemKey(region as u32)
    }

    /// The own region this key names, if it names one.
    pub fn as_region(self) -> Option<RegionId> {
        RegionId::from_index(self.0 as usize)
    }
}

/// One scatter-gather entry of a write's source: `len` bytes at `offset` of registered
/// memory `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    pub key: MemKey,
    pub offset: usize,
    pub len: usize,
}

/// Most entries one write gathers (a ConnectX send queue takes 30 per work request).
pub const MAX_SGE: usize = 30;

/// Called by a transport after it queued a completion (see `Transport::set_notify`).
pub type Notify = Arc<dyn Fn() + Send + Sync>;

/// Why and when a peer left. A peer that left after completing the operation a rank is in
/// owes that rank nothing for it; one that left earlier is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    pub reason: String,
    /// Operations the peer completed, when it said goodbye (unknown if it crashed).
    pub completed_ops: Option<OpCount>,
}

/// How many operations a departed peer said it completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCount {
    Exact(u64),
    /// Only the count modulo `2^bits` is known (a goodbye that fits in an immediate).
    Modulo {
        low: u64,
        bits: u32,
    },
}

impl OpCount {
    /// The count, as read by a rank at operation `mine`: linked ranks are never more than
    /// one operation apart, so a wrapped count is the candidate nearest `mine`.
    pub fn near(self, mine: u64) -> u64 {
        match self {
            OpCount::Exact(n) => n,
            OpCount::Modulo { low, bits } => {
                let modulus = 1u64 << bits;
                let base = mine - mine % modulus;
                [base.wrapping_sub(modulus), base, base + modulus]
                    .into_iter()
                    .map(|b| b.wrapping_add(low))
                    .min_by_key(|&c| c.abs_diff(mine))
                    .expect("three candidates")
            }
        }
    }
}

/// One rank's view of the fabric.
///
/// The contract is what an RC queue pair with RDMA_WRITE_WITH_IMM gives, and nothing more:
/// a write's source is local memory in a few segments, its target a peer's region at an
/// offset the sender computed (never out of bounds: the sender knows every region's length);
/// the peer learns `(source, immediate, length)` only; each immediate consumes one of the
/// `protocol::op::RECV_DEPTH` receives the peer keeps posted for this rank, and the protocol
/// never has more in flight; a write to a peer that is gone fails.
///
/// Ordering guarantee (the one RDMA gives with write-with-immediate on a reliable
/// connection): completions from one source arrive in the order that source posted them,
/// and a completion is delivered only after its bytes are readable in the region.
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;

    /// Size in bytes of this rank's own region `region`.
    fn region_len(&self, region: RegionId) -> usize;

    /// Makes `len` bytes at `ptr` a source of writes, until `deregister`.
    ///
    /// # Safety
    /// The memory stays allocated until `deregister(key)` has returned, and the caller does
    /// not change bytes that a posted write gathers until `flush` has returned.
    unsafe fn register(&self, ptr: *const u8, len: usize) -> Result<MemKey>;

    fn deregister(&self, key: MemKey);

    /// Posts a write: the bytes of `src` (at most `MAX_SGE` entries of registered memory)
    /// go to `peer`'s region at `offset`, then `imm` becomes visible to `peer`, which learns
    /// only `(this rank, imm, length)`. The transport refuses sources it does not know and
    /// writes the wiring does not allow. A transport whose sends queue up may block here
    /// (back-pressure) until the deadline it was made with.
    fn write_with_imm(
        &self,
        peer: usize,
        region: RegionId,
        offset: usize,
        src: &[Sge],
        imm: u32,
    ) -> Result<()>;

    /// Returns once every write posted so far has left this rank's memory (its send
    /// completion was reaped), so its sources may change or go; an error completion is the
    /// peer's loss. The host-memory transports copy while posting: nothing to wait for.
    fn flush(&self, _deadline: Instant) -> Result<()> {
        Ok(())
    }

    /// Where this rank's own `region` lives (for composing transports, which register one
    /// transport's regions with the other).
    fn region_memory(&self, region: RegionId) -> (*const u8, usize);

    /// Moves pending completions into `out`. Blocks until at least one is there or until
    /// `deadline`; returns how many were added (0 on deadline, or when woken by `wake`).
    fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize>;

    /// As `poll`, but also returns (with what it has, maybe nothing) as soon as `stop()`
    /// holds; `stop` is checked before every sleep. A transport that can sleep and still
    /// be woken by `wake` overrides this; the default sleeps in 1 ms slices.
    fn poll_until(
        &self,
        out: &mut Vec<Completion>,
        deadline: Instant,
        stop: &dyn Fn() -> bool,
    ) -> Result<usize> {
        loop {
            let now = Instant::now();
            let n = self.poll(out, deadline.min(now + Duration::from_millis(1)))?;
            if n > 0 || stop() || Instant::now() >= deadline {
                return Ok(n);
            }
        }
    }

    /// Makes a `poll` or `poll_until` that sleeps now return early.
    fn wake(&self) {}

    /// Calls `notify` after each completion this transport queues from now on; false if it
    /// cannot (then a composite polling it must not sleep long on another transport).
    fn set_notify(&self, _notify: Notify) -> bool {
        false
    }

    /// Read access to `len` bytes of this rank's own region at `offset` (bounds are checked).
    ///
    /// # Safety
    /// Peers write into these regions one-sidedly, with no lock this rank could hold, so the
    /// borrow is sound only while no peer writes the range: the caller reads only ranges
    /// whose completion it has seen and whose space it has not handed back (ring credits),
    /// and a peer that writes there anyway breaks the protocol. Transports that can refuse
    /// such writes do (see `Wiring`); over shared memory a peer that ignores its
    /// credits can still race the reader, which is why records are copied out and validated
    /// before they are used, and never trusted after their credits are returned.
    unsafe fn local(&self, region: RegionId, offset: usize, len: usize) -> Result<&[u8]>;

    /// How `peer` left, if it did. Polls wake up when a peer goes.
    fn peer_gone(&self, peer: usize) -> Option<Departure>;

    /// Marks this rank as gone after `completed_ops` operations; its later calls fail and
    /// peers see `peer_gone`.
    fn shutdown(&self, completed_ops: u64);

    /// Every byte this rank has written, per tier (`[nvl, rdma]`).
    fn wire_bytes(&self) -> [u64; 2];

    /// Where peers reach this rank, for transports with addresses.
    fn address(&self) -> Option<String> {
        None
    }

    /// Incoming connections refused (failed authentication or malformed), where that applies.
    fn rejected_connections(&self) -> u64 {
        0
    }

    /// Peers this rank is connected to, per tier (`[nvl, rdma]`).
    fn connections(&self) -> [usize; 2];
}
