//! The verbs `Transport`: the rdma tier on an InfiniBand or RoCE NIC, through RC queue pairs
//! and RDMA_WRITE_WITH_IMM, exactly the contract of `transport::Transport` (made by
//! `setup::VerbsSetup::connect`).
//!
//! One completion queue takes both directions' completions. The progress engine reaps it in
//! `poll`, and so does a writer that waits for send-queue room. One shared receive queue
//! serves every peer and is refilled as immediates consume it (`RecvQueue`). One send in
//! `SIGNAL_EVERY` asks for a completion; `flush` posts a signaled empty write (a fence) where
//! the newest write asks for none, and then waits for every queue to drain.
//!
//! Faults: an error completion is the loss of its queue pair's peer, reported by `peer_gone`
//! (the protocol turns it into `PeerLostError` naming the peer). A silent peer becomes one
//! after `QpConfig::silent_peer_seconds`. A rank that leaves says goodbye first, with an
//! immediate and no bytes that carries its operation count (`ImmKind::Goodbye`). Then it
//! moves its queue pairs to the error state, so that a peer still writing learns it is gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::abi::{IbvWc, work_completion};
use super::address::RemoteRegion;
use super::events::{self, Fault};
use super::qp;
use super::queues::{RecvQueue, SendQueue};
use super::resources::{Cq, Mr, Nic, Qp, Srq};
use super::work::{
    self, Event, LocalRegion, RECV_WR_BIT, WcStatus, Write, WriteRequest, is_receive,
};
use crate::error::{Error, Result};
use crate::protocol::imm::{Imm, ImmKind};
use crate::transport::memory::{RegionMem, outside_slots};
use crate::transport::{
    Completion, Departure, MemKey, NUM_REGIONS, RegionId, Sge, Tier, TierCounters, Transport,
    Wiring,
};

/// Work requests one queue pair holds: enough to keep a 400 Gb/s link busy with the
/// protocol's chunk sizes, well inside every ConnectX's limit.
pub const SEND_DEPTH: usize = 256;
/// One write in this many asks for a completion (reaping it frees all before it).
pub const SIGNAL_EVERY: usize = 32;
/// Receives posted at most (see `RecvQueue::capped`), below every ConnectX's limit.
pub const MAX_SRQ_DEPTH: usize = 16384;
/// Completions taken from the queue per `ibv_poll_cq`.
pub const POLL_BATCH: usize = 64;
/// How often an active transport reads the device's asynchronous events.
const EVENTS_EVERY: Duration = Duration::from_millis(10);
/// How long `shutdown` waits for its goodbyes to leave.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// A connected peer.
pub(super) struct Peer {
    pub(super) tier: Tier,
    pub(super) qp: Qp,
    pub(super) remote: [RemoteRegion; NUM_REGIONS],
    pub(super) sends: Mutex<SendQueue>,
}

/// What reaping the completion queue keeps between calls.
pub(super) struct Reaper {
    pub(super) recv: RecvQueue,
    /// Peers' writes reaped (maybe by a writer) and not yet handed to `poll`.
    pub(super) arrived: Vec<Completion>,
    pub(super) wcs: Vec<IbvWc>,
    /// When the device's asynchronous events are next read.
    pub(super) events_due: Instant,
}

/// Memory registered by `register`.
pub(super) struct Source {
    /// None for an empty range (a NIC registers no zero-length memory).
    mr: Option<Mr>,
    addr: u64,
    len: usize,
}

pub struct VerbsTransport {
    pub(super) rank: usize,
    pub(super) wiring: Arc<dyn Wiring>,
    pub(super) timeout: Duration,
    pub(super) device: String,
    /// Indexed by rank; queue pairs go first, before the queues and memory they use.
    pub(super) peers: Vec<Option<Peer>>,
    pub(super) qp_peer: HashMap<u32, usize>,
    pub(super) reaper: Mutex<Reaper>,
    pub(super) sources: Mutex<Vec<Option<Source>>>,
    pub(super) gone: Vec<Mutex<Option<Departure>>>,
    pub(super) closed: AtomicBool,
    pub(super) wakeups: AtomicU64,
    pub(super) counters: TierCounters,
    pub(super) srq: Srq,
    pub(super) cq: Cq,
    pub(super) region_mrs: [Option<Mr>; NUM_REGIONS],
    pub(super) regions: [RegionMem; NUM_REGIONS],
    pub(super) nic: Nic,
}

