//! Loopback dispatch + combine throughput (token payload bytes per second, all ranks
//! together) against a plain memcpy of the same bytes, measured in the same run.
//! A second table runs the same worlds over two channels per rank (each its own loopback
//! world and thread, as `Buffer` runs them) against one, in interleaved pairs of runs (the
//! ratio of each pair, and their median), measured in the same run.
//! `cargo bench --bench loopback`.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::{
    ChannelHandle, ChannelRoute, Channels, CombineArgs, CombineOut, Config, DispatchArgs,
    DispatchHandle, Dtype, ElemType, Endpoint, Route, SendPlan, TopkArgs, Topology, VecSink,
};

const HIDDEN: usize = 7168;
const TOPK: usize = 8;
const ROUNDS: usize = 9;
/// Runs of each channel count per world in the channel table, paired.
const PAIRS: usize = 5;

/// Seconds and payload bytes of all ranks' dispatches, then of their combines, and the
/// CPU seconds the process spent on each (all threads: ranks and channels).
type Timing = [(f64, u64, f64); 2];

/// One rank's timed rounds, each as a `Timing` (CPU seconds only on rank 0).
type Rounds = Vec<Timing>;

/// CPU seconds this process has used, over all its threads.
fn process_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill in.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// One rank: a single endpoint (the plain path), or several channels.
enum Rank {
    One(Endpoint, Arc<SendPlan>),
    Many(Channels, Vec<bool>),
}

enum Handle {
    One(Arc<DispatchHandle>),
    Many(Arc<ChannelHandle>),
}

impl Rank {
    fn payload(&self) -> u64 {
        let st = match self {
            Rank::One(ep, _) => ep.stats(),
            Rank::Many(ch, _) => ch.stats(),
        };
        st.nvl_payload_bytes + st.rdma_payload_bytes
    }

    fn dispatch(&mut self, args: &DispatchArgs<'_>, sink: &mut VecSink) -> Handle {
        match self {
            Rank::One(ep, plan) => Handle::One(
                ep.dispatch(args, Route::Fresh(Arc::clone(plan)), sink)
                    .unwrap()
                    .handle,
            ),
            Rank::Many(ch, in_rank) => Handle::Many(
                ch.dispatch(args, ChannelRoute::Fresh(in_rank), sink)
                    .unwrap()
                    .handle,
            ),
        }
    }

    fn combine(&mut self, args: &CombineArgs<'_>, handle: &Handle, out: CombineOut<'_>) {
        match (self, handle) {
            (Rank::One(ep, _), Handle::One(h)) => ep.combine(args, h, out).unwrap(),
            (Rank::Many(ch, _), Handle::Many(h)) => ch.combine(args, h, out).unwrap(),
            _ => unreachable!("a handle of the same kind of rank"),
        }
    }
}

