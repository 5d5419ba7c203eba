//! Channels, as DeepEP's: one rank's dispatch and combine split over several endpoints,
//! each with its own transport and its own thread, each owning a contiguous range of every
//! rank's tokens, so that one rank's bandwidth is not capped by one core.
//!
//! Results are bitwise those of one channel. Receive order stays (source rank, token
//! index): channel `c` carries tokens `channel_range(n, C, c)` of a source with `n`
//! tokens, the ranges ascend with `c`, so a source's rows are channel 0's, then channel 1's,
//! and so on; each channel writes its rows of every source straight into that place of one
//! output (no merge copy). Combine sums each token on exactly one channel, in the order one
//! channel would, so the sums are the same.
//!
//! Every rank must run the same number of channels (each channel is a world of its own).
//!
//! Channel 0's share of an operation runs on the calling thread (in a dispatch it also hands
//! every channel its rows, where the caller's sink is), the others' on worker threads of the
//! rank's channels, kept for their life: a thread started per operation costs tens of
//! microseconds per channel, as much as a small operation's data.

use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use crate::endpoint::{Endpoint, Stats};
use crate::error::{Error, Result};
use crate::handoff::PendingHandle;
use crate::protocol::combine::{CombineArgs, CombineOut};
use crate::protocol::dispatch::{
    DispatchArgs, DispatchHandle, DispatchOutput, RecvBuffers, RecvShape, RecvSink, Route,
    TopkArgs, VecSink,
};
use crate::protocol::dispatch::{check_tokens, split_rows};
use crate::protocol::op::OpKind;
use crate::routing::SendPlan;

/// Tokens `[lo, hi)` of `num_tokens` that channel `c` of `channels` carries: contiguous,
/// ascending with `c`, sizes differing by at most one.
pub fn channel_range(num_tokens: usize, channels: usize, c: usize) -> Range<usize> {
    let at = |c: usize| (num_tokens as u128 * c as u128 / channels as u128) as usize;
    at(c)..at(c + 1)
}

/// The handle of a dispatch over channels: each channel's own handle, and where each
/// channel's received rows sit in the merged receive order.
#[derive(Debug)]
pub struct ChannelHandle {
    pub parts: Vec<Arc<DispatchHandle>>,
    /// Per channel, row `j` of its receive order is row `rows_at[c][j]` of the output.
    pub rows_at: Vec<Vec<usize>>,
    pub num_recv: usize,
    /// Per output row: the source rank and the source's token index (DeepEP's
    /// `recv_src_idx`).
    pub recv_src_rank: Vec<u32>,
    pub recv_src_idx: Vec<u32>,
    /// Rows from each source rank.
    pub recv_per_src: Vec<u64>,
}

#[derive(Debug)]
pub struct ChannelDispatchOutput {
    pub num_recv: usize,
    /// Per local expert, rounded up to `expert_alignment`; empty without top-k or counts.
    pub num_recv_tokens_per_expert: Vec<i64>,
    pub handle: Arc<ChannelHandle>,
}

