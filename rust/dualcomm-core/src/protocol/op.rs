//! One collective operation (a dispatch or a combine) as seen by one rank: its rings, the
//! metadata exchange that opens it, and the completion loop with its deadline.
//!
//! An operation opens with metadata over the protocol's links only (see `meta`): records to
//! the twins, then, once the twins' are in, records to the ranks of the node that relay what
//! the twins said. That carries the token counts a dispatch needs, lets linked ranks check
//! that they run the same operation on records of the same format, and bounds how far a fast
//! rank can run ahead (one operation), which makes the 2-bit epoch in the immediate enough.
//!
//! No rank sends ring data before it holds all its metadata, and no rank leaves an operation
//! before that either. So a rank that rejects its own arguments sends an abort in place of
//! its records (forwarders relay it inside their node), every rank abandons the operation
//! once its records are in, nothing is left in flight, and the buffer stays usable.
//!
//! In shrink mode (`crate::mask`) an operation has no links to masked peers: nothing goes to
//! them and nothing from them is taken in. A peer whose metadata has not come by the
//! deadline, or that left before sending it, is masked then and there, and the operation
//! goes on without it; the peers left are in step, because no data moves before all
//! metadata is in. A peer lost after that fails the operation as without shrink mode.

use std::time::{Duration, Instant};

use super::imm::{Imm, ImmKind};
use super::layout::{RegionPlan, link};
use super::meta::Meta;
use super::record::{ElemType, RecordFormat};
use super::ring::{RecvRing, RingGeometry, SendRing};
use crate::error::{Error, Result};
use crate::mask::RankMask;
use crate::topology::Topology;
use crate::transport::{Completion, MemKey, Sge, Tier, Transport};

/// Receives every transport keeps posted per linked peer: an immediate consumes one (RDMA
/// semantics), and the protocol never has more in flight towards a peer. Between two linked
/// ranks at most `MAX_RING_RECORDS` data immediates (each announces at least one record of
/// a ring that holds at most that many), as many credit immediates (each returns at least one
/// record of the reverse ring) and two metadata records (this operation's and the next's)
/// are unreaped at once: `2 * RECV_DEPTH / 4 + 2 < RECV_DEPTH`.
pub const RECV_DEPTH: usize = 1024;
/// Records a ring holds at most, whatever its bytes (see `RECV_DEPTH`).
pub const MAX_RING_RECORDS: u64 = (RECV_DEPTH / 4) as u64;

/// Largest token count a rank may announce: token indices travel as u32, and every count
/// from a peer is bounded by this before anything is sized from it.
pub const MAX_TOKENS: u64 = 1 << 31;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Dispatch = 1,
    CachedDispatch = 2,
    Combine = 3,
    /// Sent in place of an operation's metadata by a rank that rejected its arguments.
    Abort = 4,
}

impl OpKind {
    pub fn from_u32(v: u32) -> Option<Self> {
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

/// What this rank announces when an operation opens.
#[derive(Debug, Clone, Copy, Default)]
pub struct Announce<'a> {
    /// Its token count.
    pub tokens: u64,
    /// Its tokens for each rank (`world_size` values) and each node (`num_nodes` values);
    /// empty for operations whose counts are known in advance (combine).
    pub to_rank: &'a [u64],
    pub to_node: &'a [u64],
    /// Combine: the operation number of the dispatch it reverses.
    pub tag: u64,
    /// Its tokens for each expert (`world_size * local_experts` values), or empty: then no
    /// per-expert receive counts travel.
    pub per_expert: &'a [u64],
    pub local_experts: usize,
}

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
    /// Shrink mode: the ranks masked so far (this operation may add to them).
    pub mask: Option<&'e RankMask>,
    /// Per rank, nanoseconds spent waiting for it (see `Op::heard`), added to when an
    /// operation ends.
    pub waits: &'e mut Vec<u64>,
}

