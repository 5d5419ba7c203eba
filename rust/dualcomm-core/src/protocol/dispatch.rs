//! Dispatch: every token goes to each destination node once (rdma, to the forwarder with
//! the source's local index), and the forwarder hands it to the ranks of its node that need
//! it (nvl). Tokens for the source's own node go straight over nvl.
//!
//! Receive order is by source rank, then source token index: a source's tokens reach a
//! destination through exactly one FIFO path, so each one's slot is the source's prefix
//! plus how many of that source's tokens came before it.

use std::sync::Arc;

use super::op::{Announce, Op, OpKind, Session};
use super::record::{ElemType, HEADER_BYTES, Header, Layout, RecordFormat, SourceOrder};
use crate::error::{Error, Result};
use crate::routing::{SendPlan, check_expert_indices, experts_per_rank};
use crate::topology::LocalMask;
use crate::transport::{Tier, TierCounters};

pub struct TopkArgs<'a> {
    /// `[num_tokens, num_topk]` global expert indices, -1 for none.
    pub idx: &'a [i64],
    /// `[num_tokens, num_topk]`.
    pub weights: &'a [f32],
    pub num_topk: usize,
    pub num_experts: usize,
}

pub struct DispatchArgs<'a> {
    pub num_tokens: usize,
    /// `[num_tokens, x_row_bytes]`: the token data, carried as opaque bytes.
    pub x: &'a [u8],
    pub x_row_bytes: usize,
    /// What the bytes of `x` are (peers must dispatch the same), and elements per row.
    pub x_dtype: ElemType,
    pub hidden: usize,
    /// `[num_tokens, scale_row_bytes]`: FP8 scales, or empty with `scale_row_bytes == 0`.
    pub scales: &'a [u8],
    pub scale_row_bytes: usize,
    pub topk: Option<TopkArgs<'a>>,
    pub expert_alignment: usize,
}

/// Where the tokens go: a new plan, or the one of an earlier dispatch.
pub enum Route<'a> {
    Fresh(Arc<SendPlan>),
    Cached(&'a DispatchHandle),
}

/// A token this rank received over rdma and forwarded inside its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    pub src: u32,
    pub idx: u32,
    pub mask: LocalMask,
}

/// Everything combine and a cached dispatch need to repeat or reverse a dispatch.
#[derive(Debug)]
pub struct DispatchHandle {
    pub endpoint_id: u64,
    /// The operation number of the dispatch; the same on every rank for one dispatch.
    pub tag: u64,
    pub plan: Arc<SendPlan>,
    pub num_recv: usize,
    pub recv_src_rank: Vec<u32>,
    pub recv_src_idx: Vec<u32>,
    pub recv_per_src: Vec<u64>,
    pub src_num_tokens: Vec<u64>,
    /// Sorted by (source, index).
    pub forwarded: Vec<Forwarded>,
}

#[derive(Debug)]
pub struct DispatchOutput {
    pub num_recv: usize,
    /// Per local expert, rounded up to `expert_alignment`; empty without top-k.
    pub num_recv_tokens_per_expert: Vec<i64>,
    pub handle: Arc<DispatchHandle>,
}

/// How much a rank receives, known once every rank has announced its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvShape {
    pub num_recv: usize,
    pub x_row_bytes: usize,
    pub scale_row_bytes: usize,
    pub num_topk: usize,
}

/// Where received tokens are written: exactly `num_recv` rows of each.
pub struct RecvBuffers<'a> {
    pub x: &'a mut [u8],
    pub scales: &'a mut [u8],
    pub topk_idx: &'a mut [i64],
    pub topk_weights: &'a mut [f32],
}

/// Supplies the receive buffers once their size is known (the caller may allocate them
/// then, as DeepEP does after its notify step). Every element is written before dispatch
/// returns successfully.
pub trait RecvSink {
    fn prepare(&mut self, shape: RecvShape) -> Result<RecvBuffers<'_>>;
}

/// A sink that owns its buffers.
#[derive(Debug, Default)]
pub struct VecSink {
    pub x: Vec<u8>,
    pub scales: Vec<u8>,
    pub topk_idx: Vec<i64>,
    pub topk_weights: Vec<f32>,
}

/// A zeroed vector of `n` elements, or an error (never an abort) when memory is short.
pub fn try_zeroed<T: Clone + Default>(what: &str, n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| Error::Os {
        what: format!("allocating {what} ({n} elements)"),
        detail: e.to_string(),
    })?;
    v.resize(n, T::default());
    Ok(v)
}