/// Where a dispatch over channels sends its tokens.
pub enum ChannelRoute<'a> {
    /// `[num_tokens, world_size]` booleans, as `Endpoint::plan` takes them.
    Fresh(&'a [bool]),
    Cached(&'a ChannelHandle),
}

/// Where a dispatch over channels queued behind others sends its tokens (as `QueuedRoute`
/// for one endpoint).
pub enum QueuedChannelRoute {
    /// `is_token_in_rank`, flattened.
    Fresh(Vec<bool>),
    /// The handle of an earlier dispatch, resolved when this one runs.
    Cached(PendingHandle<ChannelHandle>),
}

/// One rank's channels: endpoints of the same rank in as many worlds, and a worker thread
/// for each.
pub struct Channels {
    eps: Vec<Endpoint>,
    workers: rayon::ThreadPool,
}

impl Channels {
    pub fn new(eps: Vec<Endpoint>) -> Result<Self> {
        let Some(first) = eps.first() else {
            return Err(Error::invalid("channels", "at least one endpoint", 0));
        };
        let (rank, topo) = (first.rank(), *first.topology());
        if let Some(ep) = eps
            .iter()
            .find(|ep| ep.rank() != rank || *ep.topology() != topo)
        {
            return Err(Error::invalid(
                "channels",
                format!(
                    "endpoints of rank {rank} in {}x{} worlds",
                    topo.num_nodes(),
                    topo.ranks_per_node()
                ),
                format!(
                    "one of rank {} in a {}x{} world",
                    ep.rank(),
                    ep.topology().num_nodes(),
                    ep.topology().ranks_per_node()
                ),
            ));
        }
        // Channel 0 runs on the calling thread: the others need one worker each (a pool
        // has one at least).
        let num_workers = (eps.len() - 1).max(1);
        let workers = rayon::ThreadPoolBuilder::new()
            .num_threads(num_workers)
            .thread_name(move |c| format!("dualcomm-r{rank}-channel{}", c + 1))
            .build()
            .map_err(|e| Error::Os {
                what: format!("starting {num_workers} channel threads"),
                detail: e.to_string(),
            })?;
        Ok(Self { eps, workers })
    }

    pub fn len(&self) -> usize {
        self.eps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.eps.is_empty()
    }

    pub fn endpoint(&mut self, c: usize) -> &mut Endpoint {
        &mut self.eps[c]
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.eps
    }

    pub fn endpoints_mut(&mut self) -> &mut [Endpoint] {
        &mut self.eps
    }

    pub fn into_endpoints(self) -> Vec<Endpoint> {
        self.eps
    }

    pub fn rank(&self) -> usize {
        self.eps[0].rank()
    }

    /// Every channel's traffic, summed (connections too: each channel has its own).
    /// Per rank, the nanoseconds waited for it since the last call (`Endpoint::take_waits`):
    /// the channels wait side by side, so the longest channel's wait counts.
    pub fn take_waits(&mut self) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for ep in &mut self.eps {
            let w = ep.take_waits();
            if out.is_empty() {
                out = w;
            } else {
                out.iter_mut().zip(w).for_each(|(a, b)| *a = (*a).max(b));
            }
        }
        out
    }

    pub fn stats(&self) -> Stats {
        self.eps
            .iter()
            .map(Endpoint::stats)
            .fold(Stats::default(), |a, b| Stats {
                nvl_payload_bytes: a.nvl_payload_bytes + b.nvl_payload_bytes,
                rdma_payload_bytes: a.rdma_payload_bytes + b.rdma_payload_bytes,
                nvl_wire_bytes: a.nvl_wire_bytes + b.nvl_wire_bytes,
                rdma_wire_bytes: a.rdma_wire_bytes + b.rdma_wire_bytes,
                operations: a.operations.max(b.operations),
                rejected_connections: a.rejected_connections + b.rejected_connections,
                nvl_connections: a.nvl_connections + b.nvl_connections,
                rdma_connections: a.rdma_connections + b.rdma_connections,
            })
    }

    /// Runs `f` on every channel at once, channel 0 on this thread and the others on the
    /// workers; returns once all are done (a panic in any of them is raised here then).
    fn each<T: Send>(&mut self, f: impl Fn(usize, &mut Endpoint) -> T + Sync) -> Vec<T> {
        self.each_with_first(|ep| f(0, ep), |c, ep| f(c, ep))
    }

    /// As `each`, with channel 0's job its own: it runs on this thread, so it may hold
    /// what cannot cross threads (the caller's sink).
    fn each_with_first<T: Send>(
        &mut self,
        first: impl FnOnce(&mut Endpoint) -> T,
        rest: impl Fn(usize, &mut Endpoint) -> T + Sync,
    ) -> Vec<T> {
        let mut out: Vec<Option<T>> = self.eps.iter().map(|_| None).collect();
        let (ep0, eps) = self.eps.split_first_mut().expect("one channel at least");
        let (out0, outs) = out.split_first_mut().expect("one channel at least");
        let rest = &rest;
        self.workers.in_place_scope(|s| {
            for (c, (ep, slot)) in eps.iter_mut().zip(outs).enumerate() {
                s.spawn(move |_| *slot = Some(rest(c + 1, ep)));
            }
            *out0 = Some(first(ep0));
        });
        out.into_iter()
            .map(|v| v.expect("every channel's job ran"))
            .collect()
    }

    /// Refuses the next operation on every channel (see `Endpoint::reject`): peers hear
    /// of `e` instead of waiting for this rank.
    fn reject<T>(&mut self, kind: OpKind, e: Error) -> Result<T> {
        let results = self.each(|_, ep| ep.reject::<()>(kind, e.clone()));
        first_error(results)?;
        Err(e)
    }

    /// Dispatches over every channel; the received rows of all channels go to the buffers
    /// `sink` supplies, in the receive order of one channel.
    pub fn dispatch(
        &mut self,
        args: &DispatchArgs<'_>,
        route: ChannelRoute<'_>,
        sink: &mut dyn RecvSink,
    ) -> Result<ChannelDispatchOutput> {
        let nc = self.len();
        let kind = match route {
            ChannelRoute::Fresh(_) => OpKind::Dispatch,
            ChannelRoute::Cached(_) => OpKind::CachedDispatch,
        };
        let parts = match self.split(args, &route) {
            Ok(p) => p,
            Err(e @ Error::InvalidArgument { .. }) => return self.reject(kind, e),
            Err(e) => return Err(e),
        };
        let timeout = self.eps[0].config().timeout;
        let (mut sinks, coordinator) = channel_sinks(nc - 1, self.eps[0].rank(), timeout);
        let mut lead = LeadSink {
            rank: self.eps[0].rank(),
            sink: Some(sink),
            coordinator: Some(coordinator),
            alignment: args.expert_alignment,
            scratch: VecSink::default(),
        };
        let run = |part: &Part, ep: &mut Endpoint, sink: &mut dyn RecvSink| {
            let a = part.args(args);
            let route = match &part.route {
                PartRoute::Fresh(plan) => Route::Fresh(Arc::clone(plan)),
                PartRoute::Cached(h) => Route::Cached(h),
            };
            ep.dispatch(&a, route, sink)
        };
        let sinks = std::sync::Mutex::new(sinks.iter_mut().map(Some).collect::<Vec<_>>());
        // Channel 0 on this thread, where the caller's sink is: it hands every channel its
        // rows once all have shown their receive counts. The others on the workers.
        let results = self.each_with_first(
            |ep| {
                let r = run(&parts[0], ep, &mut lead);
                lead.close();
                r
            },
            |c, ep| {
                let sink = sinks.lock().unwrap()[c - 1].take().expect("one sink each");
                // The sink must go (and with it its end of the shape channel) when the job
                // ends, so that channel 0 never waits for a finished channel.
                let r = run(&parts[c], ep, sink);
                sink.close();
                r
            },
        );
        let outs = first_error(results)?;
        Ok(merge(outs, args.expert_alignment))
    }

    /// A dispatch queued behind others (see `Endpoint::dispatch_queued`): a cached one's
    /// handle resolves only now. On success `result` resolves to this dispatch's handle.
    pub fn dispatch_queued(
        &mut self,
        args: &DispatchArgs<'_>,
        route: &QueuedChannelRoute,
        sink: &mut dyn RecvSink,
        result: &PendingHandle<ChannelHandle>,
    ) -> Result<ChannelDispatchOutput> {
        let out = match route {
            QueuedChannelRoute::Fresh(in_rank) => {
                self.dispatch(args, ChannelRoute::Fresh(in_rank), sink)
            }
            QueuedChannelRoute::Cached(h) => match h.resolve() {
                Ok(h) => self.dispatch(args, ChannelRoute::Cached(h), sink),
                // This rank will not run it: its peers hear so.
                Err(e) => self.reject(OpKind::CachedDispatch, e),
            },
        }?;
        result.fill(&out.handle);
        Ok(out)
    }

    /// A combine queued behind others, of a dispatch whose handle resolves only now.
    pub fn combine_queued(
        &mut self,
        args: &CombineArgs<'_>,
        handle: &PendingHandle<ChannelHandle>,
        out: CombineOut<'_>,
    ) -> Result<()> {
        match handle.resolve() {
            Ok(h) => self.combine(args, h, out),
            Err(e) => self.reject(OpKind::Combine, e),
        }
    }

    /// Combines over every channel: each sums its tokens into its rows of `out`.
    pub fn combine(
        &mut self,
        args: &CombineArgs<'_>,
        handle: &ChannelHandle,
        out: CombineOut<'_>,
    ) -> Result<()> {
        let nc = self.len();
        if !args.rows_at.is_empty() {
            let e = Error::invalid("rows_at", "empty (channels place rows themselves)", "rows");
            return self.reject(OpKind::Combine, e);
        }
        if handle.parts.len() != nc {
            let e = Error::invalid(
                "handle",
                format!("the handle of a dispatch over {nc} channels"),
                format!("one over {}", handle.parts.len()),
            );
            return self.reject(OpKind::Combine, e);
        }
        let k = if args.weights.is_some() {
            args.num_topk
        } else {
            0
        };
        let tokens: Vec<usize> = handle.parts.iter().map(|h| h.plan.num_tokens()).collect();
        let out_rb = args.hidden * args.out_dtype.size();
        let outs = std::sync::Mutex::new(
            split_by(out.x, &tokens, out_rb)
                .into_iter()
                .zip(split_by(out.weights, &tokens, k))
                .map(Some)
                .collect::<Vec<_>>(),
        );
        let results = self.each(|c, ep| {
            let (x, weights) = outs.lock().unwrap()[c].take().expect("one output each");
            let rows_at = &handle.rows_at[c];
            // Empty `rows_at` means "x in receive order": a channel that received nothing
            // gets no rows instead.
            let a = if rows_at.is_empty() {
                CombineArgs {
                    x: &[],
                    weights: args.weights.map(|_| &[][..]),
                    ..*args
                }
            } else {
                CombineArgs { rows_at, ..*args }
            };
            ep.combine(&a, &handle.parts[c], CombineOut { x, weights })
        });
        first_error(results).map(|_| ())
    }

    /// Each channel's share of a dispatch: its token range, plan or handle, and counts.
    fn split(&self, args: &DispatchArgs<'_>, route: &ChannelRoute<'_>) -> Result<Vec<Part>> {
        let (nc, n) = (self.len(), args.num_tokens);
        let topo = *self.eps[0].topology();
        let w = topo.world_size();
        check_tokens(&topo, args)?;
        let ranges: Vec<_> = (0..nc).map(|c| channel_range(n, nc, c)).collect();
        let routes: Vec<PartRoute> = match route {
            ChannelRoute::Fresh(in_rank) => {
                if in_rank.len() != n * w {
                    return Err(Error::invalid(
                        "is_token_in_rank",
                        format!("{n} x {w} values"),
                        in_rank.len(),
                    ));
                }
                ranges
                    .iter()
                    .map(|r| {
                        let plan = self.eps[0].plan(&in_rank[r.start * w..r.end * w], r.len())?;
                        Ok(PartRoute::Fresh(plan))
                    })
                    .collect::<Result<_>>()?
            }
            ChannelRoute::Cached(h) => {
                if h.parts.len() != nc {
                    return Err(Error::invalid(
                        "handle",
                        format!("the handle of a dispatch over {nc} channels"),
                        format!("one over {}", h.parts.len()),
                    ));
                }
                h.parts.iter().cloned().map(PartRoute::Cached).collect()
            }
        };
        let per_expert = per_channel_expert_counts(args, &ranges)?;
        Ok(ranges
            .into_iter()
            .zip(routes)
            .zip(per_expert)
            .map(|((tokens, route), per_expert)| Part {
                tokens,
                route,
                per_expert,
            })
            .collect())
    }
}