/// Why this operation is abandoned: the rank that rejected its arguments, what it was asked
/// to run, and why. Relayed within the node by the forwarder that heard it.
#[derive(Debug, Clone)]
struct AbortNote {
    origin: usize,
    meant: u64,
    reason: String,
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
    plan: RegionPlan,
    record_bytes: u32,
    format: RecordFormat,
    tokens: u64,
    to_rank: Vec<u64>,
    per_expert: Vec<u64>,
    local_experts: usize,
    tag: u64,
    /// Records from linked peers, by rank.
    metas: Vec<Option<Meta>>,
    missing_twins: usize,
    missing_locals: usize,
    nvl_sent: bool,
    /// This rank's own abort, or the first one a twin sent: relayed inside the node.
    note: Option<AbortNote>,
    /// Indexed by peer rank; `None` where this rank never talks to that peer directly.
    pub send: Vec<Option<SendRing>>,
    pub recv: Vec<Option<RecvRing>>,
    stash: &'e mut Vec<Completion>,
    inbox: Vec<Completion>,
    /// Set when a peer aborted this operation; raised once all metadata is in.
    aborted: Option<Error>,
    /// This operation's outgoing metadata records, one slot per link (a posted write's
    /// source stays untouched until flushed), registered with the transport as `meta_key`.
    meta_out: Vec<u8>,
    meta_key: Option<MemKey>,
    /// Bytes of `meta_out` already posted.
    meta_used: usize,
    /// Shrink mode's shared flags, and the peers this operation runs without.
    mask: Option<&'e RankMask>,
    masked: Vec<bool>,
    /// When the operation opened, and when each peer's metadata came: the time this rank
    /// waited for the peer to start (DeepEP's `*_wait_recv_cost_stats`). Data moves only
    /// once every rank's metadata is in, so after that a late rank holds up every link
    /// alike: the metadata is what singles it out.
    opened: Instant,
    heard: Vec<Option<Instant>>,
    waits: &'e mut Vec<u64>,
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.meta_key.take() {
            self.t.deregister(k);
        }
        if self.waits.len() < self.heard.len() {
            self.waits.resize(self.heard.len(), 0);
        }
        for (w, heard) in self.waits.iter_mut().zip(&self.heard) {
            if let Some(at) = heard {
                *w += at.saturating_duration_since(self.opened).as_nanos() as u64;
            }
        }
    }
}

/// The format field of an abort record (unused).
const ABORT_FORMAT: RecordFormat = RecordFormat {
    dtype: ElemType::Bytes,
    hidden: 0,
    scale_cols: 0,
    topk: 0,
};

/// Tells every linked peer that this rank abandons operation `seq` (a `kind` it rejected the
/// arguments of) and why, then waits for its metadata of that operation, so that nothing of
/// it is left in flight.
pub fn abort(s: Session<'_>, kind: OpKind, reason: &str) -> Result<()> {
    let note = AbortNote {
        origin: s.transport.rank(),
        meant: kind as u64,
        reason: reason.to_string(),
    };
    let mut op = Op::open(
        s,
        OpKind::Abort,
        ABORT_FORMAT,
        1,
        Announce::default(),
        Some(note),
    )?;
    while !op.metas_ready() {
        op.pump(true)?;
    }
    op.flush()
}

impl<'e> Op<'e> {
    /// Checks that the rings hold a record, then opens the operation (see the module).
    pub fn begin(
        s: Session<'e>,
        kind: OpKind,
        format: RecordFormat,
        record_bytes: usize,
        announce: Announce<'_>,
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
        Self::open(s, kind, format, record_bytes, announce, None)
    }

