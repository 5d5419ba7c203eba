//! Combine, the mirror of dispatch: each rank sends every row it received back to the
//! forwarder of its node that served the row's source (nvl); the forwarder sums the rows of
//! one token over its local ranks and sends one partial per token over rdma; the source sums
//! the partials over nodes.
//!
//! Every token's sum is taken straight out of the receive rings, with no staging: its
//! local rows in ascending local-rank order into the forwarder's partial (which is written
//! where it is sent from), then the partials in ascending node order into the output. The
//! order is fixed, so the result is bitwise reproducible whatever the arrival order.
//!
//! All of it runs in one global order of tokens, by (source rank, token index): each
//! destination sends its rows for a reducer in that order, each reducer sums and sends its
//! partials in that order, and each source finishes its tokens in that order (interleaved
//! with the tokens it reduces for others). A reducer takes a token only once the head of
//! every ring it needs holds that token's record, so records are consumed as they come, and
//! no ring size can deadlock: take the smallest token any rank still waits for. Everything
//! before it is consumed everywhere, so every ring that it needs is either empty (and its
//! space handed back: `RecvRing::credit_due`) or holds its record at the head; the senders
//! of the missing records are destinations (which wait for nothing but space) or reducers
//! that have already summed it (and wait for nothing but space). So that token completes.
//!
//! Each rank plays three roles, each its own type: the [`destination::Destination`] of the
//! dispatch sends its rows back, the [`reducer::Reducer`] (the dispatch's forwarder) sums
//! its node's rows per token, and the [`finisher::Finisher`] (the dispatch's source) sums
//! the partials per token into the output.

mod destination;
mod finisher;
mod reducer;

use super::dispatch::DispatchHandle;
use super::op::{Announce, Op, OpKind, Session};
use super::record::{ElemType, Layout, RecordFormat};
use super::reduce::Dtype;
use super::sources::Registered;
use crate::error::{Error, Result};
use crate::topology::LocalMask;
use crate::transport::TierCounters;
use destination::{Destination, RowSources, Rows};
use finisher::Finisher;
use reducer::Reducer;

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
    /// Where row `j` of the handle's receive order sits in `x` (and `weights`), when `x`
    /// holds more rows than the handle's (one channel's rows inside a Buffer's output);
    /// empty: row `j` is row `j`.
    pub rows_at: &'a [usize],
}

/// Where combine writes: `[num_tokens, hidden]` in `out_dtype`, and `[num_tokens,
/// num_topk]` weights (empty without weights). Every element is written.
pub struct CombineOut<'a> {
    pub x: &'a mut [u8],
    pub weights: &'a mut [f32],
}

/// The partials' memory, kept by the endpoint between combines so that steady-state
/// training steps neither fault in fresh pages nor zero them (every byte is written before
/// it is sent).
#[derive(Debug, Default)]
pub struct Scratch {
    bodies: Vec<u8>,
}

/// `v` with at least `n` elements, reusing its memory; old contents stay (callers overwrite).
fn at_least<T: Copy + Default>(mut v: Vec<T>, n: usize) -> Vec<T> {
    if v.len() < n {
        v.resize(n, T::default());
    }
    v
}

/// One token this rank reduces for its node: (source, index, local ranks that hold a row),
/// and where this rank's own row of it sits among the rows it received (when it holds one).
#[derive(Clone, Copy)]
pub(super) struct Entry {
    src: u32,
    idx: u32,
    mask: LocalMask,
    own_row: usize,
}

/// Row geometry of one combine.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    hidden: usize,
    k: usize,
    dtype: Dtype,
}