enum PartRoute {
    Fresh(Arc<SendPlan>),
    Cached(Arc<DispatchHandle>),
}

struct Part {
    tokens: Range<usize>,
    route: PartRoute,
    per_expert: Vec<u64>,
}

impl Part {
    /// The dispatch arguments of this channel's tokens. Per-expert receive counts are summed
    /// over channels before they are rounded up, so each channel counts unrounded.
    fn args<'a>(&'a self, a: &DispatchArgs<'a>) -> DispatchArgs<'a> {
        let r = &self.tokens;
        let rows = |buf: &'a [u8], row: usize| {
            &buf[(r.start * row).min(buf.len())..(r.end * row).min(buf.len())]
        };
        DispatchArgs {
            num_tokens: r.len(),
            x: rows(a.x, a.x_row_bytes),
            scales: rows(a.scales, a.scale_row_bytes),
            topk: a.topk.as_ref().map(|t| TopkArgs {
                idx: &t.idx[(r.start * t.num_topk).min(t.idx.len())
                    ..(r.end * t.num_topk).min(t.idx.len())],
                weights: &t.weights[(r.start * t.num_topk).min(t.weights.len())
                    ..(r.end * t.num_topk).min(t.weights.len())],
                ..*t
            }),
            num_tokens_per_expert: &self.per_expert,
            expert_alignment: 1,
            ..*a
        }
    }
}

