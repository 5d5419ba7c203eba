//! The forwarder role of combine: for every token this rank forwarded in the dispatch (and
//! its own tokens), in (source, index) order, the rows of the node's ranks that hold one
//! are summed in ascending local-rank order straight from the receive rings (this rank's
//! own row from its rows). The sum goes to this rank's finisher (its own tokens) or, as
//! one partial per token, back over rdma to the token's source on another node.
//!
//! A partial that is this rank's own row alone is not summed: the row goes out as it is,
//! from the caller's memory, one pass over its bytes fewer. The source adds every partial
//! to zero (see `finisher`), so the bits are those of the row summed here. Such partials
//! need nothing from any ring, so they are ready from the start: they leave as credits
//! allow while this rank finishes its own tokens, instead of waiting behind them (each
//! source's partials still leave in its token order, the order it finishes them in).
//! Sending something earlier never holds anything up, so the order argument of `combine`
//! stands.

use super::destination::{RowSources, Rows};
use super::finisher::Finisher;
use super::{Entry, Shape, at_least};
use crate::error::{Error, Result};
use crate::protocol::dispatch::DispatchHandle;
use crate::protocol::op::Op;
use crate::protocol::record::{HEADER_BYTES, Header};
use crate::protocol::reduce::{Dtype, sum_terms};
use crate::protocol::sources::Source;
use crate::routing::SendPlan;
use crate::topology::{LocalMask, Topology};
use crate::transport::{Sge, Tier, TierCounters};

/// A token's rows on this node, in ascending local rank: row bytes and top-k weights.
#[derive(Default)]
pub(super) struct LocalRows<'t> {
    pub x: Vec<&'t [u8]>,
    pub weights: Vec<&'t [u8]>,
}

impl<'t> LocalRows<'t> {
    fn push(&mut self, row: &'t [u8], weights: &'t [u8]) {
        self.x.push(row);
        self.weights.push(weights);
    }
}

/// Where an entry's partial (for a source on another node) stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Partial {
    /// Not summed yet (and so not ready to leave).
    Pending,
    /// Summed in `bodies` at the entry's slot, ready to leave from there.
    Summed,
    /// This rank's own row `j` alone: ready from the start, it leaves from the caller's
    /// rows (its header sits in `bodies` at the entry's slot).
    Row(usize),
}

/// Tokens summed per call of [`Reducer::advance`], so that partials leave and ring space
/// goes back while a long run of ready tokens is summed.
const BATCH: usize = 64;

pub(super) struct Reducer {
    /// Sorted by (source, index); this rank's own tokens are the ones that went to any node.
    entries: Vec<Entry>,
    /// The first entry not summed yet.
    next: usize,
    topo: Topology,
    me: usize,
    shape: Shape,
    /// Per entry, its partial.
    partials: Vec<Partial>,
    /// Per source rank, its entries (`[lo, hi)`: they are sorted by source) and the first
    /// whose partial has not left yet.
    span: Vec<(usize, usize)>,
    posted: Vec<usize>,
    pub bodies: Vec<u8>,
    body_bytes: usize,
}

impl Reducer {
    /// `own_rows` are the rows this rank received that it reduces itself, in (source,
    /// index) order; `bodies` is reused memory for the partials.
    pub fn new(
        handle: &DispatchHandle,
        topo: &Topology,
        me: usize,
        shape: Shape,
        own_rows: Vec<usize>,
        bodies: Vec<u8>,
    ) -> Result<Self> {
        let plan = &handle.plan;
        let my_node = topo.node_of(me);
        let mut entries: Vec<Entry> = handle
            .forwarded
            .iter()
            .map(|f| Entry {
                src: f.src,
                idx: f.idx,
                mask: f.mask,
                own_row: usize::MAX,
            })
            .collect();
        // Every own token that went anywhere is finished in this order too, even one with no
        // row on this node (its entry then only collects the other nodes' partials).
        entries.extend(
            (0..plan.num_tokens())
                .filter(|&tok| (0..topo.num_nodes()).any(|n| plan.mask(tok, n) != 0))
                .map(|tok| Entry {
                    src: me as u32,
                    idx: tok as u32,
                    mask: plan.mask(tok, my_node),
                    own_row: usize::MAX,
                }),
        );
        entries.sort_unstable_by_key(|e| (e.src, e.idx));
        Self::place_own_rows(&mut entries, handle, topo, me, &own_rows)?;
        // A partial travels as one record: header, row, weights, laid out where it is summed.
        let body_bytes = HEADER_BYTES + shape.row_bytes() + shape.k * 4;
        let span: Vec<(usize, usize)> = (0..topo.world_size() as u32)
            .map(|s| {
                let lo = entries.partition_point(|e| e.src < s);
                (lo, entries.partition_point(|e| e.src <= s))
            })
            .collect();
        let mut red = Self {
            bodies: at_least(bodies, entries.len() * body_bytes),
            next: 0,
            topo: *topo,
            me,
            shape,
            partials: vec![Partial::Pending; entries.len()],
            posted: span.iter().map(|&(lo, _)| lo).collect(),
            span,
            body_bytes,
            entries,
        };
        let own_bit: LocalMask = 1 << topo.local_of(me);
        for slot in 0..red.entries.len() {
            let e = red.entries[slot];
            if e.src as usize != me && e.mask == own_bit {
                red.take_own_row(&e, slot);
            }
        }
        Ok(red)
    }