impl Shape {
    fn row_bytes(&self) -> usize {
        self.hidden * self.dtype.size()
    }
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
    let plan = &handle.plan;
    // Nothing has been sent yet: an error here leaves every rank in step (see `Endpoint`).
    let c = check(args, handle, endpoint_id, &out)?;
    let rows = Rows {
        x: args.x,
        weights: args.weights.map(bytemuck::cast_slice).unwrap_or(&[]),
        row_bytes: c.shape.row_bytes(),
        topk: c.shape.k,
        at: args.rows_at,
    };
    let mut dest = Destination::new(handle, &topo, me);
    let mut red = Reducer::new(
        handle,
        &topo,
        me,
        c.shape,
        dest.take_own_rows(),
        std::mem::take(&mut scratch.bodies),
    )?;
    let mut fin = Finisher::new(plan, &topo, me, c.shape, args.out_dtype, out.x, out.weights);
    // Writes take their bytes from registered memory: the caller's rows and weights, the
    // rows' headers, and the partials where they are summed.
    let headers = dest.headers(handle);
    let mut registered = Registered::new(session.transport);
    let row_sources = RowSources {
        headers: headers
            .iter()
            .map(|h| registered.add(h))
            .collect::<Result<Vec<_>>>()?,
        x: registered.add(rows.x)?,
        weights: registered.add(rows.weights)?,
    };
    let (ptr, len) = red.partials_memory();
    // SAFETY: the reducer keeps its partials in place until after this guard drops (it is
    // declared before it), and writes a partial only before posting it.
    let partials = unsafe { registered.add_raw(ptr, len)? };
    let announce = Announce {
        tag: handle.tag,
        ..Announce::default()
    };
    let record_bytes = c.layout.record_bytes();
    let mut op = Op::begin(session, OpKind::Combine, c.format, record_bytes, announce)?;
    red.expect(&mut op);
    fin.expect(&mut op, plan);

    let mut started = false;
    loop {
        let mut progress = false;
        if !started && op.metas_ready() {
            if let Some((p, tag)) = op.tag_mismatch() {
                return Err(Error::protocol(
                    p,
                    format!(
                        "rank {p} combines with the handle of operation #{tag}, rank {me} with \
                         #{}: every rank must pass the handle of the same dispatch",
                        handle.tag
                    ),
                ));
            }
            started = true;
            progress = true;
        }
        // No data moves before every peer's metadata is in.
        if started {
            progress |= dest.post(&mut op, &rows, &row_sources, payload)?;
            progress |= red.advance(&mut op, &rows, &mut fin, plan)?;
            progress |= red.post_partials(&mut op, partials, &rows, &row_sources, payload)?;
            op.return_credits()?;
            if red.finished() && op.rings_finished() {
                break;
            }
        }
        op.pump(!progress)?;
    }
    op.flush()?;
    drop(op);
    drop(registered);
    scratch.bodies = red.bodies;
    Ok(())
}

/// A combine whose arguments passed every check.
struct Checked {
    shape: Shape,
    /// Record sections: row, top-k weights.
    layout: Layout,
    format: RecordFormat,
}

fn check(
    args: &CombineArgs<'_>,
    handle: &DispatchHandle,
    endpoint_id: u64,
    out: &CombineOut<'_>,
) -> Result<Checked> {
    let n_tok = handle.plan.num_tokens();
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
    let x_rows = if args.rows_at.is_empty() {
        handle.num_recv
    } else {
        args.x.len() / rb.max(1)
    };
    if x_rows.checked_mul(rb) != Some(args.x.len()) {
        return Err(Error::invalid(
            "x",
            format!(
                "{} rows (as many as the handle's dispatch delivered to this rank)",
                handle.num_recv
            ),
            format!("{} rows", args.x.len() / rb.max(1)),
        ));
    }
    if !args.rows_at.is_empty()
        && (args.rows_at.len() != handle.num_recv || args.rows_at.iter().any(|&r| r >= x_rows))
    {
        return Err(Error::invalid(
            "rows_at",
            format!("{} row numbers below {x_rows}", handle.num_recv),
            format!("{} row numbers", args.rows_at.len()),
        ));
    }
    if let Some(w) = args.weights
        && x_rows.checked_mul(k) != Some(w.len())
    {
        return Err(Error::invalid(
            "topk_weights",
            format!("{x_rows} x {k} values"),
            w.len(),
        ));
    }
    let out_rb = args.hidden * args.out_dtype.size();
    if n_tok.checked_mul(out_rb) != Some(out.x.len()) || n_tok * k != out.weights.len() {
        return Err(Error::invalid(
            "combine output",
            format!("{n_tok} rows of {out_rb} bytes and {n_tok} x {k} weights"),
            format!("{} bytes and {} weights", out.x.len(), out.weights.len()),
        ));
    }
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
    Ok(Checked {
        shape: Shape {
            hidden: args.hidden,
            k,
            dtype: args.dtype,
        },
        layout: Layout::new(&[rb, k * 4]),
        format,
    })
}
