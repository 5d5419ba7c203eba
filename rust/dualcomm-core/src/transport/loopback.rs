//! Loopback: every rank is a thread of one process and regions are plain heap memory.
//! A write is a memcpy into the peer's region followed by a completion pushed onto the
//! peer's queue under its lock, which orders the bytes before the immediate.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::memory::{CompletionQueue, RegionMem, Registry};
use super::{
    Completion, Departure, MemKey, NUM_REGIONS, OpCount, RegionId, Sge, TierCounters, Transport,
    Wiring,
};
use crate::error::{Error, Result};

struct Slot {
    regions: OnceLock<[RegionMem; NUM_REGIONS]>,
    queue: CompletionQueue,
    gone: Mutex<Option<Departure>>,
}

struct Joined {
    fingerprints: Vec<Option<String>>,
}

/// The shared "fabric" of a loopback world. Ranks join it with [`LoopbackFabric::join`].
pub struct LoopbackFabric {
    slots: Vec<Slot>,
    joined: Mutex<Joined>,
    all_joined: Condvar,
}

impl LoopbackFabric {
    pub fn new(world_size: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: (0..world_size)
                .map(|_| Slot {
                    regions: OnceLock::new(),
                    queue: CompletionQueue::default(),
                    gone: Mutex::new(None),
                })
                .collect(),
            joined: Mutex::new(Joined {
                fingerprints: vec![None; world_size],
            }),
            all_joined: Condvar::new(),
        })
    }

    pub fn world_size(&self) -> usize {
        self.slots.len()
    }

    /// Registers `rank`'s regions and waits (until `timeout`) for every rank to join.
    /// `fingerprint` describes the configuration; ranks that disagree all get an error.
    pub fn join(
        self: &Arc<Self>,
        rank: usize,
        wiring: Arc<dyn Wiring>,
        fingerprint: String,
        timeout: Duration,
    ) -> Result<LoopbackTransport> {
        let w = self.world_size();
        if rank >= w {
            return Err(Error::invalid("rank", format!("in [0, {w})"), rank));
        }
        if wiring.world_size() != w {
            return Err(Error::invalid(
                "wiring",
                format!("a plan for {w} ranks"),
                wiring.world_size(),
            ));
        }
        let regions = RegionMem::all(wiring.region_lens())?;
        if self.slots[rank].regions.set(regions).is_err() {
            return Err(Error::invalid(
                "rank",
                "a rank of this loopback world that has no buffer yet",
                format!("{rank}, which already joined"),
            ));
        }
        let deadline = Instant::now() + timeout;
        let mut joined = self.joined.lock().unwrap();
        joined.fingerprints[rank] = Some(fingerprint);
        self.all_joined.notify_all();
        while joined.fingerprints.iter().any(Option::is_none) {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..w)
                    .filter(|&r| joined.fingerprints[r].is_none())
                    .collect();
                return Err(Error::Timeout {
                    what: format!("ranks {missing:?} to create their buffers"),
                    timeout,
                });
            }
            joined = self
                .all_joined
                .wait_timeout(joined, deadline - now)
                .unwrap()
                .0;
        }
        let mine = joined.fingerprints[rank].as_deref().unwrap_or_default();
        if let Some(other) = (0..w).find(|&r| joined.fingerprints[r].as_deref() != Some(mine)) {
            return Err(Error::ConfigMismatch(format!(
                "rank {rank} has {mine}, rank {other} has {}",
                joined.fingerprints[other].as_deref().unwrap_or_default()
            )));
        }
        drop(joined);
        Ok(LoopbackTransport {
            fabric: Arc::clone(self),
            rank,
            wiring,
            wire: TierCounters::default(),
            registry: Registry::default(),
        })
    }
}

pub struct LoopbackTransport {
    fabric: Arc<LoopbackFabric>,
    rank: usize,
    wiring: Arc<dyn Wiring>,
    wire: TierCounters,
    registry: Registry,
}

impl LoopbackTransport {
    fn slot(&self, rank: usize) -> &Slot {
        &self.fabric.slots[rank]
    }

    fn regions(&self, rank: usize) -> &[RegionMem; NUM_REGIONS] {
        // Every rank joined before a transport existed.
        self.slot(rank).regions.get().expect("joined rank")
    }
}