impl RecvSink for VecSink {
    fn prepare(&mut self, s: RecvShape) -> Result<RecvBuffers<'_>> {
        let n = s.num_recv;
        self.x = try_zeroed("received rows", s.x_row_bytes.saturating_mul(n))?;
        self.scales = try_zeroed("received scales", s.scale_row_bytes.saturating_mul(n))?;
        self.topk_idx = try_zeroed("received top-k indices", s.num_topk.saturating_mul(n))?;
        self.topk_weights = try_zeroed("received top-k weights", s.num_topk.saturating_mul(n))?;
        Ok(RecvBuffers {
            x: &mut self.x,
            scales: &mut self.scales,
            topk_idx: &mut self.topk_idx,
            topk_weights: &mut self.topk_weights,
        })
    }
}

fn check_len(arg: &str, got: usize, rows: usize, row: usize) -> Result<()> {
    if rows.checked_mul(row) != Some(got) {
        return Err(Error::invalid(
            arg,
            format!("{rows} rows of {row} bytes"),
            format!("{got} bytes"),
        ));
    }
    Ok(())
}

/// The receiving side's output buffers and the order check.
struct Receiver<'o> {
    counts: Vec<u64>,
    prefix: Vec<usize>,
    got: Vec<u64>,
    order: SourceOrder,
    x: &'o mut [u8],
    scales: &'o mut [u8],
    topk_idx: &'o mut [i64],
    topk_w: &'o mut [f32],
    src_rank: Vec<u32>,
    src_idx: Vec<u32>,
    xb: usize,
    sb: usize,
    k: usize,
    /// This rank's experts: `[lo, hi)`.
    experts: (i64, i64),
}

impl Receiver<'_> {
    fn deliver(&mut self, via: usize, h: &Header, secs: &[&[u8]]) -> Result<()> {
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
        let slot = self.prefix[s] + self.got[s] as usize;
        self.got[s] += 1;
        self.x[slot * self.xb..(slot + 1) * self.xb].copy_from_slice(secs[0]);
        self.scales[slot * self.sb..(slot + 1) * self.sb].copy_from_slice(secs[1]);
        let (lo, hi) = self.experts;
        for k in 0..self.k {
            let e = i64::from_le_bytes(secs[2][k * 8..k * 8 + 8].try_into().unwrap());
            let w = f32::from_le_bytes(secs[3][k * 4..k * 4 + 4].try_into().unwrap());
            let local = (lo..hi).contains(&e);
            self.topk_idx[slot * self.k + k] = if local { e - lo } else { -1 };
            self.topk_w[slot * self.k + k] = if local { w } else { 0.0 };
        }
        self.src_rank[slot] = h.src_rank;
        self.src_idx[slot] = h.src_idx;
        Ok(())
    }
}

/// This rank's own tokens for one peer, posted as credits allow.
struct Outbox {
    peer: usize,
    tier: Tier,
    tokens: Vec<u32>,
    sent: usize,
}