    /// Sets up the rings and sends this rank's records to its twins (an abort, with `note`).
    fn open(
        s: Session<'e>,
        kind: OpKind,
        format: RecordFormat,
        record_bytes: usize,
        announce: Announce<'_>,
        note: Option<AbortNote>,
    ) -> Result<Self> {
        let topo = s.topo;
        let t = s.transport;
        let me = t.rank();
        let w = topo.world_size();
        let plan = RegionPlan::new(topo, s.num_nvl_bytes, s.num_rdma_bytes);
        // Ring of sender `from` inside receiver `to`'s region.
        let geometry = |from: usize, to: usize, tier: Tier| {
            let (region, base) = plan.ring_of(from, tier);
            RingGeometry {
                peer: if from == me { to } else { from },
                tier,
                region,
                base,
                capacity: ((plan.ring_bytes(tier) / record_bytes) as u64).min(MAX_RING_RECORDS),
                record_bytes,
                credit_offset: plan.ring_of(to, tier).1,
            }
        };
        let masked: Vec<bool> = (0..w)
            .map(|p| p != me && s.mask.is_some_and(|m| m.is_masked(p)))
            .collect();
        let mut send = Vec::with_capacity(w);
        let mut recv = Vec::with_capacity(w);
        let (mut twins, mut locals) = (0, 0);
        for (p, &absent) in masked.iter().enumerate() {
            let tier = link(&topo, me, p);
            match tier {
                _ if absent => {}
                Some(Tier::Nvl) => locals += 1,
                Some(Tier::Rdma) => twins += 1,
                None => {}
            }
            let mut out = tier.map(|tier| SendRing::new(geometry(me, p, tier)));
            let mut inc = tier.map(|tier| RecvRing::new(geometry(p, me, tier)));
            if absent {
                out.iter_mut().for_each(SendRing::make_absent);
                inc.iter_mut().for_each(RecvRing::make_absent);
            }
            send.push(out);
            recv.push(inc);
        }
        let meta_out_bytes =
            twins * plan.meta_bytes(Tier::Rdma) + locals * plan.meta_bytes(Tier::Nvl);
        let mut op = Op {
            t,
            topo,
            me,
            epoch: (s.seq % 4) as u32,
            seq: s.seq,
            kind,
            timeout: s.timeout,
            deadline: Instant::now() + s.timeout,
            plan,
            record_bytes: record_bytes as u32,
            format,
            tokens: announce.tokens,
            to_rank: announce.to_rank.to_vec(),
            per_expert: announce.per_expert.to_vec(),
            local_experts: announce.local_experts,
            tag: announce.tag,
            metas: vec![None; w],
            missing_twins: twins,
            missing_locals: locals,
            nvl_sent: false,
            note,
            send,
            recv,
            stash: s.stash,
            inbox: Vec::new(),
            aborted: None,
            meta_out: vec![0; meta_out_bytes],
            meta_key: None,
            meta_used: 0,
            mask: s.mask,
            masked,
            opened: Instant::now(),
            heard: vec![None; w],
            waits: s.waits,
        };
        // SAFETY: the buffer lives in the operation, which deregisters it when it drops
        // (after flushing its writes); it only changes in slots not yet posted.
        op.meta_key = Some(unsafe { t.register(op.meta_out.as_ptr(), op.meta_out.len())? });
        for n in (0..topo.num_nodes()).filter(|&n| n != topo.node_of(me)) {
            let twin = topo.forwarder(me, n);
            if op.masked[twin] {
                continue;
            }
            let mut m = op.record();
            m.tokens = announce.tokens;
            m.node_count = announce.to_node.get(n).copied().unwrap_or(0);
            m.counts = (0..topo.ranks_per_node())
                .map(|l| {
                    let d = topo.rank_at(n, l);
                    announce.to_rank.get(d).copied().unwrap_or(0)
                })
                .collect();
            m.expert_counts = (0..topo.ranks_per_node())
                .flat_map(|l| op.own_expert_counts(topo.rank_at(n, l)))
                .map(|c| c as u32)
                .collect();
            if let Err(e) = op.send_meta(twin, Tier::Rdma, &m) {
                // A write to a peer that has left fails by itself: in shrink mode, the
                // operation goes on without it.
                match (op.mask, t.peer_gone(twin)) {
                    (Some(_), Some(d)) => op.mask_peer(twin, &d.reason),
                    _ => return Err(e),
                }
            }
        }
        // With no twins to wait for, this rank's records go out before it looks at what its
        // peers sent early: a peer whose record it refuses has this rank's record too, and so
        // names the same mismatch instead of finding this rank gone.
        op.relay_when_ready()?;
        // Completions of this operation that arrived while the previous one ran.
        let early: Vec<Completion> = std::mem::take(op.stash);
        for c in early {
            op.handle(c)?;
        }
        op.relay_when_ready()?;
        op.raise_abort()?;
        Ok(op)
    }

    /// A record of this operation with nothing but what every record carries.
    fn record(&self) -> Meta {
        match &self.note {
            Some(note) => {
                let mut m = Meta::new(OpKind::Abort, self.record_bytes, self.format);
                m.tag = note.meant;
                m.origin = note.origin as u64;
                m.reason = note.reason.clone();
                m
            }
            None => {
                let mut m = Meta::new(self.kind, self.record_bytes, self.format);
                m.tag = self.tag;
                m.local_experts = self.local_experts as u32;
                m
            }
        }
    }