/// Runs `ROUNDS` dispatch+combine rounds on every rank, over `channels` channels (1: one
/// plain endpoint per rank).
fn world(nodes: usize, rpn: usize, tokens: usize, channels: usize) -> Timing {
    let topo = Topology::new(nodes, rpn).unwrap();
    let w = topo.world_size();
    let experts = 8 * w;
    let fabrics: Vec<_> = (0..channels).map(|_| LoopbackFabric::new(w)).collect();
    let config = Config {
        num_nvl_bytes: 64 << 20,
        num_rdma_bytes: 64 << 20,
        timeout: Duration::from_secs(120),
    };
    let barrier = Arc::new(Barrier::new(w));
    let threads: Vec<_> = (0..w)
        .map(|r| {
            let (fabrics, config, barrier) =
                (fabrics.clone(), config.clone(), Arc::clone(&barrier));
            thread::spawn(move || {
                let mut eps: Vec<_> = fabrics
                    .iter()
                    .map(|f| Endpoint::loopback(f, topo, r, config.clone()).unwrap())
                    .collect();
                let mut s = r as u64 + 1;
                let mut next = || {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    s >> 33
                };
                let x: Vec<u8> = (0..tokens * HIDDEN * 2).map(|_| next() as u8).collect();
                let idx: Vec<i64> = (0..tokens * TOPK)
                    .map(|_| (next() % experts as u64) as i64)
                    .collect();
                let wts = vec![0.125f32; tokens * TOPK];
                let layout = eps[0].layout(&idx, tokens, TOPK, experts).unwrap();
                let mut rank = if channels == 1 {
                    let plan = eps[0].plan(&layout.is_token_in_rank, tokens).unwrap();
                    Rank::One(eps.pop().unwrap(), plan)
                } else {
                    Rank::Many(Channels::new(eps).unwrap(), layout.is_token_in_rank)
                };
                let mut rounds: Rounds = Vec::with_capacity(ROUNDS);
                // Outputs are reused from round to round, as the Python binding's receive
                // pool does, so that page faults of fresh allocations are not timed.
                let mut recv = VecSink::default();
                let mut combined = vec![0u8; tokens * HIDDEN * 2];
                // Round 0 warms up (first touches of the rings and outputs) and is not timed.
                for _ in 0..=ROUNDS {
                    let mut timing: Timing = [(0.0, 0, 0.0); 2];
                    barrier.wait();
                    let (start, before, cpu) = (Instant::now(), rank.payload(), process_cpu());
                    let handle = rank.dispatch(
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
                                num_experts: experts,
                            }),
                            num_tokens_per_expert: &[],
                            expert_alignment: 1,
                        },
                        &mut recv,
                    );
                    timing[0].0 = start.elapsed().as_secs_f64();
                    timing[0].1 = rank.payload() - before;
                    // Every rank is done once all are past this barrier (rank 0 counts the
                    // process's CPU time, which the ranks spend in their barrier waits too).
                    barrier.wait();
                    if r == 0 {
                        timing[0].2 = process_cpu() - cpu;
                    }
                    let (start, before, cpu) = (Instant::now(), rank.payload(), process_cpu());
                    rank.combine(
                        &CombineArgs {
                            rows_at: &[],
                            x: &recv.x,
                            hidden: HIDDEN,
                            dtype: Dtype::Bf16,
                            weights: None,
                            num_topk: 0,
                            out_dtype: Dtype::Bf16,
                        },
                        &handle,
                        CombineOut {
                            x: &mut combined,
                            weights: &mut [],
                        },
                    );
                    black_box(&combined);
                    timing[1].0 = start.elapsed().as_secs_f64();
                    timing[1].1 = rank.payload() - before;
                    barrier.wait();
                    if r == 0 {
                        timing[1].2 = process_cpu() - cpu;
                    }
                    rounds.push(timing);
                }
                // The first round warms up (first touches of the rings and outputs).
                rounds.split_off(1)
            })
        })
        .collect();
    let results: Vec<Rounds> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Per round: the slowest rank's time (the operation is collective), every rank's bytes;
    // then the median round of each operation, which a noisy neighbour moves least.
    [0, 1].map(|i| {
        let mut rounds: Vec<(f64, u64, f64)> = (0..ROUNDS)
            .map(|round| {
                let per_rank = results.iter().map(|r| r[round][i]);
                (
                    per_rank.clone().map(|t| t.0).fold(0.0, f64::max),
                    per_rank.clone().map(|t| t.1).sum(),
                    per_rank.map(|t| t.2).sum(),
                )
            })
            .collect();
        rounds.sort_by(|a, b| (a.1 as f64 / a.0).total_cmp(&(b.1 as f64 / b.0)));
        rounds[ROUNDS / 2]
    })
}