    /// Points each entry with this rank's bit at the row this rank received for it: the two
    /// lists are both in (source, index) order and must pair up one to one.
    fn place_own_rows(
        entries: &mut [Entry],
        handle: &DispatchHandle,
        topo: &Topology,
        me: usize,
        own_rows: &[usize],
    ) -> Result<()> {
        let bit: LocalMask = 1 << topo.local_of(me);
        let mut rows = own_rows.iter();
        for e in entries.iter_mut().filter(|e| e.mask & bit != 0) {
            let j = *rows.next().ok_or_else(|| {
                Error::internal(
                    me,
                    format!(
                        "no received row for token {} of rank {}, which this rank forwarded to \
                     itself",
                        e.idx, e.src
                    ),
                )
            })?;
            let key = (handle.recv_src_rank[j], handle.recv_src_idx[j]);
            if key != (e.src, e.idx) {
                return Err(Error::internal(
                    me,
                    format!(
                        "received row {j} is token {} of rank {}, which this rank did not forward \
                     to itself",
                        key.1, key.0
                    ),
                ));
            }
            e.own_row = j;
        }
        match rows.next() {
            Some(&j) => Err(Error::internal(
                me,
                format!(
                    "received row {j} (token {} of rank {}), which this rank did not forward",
                    handle.recv_src_idx[j], handle.recv_src_rank[j]
                ),
            )),
            None => Ok(()),
        }
    }

    /// Tells each ring of the node how many rows it carries: one per token whose mask has
    /// the sender's bit.
    pub fn expect(&self, op: &mut Op<'_>) {
        let (topo, me) = (self.topo, self.me);
        let my_node = topo.node_of(me);
        for l in (0..topo.ranks_per_node()).filter(|&l| l != topo.local_of(me)) {
            let d = topo.rank_at(my_node, l);
            let rows = self
                .entries
                .iter()
                .filter(|e| e.mask & (1 << l) != 0)
                .count();
            op.recv_ring(d).set_expected(rows as u64);
        }
    }

    pub fn finished(&self) -> bool {
        self.next == self.entries.len()
    }

