//! Combine, the mirror of dispatch: each rank sends every row it received back to the
//! forwarder of its node that served the row's source (nvl); the forwarder sums the rows of
//! one token over its local ranks and sends one partial per token over rdma; the source sums
//! the partials over nodes.
//!
//! Contributions and partials are staged on arrival and summed only once all are there,
//! always in ascending local-rank order and then ascending node order. That makes the
//! result bitwise reproducible whatever the arrival order, and it means rings always drain,
//! so no ring can wait on another one (no deadlock for any ring size).

use std::collections::VecDeque;

use super::dispatch::DispatchHandle;
use super::op::{Announce, Op, OpKind, Session};
use super::record::{ElemType, HEADER_BYTES, Header, Layout, RecordFormat};
use super::reduce::{Dtype, add_into, read_f32s, store};
use crate::error::{Error, Result};
use crate::topology::LocalMask;
use crate::transport::{Tier, TierCounters};

pub struct CombineArgs<'a> {
    /// `[num_recv, hidden]` rows in `dtype`, in the order dispatch delivered them.
    pub x: &'a [u8],
    pub hidden: usize,
    pub dtype: Dtype,
    /// `[num_recv, num_topk]`, summed alongside the rows.
    pub weights: Option<&'a [f32]>,
    pub num_topk: usize,
    /// The dtype of the result (fp32 keeps the full-precision sum).
    pub out_dtype: Dtype,
}

/// Where combine writes: `[num_tokens, hidden]` in `out_dtype`, and `[num_tokens,
/// num_topk]` weights (empty without weights). Every element is written.
pub struct CombineOut<'a> {
    pub x: &'a mut [u8],
    pub weights: &'a mut [f32],
}

/// Staging memory kept by the endpoint between combines, so that steady-state training
/// steps neither fault in fresh pages nor zero them (every byte is written before it is read).
#[derive(Debug, Default)]
pub struct Scratch {
    rows: Vec<u8>,
    parts: Vec<f32>,
    bodies: Vec<u8>,
}

/// `v` with at least `n` elements, reusing its memory; old contents stay (callers overwrite).
fn at_least<T: Copy + Default>(mut v: Vec<T>, n: usize) -> Vec<T> {
    if v.len() < n {
        v.resize(n, T::default());
    }
    v
}

/// One token this rank reduces for its node: (source, index, local ranks that hold a row).
#[derive(Clone, Copy)]
struct Entry {
    src: u32,
    idx: u32,
    mask: LocalMask,
}

/// Row geometry of one combine.
#[derive(Clone, Copy)]
struct Shape {
    hidden: usize,
    k: usize,
    dtype: Dtype,
}

impl Shape {
    fn row_bytes(&self) -> usize {
        self.hidden * self.dtype.size()
    }

    fn width(&self) -> usize {
        self.hidden + self.k
    }
}

/// Forwarder side: the rows of each token are kept until the last one arrives; that one
/// is summed in place, straight from the ring.
struct Reducer {
    entries: Vec<Entry>,
    first_row: Vec<usize>,
    present: Vec<LocalMask>,
    rows: Vec<u8>,
    shape: Shape,
    /// The sum of the entry `add` just completed (rows, then weights).
    acc: Vec<f32>,
}

/// Source side: each token's partial sums per destination node. A token that went to one
/// node is written out directly; others wait until every node's partial is in.
struct Finisher<'o> {
    first_part: Vec<usize>,
    need: Vec<u32>,
    have: Vec<u32>,
    seen: Vec<bool>,
    parts: Vec<f32>,
    shape: Shape,
    out_dtype: Dtype,
    out_x: &'o mut [u8],
    out_w: &'o mut [f32],
    done: usize,
    acc: Vec<f32>,
}

/// Partials for sources on other nodes, waiting for ring credit: per source rank a queue of
/// (token index, entry); the partial itself sits in `bodies` at its entry's slot.
struct Outgoing {
    queues: Vec<VecDeque<(u32, usize)>>,
    bodies: Vec<u8>,
    body_bytes: usize,
}

