//! The destination role of combine: every row this rank received in the dispatch goes back
//! to the rank of its node that forwarded it (the one with the source's local index), which
//! reduces it with the node's other rows of that token. The rows for each reducer go in
//! (source, index) order, the order in which it sums them; the rows whose reducer is this
//! rank itself are handed to its reducer, which reads them where they are.

use crate::error::Result;
use crate::protocol::dispatch::DispatchHandle;
use crate::protocol::op::Op;
use crate::protocol::record::{HEADER_BYTES, Header};
use crate::protocol::sources::Source;
use crate::topology::Topology;
use crate::transport::{Sge, Tier, TierCounters};

/// This rank's rows (in dispatch's receive order) with their top-k weights.
pub(super) struct Rows<'a> {
    pub x: &'a [u8],
    pub weights: &'a [u8],
    pub row_bytes: usize,
    pub topk: usize,
    /// See `CombineArgs::rows_at`.
    pub at: &'a [usize],
}

impl<'a> Rows<'a> {
    /// Where row `j` of the receive order sits in `x`.
    pub fn index(&self, j: usize) -> usize {
        if self.at.is_empty() { j } else { self.at[j] }
    }

    /// Row `j` and its weights.
    pub fn row(&self, j: usize) -> [&'a [u8]; 2] {
        let (rb, k) = (self.row_bytes, self.topk);
        let j = self.index(j);
        [
            &self.x[j * rb..(j + 1) * rb],
            &self.weights[j * k * 4..(j + 1) * k * 4],
        ]
    }
}

/// Where the rows' bytes come from once registered: the headers per reducer, the caller's
/// rows and weights.
pub(super) struct RowSources {
    pub headers: Vec<Source>,
    pub x: Source,
    pub weights: Source,
}

pub(super) struct Destination {
    topo: Topology,
    me: usize,
    /// Row indices per local rank of the reducer, in (source, index) order.
    to_reducer: Vec<Vec<usize>>,
    sent: Vec<usize>,
}

impl Destination {
    pub fn new(handle: &DispatchHandle, topo: &Topology, me: usize) -> Self {
        let my_node = topo.node_of(me);
        let mut to_reducer: Vec<Vec<usize>> = vec![Vec::new(); topo.ranks_per_node()];
        for j in 0..handle.num_recv {
            let f = topo.forwarder(handle.recv_src_rank[j] as usize, my_node);
            to_reducer[topo.local_of(f)].push(j);
        }
        for list in &mut to_reducer {
            list.sort_by_key(|&j| (handle.recv_src_rank[j], handle.recv_src_idx[j]));
        }
        Self {
            topo: *topo,
            me,
            sent: vec![0; topo.ranks_per_node()],
            to_reducer,
        }
    }

    fn header(handle: &DispatchHandle, j: usize) -> Header {
        Header {
            src_rank: handle.recv_src_rank[j],
            src_idx: handle.recv_src_idx[j],
            mask: 0,
        }
    }

    /// The record headers of the rows for each reducer, to be registered.
    pub fn headers(&self, handle: &DispatchHandle) -> Vec<Vec<u8>> {
        self.to_reducer
            .iter()
            .map(|list| {
                list.iter()
                    .flat_map(|&j| Self::header(handle, j).encode())
                    .collect()
            })
            .collect()
    }

    /// The rows whose reducer is this rank itself, in (source, index) order.
    pub fn take_own_rows(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.to_reducer[self.topo.local_of(self.me)])
    }

    /// Sends rows to the node's other reducers as credits allow.
    pub fn post(
        &mut self,
        op: &mut Op<'_>,
        rows: &Rows<'_>,
        src: &RowSources,
        payload: &TierCounters,
    ) -> Result<bool> {
        let (t, epoch, topo, me) = (op.t, op.epoch, self.topo, self.me);
        let my_node = topo.node_of(me);
        let mut progress = false;
        for l in (0..topo.ranks_per_node()).filter(|&l| l != topo.local_of(me)) {
            let f = topo.rank_at(my_node, l);
            let ring = op.send_ring(f);
            let list = &self.to_reducer[l];
            let n = (ring.free() as usize).min(list.len() - self.sent[l]);
            if n > 0 {
                let (rb, k) = (rows.row_bytes, rows.topk);
                let mut sges: Vec<Sge> = Vec::with_capacity(3 * n);
                for (i, &j) in list.iter().enumerate().skip(self.sent[l]).take(n) {
                    sges.extend([
                        src.headers[l].piece(i, HEADER_BYTES),
                        src.x.piece(rows.index(j), rb),
                        src.weights.piece(rows.index(j), k * 4),
                    ]);
                }
                ring.post(t, epoch, &sges, 3)?;
                payload.add(Tier::Nvl, n * rows.row_bytes);
                self.sent[l] += n;
                progress = true;
            }
            if self.sent[l] == list.len() {
                ring.closed = true;
            }
        }
        Ok(progress)
    }
}
