//! The forwarder role of combine: for every token this rank forwarded in the dispatch (and
//! its own tokens for its own node), the rows of the node's ranks that hold one are kept
//! until the last arrives, then summed in ascending local-rank order; the sum goes to this
//! rank's finisher (its own tokens) or, as one partial per token, back over rdma to the
//! token's source on another node.

use std::collections::VecDeque;

use super::finisher::{Finisher, node_pos};
use super::{Entry, Part, Shape, at_least};
use crate::error::{Error, Result};
use crate::protocol::dispatch::DispatchHandle;
use crate::protocol::op::Op;
use crate::protocol::record::{HEADER_BYTES, Header, Layout};
use crate::protocol::reduce::{Dtype, add_into, store};
use crate::protocol::sources::Source;
use crate::routing::SendPlan;
use crate::topology::{LocalMask, Topology};
use crate::transport::{Sge, Tier, TierCounters};

pub(super) struct Reducer {
    entries: Vec<Entry>,
    first_row: Vec<usize>,
    present: Vec<LocalMask>,
    /// Rows staged until a token's last one arrives (reused memory).
    pub rows: Vec<u8>,
    shape: Shape,
    /// The sum of the entry `add` just completed (rows, then weights).
    acc: Vec<f32>,
    /// Partials for sources on other nodes, waiting for ring credit: per source rank a queue
    /// of (token index, entry); the partial itself sits in `bodies` at its entry's slot.
    queues: Vec<VecDeque<(u32, usize)>>,
    pub bodies: Vec<u8>,
    body_bytes: usize,
    /// Partials each source on another node is still owed.
    pending: Vec<usize>,
}

impl Reducer {
    /// `rows` and `bodies` are reused staging memory.
    pub fn new(
        handle: &DispatchHandle,
        topo: &Topology,
        me: usize,
        shape: Shape,
        rows: Vec<u8>,
        bodies: Vec<u8>,
    ) -> Self {
        let plan = &handle.plan;
        let my_node = topo.node_of(me);
        let mut entries: Vec<Entry> = handle
            .forwarded
            .iter()
            .map(|f| Entry {
                src: f.src,
                idx: f.idx,
                mask: f.mask,
            })
            .collect();
        entries.extend((0..plan.num_tokens()).filter_map(|tok| {
            let mask = plan.mask(tok, my_node);
            (mask != 0).then_some(Entry {
                src: me as u32,
                idx: tok as u32,
                mask,
            })
        }));
        entries.sort_unstable_by_key(|e| (e.src, e.idx));
        let mut first_row = Vec::with_capacity(entries.len());
        let mut rows_total = 0;
        for e in &entries {
            first_row.push(rows_total);
            // A token with one local row needs no staging: its row is its sum.
            if e.mask.count_ones() > 1 {
                rows_total += e.mask.count_ones() as usize;
            }
        }
        // A partial travels as one record: header, row, weights, laid out where it is summed.
        let body_bytes = HEADER_BYTES + shape.row_bytes() + shape.k * 4;
        let mut pending = vec![0usize; topo.world_size()];
        for e in &entries {
            pending[e.src as usize] += 1;
        }
        Self {
            present: vec![0; entries.len()],
            rows: at_least(rows, rows_total * (shape.row_bytes() + shape.k * 4)),
            bodies: at_least(bodies, entries.len() * body_bytes),
            first_row,
            shape,
            acc: vec![0.0; shape.width()],
            queues: vec![VecDeque::new(); topo.world_size()],
            body_bytes,
            pending,
            entries,
        }
    }

    /// Tells each ring of the node how many rows it carries: one per token whose mask has
    /// the sender's bit.
    pub fn expect(&self, op: &mut Op<'_>) {
        let (topo, me) = (op.topo, op.me);
        let my_node = topo.node_of(me);
        for l in (0..topo.ranks_per_node()).filter(|&l| l != topo.local_of(me)) {
            let d = topo.rank_at(my_node, l);
            let rows = self
                .entries
                .iter()
                .filter(|e| e.mask & (1 << l) != 0)
                .count();
            op.recv_ring(d).expected = Some(rows as u64);
        }
    }

    /// Takes in the rows the node's ranks sent.
    pub fn drain(
        &mut self,
        op: &mut Op<'_>,
        layout: &Layout,
        fin: &mut Finisher<'_>,
        plan: &SendPlan,
    ) -> Result<bool> {
        let (t, topo, me) = (op.t, op.topo, op.me);
        let my_node = topo.node_of(me);
        let mut progress = false;
        for l in (0..topo.ranks_per_node()).filter(|&l| l != topo.local_of(me)) {
            let d = topo.rank_at(my_node, l);
            let ring = op.recv_ring(d);
            let avail = ring.available();
            for i in 0..avail {
                let rec = ring.record(t, i)?;
                let h = Header::decode(rec);
                let secs = layout.split(rec);
                if let Some(done) = self.add(d, l, &h, secs[0], secs[1])? {
                    self.route(done, me, my_node, fin, plan)?;
                }
            }
            ring.consume(avail);
            progress |= avail > 0;
        }
        Ok(progress)
    }