impl Outgoing {
    fn body(&self, entry: usize) -> &[u8] {
        &self.bodies[entry * self.body_bytes..(entry + 1) * self.body_bytes]
    }
}

/// A partial sum as it reaches the finisher.
enum Part<'a> {
    /// This node's own partial, still in fp32.
    Own(&'a [f32]),
    /// Another node's partial: rows in the combine dtype, weights in fp32.
    Wire(&'a [u8], &'a [u8]),
}

pub(crate) fn run(
    session: Session<'_>,
    endpoint_id: u64,
    payload: &TierCounters,
    args: &CombineArgs<'_>,
    handle: &DispatchHandle,
    scratch: &mut Scratch,
    out: CombineOut<'_>,
) -> Result<()> {
    let topo = session.topo;
    let me = session.transport.rank();
    let (nn, rpn, my_node) = (topo.num_nodes(), topo.ranks_per_node(), topo.node_of(me));
    let plan = &handle.plan;
    let n_tok = plan.num_tokens();
    let k = if args.weights.is_some() {
        args.num_topk
    } else {
        0
    };

    if handle.endpoint_id != endpoint_id {
        return Err(Error::invalid(
            "handle",
            "a handle made by this buffer",
            "a handle from another buffer",
        ));
    }
    let rb = args.hidden * args.dtype.size();
    if args.x.len() != handle.num_recv * rb {
        return Err(Error::invalid(
            "x",
            format!(
                "{} rows (as many as the handle's dispatch delivered to this rank)",
                handle.num_recv
            ),
            format!("{} rows", args.x.len() / rb.max(1)),
        ));
    }
    if let Some(w) = args.weights
        && w.len() != handle.num_recv * k
    {
        return Err(Error::invalid(
            "topk_weights",
            format!("{} x {k} values", handle.num_recv),
            w.len(),
        ));
    }
    let shape = Shape {
        hidden: args.hidden,
        k,
        dtype: args.dtype,
    };
    let out_rb = args.hidden * args.out_dtype.size();
    if out.x.len() != n_tok * out_rb || out.weights.len() != n_tok * k {
        return Err(Error::invalid(
            "combine output",
            format!("{n_tok} rows of {out_rb} bytes and {n_tok} x {k} weights"),
            format!("{} bytes and {} weights", out.x.len(), out.weights.len()),
        ));
    }
    let layout = Layout::new(&[rb, k * 4]);
    let w_bytes: &[u8] = args.weights.map(bytemuck::cast_slice).unwrap_or(&[]);
    let my_row = |j: usize| -> [&[u8]; 2] {
        [
            &args.x[j * rb..(j + 1) * rb],
            &w_bytes[j * k * 4..(j + 1) * k * 4],
        ]
    };

    // Forwarder side: the tokens whose rows this rank sums for its node.
    let mut entries: Vec<Entry> = handle
        .forwarded
        .iter()
        .map(|f| Entry {
            src: f.src,
            idx: f.idx,
            mask: f.mask,
        })
        .collect();
    entries.extend((0..n_tok).filter_map(|tok| {
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
    let mut red = Reducer {
        present: vec![0; entries.len()],
        rows: at_least(std::mem::take(&mut scratch.rows), rows_total * (rb + k * 4)),
        entries,
        first_row,
        shape,
        acc: vec![0.0; shape.width()],
    };
    let body_bytes = rb + k * 4;
    let mut outgoing = Outgoing {
        queues: vec![VecDeque::new(); topo.world_size()],
        bodies: at_least(
            std::mem::take(&mut scratch.bodies),
            red.entries.len() * body_bytes,
        ),
        body_bytes,
    };
    let mut pending_per_src = vec![0usize; topo.world_size()];
    for e in &red.entries {
        pending_per_src[e.src as usize] += 1;
    }

    // Source side.
    let mut first_part = Vec::with_capacity(n_tok);
    let mut need = Vec::with_capacity(n_tok);
    let mut staged = 0;
    for tok in 0..n_tok {
        first_part.push(staged);
        let nodes = (0..nn).filter(|&n| plan.mask(tok, n) != 0).count();
        need.push(nodes as u32);
        // Single-node tokens skip the staging area.
        if nodes > 1 {
            staged += nodes;
        }
    }
    // Tokens that went nowhere are finished from the start: zeros.
    let done = need.iter().filter(|&&n| n == 0).count();
    for tok in (0..n_tok).filter(|&t| need[t] == 0) {
        out.x[tok * out_rb..(tok + 1) * out_rb].fill(0);
        out.weights[tok * k..(tok + 1) * k].fill(0.0);
    }
    let mut fin = Finisher {
        first_part,
        need,
        have: vec![0; n_tok],
        seen: vec![false; staged],
        parts: at_least(std::mem::take(&mut scratch.parts), staged * shape.width()),
        shape,
        out_dtype: args.out_dtype,
        out_x: out.x,
        out_w: out.weights,
        done,
        acc: vec![0.0; shape.width()],
    };

    // Destination side: this rank's rows, grouped by the forwarder that reduces them.
    let mut to_forwarder: Vec<Vec<usize>> = vec![Vec::new(); rpn];
    for j in 0..handle.num_recv {
        let f = topo.forwarder(handle.recv_src_rank[j] as usize, my_node);
        to_forwarder[topo.local_of(f)].push(j);
    }
    let mut sent_to = vec![0usize; rpn];

    let format = RecordFormat {
        dtype: match args.dtype {
            Dtype::Bf16 => ElemType::Bf16,
            Dtype::F32 => ElemType::F32,
        },
        hidden: u32::try_from(args.hidden)
            .map_err(|_| Error::invalid("x", "a hidden size below 2^32", args.hidden))?,
        scale_cols: 0,
        topk: k as u32,
    };
    let mut op = Op::begin(
        session,
        OpKind::Combine,
        format,
        layout.record_bytes(),
        Announce {
            tag: handle.tag,
            ..Announce::default()
        },
    )?;
    let (t, epoch) = (op.t, op.epoch);
    for l in (0..rpn).filter(|&l| l != topo.local_of(me)) {
        let d = topo.rank_at(my_node, l);
        let rows = red
            .entries
            .iter()
            .filter(|e| e.mask & (1 << l) != 0)
            .count();
        op.recv_ring(d).expected = Some(rows as u64);
    }
    for n in (0..nn).filter(|&n| n != my_node) {
        let p = topo.forwarder(me, n);
        op.recv_ring(p).expected = Some(plan.count_to_node()[n]);
    }

    let mut started = false;
    loop {
        let mut progress = false;
        if !started && op.metas_ready() {
            if let Some((p, tag)) = op.tag_mismatch() {
                return Err(Error::protocol(
                    p,
                    format!(
                        "rank {p} combines with the handle of operation #{}, rank {me} with \
                         #{}: every rank must pass the handle of the same dispatch",
                        tag, handle.tag
                    ),
                ));
            }
            started = true;
            progress = true;
            // Rows whose reducer is this rank itself.
            let own = std::mem::take(&mut to_forwarder[topo.local_of(me)]);
            for j in own {
                let h = Header {
                    src_rank: handle.recv_src_rank[j],
                    src_idx: handle.recv_src_idx[j],
                    mask: 0,
                };
                let [row, w] = my_row(j);
                if let Some(done) = red.add(me, topo.local_of(me), &h, row, w)? {
                    route_partial(done, &red, me, my_node, &mut fin, &mut outgoing, plan)?;
                }
            }
        }
        if !started {
            op.pump(true)?;
            continue;
        }

        // Destination side: rows to the local forwarders.
        for l in (0..rpn).filter(|&l| l != topo.local_of(me)) {
            let f = topo.rank_at(my_node, l);
            let ring = op.send_ring(f);
            let list = &to_forwarder[l];
            let n = (ring.free() as usize).min(list.len() - sent_to[l]);
            if n > 0 {
                let batch = &list[sent_to[l]..sent_to[l] + n];
                let headers: Vec<[u8; HEADER_BYTES]> = batch
                    .iter()
                    .map(|&j| {
                        Header {
                            src_rank: handle.recv_src_rank[j],
                            src_idx: handle.recv_src_idx[j],
                            mask: 0,
                        }
                        .encode()
                    })
                    .collect();
                let mut segs: Vec<&[u8]> = Vec::with_capacity(3 * n);
                for (hdr, &j) in headers.iter().zip(batch) {
                    segs.push(hdr);
                    segs.extend(my_row(j));
                }
                ring.post(t, epoch, &segs, 3)?;
                payload.add(Tier::Nvl, n * rb);
                sent_to[l] += n;
                progress = true;
            }
            if sent_to[l] == list.len() {
                ring.closed = true;
            }
        }

        // Forwarder side: rows from local ranks.
        for l in (0..rpn).filter(|&l| l != topo.local_of(me)) {
            let d = topo.rank_at(my_node, l);
            let ring = op.recv_ring(d);
            let avail = ring.available();
            for i in 0..avail {
                let rec = ring.record(t, i)?;
                let h = Header::decode(rec);
                let secs = layout.split(rec);
                if let Some(done) = red.add(d, l, &h, secs[0], secs[1])? {
                    route_partial(done, &red, me, my_node, &mut fin, &mut outgoing, plan)?;
                }
            }
            ring.consume(avail);
            progress |= avail > 0;
        }
        // Forwarder side: finished partials to their sources on other nodes.
        for n in (0..nn).filter(|&n| n != my_node) {
            let s = topo.forwarder(me, n);
            let ring = op.send_ring(s);
            let queue = &mut outgoing.queues[s];
            let m = (ring.free() as usize).min(queue.len());
            if m > 0 {
                let batch: Vec<(u32, usize)> = queue.drain(..m).collect();
                let headers: Vec<[u8; HEADER_BYTES]> = batch
                    .iter()
                    .map(|(idx, _)| {
                        Header {
                            src_rank: s as u32,
                            src_idx: *idx,
                            mask: 0,
                        }
                        .encode()
                    })
                    .collect();
                let mut segs: Vec<&[u8]> = Vec::with_capacity(2 * m);
                for (hdr, &(_, e)) in headers.iter().zip(&batch) {
                    segs.push(hdr);
                    segs.push(outgoing.body(e));
                }
                ring.post(t, epoch, &segs, 2)?;
                payload.add(Tier::Rdma, m * rb);
                pending_per_src[s] -= m;
                progress = true;
            }
            if pending_per_src[s] == 0 {
                ring.closed = true;
            }
        }
        // Source side: partials from the other nodes.
        for n in (0..nn).filter(|&n| n != my_node) {
            let p = topo.forwarder(me, n);
            let ring = op.recv_ring(p);
            let avail = ring.available();
            for i in 0..avail {
                let rec = ring.record(t, i)?;
                let h = Header::decode(rec);
                let tok = h.src_idx as usize;
                if h.src_rank as usize != me || tok >= n_tok || plan.mask(tok, n) == 0 {
                    return Err(Error::protocol(
                        p,
                        format!(
                            "partial for token {tok} of rank {}, which never went to node {n}",
                            h.src_rank
                        ),
                    ));
                }
                let secs = layout.split(rec);
                fin.put(p, tok, plan_pos(plan, tok, n), Part::Wire(secs[0], secs[1]))?;
            }
            ring.consume(avail);
            progress |= avail > 0;
        }

        op.return_credits()?;
        if fin.done == n_tok && op.rings_finished() {
            break;
        }
        op.pump(!progress)?;
    }
    scratch.rows = red.rows;
    scratch.parts = fin.parts;
    scratch.bodies = outgoing.bodies;
    Ok(())
}

/// Position of `node` among the nodes `tok` went to.
fn plan_pos(plan: &crate::routing::SendPlan, tok: usize, node: usize) -> usize {
    (0..node).filter(|&n| plan.mask(tok, n) != 0).count()
}

/// Hands the sum `red` just completed on: to this rank's own finisher, or to the queue for
/// its source on another node.
fn route_partial(
    e: Entry,
    red: &Reducer,
    me: usize,
    my_node: usize,
    fin: &mut Finisher,
    outgoing: &mut Outgoing,
    plan: &crate::routing::SendPlan,
) -> Result<()> {
    let sum = &red.acc;
    if e.src as usize == me {
        let tok = e.idx as usize;
        return fin.put(me, tok, plan_pos(plan, tok, my_node), Part::Own(sum));
    }
    let shape = red.shape;
    let rb = shape.row_bytes();
    let slot = red.index_of(&e);
    let bb = outgoing.body_bytes;
    let body = &mut outgoing.bodies[slot * bb..(slot + 1) * bb];
    store(&sum[..shape.hidden], &mut body[..rb], shape.dtype);
    body[rb..].copy_from_slice(bytemuck::cast_slice(&sum[shape.hidden..]));
    outgoing.queues[e.src as usize].push_back((e.idx, slot));
    Ok(())
}

impl Reducer {
    fn index_of(&self, e: &Entry) -> usize {
        self.entries
            .binary_search_by_key(&(e.src, e.idx), |x| (x.src, x.idx))
            .expect("entry exists")
    }

    /// Takes local rank `l`'s row for `h`'s token. When it is the last one, sums all rows
    /// (ascending local rank) into `acc` and returns the entry.
    fn add(
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

impl Finisher<'_> {
    /// Takes the partial of the `pos`-th node of `tok`; writes the token out once complete.
    fn put(&mut self, via: usize, tok: usize, pos: usize, part: Part<'_>) -> Result<()> {
        let Shape { hidden, k, dtype } = self.shape;
        let width = self.shape.width();
        let orb = hidden * self.out_dtype.size();
        let out = &mut self.out_x[tok * orb..(tok + 1) * orb];
        let out_w = &mut self.out_w[tok * k..(tok + 1) * k];
        if self.have[tok] >= self.need[tok] {
            return Err(Error::protocol(
                via,
                format!("extra partial for token {tok}"),
            ));
        }
        if self.need[tok] == 1 {
            match part {
                Part::Own(sum) => {
                    store(&sum[..hidden], out, self.out_dtype);
                    out_w.copy_from_slice(&sum[hidden..]);
                }
                Part::Wire(row, w) if dtype == self.out_dtype => {
                    out.copy_from_slice(row);
                    read_f32s(out_w, w);
                }
                Part::Wire(row, w) => {
                    self.acc.fill(0.0);
                    add_into(&mut self.acc[..hidden], row, dtype);
                    store(&self.acc[..hidden], out, self.out_dtype);
                    read_f32s(out_w, w);
                }
            }
            self.have[tok] = 1;
            self.done += 1;
            return Ok(());
        }
        let slot = self.first_part[tok] + pos;
        if self.seen[slot] {
            return Err(Error::protocol(
                via,
                format!("second partial for token {tok}"),
            ));
        }
        self.seen[slot] = true;
        self.have[tok] += 1;
        if self.have[tok] < self.need[tok] {
            let dst = &mut self.parts[slot * width..(slot + 1) * width];
            match part {
                Part::Own(sum) => dst.copy_from_slice(sum),
                Part::Wire(row, w) => {
                    dst.fill(0.0);
                    add_into(&mut dst[..hidden], row, dtype);
                    add_into(&mut dst[hidden..], w, Dtype::F32);
                }
            }
        } else {
            // The last partial is summed where it is, in node order with the staged ones.
            self.acc.fill(0.0);
            let first = self.first_part[tok];
            for p in 0..self.need[tok] as usize {
                if p == pos {
                    match part {
                        Part::Own(sum) => {
                            self.acc.iter_mut().zip(sum).for_each(|(a, b)| *a += b);
                        }
                        Part::Wire(row, w) => {
                            add_into(&mut self.acc[..hidden], row, dtype);
                            add_into(&mut self.acc[hidden..], w, Dtype::F32);
                        }
                    }
                } else {
                    let at = (first + p) * width;
                    self.acc
                        .iter_mut()
                        .zip(&self.parts[at..at + width])
                        .for_each(|(a, b)| *a += b);
                }
            }
            store(&self.acc[..hidden], out, self.out_dtype);
            out_w.copy_from_slice(&self.acc[hidden..]);
            self.done += 1;
        }
        Ok(())
    }
}
