//! Dispatch: every token goes to each destination node once (rdma, to the forwarder with
//! the source's local index), and the forwarder hands it to the ranks of its node that need
//! it (nvl). Tokens for the source's own node go straight over nvl.
//!
//! Receive order is by source rank, then source token index: a source's tokens reach a
//! destination through exactly one FIFO path, so each one's slot is the source's prefix
//! plus how many of that source's tokens came before it.
//!
//! Every rank plays three roles at once, each its own type: the [`source::Sender`] of its
//! tokens, the [`forwarder::Forwarder`] of its twins' tokens into its node, and the
//! [`receiver::Receiver`] of the tokens for its experts. `run` checks the arguments, opens
//! the operation and drives the three until every ring is drained and acknowledged.

mod checks;
pub(crate) use checks::check_tokens;
mod forwarder;
mod receiver;
mod source;

use std::sync::Arc;

use super::op::{Announce, Op, Session};
use super::record::ElemType;
use super::sources::Registered;
use crate::error::{Error, Result};
use crate::routing::SendPlan;
use crate::topology::LocalMask;
use crate::transport::TierCounters;
use forwarder::Forwarder;
use receiver::Receiver;
use source::{Sender, TokenSources};

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
    /// `[num_experts]`: this rank's tokens for each expert (DeepEP's `num_tokens_per_expert`),
    /// or empty. With it every rank learns its per-expert receive counts from the metadata,
    /// before any token moves.
    pub num_tokens_per_expert: &'a [u64],
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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecvShape {
    pub num_recv: usize,
    pub x_row_bytes: usize,
    pub scale_row_bytes: usize,
    pub num_topk: usize,
    /// Tokens from each source rank, in receive order.
    pub recv_per_src: Vec<u64>,
    /// Tokens each rank of this node sends straight to each other one (`ranks_per_node`
    /// squared, row = sender): DeepEP's rank prefix matrix, before the prefix sum, on one node.
    pub node_matrix: Vec<u64>,
    /// Per local expert, rounded up to `expert_alignment`, when `num_tokens_per_expert` was given.
    pub num_recv_tokens_per_expert: Option<Vec<i64>>,
}

/// Where received tokens are written: per source rank, in receive order, a block of
/// exactly `recv_per_src[s]` rows of each. Blocks need not be adjacent: a Buffer that runs
/// several channels hands each channel its own rows of every source, inside one output.
pub struct RecvBuffers<'a> {
    pub x: Vec<&'a mut [u8]>,
    pub scales: Vec<&'a mut [u8]>,
    pub topk_idx: Vec<&'a mut [i64]>,
    pub topk_weights: Vec<&'a mut [f32]>,
}

impl<'a> RecvBuffers<'a> {
    /// Contiguous `[num_recv, row]` buffers cut into one block per source (`shape`'s
    /// `recv_per_src`); each buffer must hold exactly `num_recv` rows.
    pub fn contiguous(
        shape: &RecvShape,
        x: &'a mut [u8],
        scales: &'a mut [u8],
        topk_idx: &'a mut [i64],
        topk_weights: &'a mut [f32],
    ) -> Self {
        let counts = &shape.recv_per_src;
        Self {
            x: split_rows(x, counts, shape.x_row_bytes),
            scales: split_rows(scales, counts, shape.scale_row_bytes),
            topk_idx: split_rows(topk_idx, counts, shape.num_topk),
            topk_weights: split_rows(topk_weights, counts, shape.num_topk),
        }
    }
}

/// `buf` cut into consecutive blocks of `counts[s] * row` elements (the last block takes
/// whatever is left, so a short or long buffer shows up in the receiver's length check).
pub fn split_rows<'a, T>(mut buf: &'a mut [T], counts: &[u64], row: usize) -> Vec<&'a mut [T]> {
    let mut blocks = Vec::with_capacity(counts.len());
    for (s, &n) in counts.iter().enumerate() {
        let len = if s + 1 == counts.len() {
            buf.len()
        } else {
            (n as usize).saturating_mul(row).min(buf.len())
        };
        let (block, rest) = std::mem::take(&mut buf).split_at_mut(len);
        blocks.push(block);
        buf = rest;
    }
    blocks
}

/// Supplies the receive buffers once their size is known (the caller may allocate them
/// then, as DeepEP does after its notify step). Every element is written before dispatch
/// returns successfully.
pub trait RecvSink {
    fn prepare(&mut self, shape: RecvShape) -> Result<RecvBuffers<'_>>;
}

