//! One collective operation (a dispatch or a combine) as seen by one rank: its rings, the
//! metadata exchange that opens it, and the completion loop with its deadline.
//!
//! Every operation starts with every rank writing a small metadata record to every other
//! rank. That carries the token counts a dispatch needs, lets ranks check that they run the
//! same operation on records of the same format, and bounds how far a fast rank can run
//! ahead (one operation), which is what makes the 2-bit epoch in the immediate sufficient.
//!
//! No rank sends ring data before it holds every peer's metadata, and no rank leaves an
//! operation before it holds every peer's metadata. So a rank that rejects its own arguments
//! sends an abort record in place of its metadata, every rank abandons that operation
//! together once all records are in, nothing is left in flight, and the buffer stays usable.

use std::time::{Duration, Instant};

use super::imm::{Imm, ImmKind};
use super::record::{FORMAT_BYTES, RecordFormat};
use super::ring::{RecvRing, RingGeometry, SendRing};
use crate::error::{Error, Result};
use crate::topology::Topology;
use crate::transport::{Completion, RegionId, Tier, Transport, WriteWindows};

pub const META_BYTES: usize = 128;
/// Bytes of an abort's reason that travel (the rest is cut).
const REASON_BYTES: usize = META_BYTES - 8 - FORMAT_BYTES - 24;
/// Largest token count a rank may announce: token indices travel as u32, and every count
/// from a peer is bounded by this before anything is sized from it.
pub const MAX_TOKENS: u64 = 1 << 31;

/// Bytes of the meta region a rank must register for a world of `world_size` ranks.
pub fn meta_region_len(world_size: usize) -> usize {
    2 * world_size * META_BYTES
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Dispatch = 1,
    CachedDispatch = 2,
    Combine = 3,
    /// Sent in place of an operation's metadata by a rank that rejected its arguments.
    Abort = 4,
}

impl OpKind {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Dispatch),
            2 => Some(Self::CachedDispatch),
            3 => Some(Self::Combine),
            4 => Some(Self::Abort),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Dispatch => "dispatch",
            Self::CachedDispatch => "cached dispatch",
            Self::Combine => "combine",
            Self::Abort => "aborted operation",
        }
    }
}

/// What one rank tells another when an operation starts. The meaning of `a`, `b`, `c`
/// belongs to the operation. An abort carries the operation the aborting rank meant to
/// run (in `aborted`) and why (in `reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: OpKind,
    pub record_bytes: u32,
    pub format: RecordFormat,
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub reason: String,
}

impl Meta {
    /// Wire layout: kind u32 | record_bytes u32 | format | a | b | c | reason (UTF-8, NUL-padded).
    fn encode(&self) -> [u8; META_BYTES] {
        let mut out = [0u8; META_BYTES];
        out[0..4].copy_from_slice(&(self.kind as u32).to_le_bytes());
        out[4..8].copy_from_slice(&self.record_bytes.to_le_bytes());
        out[8..8 + FORMAT_BYTES].copy_from_slice(&self.format.encode());
        let at = 8 + FORMAT_BYTES;
        out[at..at + 8].copy_from_slice(&self.a.to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&self.b.to_le_bytes());
        out[at + 16..at + 24].copy_from_slice(&self.c.to_le_bytes());
        let mut reason = self.reason.as_bytes();
        if reason.len() > REASON_BYTES {
            // Cut at a character boundary so the far side decodes valid UTF-8.
            let mut cut = REASON_BYTES;
            while !self.reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason = &reason[..cut];
        }
        out[at + 24..at + 24 + reason.len()].copy_from_slice(reason);
        out
    }

    fn decode(peer: usize, b: &[u8]) -> Result<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let kind = OpKind::from_u32(u32_at(0))
            .ok_or_else(|| Error::protocol(peer, format!("unknown operation {}", u32_at(0))))?;
        let at = 8 + FORMAT_BYTES;
        let reason = &b[at + 24..META_BYTES];
        let end = reason.iter().position(|&c| c == 0).unwrap_or(reason.len());
        Ok(Meta {
            kind,
            record_bytes: u32_at(4),
            format: RecordFormat::decode(peer, &b[8..8 + FORMAT_BYTES])?,
            a: u64_at(at),
            b: u64_at(at + 8),
            c: u64_at(at + 16),
            reason: String::from_utf8_lossy(&reason[..end]).into_owned(),
        })
    }
}