/// Copies `bytes` bytes from one buffer to another of that size (both already touched, so
/// no page faults are timed): what moving every payload byte once costs on this machine.
/// The best of three copies, so that a noisy neighbour flatters no ratio.
fn memcpy_rate(bytes: u64) -> f64 {
    let n = bytes as usize;
    let src = vec![1u8; n];
    let mut dst = vec![2u8; n];
    (0..3)
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
            bytes as f64 / start.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    // `DUALCOMM_BENCH_CHANNELS=1x2:1024:2` runs only that world (nodes x ranks, tokens,
    // channels), for profiling one case.
    if let Ok(spec) = std::env::var("DUALCOMM_BENCH_CHANNELS") {
        let v: Vec<usize> = spec
            .split([':', 'x'])
            .map(|p| {
                p.parse()
                    .expect("DUALCOMM_BENCH_CHANNELS: NODESxRANKS:TOKENS:CHANNELS")
            })
            .collect();
        let t = world(v[0], v[1], v[2], v[3]);
        for (name, (secs, bytes, cpu)) in ["dispatch", "combine"].into_iter().zip(t) {
            println!(
                "{spec} {name}: {:.2} GB/s, {:.2} cores busy",
                bytes as f64 / secs / 1e9,
                cpu / secs
            );
        }
        return;
    }
    println!(
        "loopback dispatch+combine, hidden {HIDDEN} bf16, top-{TOPK}: the median of {ROUNDS} rounds after one warm-up"
    );
    println!(
        "(payload GB/s of all ranks together; memcpy: the same bytes copied once, one thread, best of 3;"
    );
    println!(
        " busy: CPU seconds of the process per second of the operation, ranks' waits included)"
    );
    println!(
        "{:<6} {:>7} {:<9} {:>11} {:>10} {:>12} {:>8} {:>6}",
        "world", "tokens", "op", "payload MB", "GB/s", "memcpy GB/s", "ratio", "busy"
    );
    for (nodes, rpn, tokens) in [(1, 2, 1024), (2, 2, 512), (2, 1, 1024)] {
        let timing = world(nodes, rpn, tokens, 1);
        for (name, (secs, bytes, cpu)) in ["dispatch", "combine"].into_iter().zip(timing) {
            let ours = bytes as f64 / secs;
            let base = memcpy_rate(bytes);
            println!(
                "{:<6} {:>7} {:<9} {:>11.1} {:>10.2} {:>12.2} {:>7.1}% {:>6.2}",
                format!("{nodes}x{rpn}"),
                tokens,
                name,
                bytes as f64 / 1e6,
                ours / 1e9,
                base / 1e9,
                100.0 * ours / base,
                cpu / secs
            );
        }
    }
    println!();
    println!(
        "two channels per rank against one, same worlds, {PAIRS} interleaved pairs of runs (GB/s: medians; ratio > 1: faster)"
    );
    println!(
        "{:<6} {:>7} {:<9} {:>12} {:>12} {:>8} {:>15}",
        "world", "tokens", "op", "1 ch GB/s", "2 ch GB/s", "ratio", "pair ratios"
    );
    for (nodes, rpn, tokens) in [(1, 2, 1024), (2, 2, 512), (2, 1, 1024)] {
        // One run of each per pair, the order alternating from pair to pair, so that the
        // machine's drift (shared cores) weighs on both alike; each pair gives a ratio.
        let pairs: Vec<[Timing; 2]> = (0..PAIRS)
            .map(|p| {
                if p % 2 == 0 {
                    let one = world(nodes, rpn, tokens, 1);
                    [one, world(nodes, rpn, tokens, 2)]
                } else {
                    let two = world(nodes, rpn, tokens, 2);
                    [world(nodes, rpn, tokens, 1), two]
                }
            })
            .collect();
        for (i, name) in ["dispatch", "combine"].into_iter().enumerate() {
            let rate = |t: &Timing| t[i].1 as f64 / t[i].0 / 1e9;
            let one = median(pairs.iter().map(|p| rate(&p[0])).collect());
            let two = median(pairs.iter().map(|p| rate(&p[1])).collect());
            let ratios: Vec<f64> = pairs.iter().map(|p| rate(&p[1]) / rate(&p[0])).collect();
            let (lo, hi) = (
                ratios.iter().copied().fold(f64::INFINITY, f64::min),
                ratios.iter().copied().fold(0.0, f64::max),
            );
            println!(
                "{:<6} {:>7} {:<9} {:>12.2} {:>12.2} {:>7.2}x {:>15}",
                format!("{nodes}x{rpn}"),
                tokens,
                name,
                one,
                two,
                median(ratios),
                format!("{lo:.2}-{hi:.2}x")
            );
        }
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
