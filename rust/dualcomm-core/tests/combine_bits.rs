//! Combine's sums start from zero, whichever way a partial travels: summed at its reducer,
//! or (the reducer's own row alone) sent as the row itself and added to zero at the source.
//! Rows with -0 and a signalling NaN must come out with exactly the bits of
//! `bf16(0 + x + x + ...)`, computed here in plain f32 arithmetic.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::{
    CombineArgs, CombineOut, Config, DispatchArgs, Dtype, ElemType, Endpoint, Result, Route,
    TopkArgs, Topology, VecSink,
};

const HIDDEN: usize = 8;
const TOPK: usize = 2;
/// bf16 bit patterns: -0, a signalling NaN, 1.5, -3, +0, the smallest subnormal, -inf, 2^-8.
const PATTERN: [u16; HIDDEN] = [
    0x8000, 0x7F81, 0x3FC0, 0xC040, 0x0000, 0x0001, 0xFF80, 0x3B80,
];

fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Token `t` of `rank`: the pattern, rotated by `t` so every element meets every position.
fn row(rank: usize, t: usize) -> Vec<u16> {
    (0..HIDDEN)
        .map(|i| PATTERN[(i + t + rank) % HIDDEN])
        .collect()
}

/// Token `t`'s experts (2 per rank): only the other rank, only its own, or both.
fn topk(rank: usize, t: usize, world: usize) -> [i64; TOPK] {
    let own = 2 * rank as i64;
    let other = 2 * ((rank + 1) % world) as i64;
    match t % 3 {
        0 => [other, other + 1],
        1 => [own, -1],
        _ => [own + 1, other],
    }
}

fn run(nodes: usize, rpn: usize, tokens: usize) -> Vec<Vec<u16>> {
    let topo = Topology::new(nodes, rpn).unwrap();
    let w = topo.world_size();
    let fabric = LoopbackFabric::new(w);
    let config = Config {
        num_nvl_bytes: w * 4 * 128,
        num_rdma_bytes: w * 4 * 128,
        timeout: Duration::from_secs(30),
    };
    let handles: Vec<_> = (0..w)
        .map(|r| {
            let (fabric, config) = (Arc::clone(&fabric), config.clone());
            thread::spawn(move || -> Result<Vec<u16>> {
                let wiring = Endpoint::wiring(&topo, &config);
                let t = fabric.join(r, wiring, "bits".into(), config.timeout)?;
                let mut ep = Endpoint::new(Box::new(t), topo, config);
                let x: Vec<u8> = (0..tokens)
                    .flat_map(|t| row(r, t))
                    .flat_map(u16::to_le_bytes)
                    .collect();
                let idx: Vec<i64> = (0..tokens).flat_map(|t| topk(r, t, w)).collect();
                let wts = vec![1.0f32; tokens * TOPK];
                let layout = ep.layout(&idx, tokens, TOPK, 2 * w)?;
                let plan = ep.plan(&layout.is_token_in_rank, tokens)?;
                let mut recv = VecSink::default();
                let out = ep.dispatch(
                    &DispatchArgs {
                        num_tokens: tokens,
                        x: &x,
                        x_row_bytes: HIDDEN * 2,
                        x_dtype: ElemType::Bf16,
                        hidden: HIDDEN,
                        scales: &[],
                        scale_row_bytes: 0,
                        topk: Some(TopkArgs {
                            idx: &idx,
                            weights: &wts,
                            num_topk: TOPK,
                            num_experts: 2 * w,
                        }),
                        num_tokens_per_expert: &[],
                        expert_alignment: 1,
                    },
                    Route::Fresh(plan),
                    &mut recv,
                )?;
                let mut comb = vec![0u8; tokens * HIDDEN * 2];
                let mut comb_w = vec![0f32; tokens * TOPK];
                ep.combine(
                    &CombineArgs {
                        rows_at: &[],
                        x: &recv.x,
                        hidden: HIDDEN,
                        dtype: Dtype::Bf16,
                        weights: Some(&recv.topk_weights),
                        num_topk: TOPK,
                        out_dtype: Dtype::Bf16,
                    },
                    &out.handle,
                    CombineOut {
                        x: &mut comb,
                        weights: &mut comb_w,
                    },
                )?;
                Ok(comb
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect())
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

fn check(nodes: usize, rpn: usize) {
    let w = nodes * rpn;
    let tokens = 9;
    let got = run(nodes, rpn, tokens);
    for (r, out) in got.iter().enumerate() {
        for t in 0..tokens {
            let mut ranks: Vec<i64> = topk(r, t, w)
                .iter()
                .filter(|&&e| e >= 0)
                .map(|e| e / 2)
                .collect();
            ranks.dedup();
            let x = row(r, t);
            for i in 0..HIDDEN {
                // Each rank the token reached sends its row back unchanged: summed from 0.
                let mut acc = 0.0f32;
                for _ in &ranks {
                    acc += bf16_to_f32(x[i]);
                }
                let want = half::bf16::from_f32(acc).to_bits();
                let have = out[t * HIDDEN + i];
                assert_eq!(
                    have,
                    want,
                    "rank {r} token {t} element {i} (input {:#06x}, {} ranks): got {have:#06x}, want {want:#06x}",
                    x[i],
                    ranks.len()
                );
            }
        }
    }
}

#[test]
fn partials_sent_as_rows_sum_from_zero_across_nodes() {
    check(2, 1);
}

#[test]
fn partials_summed_at_the_reducer_sum_from_zero() {
    check(2, 2);
}

#[test]
fn sums_inside_one_node_start_from_zero() {
    check(1, 2);
}