    /// This rank's tokens for each expert of rank `d` (empty when none are counted).
    fn own_expert_counts(&self, d: usize) -> Vec<u64> {
        let l = self.local_experts;
        self.per_expert
            .get(d * l..(d + 1) * l)
            .map(<[u64]>::to_vec)
            .unwrap_or_default()
    }

    fn send_meta(&mut self, peer: usize, tier: Tier, m: &Meta) -> Result<()> {
        let (region, offset) = self.plan.meta_slot(self.seq, self.me, tier);
        let len = self.plan.meta_bytes(tier);
        let at = self.meta_used;
        self.meta_used += len;
        self.meta_out[at..at + len].copy_from_slice(&m.encode(len));
        let src = Sge {
            key: self.meta_key.expect("registered at open"),
            offset: at,
            len,
        };
        let imm = Imm::new(ImmKind::Meta, self.epoch, 0);
        self.t.write_with_imm(peer, region, offset, &[src], imm.0)
    }

    /// Waits (until the deadline) for every write this operation posted to have left.
    pub fn flush(&self) -> Result<()> {
        self.t.flush(self.deadline)
    }

    /// Once every twin's record is in: tells each rank of the node, per node, what the
    /// source this rank forwards from there sends it (or relays an abort).
    fn relay_when_ready(&mut self) -> Result<()> {
        if self.nvl_sent || self.missing_twins > 0 {
            return Ok(());
        }
        self.nvl_sent = true;
        let (topo, me) = (self.topo, self.me);
        let my_node = topo.node_of(me);
        let masked = self.masked.clone();
        for d in (0..topo.ranks_per_node())
            .map(|l| topo.rank_at(my_node, l))
            .filter(|&d| d != me && !masked[d])
        {
            let mut m = self.record();
            if self.note.is_none() && !self.to_rank.is_empty() {
                m.counts = (0..topo.num_nodes())
                    .flat_map(|n| {
                        if n == my_node {
                            [self.to_rank[d], self.tokens]
                        } else {
                            let twin = self.meta(topo.forwarder(me, n));
                            [twin.counts[topo.local_of(d)], twin.tokens]
                        }
                    })
                    .chain(
                        (0..topo.ranks_per_node()).map(|l| self.to_rank[topo.rank_at(my_node, l)]),
                    )
                    .collect();
                // Per expert of `d`: this rank's own tokens and those of the twins it
                // forwards to `d`, summed (each source reaches `d` through one forwarder).
                let mut experts = self.own_expert_counts(d);
                for n in (0..topo.num_nodes()).filter(|&n| n != my_node) {
                    let twin = self.meta(topo.forwarder(me, n));
                    let at = topo.local_of(d) * self.local_experts;
                    for (e, c) in experts.iter_mut().enumerate() {
                        *c += twin.expert_counts[at + e] as u64;
                    }
                }
                m.expert_counts = experts.into_iter().map(|c| c as u32).collect();
            }
            self.send_meta(d, Tier::Nvl, &m)?;
        }
        Ok(())
    }

    pub fn kind(&self) -> OpKind {
        self.kind
    }

    pub fn metas_ready(&self) -> bool {
        self.nvl_sent && self.missing_twins == 0 && self.missing_locals == 0
    }

    /// The record a linked `peer` sent. Only after `metas_ready`.
    fn meta(&self, peer: usize) -> &Meta {
        self.metas[peer].as_ref().expect("metas_ready")
    }

    /// Per source rank: its tokens for this rank, and its token count. Only after
    /// `metas_ready`, for operations that announce counts.
    pub fn source_counts(&self) -> (Vec<u64>, Vec<u64>) {
        let topo = self.topo;
        let me = self.me;
        (0..topo.world_size())
            .map(|s| {
                if s == me {
                    (self.to_rank[me], self.tokens)
                } else if self.masked[s] {
                    (0, 0) // it sends nothing here
                } else if link(&topo, me, s) == Some(Tier::Rdma) {
                    let m = self.meta(s);
                    (m.counts[topo.local_of(me)], m.tokens)
                } else {
                    // Relayed by the rank of this node that forwards from `s`'s node.
                    let f = topo.rank_at(topo.node_of(me), topo.local_of(s));
                    let at = 2 * topo.node_of(s);
                    let m = self.meta(f);
                    (m.counts[at], m.counts[at + 1])
                }
            })
            .unzip()
    }

