//! One transport per tier, composed, as on a real cluster: the nvl tier over shared memory
//! (later CUDA IPC) inside a node, the rdma tier over tcp (later verbs) between nodes. Each
//! holds only its tier's regions and connects only its tier's links (see `TierWiring`).
//!
//! Polling sleeps on the nvl transport, which spins briefly and then parks; the rdma
//! transport calls back on every completion it queues, which counts a generation and wakes
//! the sleeper, so a completion on either tier is seen at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Completion, Departure, MemKey, NUM_REGIONS, RegionId, Sge, Tier, Transport};
use crate::error::{Error, Result};

pub struct Tiered {
    nvl: Arc<dyn Transport>,
    rdma: Arc<dyn Transport>,
    /// Bumped by the rdma transport after every completion it queues.
    rdma_arrivals: Arc<AtomicU64>,
    /// Whether the rdma transport calls back; if not, sleeps are cut into short slices.
    notified: bool,
    /// Each own region's key at `[nvl, rdma]`: its holder's fixed key, and an alias the
    /// other transport registered (a forwarder sends what arrived over one tier on the
    /// other, straight from where it landed).
    region_keys: [[MemKey; 2]; NUM_REGIONS],
    /// Keys handed out by `register` (slot + the region keys; freed slots are reused), and
    /// the inner transports' keys for them.
    keys: Mutex<Vec<Option<[MemKey; 2]>>>,
}

impl Tiered {
    pub fn new(nvl: Box<dyn Transport>, rdma: Box<dyn Transport>) -> Result<Self> {
        if nvl.rank() != rdma.rank() {
            return Err(Error::Internal {
                rank: nvl.rank(),
                detail: format!(
                    "composing the transports of ranks {} and {}",
                    nvl.rank(),
                    rdma.rank()
                ),
            });
        }
        let nvl: Arc<dyn Transport> = Arc::from(nvl);
        let rdma: Arc<dyn Transport> = Arc::from(rdma);
        let rdma_arrivals = Arc::new(AtomicU64::new(0));
        let sleeper = Arc::downgrade(&nvl);
        let arrivals = Arc::clone(&rdma_arrivals);
        let notified = rdma.set_notify(Arc::new(move || {
            arrivals.fetch_add(1, Ordering::SeqCst);
            if let Some(nvl) = sleeper.upgrade() {
                nvl.wake();
            }
        }));
        let mut region_keys = [[MemKey(0); 2]; NUM_REGIONS];
        for region in RegionId::ALL {
            let (holder, other) = match region.tier() {
                Tier::Nvl => (&nvl, &rdma),
                Tier::Rdma => (&rdma, &nvl),
            };
            let (ptr, len) = holder.region_memory(region);
            // SAFETY: the holder's region lives as long as the holder, which this composite
            // owns together with `other`; both go together.
            let alias = unsafe { other.register(ptr, len)? };
            region_keys[region as usize] = match region.tier() {
                Tier::Nvl => [MemKey::region(region), alias],
                Tier::Rdma => [alias, MemKey::region(region)],
            };
        }
        Ok(Self {
            nvl,
            rdma,
            rdma_arrivals,
            notified,
            region_keys,
            keys: Mutex::new(Vec::new()),
        })
    }

    /// `src` in the keys of the transport of `tier`.
    fn translate(&self, tier: Tier, src: &[Sge]) -> Result<Vec<Sge>> {
        let keys = self.keys.lock().unwrap();
        src.iter()
            .map(|e| {
                let key = match e.key.as_region() {
                    Some(r) => self.region_keys[r as usize][tier as usize],
                    None => (e.key.0 as usize)
                        .checked_sub(NUM_REGIONS)
                        .and_then(|slot| keys.get(slot).copied().flatten())
                        .map(|k| k[tier as usize])
                        .ok_or_else(|| Error::Internal {
                            rank: self.rank(),
                            detail: format!("a write from unregistered memory (key {})", e.key.0),
                        })?,
                };
                Ok(Sge { key, ..*e })
            })
            .collect()
    }

