//! Low-latency combine (DeepEP's `low_latency_combine`): the expert outputs of a
//! low-latency dispatch, laid out per local expert, are weighted by the top-k weights of the
//! tokens' sources and summed per token.
//!
//! A low-latency endpoint's topology has one rank per node, so every rank is linked to every
//! other and dispatch sends each token straight to the ranks of its experts (no forwarding).
//! The weights live only at the sources, and the expert outputs only at the experts' ranks,
//! so the combine runs in three steps, each deterministic:
//! 1. the sources' weights travel where their tokens went (a cached dispatch of the `[T, K]`
//!    weights: a small record per token and destination);
//! 2. each rank sums, per received token, weight times expert output over the token's
//!    choices of that rank's experts, in ascending top-k order, in fp32;
//! 3. a combine sums those rows per token over the ranks (its fixed order), in fp32.

use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::handoff::PendingHandle;
use crate::protocol::combine::{CombineArgs, CombineOut};
use crate::protocol::dispatch::{DispatchArgs, DispatchHandle, Route, VecSink};
use crate::protocol::op::OpKind;
use crate::protocol::record::ElemType;
use crate::protocol::reduce::{Dtype, add_scaled_into};

pub struct LowLatencyCombineArgs<'a> {
    /// `[num_slots, hidden]` expert outputs in the per-expert layout dispatch returned.
    pub x: &'a [u8],
    pub dtype: Dtype,
    pub hidden: usize,
    /// `[num_recv, num_topk]`: the slot (row of `x`) of received token `r`'s `k`-th choice,
    /// or -1 where that choice is not an expert of this rank.
    pub slots: &'a [i64],
    pub num_topk: usize,
    /// `[num_tokens, num_topk]`: this rank's own tokens' weights (their sources' view).
    pub topk_weights: &'a [f32],
    pub out_dtype: Dtype,
}

/// Checks the arguments against the dispatch they reverse, before anything is sent.
fn check(args: &LowLatencyCombineArgs<'_>, handle: &DispatchHandle) -> Result<usize> {
    let (k, h) = (args.num_topk, args.hidden);
    let row = h * args.dtype.size();
    if row == 0 || args.x.len() % row != 0 {
        return Err(Error::invalid(
            "x",
            format!("rows of {h} {:?} elements", args.dtype),
            format!("{} bytes", args.x.len()),
        ));
    }
    let num_slots = args.x.len() / row;
    if args.slots.len() != handle.num_recv * k {
        return Err(Error::invalid(
            "slots",
            format!(
                "{} entries ({} received tokens x top-{k})",
                handle.num_recv * k,
                handle.num_recv
            ),
            args.slots.len(),
        ));
    }
    if let Some(&s) = args
        .slots
        .iter()
        .find(|&&s| s < -1 || s >= num_slots as i64)
    {
        return Err(Error::invalid(
            "slots",
            format!("-1 or a row of x below {num_slots}"),
            s,
        ));
    }
    let t = handle.plan.num_tokens();
    if args.topk_weights.len() != t * k {
        return Err(Error::invalid(
            "topk_weights",
            format!("[{t}, {k}] (the dispatch's tokens and top-k)"),
            format!("{} values", args.topk_weights.len()),
        ));
    }
    Ok(num_slots)
}

/// Step 2: per received token, the sum over its choices of this rank's experts of
/// weight times expert output, in ascending choice order (fp32).
pub fn weigh(
    x: &[u8],
    dtype: Dtype,
    hidden: usize,
    slots: &[i64],
    weights: &[f32],
    num_topk: usize,
) -> Vec<f32> {
    let row = hidden * dtype.size();
    let n = slots.len() / num_topk.max(1);
    let mut out = vec![0f32; n * hidden];
    for r in 0..n {
        let acc = &mut out[r * hidden..(r + 1) * hidden];
        for k in 0..num_topk {
            let s = slots[r * num_topk + k];
            if s >= 0 {
                let s = s as usize;
                add_scaled_into(
                    acc,
                    &x[s * row..(s + 1) * row],
                    weights[r * num_topk + k],
                    dtype,
                );
            }
        }
    }
    out
}

impl Endpoint {
    /// `low_latency_combine` queued behind its dispatch, whose handle resolves only now.
    pub fn low_latency_combine_queued(
        &mut self,
        args: &LowLatencyCombineArgs<'_>,
        handle: &PendingHandle,
        out: &mut [u8],
    ) -> Result<()> {
        match handle.resolve() {
            Ok(h) => self.low_latency_combine(args, h, out),
            Err(e) => self.reject(OpKind::CachedDispatch, e),
        }
    }

    /// DeepEP's low-latency combine over a dispatch `handle` of this endpoint: writes
    /// `[num_tokens, hidden]` weighted sums in `args.out_dtype` to `out`.
    pub fn low_latency_combine(
        &mut self,
        args: &LowLatencyCombineArgs<'_>,
        handle: &DispatchHandle,
        out: &mut [u8],
    ) -> Result<()> {
        if let Err(e) = check(args, handle) {
            // Peers are about to run step 1: they hear of it there, and stop.
            return self.reject(OpKind::CachedDispatch, e);
        }
        let k = args.num_topk;
        let t = handle.plan.num_tokens();
        let mut recv = VecSink::default();
        self.dispatch(
            &DispatchArgs {
                num_tokens: t,
                x: bytemuck::cast_slice(args.topk_weights),
                x_row_bytes: k * 4,
                x_dtype: ElemType::F32,
                hidden: k,
                scales: &[],
                scale_row_bytes: 0,
                topk: None,
                num_tokens_per_expert: &[],
                expert_alignment: 1,
            },
            Route::Cached(handle),
            &mut recv,
        )?;
        let recv_weights: Vec<f32> = bytemuck::pod_collect_to_vec(&recv.x);
        let rows = weigh(
            args.x,
            args.dtype,
            args.hidden,
            args.slots,
            &recv_weights,
            k,
        );
        self.combine(
            &CombineArgs {
                rows_at: &[],
                x: bytemuck::cast_slice(&rows),
                hidden: args.hidden,
                dtype: Dtype::F32,
                weights: None,
                num_topk: 0,
                out_dtype: args.out_dtype,
            },
            handle,
            CombineOut {
                x: out,
                weights: &mut [],
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighs_each_choice_in_order_and_skips_other_ranks_experts() {
        // Three slots of hidden 2 (bf16 1.0, 2.0 / 3.0, 4.0 / 5.0, 6.0), two tokens of top-2.
        let vals = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let x: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let slots = [2, 0, -1, 1];
        let weights = [0.5f32, 2.0, 9.0, -1.0];
        let got = weigh(&x, Dtype::Bf16, 2, &slots, &weights, 2);
        assert_eq!(
            got,
            vec![0.5 * 5.0 + 2.0 * 1.0, 0.5 * 6.0 + 2.0 * 2.0, -3.0, -4.0]
        );
    }
}