/// Where each peer may write in rank `me`'s regions: its ring in the nvl or rdma rings (the
/// same layout as `Op::begin` gives them) and its two metadata slots.
pub fn write_windows(
    topo: &Topology,
    me: usize,
    num_nvl_bytes: usize,
    num_rdma_bytes: usize,
) -> WriteWindows {
    let w = topo.world_size();
    let lens = [num_nvl_bytes, num_rdma_bytes, meta_region_len(w)];
    let mut win = WriteWindows::closed(lens, w);
    let nvl_ring = num_nvl_bytes / topo.ranks_per_node();
    let rdma_ring = num_rdma_bytes / topo.num_nodes();
    for p in (0..w).filter(|&p| p != me) {
        match link(topo, p, me) {
            Some(Tier::Nvl) => {
                let at = topo.local_of(p) * nvl_ring;
                win.allow(p, RegionId::NvlRings, at..at + nvl_ring);
            }
            Some(Tier::Rdma) => {
                let at = topo.node_of(p) * rdma_ring;
                win.allow(p, RegionId::RdmaRings, at..at + rdma_ring);
            }
            None => {}
        }
        for seq in 0..2 {
            let at = meta_offset(seq, w, p);
            win.allow(p, RegionId::Meta, at..at + META_BYTES);
        }
    }
    win
}

/// The metadata slot of sender `from` for operation `seq`, in every receiver's meta region.
fn meta_offset(seq: u64, world: usize, from: usize) -> usize {
    ((seq % 2) as usize * world + from) * META_BYTES
}

fn meta_tier(topo: &Topology, a: usize, b: usize) -> Tier {
    if topo.same_node(a, b) {
        Tier::Nvl
    } else {
        Tier::Rdma
    }
}

/// Tells every peer that this rank abandons operation `seq` (a `kind` it rejected the
/// arguments of) and why, then waits for every peer's record of that operation, so that
/// nothing of it is left in flight.
pub fn abort(s: Session<'_>, kind: OpKind, reason: &str) -> Result<()> {
    let mut op = Op::open(
        s,
        OpKind::Abort,
        ABORT_FORMAT,
        1,
        reason,
        kind as u64,
        |_| (0, 0, 0),
    )?;
    while !op.metas_ready() {
        op.pump(true)?;
    }
    Ok(())
}

/// The format field of an abort record (unused).
const ABORT_FORMAT: RecordFormat = RecordFormat {
    dtype: super::record::ElemType::Bytes,
    hidden: 0,
    scale_cols: 0,
    topk: 0,
};

/// The state an endpoint keeps between operations.
pub struct Session<'e> {
    pub transport: &'e dyn Transport,
    pub topo: Topology,
    pub seq: u64,
    pub timeout: Duration,
    /// Completions of the next operation that arrived during this one.
    pub stash: &'e mut Vec<Completion>,
    pub num_nvl_bytes: usize,
    pub num_rdma_bytes: usize,
}

pub struct Op<'e> {
    pub t: &'e dyn Transport,
    pub topo: Topology,
    pub me: usize,
    pub epoch: u32,
    seq: u64,
    kind: OpKind,
    timeout: Duration,
    deadline: Instant,
    metas: Vec<Option<Meta>>,
    missing_metas: usize,
    /// Indexed by peer rank; `None` where this rank never talks to that peer directly.
    pub send: Vec<Option<SendRing>>,
    pub recv: Vec<Option<RecvRing>>,
    stash: &'e mut Vec<Completion>,
    inbox: Vec<Completion>,
    format: RecordFormat,
    /// Set when a peer aborted this operation; raised once every peer's record is in.
    aborted: Option<Error>,
}

/// How a pair of ranks is linked, if it is: same node over nvl, twins (same local index on
/// different nodes) over rdma. Other pairs never exchange ring traffic.
pub fn link(topo: &Topology, a: usize, b: usize) -> Option<Tier> {
    if a == b {
        None
    } else if topo.same_node(a, b) {
        Some(Tier::Nvl)
    } else if topo.local_of(a) == topo.local_of(b) {
        Some(Tier::Rdma)
    } else {
        None
    }
}

