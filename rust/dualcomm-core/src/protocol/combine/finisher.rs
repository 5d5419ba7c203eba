//! The source role of combine: each of this rank's tokens gets one partial sum per node it
//! went to (its own node's from this rank's reducer, the others' over rdma from its twins),
//! summed in ascending node order into the output. A token that went to one node is written
//! out directly; the others wait until every node's partial is in.

use super::{Part, Shape, at_least};
use crate::error::{Error, Result};
use crate::protocol::op::Op;
use crate::protocol::record::{Header, Layout};
use crate::protocol::reduce::{Dtype, add_into, read_f32s, store};
use crate::routing::SendPlan;
use crate::topology::Topology;

pub(super) struct Finisher<'o> {
    first_part: Vec<usize>,
    need: Vec<u32>,
    have: Vec<u32>,
    seen: Vec<bool>,
    pub parts: Vec<f32>,
    shape: Shape,
    out_dtype: Dtype,
    out_x: &'o mut [u8],
    out_w: &'o mut [f32],
    done: usize,
    acc: Vec<f32>,
}

/// Position of `node` among the nodes `tok` went to.
pub(super) fn node_pos(plan: &SendPlan, tok: usize, node: usize) -> usize {
    (0..node).filter(|&n| plan.mask(tok, n) != 0).count()
}

impl<'o> Finisher<'o> {
    /// `parts` is reused staging memory. Tokens that went nowhere are written (zeros) now.
    pub fn new(
        plan: &SendPlan,
        shape: Shape,
        out_dtype: Dtype,
        out_x: &'o mut [u8],
        out_w: &'o mut [f32],
        parts: Vec<f32>,
    ) -> Self {
        let (n_tok, nn) = (plan.num_tokens(), plan.num_nodes());
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
        let (k, orb) = (shape.k, shape.hidden * out_dtype.size());
        let done = need.iter().filter(|&&n| n == 0).count();
        for tok in (0..n_tok).filter(|&t| need[t] == 0) {
            out_x[tok * orb..(tok + 1) * orb].fill(0);
            out_w[tok * k..(tok + 1) * k].fill(0.0);
        }
        Self {
            first_part,
            need,
            have: vec![0; n_tok],
            seen: vec![false; staged],
            parts: at_least(parts, staged * shape.width()),
            shape,
            out_dtype,
            out_x,
            out_w,
            done,
            acc: vec![0.0; shape.width()],
        }
    }

    /// Tells the twins' rings how many partials they carry: one per token sent to their node.
    pub fn expect(&self, op: &mut Op<'_>, plan: &SendPlan) {
        let (topo, me) = (op.topo, op.me);
        for n in (0..topo.num_nodes()).filter(|&n| n != topo.node_of(me)) {
            let p = topo.forwarder(me, n);
            op.recv_ring(p).expected = Some(plan.count_to_node()[n]);
        }
    }

    pub fn finished(&self) -> bool {
        self.done == self.need.len()
    }

    /// Takes in the partials the twins sent back.
    pub fn drain(
        &mut self,
        op: &mut Op<'_>,
        layout: &Layout,
        plan: &SendPlan,
        topo: &Topology,
    ) -> Result<bool> {
        let (t, me) = (op.t, op.me);
        let n_tok = plan.num_tokens();
        let mut progress = false;
        for n in (0..topo.num_nodes()).filter(|&n| n != topo.node_of(me)) {
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
                self.put(p, tok, node_pos(plan, tok, n), Part::Wire(secs[0], secs[1]))?;
            }
            ring.consume(avail);
            progress |= avail > 0;
        }
        Ok(progress)
    }

    /// Takes the partial of the `pos`-th node of `tok`; writes the token out once complete.
    pub fn put(&mut self, via: usize, tok: usize, pos: usize, part: Part<'_>) -> Result<()> {
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