/// `num_tokens_per_expert` split over channels. With top-k each channel counts its own
/// tokens (a token once per expert), and the sums must match what the caller gave; without
/// top-k the caller's counts are dealt out within each channel's token count.
fn per_channel_expert_counts(
    args: &DispatchArgs<'_>,
    ranges: &[Range<usize>],
) -> Result<Vec<Vec<u64>>> {
    let given = args.num_tokens_per_expert;
    if given.is_empty() {
        return Ok(vec![Vec::new(); ranges.len()]);
    }
    let Some(t) = &args.topk else {
        // Each count is dealt over the channels, none given more than its tokens (what
        // every channel checks); the receivers only add them up.
        let mut v = vec![vec![0; given.len()]; ranges.len()];
        for (e, &g) in given.iter().enumerate() {
            let mut left = g;
            for (c, r) in ranges.iter().enumerate() {
                let here = left.min(r.len() as u64);
                v[c][e] = here;
                left -= here;
            }
            // More than the tokens: the last channel keeps the rest and its checks name it.
            *v.last_mut()
                .expect("one channel at least")
                .get_mut(e)
                .expect("sized") += left;
        }
        return Ok(v);
    };
    let (k, ne) = (t.num_topk, given.len());
    if t.idx.len() != args.num_tokens * k {
        // The channel's own checks name it.
        return Ok(vec![given.to_vec(); ranges.len()]);
    }
    let counts: Vec<Vec<u64>> = ranges
        .iter()
        .map(|r| {
            let mut v = vec![0u64; ne];
            for row in t.idx[r.start * k..r.end * k].chunks(k.max(1)) {
                for (j, &e) in row.iter().enumerate() {
                    if e >= 0 && (e as usize) < ne && !row[..j].contains(&e) {
                        v[e as usize] += 1;
                    }
                }
            }
            v
        })
        .collect();
    if let Some(e) = (0..ne).find(|&e| counts.iter().map(|v| v[e]).sum::<u64>() != given[e]) {
        return Err(Error::invalid(
            "num_tokens_per_expert",
            format!(
                "the tokens topk_idx sends to each expert ({} for expert {e})",
                counts.iter().map(|v| v[e]).sum::<u64>()
            ),
            given[e],
        ));
    }
    Ok(counts)
}