    /// The partials' memory, to be registered (it is not resized while the operation runs).
    pub fn partials_memory(&self) -> (*const u8, usize) {
        (self.bodies.as_ptr(), self.bodies.len())
    }

    /// Sends finished partials to their sources on other nodes, as credits allow; each goes
    /// from where it was summed (`partials`: the registered `partials_memory`).
    pub fn post_partials(
        &mut self,
        op: &mut Op<'_>,
        partials: Source,
        payload: &TierCounters,
    ) -> Result<bool> {
        let (t, epoch, topo, me) = (op.t, op.epoch, op.topo, op.me);
        let rb = self.shape.row_bytes();
        let mut progress = false;
        for n in (0..topo.num_nodes()).filter(|&n| n != topo.node_of(me)) {
            let s = topo.forwarder(me, n);
            let ring = op.send_ring(s);
            let queue = &mut self.queues[s];
            let m = (ring.free() as usize).min(queue.len());
            if m > 0 {
                let bb = self.body_bytes;
                let sges: Vec<Sge> = queue
                    .drain(..m)
                    .map(|(_, e)| partials.piece(e, bb))
                    .collect();
                ring.post(t, epoch, &sges, 1)?;
                payload.add(Tier::Rdma, m * rb);
                self.pending[s] -= m;
                progress = true;
            }
            if self.pending[s] == 0 {
                ring.closed = true;
            }
        }
        Ok(progress)
    }

    /// Hands the sum `add` just completed on: to this rank's own finisher, or to the queue
    /// for its source on another node.
    pub fn route(
        &mut self,
        e: Entry,
        me: usize,
        my_node: usize,
        fin: &mut Finisher<'_>,
        plan: &SendPlan,
    ) -> Result<()> {
        if e.src as usize == me {
            let tok = e.idx as usize;
            return fin.put(me, tok, node_pos(plan, tok, my_node), Part::Own(&self.acc));
        }
        let shape = self.shape;
        let rb = shape.row_bytes();
        let slot = self.index_of(&e);
        let bb = self.body_bytes;
        let record = &mut self.bodies[slot * bb..(slot + 1) * bb];
        let header = Header {
            src_rank: e.src,
            src_idx: e.idx,
            mask: 0,
        };
        record[..HEADER_BYTES].copy_from_slice(&header.encode());
        let body = &mut record[HEADER_BYTES..];
        store(&self.acc[..shape.hidden], &mut body[..rb], shape.dtype);
        body[rb..].copy_from_slice(bytemuck::cast_slice(&self.acc[shape.hidden..]));
        self.queues[e.src as usize].push_back((e.idx, slot));
        Ok(())
    }

    fn index_of(&self, e: &Entry) -> usize {
        self.entries
            .binary_search_by_key(&(e.src, e.idx), |x| (x.src, x.idx))
            .expect("entry exists")
    }

    /// Takes local rank `l`'s row for `h`'s token. When it is the last one, sums all rows
    /// (ascending local rank) into `acc` and returns the entry.
    pub fn add(
        &mut self,
        via: usize,
        l: usize,
        h: &Header,
        row: &[u8],
        weights: &[u8],
    ) -> Result<Option<Entry>> {
        let e = self
            .entries
            .binary_search_by_key(&(h.src_rank, h.src_idx), |e| (e.src, e.idx))
            .map_err(|_| {
                Error::protocol(
                    via,
                    format!(
                        "row for token {} of rank {}, which this rank did not forward",
                        h.src_idx, h.src_rank
                    ),
                )
            })?;
        let entry = self.entries[e];
        let bit: LocalMask = 1 << l;
        if entry.mask & bit == 0 || self.present[e] & bit != 0 {
            return Err(Error::protocol(
                via,
                format!(
                    "unexpected or repeated row for token {} of rank {}",
                    h.src_idx, h.src_rank
                ),
            ));
        }
        self.present[e] |= bit;
        let rb = self.shape.row_bytes();
        let cb = rb + self.shape.k * 4;
        let first = self.first_row[e];
        let slot = |b: LocalMask| first + (entry.mask & (b - 1)).count_ones() as usize;
        if self.present[e] != entry.mask {
            let at = slot(bit) * cb;
            self.rows[at..at + rb].copy_from_slice(row);
            self.rows[at + rb..at + cb].copy_from_slice(weights);
            return Ok(None);
        }
        let hidden = self.shape.hidden;
        self.acc.fill(0.0);
        let mut m = entry.mask;
        while m != 0 {
            let b = m & m.wrapping_neg();
            m &= m - 1;
            let (r, w) = if b == bit {
                (row, weights)
            } else {
                let at = slot(b) * cb;
                (&self.rows[at..at + rb], &self.rows[at + rb..at + cb])
            };
            add_into(&mut self.acc[..hidden], r, self.shape.dtype);
            add_into(&mut self.acc[hidden..], w, Dtype::F32);
        }
        Ok(Some(entry))
    }
}
