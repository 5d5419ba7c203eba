//! Routing-table computation at DeepSeek-V3 scale (T=4096 tokens, top-8 of 256 experts,
//! 64 ranks as 8 nodes x 8), against a straightforward set-based version measured in the
//! same run. `cargo bench --bench routing`. The PyTorch comparison is benches/bench_core.py.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use dualcomm_core::routing::{SendPlan, dispatch_layout};
use dualcomm_core::topology::Topology;

fn median_time(reps: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[reps / 2]
}

/// The obvious way: a set of experts, ranks and nodes per token.
fn naive(topo: &Topology, topk: &[i64], t: usize, k: usize, e: usize) -> Vec<i32> {
    let w = topo.world_size();
    let epr = e / w;
    let mut per_rank = vec![0; w];
    let mut in_rank = vec![false; t * w];
    for tok in 0..t {
        let ranks: BTreeSet<usize> = topk[tok * k..(tok + 1) * k]
            .iter()
            .filter(|&&x| x >= 0)
            .map(|&x| x as usize / epr)
            .collect();
        for r in ranks {
            per_rank[r] += 1;
            in_rank[tok * w + r] = true;
        }
    }
    black_box(in_rank);
    per_rank
}

fn main() {
    let (t, k, e) = (4096, 8, 256);
    let topo = Topology::new(8, 8).unwrap();
    let mut s = 12345u64;
    let topk: Vec<i64> = (0..t)
        .flat_map(|_| {
            // k distinct experts per token, as a real gate picks them.
            let mut chosen = Vec::with_capacity(k);
            while chosen.len() < k {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = ((s >> 33) % e as u64) as i64;
                if !chosen.contains(&x) {
                    chosen.push(x);
                }
            }
            chosen
        })
        .collect();
    let reps = 51;
    let ours = median_time(reps, || {
        let l = dispatch_layout(&topo, &topk, t, k, e).unwrap();
        black_box(SendPlan::from_is_token_in_rank(&topo, &l.is_token_in_rank, t).unwrap());
    });
    let layout_only = median_time(reps, || {
        black_box(dispatch_layout(&topo, &topk, t, k, e).unwrap());
    });
    let base = median_time(reps, || {
        black_box(naive(&topo, &topk, t, k, e));
    });
    let l = dispatch_layout(&topo, &topk, t, k, e).unwrap();
    assert_eq!(l.num_tokens_per_rank, naive(&topo, &topk, t, k, e));
    println!(
        "routing tables, T={t} K={k} E={e} W={} (median of {reps})",
        topo.world_size()
    );
    println!("{:<34} {:>12} {:>14}", "what", "time", "vs baseline");
    println!(
        "{:<34} {:>10.1}us {:>13.2}x",
        "baseline (BTreeSet per token)",
        base.as_secs_f64() * 1e6,
        1.0
    );
    for (name, d) in [
        ("dispatch_layout", layout_only),
        ("dispatch_layout + SendPlan", ours),
    ] {
        println!(
            "{:<34} {:>10.1}us {:>13.2}x",
            name,
            d.as_secs_f64() * 1e6,
            base.as_secs_f64() / d.as_secs_f64()
        );
    }
}