    /// Tokens each local rank of this node sends straight to each other one
    /// (`ranks_per_node x ranks_per_node`, row = sender). Only after `metas_ready`, for
    /// operations that announce counts.
    pub fn node_matrix(&self) -> Vec<u64> {
        let (topo, me) = (self.topo, self.me);
        let (node, rpn) = (topo.node_of(me), topo.ranks_per_node());
        let direct_at = 2 * topo.num_nodes();
        (0..rpn)
            .flat_map(|i| {
                let s = topo.rank_at(node, i);
                (0..rpn).map(move |j| (s, topo.rank_at(node, j)))
            })
            .map(|(s, d)| {
                if s == me {
                    self.to_rank[d]
                } else if self.masked[s] {
                    0
                } else {
                    self.meta(s).counts[direct_at + topo.local_of(d)]
                }
            })
            .collect()
    }

    /// Tokens for each of this rank's experts, from every source: what its twins sent it to
    /// forward, what each rank of its node accounts for, and its own. None when the operation
    /// counts no experts. Only after `metas_ready`.
    pub fn expert_counts_here(&self) -> Option<Vec<u64>> {
        let by_peer = self.expert_counts_by_peer()?;
        let mut total = vec![0u64; self.local_experts];
        for counts in by_peer.iter().flatten() {
            for (t, &c) in total.iter_mut().zip(counts) {
                *t += c;
            }
        }
        Some(total)
    }

    /// Per rank: the tokens for each of this rank's experts that arrive through it (from
    /// this rank itself, each twin it forwards for, and each rank of its node, whose record
    /// accounts for its own tokens and those it forwards here); None for unlinked ranks.
    /// None when the operation counts no experts. Only after `metas_ready`.
    pub fn expert_counts_by_peer(&self) -> Option<Vec<Option<Vec<u64>>>> {
        let (topo, me, l) = (self.topo, self.me, self.local_experts);
        if l == 0 {
            return None;
        }
        let widen = |v: &[u32]| v.iter().map(|&c| c as u64).collect::<Vec<u64>>();
        Some(
            (0..topo.world_size())
                .map(|p| match link(&topo, me, p) {
                    _ if p == me => Some(self.own_expert_counts(me)),
                    _ if self.masked[p] => None,
                    Some(Tier::Rdma) => Some(widen(
                        &self.meta(p).expert_counts[topo.local_of(me) * l..][..l],
                    )),
                    Some(Tier::Nvl) => Some(widen(&self.meta(p).expert_counts[..l])),
                    None => None,
                })
                .collect(),
        )
    }

    /// Tokens twin `p` sends to this rank's node (for this rank to forward).
    pub fn node_count_from(&self, p: usize) -> u64 {
        if self.masked[p] {
            return 0;
        }
        self.meta(p).node_count
    }

    /// Tokens twin `p` announced for each local rank of this node.
    pub fn twin_counts(&self, p: usize) -> &[u64] {
        if self.masked[p] {
            return &[];
        }
        &self.meta(p).counts
    }

    /// Whether this operation runs without `peer` (shrink mode).
    pub fn is_masked(&self, peer: usize) -> bool {
        self.masked[peer]
    }

    /// Goes on without `peer`, which has not started this operation: marks it masked for
    /// this operation and the ones after, and drops its links. Only before data moves.
    fn mask_peer(&mut self, peer: usize, why: &str) {
        let Some(shared) = self.mask else { return };
        if self.masked[peer] || self.metas[peer].is_some() {
            return;
        }
        // DeepEP prints the same warning when its kernels mask a rank.
        eprintln!(
            "dualcomm: rank {} masks rank {peer} in its {} ({why}); later operations run without it",
            self.me,
            self.kind.name()
        );
        shared.set(peer, true);
        self.masked[peer] = true;
        match link(&self.topo, self.me, peer) {
            Some(Tier::Nvl) => self.missing_locals -= 1,
            Some(Tier::Rdma) => self.missing_twins -= 1,
            None => {}
        }
        self.send[peer].iter_mut().for_each(SendRing::make_absent);
        self.recv[peer].iter_mut().for_each(RecvRing::make_absent);
    }