impl VerbsTransport {
    /// The device this rank's traffic uses.
    pub fn device(&self) -> &str {
        &self.device
    }

    fn peer(&self, peer: usize) -> Result<&Peer> {
        self.peers
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::internal(
                    self.rank,
                    format!("a write to rank {peer}, which is not linked to this one"),
                )
            })
    }

    /// Records `peer`'s departure (the first reason wins) and wakes pollers.
    fn depart(&self, peer: usize, departure: Departure) {
        let Some(slot) = self.gone.get(peer) else {
            return;
        };
        let mut g = slot.lock().unwrap();
        if g.is_none() {
            *g = Some(departure);
            self.wakeups.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn lost(&self, peer: usize) -> Option<Error> {
        self.peer_gone(peer).map(|d| Error::PeerLost {
            peer,
            reason: d.reason,
        })
    }

    /// Where the bytes of key `key` are, as the NIC knows them (`sources` is locked).
    fn local_region(&self, sources: &[Option<Source>], key: MemKey) -> Option<LocalRegion> {
        match key.as_region() {
            Some(r) => {
                let mem = &self.regions[r as usize];
                Some(match &self.region_mrs[r as usize] {
                    Some(mr) => LocalRegion {
                        addr: mr.addr(),
                        len: mem.len(),
                        lkey: mr.lkey(),
                    },
                    None => LocalRegion {
                        addr: mem.as_ptr() as u64,
                        len: 0,
                        lkey: 0,
                    },
                })
            }
            None => {
                let s = sources
                    .get((key.0 as usize).checked_sub(NUM_REGIONS)?)?
                    .as_ref()?;
                Some(LocalRegion {
                    addr: s.addr,
                    len: s.len,
                    lkey: s.mr.as_ref().map_or(0, Mr::lkey),
                })
            }
        }
    }

    /// Takes what the completion queue holds: peers' writes go to `arrived`, send
    /// completions free their queues, errors lose peers, receives are topped up.
    fn reap(&self, r: &mut Reaper) -> Result<()> {
        let n = self.cq.poll(&mut r.wcs)?;
        let closed = self.closed.load(Ordering::SeqCst);
        let now = Instant::now();
        if now >= r.events_due && !closed {
            r.events_due = now + EVENTS_EVERY;
            self.take_async_events();
        }
        for i in 0..n {
            let wc = work_completion(&r.wcs[i]);
            let peer_of = |qpn: u32| self.qp_peer.get(&qpn).copied();
            if is_receive(wc.wr_id) {
                let peer = peer_of(wc.qp_num).unwrap_or(self.rank);
                r.recv.consumed(peer)?;
            }
            match work::event(&wc, &peer_of, self.rank) {
                Ok(Event::Received(c)) => {
                    let imm = Imm(c.imm);
                    if c.len == 0 && imm.kind() == Some(ImmKind::Goodbye) {
                        self.depart(
                            c.src,
                            Departure {
                                reason: "it said goodbye and left".into(),
                                completed_ops: Some(imm.goodbye_count()),
                            },
                        );
                    } else {
                        r.arrived.push(c);
                    }
                }
                Ok(Event::Sent { peer, wr_id }) => {
                    if let Some(p) = self.peers[peer].as_ref() {
                        p.sends.lock().unwrap().completed(wr_id);
                    }
                }
                // Our own shutdown flushes our queue pairs: those errors are not losses.
                Err(Error::PeerLost { .. }) if closed => {}
                Err(Error::PeerLost { peer, reason }) => self.depart(
                    peer,
                    Departure {
                        reason,
                        completed_ops: None,
                    },
                ),
                Err(e) => return Err(e),
            }
            if let (WcStatus::Failed(..), false) = (wc.status, is_receive(wc.wr_id))
                && let Some(p) = peer_of(wc.qp_num).and_then(|p| self.peers[p].as_ref())
            {
                // A failed send completes every write before it too (they are flushed).
                p.sends.lock().unwrap().completed(wc.wr_id);
            }
        }
        for _ in 0..r.recv.refill() {
            self.srq.post_receive(RECV_WR_BIT)?;
        }
        Ok(())
    }

    /// A port that went down or a failed queue pair loses peers at once, not only when a
    /// write to each of them times out.
    fn take_async_events(&self) {
        let port = self.nic.chosen.port.num;
        for event in self.nic.async_events() {
            match events::fault(&event, &self.device, port) {
                Some(Fault::Everyone(reason)) => {
                    for peer in (0..self.peers.len()).filter(|&p| self.peers[p].is_some()) {
                        self.depart(
                            peer,
                            Departure {
                                reason: reason.clone(),
                                completed_ops: None,
                            },
                        );
                    }
                }
                Some(Fault::QueuePair { qp_num, reason }) => {
                    if let Some(&peer) = self.qp_peer.get(&qp_num) {
                        self.depart(
                            peer,
                            Departure {
                                reason,
                                completed_ops: None,
                            },
                        );
                    }
                }
                None => {}
            }
        }
    }

    fn reap_now(&self) -> Result<()> {
        let mut r = self.reaper.lock().unwrap();
        self.reap(&mut r)
    }

    /// Posts `req` on `peer`'s queue pair, waiting for room until `deadline`; its id and
    /// whether it asks for a completion come from the queue's accounting (`last`: it must).
    fn post(
        &self,
        peer: usize,
        mut req: WriteRequest,
        last: bool,
        deadline: Instant,
    ) -> Result<()> {
        let p = self.peer(peer)?;
        let mut backoff = Backoff::default();
        loop {
            if let Some(e) = self.lost(peer) {
                return Err(e);
            }
            {
                // Held across the post, so that ids reach the queue pair in order (a signaled
                // completion frees every id below it).
                let mut sends = p.sends.lock().unwrap();
                if let Some((wr_id, signaled)) = sends.post(last) {
                    (req.wr_id, req.signaled) = (wr_id, signaled);
                    return p.qp.post_write(&req);
                }
            }
            self.reap_now()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "room in the send queue to rank {peer} on {} (its writes are not \
                         being acknowledged)",
                        self.device
                    ),
                    timeout: self.timeout,
                });
            }
            backoff.wait();
        }
    }

    /// An empty write to `peer`: a plain one (a fence), or one with an immediate.
    fn empty_write(&self, peer: usize, imm: Option<u32>) -> Result<WriteRequest> {
        let remote = self.peer(peer)?.remote[RegionId::RdmaMeta as usize];
        Ok(WriteRequest {
            wr_id: 0,
            sges: Vec::new(),
            remote_addr: remote.addr,
            rkey: remote.rkey,
            imm_be: imm.map(u32::to_be),
            signaled: true,
        })
    }
}

