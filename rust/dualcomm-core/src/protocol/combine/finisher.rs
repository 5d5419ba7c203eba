//! The source role of combine: each of this rank's tokens gets one partial sum per node it
//! went to (its own node's from this rank's reducer, the others' over rdma from its twins),
//! summed in ascending node order straight from the twins' rings into the output. Tokens
//! are finished in index order, which is the order the twins send their partials in.

use super::Shape;
use super::reducer::LocalRows;
use crate::error::{Error, Result};
use crate::protocol::op::Op;
use crate::protocol::record::{HEADER_BYTES, Header};
use crate::protocol::reduce::{Dtype, Term, sum_terms};
use crate::routing::SendPlan;
use crate::topology::Topology;

pub(super) struct Finisher<'o> {
    topo: Topology,
    me: usize,
    shape: Shape,
    out_dtype: Dtype,
    out_x: &'o mut [u8],
    out_w: &'o mut [f32],
}

impl<'o> Finisher<'o> {
    /// Tokens that went nowhere are written (zeros) now; the reducer finishes the others.
    pub fn new(
        plan: &SendPlan,
        topo: &Topology,
        me: usize,
        shape: Shape,
        out_dtype: Dtype,
        out_x: &'o mut [u8],
        out_w: &'o mut [f32],
    ) -> Self {
        let (k, orb) = (shape.k, shape.hidden * out_dtype.size());
        for tok in 0..plan.num_tokens() {
            if (0..plan.num_nodes()).all(|n| plan.mask(tok, n) == 0) {
                out_x[tok * orb..(tok + 1) * orb].fill(0);
                out_w[tok * k..(tok + 1) * k].fill(0.0);
            }
        }
        Self {
            topo: *topo,
            me,
            shape,
            out_dtype,
            out_x,
            out_w,
        }
    }

    /// Tells the twins' rings how many partials they carry: one per token sent to their node.
    pub fn expect(&self, op: &mut Op<'_>, plan: &SendPlan) {
        let (topo, me) = (self.topo, self.me);
        for n in (0..topo.num_nodes()).filter(|&n| n != topo.node_of(me)) {
            let p = topo.forwarder(me, n);
            op.recv_ring(p).set_expected(plan.count_to_node()[n]);
        }
    }

    /// Whether `tok`'s sum takes node `n`'s partial: the token went there, and the node is
    /// not masked (shrink mode: its partial does not come, and the sum is over the nodes
    /// left; this rank's own node is never masked).
    fn sums_node(
        topo: Topology,
        me: usize,
        op: &Op<'_>,
        plan: &SendPlan,
        tok: usize,
        n: usize,
    ) -> bool {
        plan.mask(tok, n) != 0 && (n == topo.node_of(me) || !op.is_masked(topo.forwarder(me, n)))
    }

    /// Whether every other node's partial of `tok` is at the head of its twin's ring
    /// (earlier tokens are finished, so the head can only be this token's).
    pub fn partials_ready(&self, op: &mut Op<'_>, plan: &SendPlan, tok: usize) -> bool {
        let (topo, me) = (self.topo, self.me);
        (0..plan.num_nodes())
            .filter(|&n| n != topo.node_of(me) && Self::sums_node(topo, me, op, plan, tok, n))
            .all(|n| {
                op.recv[topo.forwarder(me, n)]
                    .as_ref()
                    .is_some_and(|r| r.available() > 0)
            })
    }

    /// Sums `tok`'s partials in ascending node order into the output, consuming the other
    /// nodes' records; this node's partial is the fp32 sum of `own`, this node's rows of the
    /// token (none when no rank of this node got it), summed in the same pass.
    pub fn finish<'t>(
        &mut self,
        op: &mut Op<'t>,
        plan: &SendPlan,
        tok: usize,
        own: &LocalRows<'_>,
    ) -> Result<()> {
        let Shape { hidden, k, dtype } = self.shape;
        let my_node = self.topo.node_of(self.me);
        let rb = self.shape.row_bytes();
        let orb = hidden * self.out_dtype.size();
        let out = &mut self.out_x[tok * orb..(tok + 1) * orb];
        let out_w = &mut self.out_w[tok * k..(tok + 1) * k];
        let mut rows: Vec<Term<'_>> = Vec::with_capacity(plan.num_nodes());
        let mut weights: Vec<Term<'_>> = Vec::with_capacity(plan.num_nodes());
        for n in 0..plan.num_nodes() {
            if !Self::sums_node(self.topo, self.me, op, plan, tok, n) {
                continue;
            }
            if n == my_node {
                if own.x.is_empty() {
                    return Err(Error::internal(
                        self.me,
                        format!("no partial of this node for token {tok}"),
                    ));
                }
                rows.push(Term::Sum(&own.x));
                weights.push(Term::Sum(&own.weights));
                continue;
            }
            let body = Self::take_partial(op, plan, self.topo, self.me, n, tok)?;
            rows.push(Term::Row(&body[..rb]));
            weights.push(Term::Row(&body[rb..rb + k * 4]));
        }
        // Even one partial alone is added to zero: a reducer sends a partial that is one
        // row as the row (see `reducer`), and zero plus it has the bits the sum would.
        sum_terms(out, self.out_dtype, &rows, dtype);
        sum_terms(
            bytemuck::cast_slice_mut(out_w),
            Dtype::F32,
            &weights,
            Dtype::F32,
        );
        Ok(())
    }

    /// Consumes the head of node `n`'s twin's ring, which must be `tok`'s partial, and
    /// returns its body (row, then weights). Its space is handed back only by
    /// `return_credits`, after the caller has read it.
    fn take_partial<'t>(
        op: &mut Op<'t>,
        plan: &SendPlan,
        topo: Topology,
        me: usize,
        n: usize,
        tok: usize,
    ) -> Result<&'t [u8]> {
        let (t, p) = (op.t, topo.forwarder(me, n));
        let ring = op.recv_ring(p);
        let rec = ring.record(t, 0)?;
        let h = Header::decode(rec);
        let got = h.src_idx as usize;
        if h.src_rank as usize != me || got >= plan.num_tokens() || plan.mask(got, n) == 0 {
            return Err(Error::protocol(
                p,
                format!(
                    "partial for token {got} of rank {}, which never went to node {n}",
                    h.src_rank
                ),
            ));
        }
        if got != tok {
            return Err(Error::protocol(
                p,
                format!(
                    "partial for token {got} where the one for token {tok} was due: partials \
                     come in token order, once each"
                ),
            ));
        }
        ring.consume(1);
        Ok(&rec[HEADER_BYTES..])
    }
}