/// A sink that owns its buffers, and reuses their memory from one dispatch to the next (a
/// fresh allocation of receive rows on every call spends its time faulting in pages). What
/// the last dispatch left is not zeroed again: every element is overwritten (a pass over
/// the rows that dispatch does not need; only memory a buffer grows by is zeroed).
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
    resize_reusing(&mut v, what, n)?;
    Ok(v)
}

/// `v` resized to `n` elements: the first ones keep what they held, only new ones are zeroed.
fn resize_reusing<T: Clone + Default>(v: &mut Vec<T>, what: &str, n: usize) -> Result<()> {
    if v.len() >= n {
        v.truncate(n);
        return Ok(());
    }
    v.try_reserve_exact(n - v.len()).map_err(|e| Error::Os {
        what: format!("allocating {what} ({n} elements)"),
        detail: e.to_string(),
    })?;
    v.resize(n, T::default());
    Ok(())
}

impl RecvSink for VecSink {
    fn prepare(&mut self, s: RecvShape) -> Result<RecvBuffers<'_>> {
        let n = s.num_recv;
        resize_reusing(
            &mut self.x,
            "received rows",
            s.x_row_bytes.saturating_mul(n),
        )?;
        resize_reusing(
            &mut self.scales,
            "received scales",
            s.scale_row_bytes.saturating_mul(n),
        )?;
        resize_reusing(
            &mut self.topk_idx,
            "received top-k indices",
            s.num_topk.saturating_mul(n),
        )?;
        let k = s.num_topk.saturating_mul(n);
        resize_reusing(&mut self.topk_weights, "received top-k weights", k)?;
        Ok(RecvBuffers::contiguous(
            &s,
            &mut self.x,
            &mut self.scales,
            &mut self.topk_idx,
            &mut self.topk_weights,
        ))
    }
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
    let me = session.transport.rank();
    // Nothing has been sent yet: an error here leaves every rank in step (see `Endpoint`).
    let checked = checks::check(&topo, me, endpoint_id, args, &route)?;
    let plan = &checked.plan;
    let mut source = Sender::new(&topo, me, plan);
    // Writes take their bytes from registered memory: the caller's tensors and the headers.
    let headers = source.headers(plan);
    let mut registered = Registered::new(session.transport);
    let header_keys = headers
        .iter()
        .map(|h| registered.add(h))
        .collect::<Result<Vec<_>>>()?;
    let tk = &checked.tokens;
    let tokens = TokenSources {
        x: registered.add(tk.x)?,
        scales: registered.add(tk.scales)?,
        idx: registered.add(tk.idx)?,
        weights: registered.add(tk.weights)?,
    };
    source.attach(header_keys, tokens);
    let tag = session.seq;
    let announce = Announce {
        tokens: args.num_tokens as u64,
        to_rank: plan.count_to_rank(),
        to_node: plan.count_to_node(),
        tag: 0,
        per_expert: args.num_tokens_per_expert,
        local_experts: args.num_tokens_per_expert.len() / topo.world_size(),
    };
    let record_bytes = checked.layout.record_bytes();
    let mut op = Op::begin(
        session,
        checked.kind,
        checked.format,
        record_bytes,
        announce,
    )?;

    let mut receiver: Option<Receiver> = None;
    let mut forwarder = Forwarder::new(&topo, me);
    loop {
        let mut progress = false;
        if receiver.is_none() && op.metas_ready() {
            let (counts, src_tokens) = op.source_counts();
            let mut r = Receiver::open(&mut op, &checked, counts, &src_tokens, sink)?;
            r.take_own(&checked)?;
            forwarder.start(src_tokens);
            receiver = Some(r);
            progress = true;
        }
        // No data moves before every peer's metadata is in (so that an operation some rank
        // aborts has sent nothing anywhere).
        if let Some(r) = receiver.as_mut() {
            progress |= source.post(&mut op, &checked, payload)?;
            progress |= r.drain(&mut op, &checked.layout)?;
            progress |= forwarder.forward(&mut op, r, &checked, payload)?;
            if forwarder.done(&op)? {
                source.close_nvl(&mut op);
            }
        }
        op.return_credits()?;
        if receiver.is_some() && op.rings_finished() {
            break;
        }
        op.pump(!progress)?;
    }
    op.flush()?;
    let r = receiver.expect("the loop ends after the receiver exists");
    r.finish(args, &checked, forwarder.into_log(), endpoint_id, tag)
}