impl Transport for LoopbackTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn region_len(&self, region: RegionId) -> usize {
        self.regions(self.rank)[region as usize].len()
    }

    unsafe fn register(&self, ptr: *const u8, len: usize) -> Result<MemKey> {
        // SAFETY: the caller's contract (`Transport::register`).
        Ok(unsafe { self.registry.register(ptr, len) })
    }

    fn deregister(&self, key: MemKey) {
        self.registry.deregister(key);
    }

    fn write_with_imm(
        &self,
        peer: usize,
        region: RegionId,
        offset: usize,
        src: &[Sge],
        imm: u32,
    ) -> Result<()> {
        let segments = self
            .registry
            .gather(self.rank(), src, |region, offset, len| {
                self.regions(self.rank)[region as usize].range(self.rank, offset, len)
            })?;
        self.write_segments(peer, region, offset, &segments, imm)
    }

    fn region_memory(&self, region: RegionId) -> (*const u8, usize) {
        let r = &self.regions(self.rank)[region as usize];
        (r.as_ptr(), r.len())
    }

    fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize> {
        Ok(self.slot(self.rank).queue.poll(out, deadline))
    }

    unsafe fn local(&self, region: RegionId, offset: usize, len: usize) -> Result<&[u8]> {
        self.regions(self.rank)[region as usize].range(self.rank, offset, len)
    }

    fn peer_gone(&self, peer: usize) -> Option<Departure> {
        self.slot(peer).gone.lock().unwrap().clone()
    }

    fn shutdown(&self, completed_ops: u64) {
        {
            let mut gone = self.slot(self.rank).gone.lock().unwrap();
            if gone.is_some() {
                return;
            }
            *gone = Some(Departure {
                reason: format!("its buffer was destroyed after {completed_ops} operations"),
                completed_ops: Some(OpCount::Exact(completed_ops)),
            });
        }
        for slot in &self.fabric.slots {
            slot.queue.wake();
        }
    }

    fn wire_bytes(&self) -> [u64; 2] {
        self.wire.both()
    }

    fn wake(&self) {
        self.slot(self.rank).queue.wake();
    }

    fn set_notify(&self, notify: super::Notify) -> bool {
        self.slot(self.rank).queue.set_notify(notify);
        true
    }

    fn connections(&self) -> [usize; 2] {
        super::links_per_tier(&*self.wiring, self.rank)
    }
}

impl Drop for LoopbackTransport {
    fn drop(&mut self) {
        // Without a count: a transport dropped without its endpoint's goodbye counts as lost.
        let mut gone = self.slot(self.rank).gone.lock().unwrap();
        if gone.is_none() {
            *gone = Some(Departure {
                reason: "its transport was dropped".into(),
                completed_ops: None,
            });
        }
    }
}

impl LoopbackTransport {
    /// Copies `segments` to `peer` (see `Transport::write_with_imm`).
    fn write_segments(
        &self,
        peer: usize,
        region: RegionId,
        offset: usize,
        segments: &[&[u8]],
        imm: u32,
    ) -> Result<()> {
        if self.slot(self.rank).gone.lock().unwrap().is_some() {
            return Err(Error::Destroyed);
        }
        let w = self.fabric.world_size();
        if peer >= w {
            return Err(Error::Internal {
                rank: self.rank,
                detail: format!("a write to rank {peer} of a world of {w}"),
            });
        }
        if let Some(d) = self.peer_gone(peer) {
            return Err(Error::PeerLost {
                peer,
                reason: d.reason,
            });
        }
        let len: usize = segments.iter().map(|s| s.len()).sum();
        if !self.wiring.allows(peer, self.rank, region, offset, len) {
            return Err(super::memory::outside_slots(
                self.rank, peer, region, offset, len,
            ));
        }
        // SAFETY: the range is owned by this writer until the peer hands it back (protocol
        // credits), so nobody reads or writes it now.
        let dst = unsafe { self.regions(peer)[region as usize].range_mut(self.rank, offset, len)? };
        let mut at = 0;
        for s in segments {
            dst[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        self.wire.add(region.tier(), len);
        self.slot(peer).queue.push(Completion {
            src: self.rank,
            imm,
            len,
        });
        Ok(())
    }
}