pub(crate) fn run(
    session: Session<'_>,
    endpoint_id: u64,
    payload: &TierCounters,
    args: &DispatchArgs<'_>,
    route: Route<'_>,
    sink: &mut dyn RecvSink,
) -> Result<DispatchOutput> {
    let topo = session.topo;
    let t = session.transport;
    let me = t.rank();
    let w = topo.world_size();
    let (nn, rpn, my_node) = (topo.num_nodes(), topo.ranks_per_node(), topo.node_of(me));
    let n_tok = args.num_tokens;

    // ---- validation: nothing has been sent yet, so an error leaves the buffer usable ----
    let (plan, kind, cached) = match &route {
        Route::Fresh(plan) => (Arc::clone(plan), OpKind::Dispatch, None),
        Route::Cached(h) => (Arc::clone(&h.plan), OpKind::CachedDispatch, Some(*h)),
    };
    if plan.num_tokens() != n_tok {
        return Err(Error::invalid(
            "handle",
            format!("the handle of a dispatch of {n_tok} tokens (as many as x has)"),
            format!("one of {} tokens", plan.num_tokens()),
        ));
    }
    if let Some(h) = cached
        && h.endpoint_id != endpoint_id
    {
        return Err(Error::invalid(
            "handle",
            "a handle made by this buffer",
            "a handle from another buffer",
        ));
    }
    check_len("x", args.x.len(), n_tok, args.x_row_bytes)?;
    check_len("x scales", args.scales.len(), n_tok, args.scale_row_bytes)?;
    let (k, experts) = match &args.topk {
        Some(tk) => {
            let epr = experts_per_rank(&topo, tk.num_experts)?;
            check_len("topk_idx", tk.idx.len() * 8, n_tok, tk.num_topk * 8)?;
            check_len("topk_weights", tk.weights.len() * 4, n_tok, tk.num_topk * 4)?;
            check_expert_indices(tk.idx, tk.num_topk, tk.num_experts)?;
            let lo = (me * epr) as i64;
            (tk.num_topk, (lo, lo + epr as i64))
        }
        None => (0, (0, 0)),
    };
    if args.expert_alignment == 0 {
        return Err(Error::invalid("expert_alignment", "at least 1", 0));
    }
    if n_tok as u64 > super::op::MAX_TOKENS {
        return Err(Error::invalid(
            "x",
            format!("at most {} tokens", super::op::MAX_TOKENS),
            n_tok,
        ));
    }
    let elem = args.x_row_bytes.checked_div(args.hidden).unwrap_or(0);
    if args.hidden == 0 && args.x_row_bytes != 0 || elem * args.hidden != args.x_row_bytes {
        return Err(Error::invalid(
            "hidden",
            format!(
                "the number of elements in a {}-byte row of x",
                args.x_row_bytes
            ),
            args.hidden,
        ));
    }
    let format = RecordFormat {
        dtype: args.x_dtype,
        hidden: u32::try_from(args.hidden)
            .map_err(|_| Error::invalid("x", "a hidden size below 2^32", args.hidden))?,
        scale_cols: (args.scale_row_bytes / 4) as u32,
        topk: k as u32,
    };
    let (xb, sb) = (args.x_row_bytes, args.scale_row_bytes);
    let layout = Layout::new(&[xb, sb, k * 8, k * 4]);
    let token_payload = xb + sb;
    let (idx_bytes, w_bytes): (&[u8], &[u8]) = match &args.topk {
        Some(tk) => (
            bytemuck::cast_slice(tk.idx),
            bytemuck::cast_slice(tk.weights),
        ),
        None => (&[], &[]),
    };
    let sections = |tok: usize| -> [&[u8]; 4] {
        [
            &args.x[tok * xb..(tok + 1) * xb],
            &args.scales[tok * sb..(tok + 1) * sb],
            &idx_bytes[tok * k * 8..(tok + 1) * k * 8],
            &w_bytes[tok * k * 4..(tok + 1) * k * 4],
        ]
    };

    let mut outboxes: Vec<Outbox> = Vec::new();
    for n in (0..nn).filter(|&n| n != my_node) {
        outboxes.push(Outbox {
            peer: topo.forwarder(me, n),
            tier: Tier::Rdma,
            tokens: plan.tokens_to_node(n).map(|t| t as u32).collect(),
            sent: 0,
        });
    }
    for l in (0..rpn).filter(|&l| l != topo.local_of(me)) {
        let d = topo.rank_at(my_node, l);
        outboxes.push(Outbox {
            peer: d,
            tier: Tier::Nvl,
            tokens: plan.tokens_to_rank(d).map(|t| t as u32).collect(),
            sent: 0,
        });
    }
    let twins: Vec<usize> = (0..nn)
        .filter(|&n| n != my_node)
        .map(|n| topo.forwarder(me, n))
        .collect();
    let local_peers: Vec<usize> = (0..rpn)
        .map(|l| topo.rank_at(my_node, l))
        .filter(|&d| d != me)
        .collect();

    let tag = session.seq;
    let announce = Announce {
        tokens: n_tok as u64,
        to_rank: plan.count_to_rank(),
        to_node: plan.count_to_node(),
        tag: 0,
    };
    let mut op = Op::begin(session, kind, format, layout.record_bytes(), announce)?;
    let (epoch, t) = (op.epoch, op.t);

    let mut rx: Option<Receiver> = None;
    let mut fwd_order = SourceOrder::new(vec![0; w]);
    let mut forwarded: Vec<Forwarded> = Vec::new();
    loop {
        let mut progress = false;

        if rx.is_none() && op.metas_ready() {
            let (counts, src_tokens) = op.source_counts();
            if let Some(h) = cached
                && (h.recv_per_src != counts || h.src_num_tokens != src_tokens)
            {
                let s = (0..w)
                    .find(|&s| h.recv_per_src[s] != counts[s])
                    .unwrap_or(me);
                return Err(Error::protocol(
                    s,
                    "the handle passed to the cached dispatch is not from the same dispatch \
                     on every rank",
                ));
            }
            for &f in &local_peers {
                let via_f = (0..w)
                    .filter(|&s| topo.local_of(s) == topo.local_of(f))
                    .map(|s| counts[s])
                    .sum();
                op.recv_ring(f).expected = Some(via_f);
            }
            for &p in &twins {
                let b = op.node_count_from(p);
                op.recv_ring(p).expected = Some(b);
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
            if [xb, sb, k * 8].iter().any(|&row| {
                total
                    .checked_mul(row)
                    .is_none_or(|n| n > isize::MAX as usize)
            }) {
                return Err(Error::protocol(
                    me,
                    format!("{total} announced tokens do not fit in this rank's address space"),
                ));
            }
            let shape = RecvShape {
                num_recv: total,
                x_row_bytes: xb,
                scale_row_bytes: sb,
                num_topk: k,
            };
            let bufs = sink.prepare(shape)?;
            if bufs.x.len() != total * xb
                || bufs.scales.len() != total * sb
                || bufs.topk_idx.len() != total * k
                || bufs.topk_weights.len() != total * k
            {
                // Not a bad argument: the operation is under way on every rank.
                return Err(Error::protocol(
                    me,
                    format!("the receive buffers supplied do not hold {total} rows"),
                ));
            }
            let mut r = Receiver {
                counts,
                prefix,
                got: vec![0; w],
                order: SourceOrder::new(src_tokens.clone()),
                x: bufs.x,
                scales: bufs.scales,
                topk_idx: bufs.topk_idx,
                topk_w: bufs.topk_weights,
                src_rank: try_zeroed("received source ranks", total)?,
                src_idx: try_zeroed("received source indices", total)?,
                xb,
                sb,
                k,
                experts,
            };
            for tok in plan.tokens_to_rank(me) {
                let h = Header {
                    src_rank: me as u32,
                    src_idx: tok as u32,
                    mask: 0,
                };
                r.deliver(me, &h, &sections(tok))?;
            }
            rx = Some(r);
            fwd_order = SourceOrder::new(src_tokens);
            progress = true;
        }

        // This rank's own tokens, once every peer's metadata is in (so that an operation
        // some rank aborts has sent no data anywhere).
        for ob in outboxes.iter_mut().filter(|_| rx.is_some()) {
            let ring = op.send_ring(ob.peer);
            let n = (ring.free() as usize).min(ob.tokens.len() - ob.sent);
            if n > 0 {
                let batch = &ob.tokens[ob.sent..ob.sent + n];
                let dst_node = topo.node_of(ob.peer);
                let headers: Vec<[u8; HEADER_BYTES]> = batch
                    .iter()
                    .map(|&tok| {
                        let mask = match ob.tier {
                            Tier::Rdma => plan.mask(tok as usize, dst_node),
                            Tier::Nvl => 1 << topo.local_of(ob.peer),
                        };
                        Header {
                            src_rank: me as u32,
                            src_idx: tok,
                            mask,
                        }
                        .encode()
                    })
                    .collect();
                let mut segs: Vec<&[u8]> = Vec::with_capacity(n * 5);
                for (hdr, &tok) in headers.iter().zip(batch) {
                    segs.push(hdr);
                    segs.extend(sections(tok as usize));
                }
                ring.post(t, epoch, &segs, 5)?;
                payload.add(ob.tier, n * token_payload);
                ob.sent += n;
                progress = true;
            }
            if ob.sent == ob.tokens.len() && ob.tier == Tier::Rdma {
                ring.closed = true;
            }
        }

        if let Some(r) = rx.as_mut() {
            // Tokens from this node's forwarders (and same-node sources): into the output.
            for &f in &local_peers {
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
                    r.deliver(f, &h, &layout.split(rec))?;
                }
                ring.consume(avail);
                progress |= avail > 0;
            }
            // Tokens from other nodes: forward to the local ranks in their mask.
            for &p in &twins {
                progress |= forward(
                    &mut op,
                    p,
                    r,
                    &mut fwd_order,
                    &mut forwarded,
                    &layout,
                    payload,
                    token_payload,
                )?;
            }
            let forwarding_done = twins.iter().all(|&p| {
                let ring = op.recv[p].as_ref().expect("twin ring");
                ring.expected == Some(ring.consumed())
            });
            if forwarding_done {
                for ob in outboxes.iter().filter(|o| o.tier == Tier::Nvl) {
                    if ob.sent == ob.tokens.len() {
                        op.send_ring(ob.peer).closed = true;
                    }
                }
            }
        }

        op.return_credits()?;
        if rx.is_some() && op.rings_finished() {
            break;
        }
        op.pump(!progress)?;
    }

    let r = rx.expect("loop ends after the receiver exists");
    if let Some(s) = (0..w).find(|&s| r.got[s] != r.counts[s]) {
        return Err(Error::protocol(
            s,
            format!(
                "{} of the {} announced tokens of rank {s} arrived",
                r.got[s], r.counts[s]
            ),
        ));
    }
    let num_recv = r.prefix[w];
    let mut per_expert = Vec::new();
    if args.topk.is_some() {
        let epr = (experts.1 - experts.0) as usize;
        per_expert = vec![0i64; epr];
        for row in r.topk_idx.chunks(k.max(1)) {
            for (j, &e) in row.iter().enumerate() {
                if e >= 0 && !row[..j].contains(&e) {
                    per_expert[e as usize] += 1;
                }
            }
        }
        let a = args.expert_alignment as i64;
        per_expert
            .iter_mut()
            .for_each(|c| *c = (*c + a - 1) / a * a);
    }
    forwarded.sort_unstable_by_key(|f| (f.src, f.idx));
    let handle = match cached {
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
            plan,
            num_recv,
            recv_src_rank: r.src_rank,
            recv_src_idx: r.src_idx,
            src_num_tokens: (0..w).map(|s| r.order.limit(s)).collect(),
            recv_per_src: r.counts,
            forwarded,
        }),
    };
    Ok(DispatchOutput {
        num_recv,
        num_recv_tokens_per_expert: per_expert,
        handle,
    })
}