/// The first error of any channel: a rejected argument or a peer's abort first (they say
/// why), then the rest.
fn first_error<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    let rank = |e: &Error| match e {
        Error::InvalidArgument { .. } => 0,
        Error::PeerAborted { .. } => 1,
        _ => 2,
    };
    if let Some(e) = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .min_by_key(|e| rank(e))
    {
        return Err(e.clone());
    }
    Ok(results.into_iter().map(|r| r.expect("no error")).collect())
}

/// `buf` cut into consecutive pieces of `counts[c] * row` elements (the last takes the rest,
/// so that a wrong length reaches the channel's own check).
fn split_by<'a, T>(buf: &'a mut [T], counts: &[usize], row: usize) -> Vec<&'a mut [T]> {
    let counts: Vec<u64> = counts.iter().map(|&n| n as u64).collect();
    split_rows(buf, &counts, row)
}

fn align_up(n: i64, alignment: usize) -> i64 {
    let a = alignment.max(1) as i64;
    (n + a - 1) / a * a
}

/// The channels' outputs as one: rows in (source, channel, index) order.
fn merge(outs: Vec<DispatchOutput>, alignment: usize) -> ChannelDispatchOutput {
    let nc = outs.len();
    let w = outs[0].handle.recv_per_src.len();
    let count = |c: usize, s: usize| outs[c].handle.recv_per_src[s] as usize;
    let recv_per_src: Vec<u64> = (0..w)
        .map(|s| (0..nc).map(|c| count(c, s) as u64).sum())
        .collect();
    let num_recv: usize = outs.iter().map(|o| o.num_recv).sum();
    let mut rows_at: Vec<Vec<usize>> = outs
        .iter()
        .map(|o| Vec::with_capacity(o.num_recv))
        .collect();
    let mut recv_src_rank = Vec::with_capacity(num_recv);
    let mut recv_src_idx = Vec::with_capacity(num_recv);
    let mut local_start = vec![0usize; nc];
    for s in 0..w {
        let total: u64 = outs.iter().map(|o| o.handle.src_num_tokens[s]).sum();
        for c in 0..nc {
            let h = &outs[c].handle;
            let first = channel_range(total as usize, nc, c).start as u32;
            for j in local_start[c]..local_start[c] + count(c, s) {
                rows_at[c].push(recv_src_rank.len());
                recv_src_rank.push(s as u32);
                recv_src_idx.push(first + h.recv_src_idx[j]);
            }
            local_start[c] += count(c, s);
        }
    }
    let per_expert = if outs.iter().any(|o| o.num_recv_tokens_per_expert.is_empty()) {
        Vec::new()
    } else {
        (0..outs[0].num_recv_tokens_per_expert.len())
            .map(|e| {
                let n: i64 = outs.iter().map(|o| o.num_recv_tokens_per_expert[e]).sum();
                align_up(n, alignment)
            })
            .collect()
    };
    ChannelDispatchOutput {
        num_recv,
        num_recv_tokens_per_expert: per_expert,
        handle: Arc::new(ChannelHandle {
            parts: outs.into_iter().map(|o| o.handle).collect(),
            rows_at,
            num_recv,
            recv_src_rank,
            recv_src_idx,
            recv_per_src,
        }),
    }
}