impl<'e> Op<'e> {
    /// Checks that the rings hold a record, then opens the operation by sending `meta_for`
    /// of every peer to that peer.
    pub fn begin(
        s: Session<'e>,
        kind: OpKind,
        format: RecordFormat,
        record_bytes: usize,
        meta_for: impl Fn(usize) -> (u64, u64, u64),
    ) -> Result<Self> {
        let (nn, rpn) = (s.topo.num_nodes(), s.topo.ranks_per_node());
        if rpn > 1 && s.num_nvl_bytes / rpn < record_bytes {
            return Err(too_small(
                "num_nvl_bytes",
                record_bytes,
                rpn,
                s.num_nvl_bytes,
            ));
        }
        if nn > 1 && s.num_rdma_bytes / nn < record_bytes {
            return Err(too_small(
                "num_rdma_bytes",
                record_bytes,
                nn,
                s.num_rdma_bytes,
            ));
        }
        if record_bytes > u32::MAX as usize {
            return Err(Error::invalid(
                "token size",
                "below 4 GiB per token",
                record_bytes,
            ));
        }
        Self::open(s, kind, format, record_bytes, "", 0, meta_for)
    }

    /// Sets up the rings and sends this rank's record (`kind`, or an abort with `reason`
    /// for an operation of kind `aborted`) to every peer.
    fn open(
        s: Session<'e>,
        kind: OpKind,
        format: RecordFormat,
        record_bytes: usize,
        reason: &str,
        aborted: u64,
        meta_for: impl Fn(usize) -> (u64, u64, u64),
    ) -> Result<Self> {
        let topo = s.topo;
        let t = s.transport;
        let me = t.rank();
        let w = topo.world_size();
        let (nn, rpn) = (topo.num_nodes(), topo.ranks_per_node());
        let nvl_ring = s.num_nvl_bytes / rpn;
        let rdma_ring = s.num_rdma_bytes / nn;
        // Ring of sender `from` inside receiver `to`'s region.
        let geometry = |from: usize, to: usize, tier: Tier| {
            let (region, slot, ring) = match tier {
                Tier::Nvl => (RegionId::NvlRings, topo.local_of(from), nvl_ring),
                Tier::Rdma => (RegionId::RdmaRings, topo.node_of(from), rdma_ring),
            };
            RingGeometry {
                peer: if from == me { to } else { from },
                tier,
                region,
                base: slot * ring,
                capacity: (ring / record_bytes) as u64,
                record_bytes,
            }
        };
        let mut send = Vec::with_capacity(w);
        let mut recv = Vec::with_capacity(w);
        for p in 0..w {
            let tier = link(&topo, me, p);
            send.push(tier.map(|tier| SendRing::new(geometry(me, p, tier))));
            recv.push(tier.map(|tier| RecvRing::new(geometry(p, me, tier))));
        }
        let epoch = (s.seq % 4) as u32;
        let mut op = Op {
            t,
            topo,
            me,
            epoch,
            seq: s.seq,
            kind,
            timeout: s.timeout,
            deadline: Instant::now() + s.timeout,
            metas: vec![None; w],
            missing_metas: w,
            send,
            recv,
            stash: s.stash,
            inbox: Vec::new(),
            format,
            aborted: None,
        };
        for p in 0..w {
            let (a, b, c) = meta_for(p);
            let meta = Meta {
                kind,
                record_bytes: record_bytes as u32,
                format,
                a: if kind == OpKind::Abort { aborted } else { a },
                b,
                c,
                reason: reason.to_string(),
            };
            if p == me {
                op.metas[p] = Some(meta);
                op.missing_metas -= 1;
                continue;
            }
            let offset = meta_offset(s.seq, w, me);
            let imm = Imm::new(ImmKind::Meta, epoch, 0);
            let tier = meta_tier(&topo, me, p);
            t.write_with_imm(p, tier, RegionId::Meta, offset, &[&meta.encode()], imm.0)?;
        }
        // Completions of this operation that arrived while the previous one ran.
        let early: Vec<Completion> = std::mem::take(op.stash);
        for c in early {
            op.handle(c)?;
        }
        op.raise_abort()?;
        Ok(op)
    }

    pub fn kind(&self) -> OpKind {
        self.kind
    }

    pub fn metas_ready(&self) -> bool {
        self.missing_metas == 0
    }

    /// The metadata `peer` sent (this rank's own for itself). Only after `metas_ready`.
    pub fn meta(&self, peer: usize) -> &Meta {
        self.metas[peer].as_ref().expect("metas_ready")
    }

    pub fn send_ring(&mut self, peer: usize) -> &mut SendRing {
        self.send[peer].as_mut().expect("linked peer")
    }

    pub fn recv_ring(&mut self, peer: usize) -> &mut RecvRing {
        self.recv[peer].as_mut().expect("linked peer")
    }

