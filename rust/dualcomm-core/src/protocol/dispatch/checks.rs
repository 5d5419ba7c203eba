//! A dispatch's arguments, checked before anything is sent, and this rank's own tokens as
//! the record sections they travel in.

use std::sync::Arc;

use super::{DispatchArgs, DispatchHandle, Route};
use crate::error::{Error, Result};
use crate::protocol::meta::MAX_LOCAL_EXPERTS;
use crate::protocol::op::{MAX_TOKENS, OpKind};
use crate::protocol::record::{Layout, RecordFormat};
use crate::routing::{SendPlan, check_expert_indices, experts_per_rank};
use crate::topology::Topology;

/// A dispatch whose arguments passed every check.
pub(super) struct Checked<'a> {
    pub plan: Arc<SendPlan>,
    pub kind: OpKind,
    /// The earlier dispatch a cached dispatch repeats.
    pub cached: Option<&'a DispatchHandle>,
    pub format: RecordFormat,
    /// Record sections: row, scales, top-k indices, top-k weights.
    pub layout: Layout,
    pub tokens: Tokens<'a>,
    /// This rank's experts: `[lo, hi)` (empty without top-k).
    pub experts: (i64, i64),
    pub expert_alignment: usize,
}

/// This rank's tokens, cut into the sections of their records.
pub(super) struct Tokens<'a> {
    pub x: &'a [u8],
    pub scales: &'a [u8],
    pub idx: &'a [u8],
    pub weights: &'a [u8],
    pub x_bytes: usize,
    pub scale_bytes: usize,
    pub topk: usize,
}

impl<'a> Tokens<'a> {
    pub fn sections(&self, tok: usize) -> [&'a [u8]; 4] {
        let (xb, sb, k) = (self.x_bytes, self.scale_bytes, self.topk);
        [
            &self.x[tok * xb..(tok + 1) * xb],
            &self.scales[tok * sb..(tok + 1) * sb],
            &self.idx[tok * k * 8..(tok + 1) * k * 8],
            &self.weights[tok * k * 4..(tok + 1) * k * 4],
        ]
    }

    /// Bytes of token data (rows and scales) per token: what payload counters count.
    pub fn payload_bytes(&self) -> usize {
        self.x_bytes + self.scale_bytes
    }
}

/// `num_tokens_per_expert`: whole blocks of experts per rank, few enough per rank for the
/// metadata, and (with top-k) exactly what `topk_idx` says, since peers size from it.
fn check_expert_counts(topo: &Topology, args: &DispatchArgs<'_>) -> Result<()> {
    let counts = args.num_tokens_per_expert;
    if counts.is_empty() {
        return Ok(());
    }
    let w = topo.world_size();
    if counts.len() % w != 0 {
        return Err(Error::invalid(
            "num_tokens_per_expert",
            format!("a length that is a multiple of the world size {w}"),
            counts.len(),
        ));
    }
    if w > 1 && counts.len() / w > MAX_LOCAL_EXPERTS {
        return Err(Error::invalid(
            "num_tokens_per_expert",
            format!(
                "at most {MAX_LOCAL_EXPERTS} experts per rank ({} in all)",
                MAX_LOCAL_EXPERTS * w
            ),
            format!("{} experts", counts.len()),
        ));
    }
    if let Some(&c) = counts.iter().find(|&&c| c > args.num_tokens as u64) {
        return Err(Error::invalid(
            "num_tokens_per_expert",
            format!("counts of at most the {} tokens of x", args.num_tokens),
            c,
        ));
    }
    if let Some(tk) = &args.topk {
        if counts.len() != tk.num_experts {
            return Err(Error::invalid(
                "num_tokens_per_expert",
                format!("{} counts (one per expert)", tk.num_experts),
                counts.len(),
            ));
        }
        let mut want = vec![0u64; tk.num_experts];
        for row in tk.idx.chunks(tk.num_topk.max(1)) {
            for (j, &e) in row.iter().enumerate() {
                if e >= 0 && (e as usize) < want.len() && !row[..j].contains(&e) {
                    want[e as usize] += 1;
                }
            }
        }
        if let Some(e) = (0..want.len()).find(|&e| want[e] != counts[e]) {
            return Err(Error::invalid(
                "num_tokens_per_expert",
                format!(
                    "the tokens topk_idx sends to each expert ({} for expert {e})",
                    want[e]
                ),
                format!("{} for expert {e}", counts[e]),
            ));
        }
    }
    Ok(())
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

/// The checks of a dispatch's tokens alone (no route): shapes, expert indices and counts,
/// the format. A Buffer's channels run them on all its tokens before splitting them, so that
/// errors name the caller's token indices.
pub(crate) fn check_tokens(topo: &Topology, args: &DispatchArgs<'_>) -> Result<()> {
    let n_tok = args.num_tokens;
    check_len("x", args.x.len(), n_tok, args.x_row_bytes)?;
    check_len("x scales", args.scales.len(), n_tok, args.scale_row_bytes)?;
    if let Some(tk) = &args.topk {
        experts_per_rank(topo, tk.num_experts)?;
        check_len("topk_idx", tk.idx.len() * 8, n_tok, tk.num_topk * 8)?;
        check_len("topk_weights", tk.weights.len() * 4, n_tok, tk.num_topk * 4)?;
        check_expert_indices(tk.idx, tk.num_topk, tk.num_experts)?;
    }
    check_expert_counts(topo, args)?;
    if args.expert_alignment == 0 {
        return Err(Error::invalid("expert_alignment", "at least 1", 0));
    }
    if n_tok as u64 > MAX_TOKENS {
        return Err(Error::invalid(
            "x",
            format!("at most {MAX_TOKENS} tokens"),
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
    Ok(())
}

pub(super) fn check<'a>(
    topo: &Topology,
    me: usize,
    endpoint_id: u64,
    args: &'a DispatchArgs<'a>,
    route: &Route<'a>,
) -> Result<Checked<'a>> {
    let n_tok = args.num_tokens;
    let (plan, kind, cached) = match route {
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
    check_tokens(topo, args)?;
    let (k, experts) = match &args.topk {
        Some(tk) => {
            let epr = experts_per_rank(topo, tk.num_experts)?;
            let lo = (me * epr) as i64;
            (tk.num_topk, (lo, lo + epr as i64))
        }
        None => (0, (0, 0)),
    };
    let format = RecordFormat {
        dtype: args.x_dtype,
        hidden: u32::try_from(args.hidden)
            .map_err(|_| Error::invalid("x", "a hidden size below 2^32", args.hidden))?,
        scale_cols: (args.scale_row_bytes / 4) as u32,
        topk: k as u32,
    };
    let (xb, sb) = (args.x_row_bytes, args.scale_row_bytes);
    let (idx, weights): (&[u8], &[u8]) = match &args.topk {
        Some(tk) => (
            bytemuck::cast_slice(tk.idx),
            bytemuck::cast_slice(tk.weights),
        ),
        None => (&[], &[]),
    };
    Ok(Checked {
        plan,
        kind,
        cached,
        format,
        layout: Layout::new(&[xb, sb, k * 8, k * 4]),
        tokens: Tokens {
            x: args.x,
            scales: args.scales,
            idx,
            weights,
            x_bytes: xb,
            scale_bytes: sb,
            topk: k,
        },
        experts,
        expert_alignment: args.expert_alignment,
    })
}
