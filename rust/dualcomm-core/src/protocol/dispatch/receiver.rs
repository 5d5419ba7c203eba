//! The receiver role: the tokens for this rank's experts, from its own node's forwarders
//! (and same-node sources), its twins (through the forwarder role) and itself, each written
//! to its slot: by source rank, then source token index.

use std::sync::Arc;

use super::checks::Checked;
use super::{
    DispatchArgs, DispatchHandle, DispatchOutput, Forwarded, RecvShape, RecvSink, try_zeroed,
};
use crate::error::{Error, Result};
use crate::protocol::op::Op;
use crate::protocol::record::{Header, Layout, SourceOrder};
use crate::topology::Topology;

pub(super) struct Receiver<'o> {
    topo: Topology,
    me: usize,
    /// Tokens each source sends here, their prefix sums (slots), and how many arrived.
    counts: Vec<u64>,
    prefix: Vec<usize>,
    got: Vec<u64>,
    order: SourceOrder,
    /// Per source, its block of received rows (see `RecvBuffers`).
    x: Vec<&'o mut [u8]>,
    scales: Vec<&'o mut [u8]>,
    topk_idx: Vec<&'o mut [i64]>,
    topk_w: Vec<&'o mut [f32]>,
    src_rank: Vec<u32>,
    src_idx: Vec<u32>,
    xb: usize,
    sb: usize,
    k: usize,
    /// This rank's experts: `[lo, hi)`.
    experts: (i64, i64),
    /// Tokens per local expert that the metadata announced (unaligned), if it counted them.
    announced_per_expert: Option<Vec<u64>>,
    /// The same per rank they arrive through, and what did arrive through each (with top-k):
    /// a rank whose announcement and tokens disagree is named.
    announced_via: Option<Vec<Option<Vec<u64>>>>,
    arrived_via: Vec<u64>,
}

impl<'o> Receiver<'o> {
    /// Once every count is known: checks a cached dispatch against its handle, tells each
    /// ring how many records it will carry, and asks `sink` for the output buffers.
    pub fn open(
        op: &mut Op<'_>,
        c: &Checked<'_>,
        mut counts: Vec<u64>,
        src_tokens: &[u64],
        sink: &'o mut dyn RecvSink,
    ) -> Result<Self> {
        let (topo, me) = (op.topo, op.me);
        let w = topo.world_size();
        let my_node = topo.node_of(me);
        let mut src_tokens = src_tokens.to_vec();
        // A cached dispatch keeps its handle's layout; the rows of a source masked since
        // (shrink mode) never come, and stay empty.
        let absent: Vec<usize> = match c.cached {
            Some(h) => (0..w)
                .filter(|&s| op.is_masked(s))
                .inspect(|&s| {
                    counts[s] = h.recv_per_src[s];
                    src_tokens[s] = h.src_num_tokens[s];
                })
                .collect(),
            None => Vec::new(),
        };
        if let Some(h) = c.cached
            && (h.recv_per_src != counts || h.src_num_tokens != src_tokens)
        {
            let s = (0..w)
                .find(|&s| h.recv_per_src[s] != counts[s])
                .unwrap_or(me);
            return Err(Error::protocol(
                s,
                "the handle passed to the cached dispatch is not from the same dispatch on \
                 every rank",
            ));
        }
        for f in (0..topo.ranks_per_node())
            .map(|l| topo.rank_at(my_node, l))
            .filter(|&f| f != me)
        {
            // A rank of this node forwards the sources of its local index on every node.
            let via_f = (0..w)
                .filter(|&s| topo.local_of(s) == topo.local_of(f))
                .map(|s| counts[s])
                .sum();
            op.recv_ring(f).set_expected(via_f);
        }
        for n in (0..topo.num_nodes()).filter(|&n| n != my_node) {
            let p = topo.forwarder(me, n);
            let b = op.node_count_from(p);
            op.recv_ring(p).set_expected(b);
        }
        // Counts come from peers: each is bounded (op::MAX_TOKENS), and so is their sum.
        let mut prefix = vec![0usize; w + 1];
        for s in 0..w {
            if counts[s] > src_tokens[s] {
                return Err(Error::protocol(
                    s,
                    format!(
                        "announced {} tokens for rank {me} out of its {}",
                        counts[s], src_tokens[s]
                    ),
                ));
            }
            prefix[s + 1] = prefix[s]
                .checked_add(counts[s] as usize)
                .ok_or_else(|| Error::protocol(s, "token counts overflow"))?;
        }
        let total = prefix[w];
        let (xb, sb, k) = (c.tokens.x_bytes, c.tokens.scale_bytes, c.tokens.topk);
        if [xb, sb, k * 8].iter().any(|&row| {
            total
                .checked_mul(row)
                .is_none_or(|n| n > isize::MAX as usize)
        }) {
            let most = (0..w).max_by_key(|&s| counts[s]).unwrap_or(me);
            return Err(Error::protocol(
                most,
                format!(
                    "{total} announced tokens (rank {most}: {}) do not fit in this rank's \
                     address space",
                    counts[most]
                ),
            ));
        }
        let announced_per_expert = op.expert_counts_here();
        let announced_via = op.expert_counts_by_peer();
        let epr = (c.experts.1 - c.experts.0) as usize;
        let a = c.expert_alignment as u64;
        let shape = RecvShape {
            num_recv: total,
            x_row_bytes: xb,
            scale_row_bytes: sb,
            num_topk: k,
            recv_per_src: counts.clone(),
            node_matrix: op.node_matrix(),
            num_recv_tokens_per_expert: announced_per_expert.as_ref().map(|v| {
                v.iter()
                    .map(|&n| n.div_ceil(a) * a)
                    .map(|n| n as i64)
                    .collect()
            }),
        };
        let bufs = sink.prepare(shape)?;
        let fits = |lens: Vec<usize>, row: usize| {
            lens.len() == w && (0..w).all(|s| lens[s] == counts[s] as usize * row)
        };
        if !(fits(bufs.x.iter().map(|b| b.len()).collect(), xb)
            && fits(bufs.scales.iter().map(|b| b.len()).collect(), sb)
            && fits(bufs.topk_idx.iter().map(|b| b.len()).collect(), k)
            && fits(bufs.topk_weights.iter().map(|b| b.len()).collect(), k))
        {
            // Not a bad argument: the operation is under way on every rank.
            return Err(Error::Internal {
                rank: me,
                detail: format!(
                    "the receive buffers supplied do not hold the {total} rows announced \
                     per source"
                ),
            });
        }
        let mut r = Self {
            topo,
            me,
            counts,
            prefix,
            got: vec![0; w],
            order: SourceOrder::new(src_tokens),
            x: bufs.x,
            scales: bufs.scales,
            topk_idx: bufs.topk_idx,
            topk_w: bufs.topk_weights,
            src_rank: try_zeroed("received source ranks", total)?,
            src_idx: try_zeroed("received source indices", total)?,
            xb,
            sb,
            k,
            experts: c.experts,
            arrived_via: match &announced_via {
                Some(_) => try_zeroed("per-expert arrivals", w * epr)?,
                None => Vec::new(),
            },
            announced_via,
            announced_per_expert,
        };
        for s in absent {
            r.leave_empty(s);
        }
        Ok(r)
    }