    /// Takes in completions: waits (until the deadline) when `block`, else only looks.
    pub fn pump(&mut self, block: bool) -> Result<()> {
        let now = Instant::now();
        // Sleep in slices so a vanished peer is noticed even by transports that cannot wake us.
        let until = if block {
            self.deadline.min(now + Duration::from_millis(100))
        } else {
            now
        };
        let n = self.take_in(until)?;
        self.raise_abort()?;
        if block && n == 0 {
            if self.t.peer_gone(self.me).is_some() {
                return Err(Error::Destroyed); // this rank was told to leave
            }
            if self.lost_peer().is_some() {
                // A transport makes a peer's departure visible only after everything the
                // peer wrote before it left: take that in before judging (a peer that
                // completed this operation and exited at once owes nothing more).
                self.take_in(Instant::now())?;
                if let Some(e) = self.lost_peer() {
                    return Err(e);
                }
            }
            if Instant::now() >= self.deadline {
                return Err(Error::Timeout {
                    what: format!("{} to complete: {}", self.kind.name(), self.describe_wait()),
                    timeout: self.timeout,
                });
            }
        }
        Ok(())
    }

    /// Polls the transport until `until` and handles what came; returns how many.
    fn take_in(&mut self, until: Instant) -> Result<usize> {
        let mut inbox = std::mem::take(&mut self.inbox);
        inbox.clear();
        let n = self.t.poll(&mut inbox, until)?;
        for c in inbox.drain(..) {
            self.handle(c)?;
        }
        self.inbox = inbox;
        Ok(n)
    }

    fn handle(&mut self, c: Completion) -> Result<()> {
        let imm = Imm(c.imm);
        let kind = imm
            .kind()
            .ok_or_else(|| Error::protocol(c.src, format!("malformed immediate {:#x}", c.imm)))?;
        if imm.epoch() != self.epoch {
            if imm.epoch() == (self.epoch + 1) % 4 {
                self.stash.push(c);
                return Ok(());
            }
            return Err(Error::protocol(
                c.src,
                format!(
                    "message of operation epoch {} during epoch {}",
                    imm.epoch(),
                    self.epoch
                ),
            ));
        }
        match kind {
            ImmKind::Meta => self.on_meta(&c),
            ImmKind::Data => match self.recv.get_mut(c.src).and_then(Option::as_mut) {
                Some(ring) => ring.on_data(&c, imm.value() as u64),
                None => Err(Error::protocol(c.src, "data from a rank with no ring here")),
            },
            ImmKind::Credit => match self.send.get_mut(c.src).and_then(Option::as_mut) {
                Some(ring) => ring.on_credit(imm.value() as u64),
                None => Err(Error::protocol(
                    c.src,
                    "credit from a rank with no ring here",
                )),
            },
        }
    }

    fn on_meta(&mut self, c: &Completion) -> Result<()> {
        let w = self.topo.world_size();
        let want = meta_offset(self.seq, w, c.src);
        if c.region != RegionId::Meta || c.offset != want || c.len != META_BYTES {
            return Err(Error::protocol(c.src, "metadata outside its slot"));
        }
        if self.metas[c.src].is_some() {
            return Err(Error::protocol(c.src, "metadata sent twice"));
        }
        // SAFETY: the sender's own slot of this operation's parity, announced complete; the
        // sender writes it again only for the operation after next, which needs this one done.
        let bytes = unsafe { self.t.local(RegionId::Meta, c.offset, META_BYTES)? };
        let meta = Meta::decode(c.src, bytes)?;
        if meta.kind == OpKind::Abort || self.kind == OpKind::Abort {
            // Nothing of an aborted operation is used: only its records are collected.
            if meta.kind == OpKind::Abort && self.kind != OpKind::Abort && self.aborted.is_none() {
                self.aborted = Some(self.aborted_by(c.src, &meta));
            }
            self.metas[c.src] = Some(meta);
            self.missing_metas -= 1;
            return Ok(());
        }
        let mine = self.metas[self.me].as_ref().expect("own meta set at begin");
        if meta.kind != self.kind {
            return Err(Error::protocol(
                c.src,
                format!(
                    "rank {} runs {} while rank {} runs {}: every rank must make the same calls \
                     in the same order",
                    c.src,
                    meta.kind.name(),
                    self.me,
                    self.kind.name()
                ),
            ));
        }
        if meta.record_bytes != mine.record_bytes {
            return Err(Error::protocol(
                c.src,
                format!(
                    "rank {} sends {}-byte token records, rank {} {}-byte ones: hidden size, \
                     dtype and top-k must agree on every rank",
                    c.src, meta.record_bytes, self.me, mine.record_bytes
                ),
            ));
        }
        if meta.format != self.format {
            return Err(Error::protocol(
                c.src,
                format!(
                    "rank {} runs its {} on {}, rank {} on {}: dtype, hidden size, scales and \
                     top-k must agree on every rank",
                    c.src,
                    self.kind.name(),
                    meta.format,
                    self.me,
                    self.format
                ),
            ));
        }
        if meta.a > MAX_TOKENS || meta.b > MAX_TOKENS || meta.c > MAX_TOKENS {
            return Err(Error::protocol(
                c.src,
                format!(
                    "announced token counts ({}, {}, {}) above the limit of {MAX_TOKENS}",
                    meta.a, meta.b, meta.c
                ),
            ));
        }
        self.metas[c.src] = Some(meta);
        self.missing_metas -= 1;
        Ok(())
    }