/// What the coordinator answers a channel that showed its receive shape.
enum Answer<'a> {
    /// Its rows inside the caller's buffers.
    Rows(RecvBuffers<'a>),
    /// Another channel ended without a shape: the dispatch fails, but this channel's runs on
    /// every rank and must finish, so it receives into memory of its own.
    Scratch,
    Failed(Error),
}

/// A channel's sink: shows its shape to the coordinator and takes the memory it answers.
struct ChannelSink<'a> {
    shapes: Option<Sender<RecvShape>>,
    answers: Receiver<Answer<'a>>,
    scratch: VecSink,
    timeout: Duration,
    rank: usize,
}

impl ChannelSink<'_> {
    fn close(&mut self) {
        self.shapes = None;
    }
}

impl<'a> RecvSink for ChannelSink<'a> {
    fn prepare(&mut self, shape: RecvShape) -> Result<RecvBuffers<'_>> {
        let gone = || Error::Internal {
            rank: self.rank,
            detail: "the channel coordinator stopped".into(),
        };
        let tx = self.shapes.take().ok_or_else(gone)?;
        tx.send(shape.clone()).map_err(|_| gone())?;
        match self.answers.recv_timeout(self.timeout) {
            Ok(Answer::Rows(b)) => Ok(b),
            Ok(Answer::Scratch) => self.scratch.prepare(shape),
            Ok(Answer::Failed(e)) => Err(e),
            Err(_) => Err(Error::Timeout {
                what: "the other channels' receive counts".into(),
                timeout: self.timeout,
            }),
        }
    }
}