    /// The rows of masked source `s`, which will not come: zeros, with no expert chosen.
    fn leave_empty(&mut self, s: usize) {
        self.x[s].fill(0);
        self.scales[s].fill(0);
        self.topk_idx[s].fill(-1);
        self.topk_w[s].fill(0.0);
        self.got[s] = self.counts[s];
    }

    /// This rank's own tokens for its own experts.
    pub fn take_own(&mut self, c: &Checked<'_>) -> Result<()> {
        let me = self.me;
        for tok in c.plan.tokens_to_rank(me) {
            let h = Header {
                src_rank: me as u32,
                src_idx: tok as u32,
                mask: 0,
            };
            self.deliver(me, &h, &c.tokens.sections(tok))?;
        }
        Ok(())
    }

    /// Writes one token (received via `via`) to its slot.
    pub fn deliver(&mut self, via: usize, h: &Header, secs: &[&[u8]]) -> Result<()> {
        self.order.accept(via, h)?;
        let s = h.src_rank as usize;
        if self.got[s] >= self.counts[s] {
            return Err(Error::protocol(
                via,
                format!(
                    "more than the {} announced tokens of rank {s}",
                    self.counts[s]
                ),
            ));
        }
        // `g`: the row in the source's block; `slot`: the row in this receive order.
        let g = self.got[s] as usize;
        let slot = self.prefix[s] + g;
        self.got[s] += 1;
        self.x[s][g * self.xb..(g + 1) * self.xb].copy_from_slice(secs[0]);
        self.scales[s][g * self.sb..(g + 1) * self.sb].copy_from_slice(secs[1]);
        let (lo, hi) = self.experts;
        let epr = (hi - lo) as usize;
        let (idx_row, w_row) = (
            &mut self.topk_idx[s][g * self.k..(g + 1) * self.k],
            &mut self.topk_w[s][g * self.k..(g + 1) * self.k],
        );
        for k in 0..self.k {
            let e = i64::from_le_bytes(secs[2][k * 8..k * 8 + 8].try_into().expect("8 bytes"));
            let w = f32::from_le_bytes(secs[3][k * 4..k * 4 + 4].try_into().expect("4 bytes"));
            let local = (lo..hi).contains(&e);
            // A token counts once per expert, however often its top-k names it.
            if local && !self.arrived_via.is_empty() && !idx_row[..k].contains(&(e - lo)) {
                self.arrived_via[via * epr + (e - lo) as usize] += 1;
            }
            idx_row[k] = if local { e - lo } else { -1 };
            w_row[k] = if local { w } else { 0.0 };
        }
        self.src_rank[slot] = h.src_rank;
        self.src_idx[slot] = h.src_idx;
        Ok(())
    }