    /// Shrink mode, before data moves: masks every linked peer whose metadata is missing
    /// and that has left (`all_missing`: or that is simply late, at the deadline). Returns
    /// whether it masked any.
    fn mask_missing(&mut self, all_missing: bool) -> Result<bool> {
        if self.mask.is_none() || self.metas_ready() {
            return Ok(false);
        }
        let mut any = false;
        for p in 0..self.topo.world_size() {
            let missing = link(&self.topo, self.me, p).is_some()
                && !self.masked[p]
                && self.metas[p].is_none();
            if !missing {
                continue;
            }
            let why = match self.t.peer_gone(p) {
                Some(d) => d.reason,
                None if all_missing => format!(
                    "no word from it within the {:.1} s timeout",
                    self.timeout.as_secs_f64()
                ),
                None => continue,
            };
            self.mask_peer(p, &why);
            any = true;
        }
        if any {
            self.relay_when_ready()?;
        }
        Ok(any)
    }

    /// A linked peer whose tag differs from this rank's, and its tag.
    pub fn tag_mismatch(&self) -> Option<(usize, u64)> {
        (0..self.metas.len())
            .filter_map(|p| self.metas[p].as_ref().map(|m| (p, m.tag)))
            .find(|&(_, tag)| tag != self.tag)
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
        // Checked on every call: a peer that keeps this rank busy must not keep it forever.
        if Instant::now() >= self.deadline {
            if self.mask_missing(true)? {
                // The peers left get a full timeout for the rest of the operation.
                self.deadline = Instant::now() + self.timeout;
                return self.raise_abort();
            }
            return Err(Error::Timeout {
                what: format!("{} to complete: {}", self.kind.name(), self.describe_wait()),
                timeout: self.timeout,
            });
        }
        if block && n == 0 {
            if self.t.peer_gone(self.me).is_some() {
                return Err(Error::Destroyed); // this rank was told to leave
            }
            if self.lost_peer().is_some() {
                // A transport makes a peer's departure visible only after everything the
                // peer wrote before it left: take that in before judging (a peer that
                // completed this operation and exited at once owes nothing more).
                self.take_in(Instant::now())?;
                if self.mask_missing(false)? {
                    return self.raise_abort();
                }
                if let Some(e) = self.lost_peer() {
                    return Err(e);
                }
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
        if self.masked.get(c.src).copied().unwrap_or(false) {
            // A masked peer is not listened to: what it sent belongs to an operation the
            // ranks left ran without it.
            return Ok(());
        }
        let imm = Imm(c.imm);
        let kind = imm
            .kind()
            .ok_or_else(|| Error::protocol(c.src, format!("malformed immediate {:#x}", c.imm)))?;
        // Transports consume their control messages; one that reaches here is a fault.
        let control = || {
            Error::protocol(
                c.src,
                "a control message the transport should have consumed",
            )
        };
        if kind == ImmKind::Goodbye {
            return Err(control());
        }
        if imm.epoch() != self.epoch {
            if imm.epoch() == (self.epoch + 1) % 4 {
                // A linked peer that finished this operation can be one ahead, and can only
                // have sent its metadata of the next (its data waits for this rank's): one
                // record per link, so the stash stays bounded.
                let again = self.stash.iter().any(|s| s.src == c.src);
                if kind != ImmKind::Meta || again {
                    return Err(Error::protocol(
                        c.src,
                        "ran ahead into the next operation beyond its metadata",
                    ));
                }
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
        if self.kind == OpKind::Abort && kind != ImmKind::Meta {
            return Err(Error::protocol(
                c.src,
                "ring traffic in an operation that was aborted",
            ));
        }
        if kind == ImmKind::Meta {
            self.heard[c.src] = Some(Instant::now());
        }
        match kind {
            ImmKind::Meta => {
                self.on_meta(&c)?;
                self.relay_when_ready()
            }
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
            ImmKind::Goodbye => Err(control()),
        }
    }

    fn on_meta(&mut self, c: &Completion) -> Result<()> {
        let Some(tier) = link(&self.topo, self.me, c.src) else {
            return Err(Error::protocol(
                c.src,
                "metadata from a rank with no link here",
            ));
        };
        let bytes = self.plan.meta_bytes(tier);
        if c.len != bytes {
            return Err(Error::protocol(
                c.src,
                format!("metadata of {} bytes, expected {bytes}", c.len),
            ));
        }
        if self.metas[c.src].is_some() {
            return Err(Error::protocol(c.src, "metadata sent twice"));
        }
        let (region, offset) = self.plan.meta_slot(self.seq, c.src, tier);
        // SAFETY: the sender's own slot of this operation's parity, announced complete; the
        // sender writes it again only for the operation after next, which needs this one done.
        let raw = unsafe { self.t.local(region, offset, bytes)? };
        let meta = Meta::decode(c.src, raw)?;
        if meta.kind == OpKind::Abort {
            self.on_abort(c.src, tier, &meta)?;
        } else if self.kind != OpKind::Abort {
            self.check_same_call(c.src, &meta)?;
            self.check_counts(c.src, tier, &meta)?;
        }
        self.metas[c.src] = Some(meta);
        match tier {
            Tier::Nvl => self.missing_locals -= 1,
            Tier::Rdma => self.missing_twins -= 1,
        }
        Ok(())
    }

    /// A peer's abort: remembered for the caller (raised once all records are in) and, if
    /// it came from a twin, relayed inside the node.
    fn on_abort(&mut self, src: usize, tier: Tier, m: &Meta) -> Result<()> {
        let topo = self.topo;
        let origin = m.origin as usize;
        // A twin aborts only for itself; a rank of the node relays only for the sources it
        // forwards from (its own local index).
        let plausible = origin < topo.world_size()
            && match tier {
                Tier::Rdma => origin == src,
                Tier::Nvl => topo.local_of(origin) == topo.local_of(src),
            };
        if !plausible {
            return Err(Error::protocol(
                src,
                format!("an abort on behalf of rank {origin}, which it does not speak for"),
            ));
        }
        let note = AbortNote {
            origin,
            meant: m.tag,
            reason: m.reason.clone(),
        };
        if tier == Tier::Rdma && self.note.is_none() {
            self.note = Some(note.clone());
        }
        if self.kind != OpKind::Abort && self.aborted.is_none() {
            let meant = u32::try_from(note.meant)
                .ok()
                .and_then(OpKind::from_u32)
                .map_or("operation", OpKind::name);
            self.aborted = Some(Error::PeerAborted {
                peer: origin,
                op: self.kind.name().to_string(),
                reason: format!("it rejected its arguments to its {meant}: {}", note.reason),
            });
        }
        Ok(())
    }

    fn check_same_call(&self, src: usize, m: &Meta) -> Result<()> {
        if m.kind != self.kind {
            return Err(Error::protocol(
                src,
                format!(
                    "rank {src} runs {} while rank {} runs {}: every rank must make the same \
                     calls in the same order",
                    m.kind.name(),
                    self.me,
                    self.kind.name()
                ),
            ));
        }
        if m.record_bytes != self.record_bytes {
            return Err(Error::protocol(
                src,
                format!(
                    "rank {src} sends {}-byte token records, rank {} {}-byte ones: hidden size, \
                     dtype and top-k must agree on every rank",
                    m.record_bytes, self.me, self.record_bytes
                ),
            ));
        }
        if m.format != self.format {
            return Err(Error::protocol(
                src,
                format!(
                    "rank {src} runs its {} on {}, rank {} on {}: dtype, hidden size, scales and \
                     top-k must agree on every rank",
                    self.kind.name(),
                    m.format,
                    self.me,
                    self.format
                ),
            ));
        }
        if m.local_experts as usize != self.local_experts {
            return Err(Error::protocol(
                src,
                format!(
                    "rank {src} counts tokens for {} experts per rank, rank {} for {}:                      num_tokens_per_expert must have the same length on every rank",
                    m.local_experts, self.me, self.local_experts
                ),
            ));
        }
        Ok(())
    }

    /// Counts come from peers: each is bounded before anything is sized from it.
    fn check_counts(&self, src: usize, tier: Tier, m: &Meta) -> Result<()> {
        if self.to_rank.is_empty() {
            return Ok(()); // this operation announces no counts
        }
        let over = |what: String| Error::protocol(src, what);
        let (nn, rpn) = (self.topo.num_nodes(), self.topo.ranks_per_node());
        let want_counts = match tier {
            Tier::Rdma => rpn,
            Tier::Nvl => 2 * nn + rpn,
        };
        if m.counts.len() != want_counts {
            return Err(over(format!(
                "{} counts in its metadata, expected {want_counts}",
                m.counts.len()
            )));
        }
        // Each expert count is bounded like a token count; sums of them stay far from
        // overflow (at most `world_size` terms of at most `MAX_TOKENS`).
        let experts = match tier {
            Tier::Rdma => rpn * self.local_experts,
            Tier::Nvl => self.local_experts,
        };
        if let Some(c) = m.expert_counts[..experts.min(m.expert_counts.len())]
            .iter()
            .find(|&&c| c as u64 > MAX_TOKENS)
        {
            return Err(over(format!(
                "announced {c} tokens for one expert, above the limit of {MAX_TOKENS}"
            )));
        }
        match tier {
            Tier::Rdma => {
                if m.tokens > MAX_TOKENS {
                    return Err(over(format!(
                        "announced {} tokens, above the limit of {MAX_TOKENS}",
                        m.tokens
                    )));
                }
                if m.node_count > m.tokens {
                    return Err(over(format!(
                        "announced {} tokens for node {} out of its {}",
                        m.node_count,
                        self.topo.node_of(self.me),
                        m.tokens
                    )));
                }
                if let Some(c) = m.counts.iter().find(|&&c| c > m.node_count) {
                    return Err(over(format!(
                        "announced {c} tokens for one rank of node {} out of its {} for the node",
                        self.topo.node_of(self.me),
                        m.node_count
                    )));
                }
            }
            Tier::Nvl => {
                let (pairs, direct) = m.counts.split_at(2 * nn);
                let own_tokens = pairs[2 * self.topo.node_of(self.me) + 1];
                if let Some(c) = direct.iter().find(|&&c| c > own_tokens) {
                    return Err(over(format!(
                        "announced {c} tokens for one rank of its node out of its {own_tokens}"
                    )));
                }
                for (n, pair) in pairs.chunks_exact(2).enumerate() {
                    let (count, tokens) = (pair[0], pair[1]);
                    if tokens > MAX_TOKENS || count > tokens {
                        return Err(over(format!(
                            "relayed {count} tokens for rank {} out of {tokens} from node {n} \
                             (limit {MAX_TOKENS})",
                            self.me
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Once all records are in, a peer's abort ends this operation (on every rank).
    fn raise_abort(&mut self) -> Result<()> {
        if self.metas_ready()
            && let Some(e) = self.aborted.take()
        {
            // The buffer stays usable: this operation's writes must have left first.
            self.flush()?;
            return Err(e);
        }
        Ok(())
    }

    pub fn return_credits(&mut self) -> Result<()> {
        // Records forwarded from a ring are written on from where they landed: those writes
        // must have left before the space goes back to the sender.
        if self.recv.iter().flatten().any(RecvRing::credit_due) {
            self.t.flush(self.deadline)?;
        }
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
        link(&self.topo, self.me, peer).is_some()
            && !self.masked[peer]
            && (self.metas[peer].is_none()
                || self.send[peer]
                    .as_ref()
                    .is_some_and(SendRing::awaiting_credit)
                || self.recv[peer]
                    .as_ref()
                    .is_some_and(RecvRing::awaiting_data))
    }

    /// The error for a peer this rank still needs that has gone, if any.
    fn lost_peer(&self) -> Option<Error> {
        for p in (0..self.topo.world_size()).filter(|&p| self.needs(p)) {
            if let Some(d) = self.t.peer_gone(p) {
                if d.completed_ops.is_some_and(|n| n.near(self.seq) > self.seq) {
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
            .filter(|&p| {
                link(&self.topo, self.me, p).is_some() && !self.masked[p] && self.metas[p].is_none()
            })
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