/// Channel 0's side of the other channels' sinks: their shapes come in, their rows go out.
struct Coordinator<'a> {
    shapes: Vec<Receiver<RecvShape>>,
    answers: Vec<Sender<Answer<'a>>>,
    timeout: Duration,
}

fn channel_sinks<'a>(
    nc: usize,
    rank: usize,
    timeout: Duration,
) -> (Vec<ChannelSink<'a>>, Coordinator<'a>) {
    let mut sinks = Vec::with_capacity(nc);
    let mut coordinator = Coordinator {
        shapes: Vec::with_capacity(nc),
        answers: Vec::with_capacity(nc),
        timeout,
    };
    for _ in 0..nc {
        let (shape_tx, shape_rx) = mpsc::channel();
        let (answer_tx, answer_rx) = mpsc::channel();
        sinks.push(ChannelSink {
            shapes: Some(shape_tx),
            answers: answer_rx,
            scratch: VecSink::default(),
            timeout,
            rank,
        });
        coordinator.shapes.push(shape_rx);
        coordinator.answers.push(answer_tx);
    }
    (sinks, coordinator)
}

impl<'a> Coordinator<'a> {
    /// The other channels' shapes, None for one that ended without showing it.
    fn shapes(&self) -> Vec<Option<RecvShape>> {
        // A channel's job ends (and drops its sender) within its deadline; the extra second
        // only keeps this wait bounded should it not.
        let wait = self.timeout + Duration::from_secs(1);
        self.shapes
            .iter()
            .map(|rx| rx.recv_timeout(wait).ok())
            .collect()
    }

    /// The dispatch fails (a channel ended without a shape): the channels that showed
    /// theirs still run on every rank, into memory of their own.
    fn scratch_for(&self, shapes: &[Option<RecvShape>]) {
        for (tx, shape) in self.answers.iter().zip(shapes) {
            if shape.is_some() {
                let _ = tx.send(Answer::Scratch);
            }
        }
    }
}

/// Channel 0's sink: the caller's, and the coordinator of the other channels. Once every
/// channel has shown its receive counts it asks the caller's sink for buffers of their sum
/// and hands each channel its rows of every source (channel 0's first).
struct LeadSink<'a> {
    rank: usize,
    sink: Option<&'a mut dyn RecvSink>,
    /// Taken once the other channels have been answered.
    coordinator: Option<Coordinator<'a>>,
    alignment: usize,
    scratch: VecSink,
}

impl LeadSink<'_> {
    /// Channel 0 ended: answers the other channels if its own shape never came.
    fn close(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.scratch_for(&c.shapes());
        }
    }
}

impl<'a> RecvSink for LeadSink<'a> {
    fn prepare(&mut self, shape: RecvShape) -> Result<RecvBuffers<'_>> {
        let twice = || Error::Internal {
            rank: self.rank,
            detail: "channel 0 prepared its receive buffers twice".into(),
        };
        let c = self.coordinator.take().ok_or_else(twice)?;
        let others = c.shapes();
        if others.iter().any(Option::is_none) {
            c.scratch_for(&others);
            return self.scratch.prepare(shape);
        }
        let shapes: Vec<RecvShape> = std::iter::once(shape)
            .chain(others.into_iter().map(Option::unwrap))
            .collect();
        let merged = merged_shape(&shapes, self.alignment);
        let sink = self.sink.take().ok_or_else(twice)?;
        match sink.prepare(merged) {
            Ok(bufs) => {
                let mut rows = split_channels(bufs, &shapes).into_iter();
                let own = rows.next().expect("channel 0's rows");
                for (tx, rows) in c.answers.iter().zip(rows) {
                    let _ = tx.send(Answer::Rows(rows));
                }
                Ok(own)
            }
            Err(e) => {
                for tx in &c.answers {
                    let _ = tx.send(Answer::Failed(e.clone()));
                }
                Err(e)
            }
        }
    }
}