    /// The error for this rank's caller: `peer` aborted the operation.
    fn aborted_by(&self, peer: usize, meta: &Meta) -> Error {
        let meant = u32::try_from(meta.a)
            .ok()
            .and_then(OpKind::from_u32)
            .map_or("operation", OpKind::name);
        Error::PeerAborted {
            peer,
            op: self.kind.name().to_string(),
            reason: format!("it rejected its arguments to its {meant}: {}", meta.reason),
        }
    }

    /// Once every peer's record is in, a peer's abort ends this operation (on every rank).
    fn raise_abort(&mut self) -> Result<()> {
        if self.metas_ready()
            && let Some(e) = self.aborted.take()
        {
            return Err(e);
        }
        Ok(())
    }

    pub fn return_credits(&mut self) -> Result<()> {
        for ring in self.recv.iter_mut().flatten() {
            ring.return_credits(self.t, self.epoch)?;
        }
        Ok(())
    }

    /// All metadata in, every ring closed, drained and acknowledged.
    pub fn rings_finished(&self) -> bool {
        self.metas_ready()
            && self.send.iter().flatten().all(SendRing::finished)
            && self.recv.iter().flatten().all(RecvRing::finished)
    }

    /// Whether this rank still waits for something from `peer`. A peer that finished the
    /// operation legitimately owes nothing, so only a peer that does is lost when it goes.
    /// (Work this rank has yet to send is not counted: a write to a peer that is gone fails
    /// by itself.)
    fn needs(&self, peer: usize) -> bool {
        self.metas[peer].is_none()
            || self.send[peer]
                .as_ref()
                .is_some_and(SendRing::awaiting_credit)
            || self.recv[peer]
                .as_ref()
                .is_some_and(RecvRing::awaiting_data)
    }

    /// The error for a peer this rank still needs that has gone, if any.
    fn lost_peer(&self) -> Option<Error> {
        for p in (0..self.topo.world_size()).filter(|&p| p != self.me && self.needs(p)) {
            if let Some(d) = self.t.peer_gone(p) {
                if d.completed_ops.is_some_and(|n| n > self.seq) {
                    continue; // it finished this operation: all it sent here has arrived
                }
                return Some(Error::PeerLost {
                    peer: p,
                    reason: format!(
                        "{}, while rank {} in {} still waited for {}",
                        d.reason,
                        self.me,
                        self.kind.name(),
                        self.describe_wait()
                    ),
                });
            }
        }
        None
    }

    fn describe_wait(&self) -> String {
        let missing: Vec<usize> = (0..self.metas.len())
            .filter(|&p| self.metas[p].is_none())
            .collect();
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!(
                "ranks {missing:?} to start the {}",
                self.kind.name()
            ));
        }
        parts.extend(
            self.recv
                .iter()
                .flatten()
                .filter_map(RecvRing::describe_wait),
        );
        parts.extend(
            self.send
                .iter()
                .flatten()
                .filter_map(SendRing::describe_wait),
        );
        if parts.is_empty() {
            parts.push("local work".into());
        }
        parts.truncate(4);
        parts.join("; ")
    }
}

fn too_small(arg: &str, record_bytes: usize, rings: usize, got: usize) -> Error {
    Error::invalid(
        arg,
        format!(
            "at least {} bytes ({rings} rings of at least one {record_bytes}-byte token record)",
            rings * record_bytes
        ),
        got,
    )
}