    fn of(&self, tier: Tier) -> &dyn Transport {
        match tier {
            Tier::Nvl => &*self.nvl,
            Tier::Rdma => &*self.rdma,
        }
    }
}

impl Transport for Tiered {
    fn rank(&self) -> usize {
        self.nvl.rank()
    }

    fn region_len(&self, region: RegionId) -> usize {
        self.of(region.tier()).region_len(region)
    }

    unsafe fn register(&self, ptr: *const u8, len: usize) -> Result<MemKey> {
        // SAFETY: the caller's contract, passed on.
        let nvl = unsafe { self.nvl.register(ptr, len)? };
        // SAFETY: as above.
        let rdma = match unsafe { self.rdma.register(ptr, len) } {
            Ok(k) => k,
            Err(e) => {
                self.nvl.deregister(nvl);
                return Err(e);
            }
        };
        let mut keys = self.keys.lock().unwrap();
        let slot = match keys.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                keys.push(None);
                keys.len() - 1
            }
        };
        keys[slot] = Some([nvl, rdma]);
        Ok(MemKey((NUM_REGIONS + slot) as u32))
    }

    fn deregister(&self, key: MemKey) {
        let taken = (key.0 as usize).checked_sub(NUM_REGIONS).and_then(|slot| {
            self.keys
                .lock()
                .unwrap()
                .get_mut(slot)
                .and_then(Option::take)
        });
        if let Some([nvl, rdma]) = taken {
            self.nvl.deregister(nvl);
            self.rdma.deregister(rdma);
        }
    }

    fn write_with_imm(
        &self,
        peer: usize,
        region: RegionId,
        offset: usize,
        src: &[Sge],
        imm: u32,
    ) -> Result<()> {
        let tier = region.tier();
        let src = self.translate(tier, src)?;
        self.of(tier)
            .write_with_imm(peer, region, offset, &src, imm)
    }

    fn flush(&self, deadline: Instant) -> Result<()> {
        self.nvl.flush(deadline)?;
        self.rdma.flush(deadline)
    }

    fn region_memory(&self, region: RegionId) -> (*const u8, usize) {
        self.of(region.tier()).region_memory(region)
    }

    fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize> {
        let seen = self.rdma_arrivals.load(Ordering::SeqCst);
        let now = Instant::now();
        let n = self.rdma.poll(out, now)? + self.nvl.poll(out, now)?;
        if n > 0 || now >= deadline {
            return Ok(n);
        }
        let n = if self.notified {
            let arrived = || self.rdma_arrivals.load(Ordering::SeqCst) != seen;
            self.nvl.poll_until(out, deadline, &arrived)?
        } else {
            let slice = deadline.min(now + std::time::Duration::from_millis(1));
            self.nvl.poll(out, slice)?
        };
        Ok(n + self.rdma.poll(out, Instant::now())?)
    }

    unsafe fn local(&self, region: RegionId, offset: usize, len: usize) -> Result<&[u8]> {
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { self.of(region.tier()).local(region, offset, len) }
    }

    fn peer_gone(&self, peer: usize) -> Option<Departure> {
        self.nvl
            .peer_gone(peer)
            .or_else(|| self.rdma.peer_gone(peer))
    }

    fn shutdown(&self, completed_ops: u64) {
        self.nvl.shutdown(completed_ops);
        self.rdma.shutdown(completed_ops);
    }

    fn wake(&self) {
        self.nvl.wake();
        self.rdma.wake();
    }

    fn wire_bytes(&self) -> [u64; 2] {
        let (a, b) = (self.nvl.wire_bytes(), self.rdma.wire_bytes());
        [a[0] + b[0], a[1] + b[1]]
    }

    fn address(&self) -> Option<String> {
        self.rdma.address()
    }

    fn rejected_connections(&self) -> u64 {
        self.nvl.rejected_connections() + self.rdma.rejected_connections()
    }

    fn connections(&self) -> [usize; 2] {
        let (a, b) = (self.nvl.connections(), self.rdma.connections());
        [a[0] + b[0], a[1] + b[1]]
    }
}