/// Busy-polls first (a completion is usually microseconds away), then yields, then sleeps
/// in short slices, so that an idle progress thread does not hold a core forever.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn wait(&mut self) {
        self.0 = self.0.saturating_add(1);
        match self.0 {
            0..64 => std::hint::spin_loop(),
            64..1024 => std::thread::yield_now(),
            _ => std::thread::sleep(Duration::from_micros(50)),
        }
    }
}

impl Transport for VerbsTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn region_len(&self, region: RegionId) -> usize {
        self.regions[region as usize].len()
    }

    unsafe fn register(&self, ptr: *const u8, len: usize) -> Result<MemKey> {
        let mr = if len == 0 {
            None
        } else {
            // SAFETY: the caller keeps the memory until `deregister` (`Transport::register`).
            Some(unsafe { self.nic.register_source(ptr, len)? })
        };
        let source = Source {
            addr: mr.as_ref().map_or(ptr as u64, Mr::addr),
            mr,
            len,
        };
        let mut t = self.sources.lock().unwrap();
        let slot = match t.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                t.push(None);
                t.len() - 1
            }
        };
        t[slot] = Some(source);
        Ok(MemKey((NUM_REGIONS + slot) as u32))
    }

    fn deregister(&self, key: MemKey) {
        if let Some(slot) = (key.0 as usize).checked_sub(NUM_REGIONS) {
            let taken = self
                .sources
                .lock()
                .unwrap()
                .get_mut(slot)
                .and_then(Option::take);
            drop(taken); // ibv_dereg_mr, outside the lock
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
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Destroyed);
        }
        let len: usize = src.iter().map(|s| s.len).sum();
        if !self.wiring.allows(peer, self.rank, region, offset, len) {
            return Err(outside_slots(self.rank, peer, region, offset, len));
        }
        let p = self.peer(peer)?;
        let remote = p.remote[region as usize];
        let req = {
            let sources = self.sources.lock().unwrap();
            let w = Write {
                wr_id: 0,
                src,
                offset,
                imm,
                signaled: false,
            };
            work::write_request(self.rank, &w, &|k| self.local_region(&sources, k), &remote)?
        };
        self.post(peer, req, false, Instant::now() + self.timeout)?;
        self.counters.add(p.tier, len);
        Ok(())
    }

    fn flush(&self, deadline: Instant) -> Result<()> {
        for (peer, p) in self.peers.iter().enumerate() {
            let Some(p) = p else { continue };
            if !p.sends.lock().unwrap().needs_fence() {
                continue;
            }
            // An empty plain write: no completion at the peer, and RC completes it only
            // after every write before it.
            self.post(peer, self.empty_write(peer, None)?, true, deadline)?;
        }
        let mut backoff = Backoff::default();
        loop {
            let pending: Vec<usize> = (0..self.peers.len())
                .filter(|&q| {
                    self.peers[q]
                        .as_ref()
                        .is_some_and(|p| !p.sends.lock().unwrap().drained())
                })
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if let Some(e) = pending.iter().find_map(|&q| self.lost(q)) {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "the send completions of writes to ranks {pending:?} on {}",
                        self.device
                    ),
                    timeout: self.timeout,
                });
            }
            self.reap_now()?;
            backoff.wait();
        }
    }

    fn region_memory(&self, region: RegionId) -> (*const u8, usize) {
        let r = &self.regions[region as usize];
        (r.as_ptr(), r.len())
    }

    fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize> {
        let seen = self.wakeups.load(Ordering::SeqCst);
        let mut backoff = Backoff::default();
        loop {
            {
                let mut r = self.reaper.lock().unwrap();
                self.reap(&mut r)?;
                if !r.arrived.is_empty() {
                    let n = r.arrived.len();
                    out.append(&mut r.arrived);
                    return Ok(n);
                }
            }
            if Instant::now() >= deadline || self.wakeups.load(Ordering::SeqCst) != seen {
                return Ok(0);
            }
            backoff.wait();
        }
    }

    fn wake(&self) {
        self.wakeups.fetch_add(1, Ordering::SeqCst);
    }

    unsafe fn local(&self, region: RegionId, offset: usize, len: usize) -> Result<&[u8]> {
        self.regions[region as usize].range(self.rank, offset, len)
    }

    fn peer_gone(&self, peer: usize) -> Option<Departure> {
        if peer == self.rank && self.closed.load(Ordering::SeqCst) {
            return Some(Departure {
                reason: "this rank left".into(),
                completed_ops: None,
            });
        }
        self.gone.get(peer)?.lock().unwrap().clone()
    }

    fn shutdown(&self, completed_ops: u64) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let goodbye = Imm::goodbye(completed_ops).0;
        let deadline = Instant::now() + GOODBYE_WAIT;
        let linked = (0..self.peers.len()).filter(|&q| self.peers[q].is_some());
        for peer in linked.collect::<Vec<_>>() {
            if self.peer_gone(peer).is_some() {
                continue;
            }
            // Best effort: a peer that cannot be told will see the queue pair fail instead.
            if let Ok(req) = self.empty_write(peer, Some(goodbye)) {
                let _ = self.post(peer, req, true, deadline);
            }
        }
        let _ = self.flush(deadline);
        self.closed.store(true, Ordering::SeqCst);
        for p in self.peers.iter().flatten() {
            let _ = p.qp.modify(&qp::to_error());
        }
        self.wakeups.fetch_add(1, Ordering::SeqCst);
    }

    fn wire_bytes(&self) -> [u64; 2] {
        self.counters.both()
    }

    fn connections(&self) -> [usize; 2] {
        let mut n = [0; 2];
        for p in self.peers.iter().flatten() {
            n[p.tier as usize] += 1;
        }
        n
    }
}

impl Drop for VerbsTransport {
    fn drop(&mut self) {
        self.shutdown(0);
    }
}