/// The channels' shapes as one; per-expert counts are summed, then aligned (as one channel
/// would count them).
fn merged_shape(shapes: &[RecvShape], alignment: usize) -> RecvShape {
    let sum = |f: &dyn Fn(&RecvShape) -> &[u64]| -> Vec<u64> {
        let mut v = f(&shapes[0]).to_vec();
        for s in &shapes[1..] {
            for (a, b) in v.iter_mut().zip(f(s)) {
                *a += b;
            }
        }
        v
    };
    let per_expert = if shapes
        .iter()
        .all(|s| s.num_recv_tokens_per_expert.is_some())
    {
        let mut v = shapes[0]
            .num_recv_tokens_per_expert
            .clone()
            .expect("checked");
        for s in &shapes[1..] {
            for (a, b) in v
                .iter_mut()
                .zip(s.num_recv_tokens_per_expert.as_ref().expect("checked"))
            {
                *a += b;
            }
        }
        Some(v.into_iter().map(|n| align_up(n, alignment)).collect())
    } else {
        None
    };
    RecvShape {
        num_recv: shapes.iter().map(|s| s.num_recv).sum(),
        recv_per_src: sum(&|s| &s.recv_per_src),
        node_matrix: sum(&|s| &s.node_matrix),
        num_recv_tokens_per_expert: per_expert,
        ..shapes[0].clone()
    }
}

/// Source `s`'s block of `blocks` cut into the channels' rows (`counts(s)`), each piece
/// appended to its channel's buffers (`field` picks which).
fn deal<'a, T>(
    blocks: Vec<&'a mut [T]>,
    counts: &dyn Fn(usize) -> Vec<u64>,
    row: usize,
    out: &mut [RecvBuffers<'a>],
    field: impl for<'b> Fn(&'b mut RecvBuffers<'a>) -> &'b mut Vec<&'a mut [T]>,
) {
    for (s, block) in blocks.into_iter().enumerate() {
        for (c, piece) in split_rows(block, &counts(s), row).into_iter().enumerate() {
            field(&mut out[c]).push(piece);
        }
    }
}

/// Each source's block of `bufs` cut into the channels' rows, channel 0's first.
fn split_channels<'a>(bufs: RecvBuffers<'a>, shapes: &[RecvShape]) -> Vec<RecvBuffers<'a>> {
    let nc = shapes.len();
    let mut out: Vec<RecvBuffers<'a>> = (0..nc)
        .map(|_| RecvBuffers {
            x: Vec::new(),
            scales: Vec::new(),
            topk_idx: Vec::new(),
            topk_weights: Vec::new(),
        })
        .collect();
    let counts = |s: usize| -> Vec<u64> { shapes.iter().map(|sh| sh.recv_per_src[s]).collect() };
    let s0 = &shapes[0];
    deal(bufs.x, &counts, s0.x_row_bytes, &mut out, |b| &mut b.x);
    deal(bufs.scales, &counts, s0.scale_row_bytes, &mut out, |b| {
        &mut b.scales
    });
    deal(bufs.topk_idx, &counts, s0.num_topk, &mut out, |b| {
        &mut b.topk_idx
    });
    deal(bufs.topk_weights, &counts, s0.num_topk, &mut out, |b| {
        &mut b.topk_weights
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tile_the_tokens_in_order() {
        for n in [0usize, 1, 5, 7, 1024] {
            for nc in 1..5 {
                let rs: Vec<_> = (0..nc).map(|c| channel_range(n, nc, c)).collect();
                assert_eq!(rs[0].start, 0);
                assert_eq!(rs[nc - 1].end, n);
                for c in 1..nc {
                    assert_eq!(rs[c].start, rs[c - 1].end);
                }
                let (lo, hi) = (
                    rs.iter().map(|r| r.len()).min().unwrap(),
                    rs.iter().map(|r| r.len()).max().unwrap(),
                );
                assert!(hi - lo <= 1, "{n} over {nc}: {rs:?}");
            }
        }
    }
}