    /// Sums the next tokens whose records are all in, as far as they go (at most a batch).
    pub fn advance<'t>(
        &mut self,
        op: &mut Op<'t>,
        rows: &Rows<'t>,
        fin: &mut Finisher<'_>,
        plan: &SendPlan,
    ) -> Result<bool> {
        let start = self.next;
        while let Some(&e) = self.entries.get(self.next) {
            if self.partials[self.next] != Partial::Pending {
                self.next += 1; // a partial that is a row, ready since the start
                continue;
            }
            let own = e.src as usize == self.me;
            if self.next - start == BATCH
                || !self.rows_ready(op, &e)
                || (own && !fin.partials_ready(op, plan, e.idx as usize))
            {
                break;
            }
            let local = self.take_rows(op, &e, rows)?;
            if own {
                fin.finish(op, plan, e.idx as usize, &local)?;
            } else {
                self.write_partial(&e, self.next, &local);
            }
            self.next += 1;
        }
        Ok(self.next > start)
    }

    /// Whether every other local rank that holds a row of `e` has its record at the head of
    /// its ring (earlier tokens are consumed, so the head can only be this token's).
    fn rows_ready(&self, op: &mut Op<'_>, e: &Entry) -> bool {
        let (topo, me) = (self.topo, self.me);
        let mut m = e.mask & !(1 << topo.local_of(me));
        while m != 0 {
            let l = m.trailing_zeros() as usize;
            m &= m - 1;
            if op.recv_ring(topo.rank_at(topo.node_of(me), l)).available() == 0 {
                return false;
            }
        }
        true
    }

    /// `e`'s rows in ascending local rank, the order they are summed in: this rank's own
    /// from its rows, the others' from the heads of their rings (consumed; their space goes
    /// back only in `return_credits`, after the sum).
    fn take_rows<'t>(&self, op: &mut Op<'t>, e: &Entry, rows: &Rows<'t>) -> Result<LocalRows<'t>> {
        let (topo, me, t) = (self.topo, self.me, op.t);
        let (rb, k) = (self.shape.row_bytes(), self.shape.k);
        let mut local = LocalRows::default();
        let mut m = e.mask;
        while m != 0 {
            let l = m.trailing_zeros() as usize;
            m &= m - 1;
            let d = topo.rank_at(topo.node_of(me), l);
            if d == me {
                let [row, w] = rows.row(e.own_row);
                local.push(row, w);
                continue;
            }
            let ring = op.recv_ring(d);
            let rec = ring.record(t, 0)?;
            let h = Header::decode(rec);
            if (h.src_rank, h.src_idx) != (e.src, e.idx) {
                return Err(self.misplaced(d, l, &h, e));
            }
            let body = &rec[HEADER_BYTES..];
            local.push(&body[..rb], &body[rb..rb + k * 4]);
            ring.consume(1);
        }
        Ok(local)
    }

    /// The error for a row from local rank `l` (rank `via`) that is not `due`'s.
    fn misplaced(&self, via: usize, l: usize, h: &Header, due: &Entry) -> Error {
        let what = format!("row for token {} of rank {}", h.src_idx, h.src_rank);
        let found = self
            .entries
            .binary_search_by_key(&(h.src_rank, h.src_idx), |x| (x.src, x.idx));
        let why = match found {
            Err(_) => "which this rank did not forward".to_string(),
            Ok(i) if self.entries[i].mask & (1 << l) == 0 => {
                format!("which rank {via} never received from this rank")
            }
            Ok(i) if i < self.next => "a second time".to_string(),
            Ok(_) => format!(
                "before the one for token {} of rank {}: rows come in (source, index) order",
                due.idx, due.src
            ),
        };
        Error::protocol(via, format!("{what}, {why}"))
    }

    /// Sums `local` as the partial of entry `slot`, where it is sent from.
    fn write_partial(&mut self, e: &Entry, slot: usize, local: &LocalRows<'_>) {
        let shape = self.shape;
        let rb = shape.row_bytes();
        let bb = self.body_bytes;
        let record = &mut self.bodies[slot * bb..(slot + 1) * bb];
        let header = Header {
            src_rank: e.src,
            src_idx: e.idx,
            mask: 0,
        };
        record[..HEADER_BYTES].copy_from_slice(&header.encode());
        let (row, weights) = record[HEADER_BYTES..].split_at_mut(rb);
        sum_terms(row, shape.dtype, &local.x, shape.dtype);
        sum_terms(weights, Dtype::F32, &local.weights, Dtype::F32);
        self.partials[slot] = Partial::Summed;
    }

    /// Readies the partial of entry `slot`, which is this rank's own row alone: its header
    /// is written where the partial would be summed, the row and weights go from the
    /// caller's.
    fn take_own_row(&mut self, e: &Entry, slot: usize) {
        let bb = self.body_bytes;
        let header = Header {
            src_rank: e.src,
            src_idx: e.idx,
            mask: 0,
        };
        self.bodies[slot * bb..slot * bb + HEADER_BYTES].copy_from_slice(&header.encode());
        self.partials[slot] = Partial::Row(e.own_row);
    }

    /// The partials' memory, to be registered (it is not resized while the operation runs).
    pub fn partials_memory(&self) -> (*const u8, usize) {
        (self.bodies.as_ptr(), self.bodies.len())
    }

    /// Sends finished partials to their sources on other nodes, as credits allow; each goes
    /// from where it was summed (`partials`: the registered `partials_memory`), or from the
    /// caller's rows (`own`) where it is one of them.
    pub fn post_partials(
        &mut self,
        op: &mut Op<'_>,
        partials: Source,
        rows: &Rows<'_>,
        own: &RowSources,
        payload: &TierCounters,
    ) -> Result<bool> {
        let (t, epoch, topo, me) = (op.t, op.epoch, self.topo, self.me);
        let rb = self.shape.row_bytes();
        let mut progress = false;
        for n in (0..topo.num_nodes()).filter(|&n| n != topo.node_of(me)) {
            let s = topo.forwarder(me, n);
            let ring = op.send_ring(s);
            let (from, hi) = (self.posted[s], self.span[s].1);
            // The ready partials at the front of this source's, in its token order.
            let room = ring.free() as usize;
            let to = from
                + self.partials[from..hi]
                    .iter()
                    .take(room)
                    .take_while(|&&p| p != Partial::Pending)
                    .count();
            if to > from {
                let (bb, wb) = (self.body_bytes, self.shape.k * 4);
                let partials_of = &self.partials;
                let sges: Vec<Sge> = (from..to)
                    .flat_map(|e| {
                        let at = e * bb;
                        let header = partials.at(at, HEADER_BYTES);
                        match partials_of[e] {
                            Partial::Pending | Partial::Summed => [
                                header,
                                partials.at(at + HEADER_BYTES, rb),
                                partials.at(at + HEADER_BYTES + rb, wb),
                            ],
                            Partial::Row(j) => [
                                header,
                                own.x.piece(rows.index(j), rb),
                                own.weights.piece(rows.index(j), wb),
                            ],
                        }
                    })
                    .collect();
                ring.post(t, epoch, &sges, 3)?;
                payload.add(Tier::Rdma, (to - from) * rb);
                self.posted[s] = to;
                progress = true;
            }
            if self.posted[s] == hi {
                ring.closed = true;
            }
        }
        Ok(progress)
    }
}