    /// Takes in what this node's ranks sent (their own tokens and those they forward).
    pub fn drain(&mut self, op: &mut Op<'_>, layout: &Layout) -> Result<bool> {
        let (t, topo, me) = (op.t, self.topo, self.me);
        let w = topo.world_size();
        let my_node = topo.node_of(me);
        let mut progress = false;
        for f in (0..topo.ranks_per_node())
            .map(|l| topo.rank_at(my_node, l))
            .filter(|&f| f != me)
        {
            let ring = op.recv_ring(f);
            let avail = ring.available();
            for i in 0..avail {
                let rec = ring.record(t, i)?;
                let h = Header::decode(rec);
                let s = h.src_rank as usize;
                if s >= w || topo.local_of(s) != topo.local_of(f) {
                    return Err(Error::protocol(
                        f,
                        format!("forwarded a token of rank {s}, which it does not serve"),
                    ));
                }
                self.deliver(f, &h, &layout.split(rec))?;
            }
            ring.consume(avail);
            progress |= avail > 0;
        }
        Ok(progress)
    }

    /// The dispatch's results, once every ring is done.
    pub fn finish(
        self,
        args: &DispatchArgs<'_>,
        c: &Checked<'_>,
        forwarded: Vec<Forwarded>,
        endpoint_id: u64,
        tag: u64,
    ) -> Result<DispatchOutput> {
        let w = self.topo.world_size();
        if let Some(s) = (0..w).find(|&s| self.got[s] != self.counts[s]) {
            return Err(Error::protocol(
                s,
                format!(
                    "{} of the {} announced tokens of rank {s} arrived",
                    self.got[s], self.counts[s]
                ),
            ));
        }
        let num_recv = self.prefix[w];
        let mut per_expert: Vec<u64> = Vec::new();
        if args.topk.is_some() {
            let epr = (self.experts.1 - self.experts.0) as usize;
            per_expert = vec![0; epr];
            for row in self.topk_idx.iter().flat_map(|b| b.chunks(self.k.max(1))) {
                for (j, &e) in row.iter().enumerate() {
                    if e >= 0 && !row[..j].contains(&e) {
                        per_expert[e as usize] += 1;
                    }
                }
            }
            // What arrived through each rank must be what it announced (each source
            // checked its own counts against its top-k before sending them).
            if let Some(by_peer) = &self.announced_via {
                for (p, announced) in by_peer.iter().enumerate() {
                    let Some(announced) = announced else { continue };
                    let arrived = &self.arrived_via[p * epr..(p + 1) * epr];
                    if let Some(e) = (0..epr).find(|&e| announced[e] != arrived[e]) {
                        return Err(Error::protocol(
                            p,
                            format!(
                                "{} tokens for local expert {e} of rank {} arrived through it, \
                                 it announced {}",
                                arrived[e], self.me, announced[e]
                            ),
                        ));
                    }
                }
            }
        } else if let Some(announced) = self.announced_per_expert {
            per_expert = announced;
        }
        let a = args.expert_alignment as u64;
        let per_expert: Vec<i64> = per_expert
            .iter()
            .map(|&c| (c.div_ceil(a) * a) as i64)
            .collect();
        let handle = match c.cached {
            Some(h) => Arc::new(DispatchHandle {
                endpoint_id,
                tag: h.tag,
                plan: Arc::clone(&h.plan),
                num_recv: h.num_recv,
                recv_src_rank: h.recv_src_rank.clone(),
                recv_src_idx: h.recv_src_idx.clone(),
                recv_per_src: h.recv_per_src.clone(),
                src_num_tokens: h.src_num_tokens.clone(),
                forwarded: h.forwarded.clone(),
            }),
            None => Arc::new(DispatchHandle {
                endpoint_id,
                tag,
                plan: Arc::clone(&c.plan),
                num_recv,
                recv_src_rank: self.src_rank,
                recv_src_idx: self.src_idx,
                src_num_tokens: (0..w).map(|s| self.order.limit(s)).collect(),
                recv_per_src: self.counts,
                forwarded,
            }),
        };
        Ok(DispatchOutput {
            num_recv,
            num_recv_tokens_per_expert: per_expert,
            handle,
        })
    }
}