/// Takes the records at the head of `p`'s rdma ring and passes each on to the local ranks in
/// its mask, as far as their rings have room. A record is taken whole or not at all.
#[allow(clippy::too_many_arguments)]
fn forward(
    op: &mut Op<'_>,
    p: usize,
    r: &mut Receiver,
    order: &mut SourceOrder,
    log: &mut Vec<Forwarded>,
    layout: &Layout,
    payload: &TierCounters,
    token_payload: usize,
) -> Result<bool> {
    let (t, epoch, topo, me) = (op.t, op.epoch, op.topo, op.me);
    let rpn = topo.ranks_per_node();
    let my_node = topo.node_of(me);
    let ring = op.recv[p].as_ref().expect("twin ring");
    let avail = ring.available();
    let mut room: Vec<u64> = (0..rpn)
        .map(|l| {
            let d = topo.rank_at(my_node, l);
            if d == me {
                u64::MAX
            } else {
                op.send[d].as_ref().expect("local ring").free()
            }
        })
        .collect();
    let mut batches: Vec<Vec<&[u8]>> = vec![Vec::new(); rpn];
    let mut taken = 0;
    let valid_mask = LocalMask::MAX >> (LocalMask::BITS as usize - rpn);
    for i in 0..avail {
        let rec = ring.record(t, i)?;
        let h = Header::decode(rec);
        if h.src_rank as usize != p || h.mask == 0 || h.mask & !valid_mask != 0 {
            return Err(Error::protocol(
                p,
                format!(
                    "record claims source {} and local-rank mask {:#x}; expected source {p} \
                     and a non-empty mask below {rpn} ranks",
                    h.src_rank, h.mask
                ),
            ));
        }
        let targets = (0..rpn).filter(|l| h.mask & (1 << l) != 0);
        if targets.clone().any(|l| room[l] == 0) {
            break;
        }
        order.accept(p, &h)?;
        for l in targets {
            if topo.rank_at(my_node, l) == me {
                r.deliver(p, &h, &layout.split(rec))?;
            } else {
                batches[l].push(rec);
                room[l] -= 1;
            }
        }
        log.push(Forwarded {
            src: h.src_rank,
            idx: h.src_idx,
            mask: h.mask,
        });
        taken += 1;
    }
    for (l, batch) in batches.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
        let d = topo.rank_at(my_node, l);
        op.send_ring(d).post(t, epoch, batch, 1)?;
        payload.add(Tier::Nvl, batch.len() * token_payload);
    }
    op.recv_ring(p).consume(taken);
    Ok(taken > 0)
}
