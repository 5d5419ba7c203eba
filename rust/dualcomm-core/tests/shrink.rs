//! Shrink mode (DeepEP's `enable_shrink`): in a world of one rank per node, a rank that
//! stops taking part (it skips a call, or leaves) is masked by the others, which finish the
//! operation and every later one without it. Each case checks what the survivors receive
//! and combine against a reference computed here from the routing, and what they mask.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use dualcomm_core::transport::Transport;
use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::transport::tcp::{TcpBinding, TcpTransport};
use dualcomm_core::{
    CombineArgs, CombineOut, Config, DispatchArgs, DispatchOutput, Dtype, ElemType, Endpoint,
    Error, RankMask, Result, Route, TopkArgs, Topology, VecSink,
};

const WORLD: usize = 4;
const TOKENS: usize = 6;
const HIDDEN: usize = 4;
const TOPK: usize = 2;
const EXPERTS: usize = 8;
const PER_RANK: usize = EXPERTS / WORLD;

fn topk_of(rank: usize) -> Vec<i64> {
    (0..TOKENS)
        .flat_map(|t| {
            [
                ((t + rank) % EXPERTS) as i64,
                ((t + 3 + rank) % EXPERTS) as i64,
            ]
        })
        .collect()
}

fn row_of(rank: usize, t: usize) -> Vec<f32> {
    (0..HIDDEN)
        .map(|h| (rank * 100 + t) as f32 + h as f32 * 0.25)
        .collect()
}

fn weights_of(rank: usize) -> Vec<f32> {
    (0..TOKENS * TOPK)
        .map(|i| 0.5 + (i + rank) as f32 / 16.0)
        .collect()
}

/// What a rank does: every step up to `stop_before` (0: the dispatch, 1: the combine,
/// 2: a cached dispatch); then it stays idle (`leave`: drops its endpoint at once) until the
/// others are done.
#[derive(Clone, Copy)]
struct Script {
    stopper: usize,
    stop_before: usize,
    leave: bool,
}

struct Outcome {
    dispatched: Vec<f32>,
    combined: Vec<f32>,
    combined_w: Vec<f32>,
    cached: Vec<f32>,
    cached_idx: Vec<i64>,
    masked: Vec<bool>,
}

fn dispatch(
    ep: &mut Endpoint,
    rank: usize,
    route: Option<&DispatchOutput>,
) -> Result<(DispatchOutput, VecSink)> {
    let x: Vec<f32> = (0..TOKENS).flat_map(|t| row_of(rank, t)).collect();
    let idx = topk_of(rank);
    let wts = weights_of(rank);
    let layout = ep.layout(&idx, TOKENS, TOPK, EXPERTS)?;
    let per_expert: Vec<u64> = layout
        .num_tokens_per_expert
        .iter()
        .map(|&c| c as u64)
        .collect();
    let route = match route {
        Some(out) => Route::Cached(&out.handle),
        None => Route::Fresh(ep.plan(&layout.is_token_in_rank, TOKENS)?),
    };
    let mut recv = VecSink::default();
    let out = ep.dispatch(
        &DispatchArgs {
            num_tokens: TOKENS,
            x: bytemuck::cast_slice(&x),
            x_row_bytes: HIDDEN * 4,
            x_dtype: ElemType::F32,
            hidden: HIDDEN,
            scales: &[],
            scale_row_bytes: 0,
            topk: Some(TopkArgs {
                idx: &idx,
                weights: &wts,
                num_topk: TOPK,
                num_experts: EXPERTS,
            }),
            num_tokens_per_expert: &per_expert,
            expert_alignment: 1,
        },
        route,
        &mut recv,
    )?;
    Ok((out, recv))
}

fn run_rank(ep: &mut Endpoint, rank: usize, script: Script) -> Result<Option<Outcome>> {
    let stops = |step: usize| rank == script.stopper && script.stop_before == step;
    if stops(0) {
        return Ok(None);
    }
    let (out, recv) = dispatch(ep, rank, None)?;
    if stops(1) {
        return Ok(None);
    }
    let mut comb_x = vec![0u8; TOKENS * HIDDEN * 4];
    let mut combined_w = vec![0f32; TOKENS * TOPK];
    ep.combine(
        &CombineArgs {
            rows_at: &[],
            x: &recv.x,
            hidden: HIDDEN,
            dtype: Dtype::F32,
            weights: Some(&recv.topk_weights),
            num_topk: TOPK,
            out_dtype: Dtype::F32,
        },
        &out.handle,
        CombineOut {
            x: &mut comb_x,
            weights: &mut combined_w,
        },
    )?;
    if stops(2) {
        return Ok(None);
    }
    let (_, again) = dispatch(ep, rank, Some(&out))?;
    Ok(Some(Outcome {
        dispatched: bytemuck::cast_slice(&recv.x).to_vec(),
        combined: bytemuck::cast_slice(&comb_x).to_vec(),
        combined_w,
        cached: bytemuck::cast_slice(&again.x).to_vec(),
        cached_idx: again.topk_idx,
        masked: ep.rank_mask().expect("shrink mode").snapshot(),
    }))
}

/// Runs the script on every rank of a 4 x 1 loopback world in shrink mode (the masks set
/// in `premasked` first, on every rank but the masked one); returns each rank's outcome.
fn run_world(
    script: Script,
    premasked: &[usize],
    timeout: Duration,
) -> Vec<Result<Option<Outcome>>> {
    run_world_on(script, premasked, timeout, false)
}

/// As `run_world`, over TCP sockets on 127.0.0.1 (`tcp`) instead of the in-memory loopback.
fn run_world_on(
    script: Script,
    premasked: &[usize],
    timeout: Duration,
    tcp: bool,
) -> Vec<Result<Option<Outcome>>> {
    let topo = Topology::new(WORLD, 1).unwrap();
    let fabric = LoopbackFabric::new(WORLD);
    let mut bindings: Vec<Option<TcpBinding>> = (0..WORLD)
        .map(|_| tcp.then(|| TcpBinding::bind("127.0.0.1").unwrap()))
        .collect();
    let addrs: Vec<String> = bindings
        .iter()
        .flatten()
        .map(|b| b.local_addr().to_string())
        .collect();
    let config = Config {
        // Rings of two records: credits flow during the operations.
        num_nvl_bytes: 0,
        num_rdma_bytes: WORLD * 2 * 256,
        timeout,
    };
    let done = Arc::new(Barrier::new(WORLD));
    let premasked = premasked.to_vec();
    let handles: Vec<_> = (0..WORLD)
        .map(|r| {
            let (fabric, config, done, premasked) = (
                Arc::clone(&fabric),
                config.clone(),
                Arc::clone(&done),
                premasked.clone(),
            );
            let (binding, addrs) = (bindings[r].take(), addrs.clone());
            thread::spawn(move || {
                let wiring = Endpoint::wiring(&topo, &config);
                let t: Box<dyn Transport> = match binding {
                    Some(b) => Box::new(TcpTransport::establish(
                        b,
                        r,
                        &addrs,
                        [5; 16],
                        wiring,
                        config.timeout,
                    )?),
                    None => Box::new(fabric.join(r, wiring, "shrink".into(), config.timeout)?),
                };
                let mut ep = Endpoint::new(t, topo, config);
                let mask = Arc::new(RankMask::new(WORLD));
                for &p in premasked.iter().filter(|&&p| p != r) {
                    mask.set(p, true);
                }
                ep.enable_shrink(mask)?;
                let out = run_rank(&mut ep, r, script);
                if out.as_ref().is_ok_and(Option::is_none) && script.leave {
                    drop(ep);
                    done.wait();
                } else {
                    done.wait();
                    drop(ep);
                }
                out
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("no rank panics"))
        .collect()
}

/// The rows rank `me` receives in a dispatch from the sources in `from`: by source, then
/// token, each token once however many of `me`'s experts it chose.
fn expected_rows(me: usize, from: impl Fn(usize) -> bool) -> Vec<f32> {
    let mine = |e: i64| (e as usize) / PER_RANK == me;
    (0..WORLD)
        .filter(|&s| from(s))
        .flat_map(|s| {
            let idx = topk_of(s);
            (0..TOKENS)
                .filter(move |&t| idx[t * TOPK..(t + 1) * TOPK].iter().any(|&e| mine(e)))
                .flat_map(move |t| row_of(s, t))
        })
        .collect()
}

/// Combine of the dispatched rows sent back unchanged: each rank the token reached (and is
/// still in the world) returns it once; the weights are those of the choices on such ranks.
fn expected_combine(me: usize, live: impl Fn(usize) -> bool) -> (Vec<f32>, Vec<f32>) {
    let idx = topk_of(me);
    let wts = weights_of(me);
    let mut x = Vec::new();
    let mut w = Vec::new();
    for t in 0..TOKENS {
        let choices = &idx[t * TOPK..(t + 1) * TOPK];
        let mut ranks: Vec<usize> = choices.iter().map(|&e| e as usize / PER_RANK).collect();
        ranks.sort_unstable();
        ranks.dedup();
        let reached = ranks.iter().filter(|&&r| live(r)).count() as f32;
        x.extend(row_of(me, t).iter().map(|v| v * reached));
        w.extend((0..TOPK).map(|k| {
            if live(choices[k] as usize / PER_RANK) {
                wts[t * TOPK + k]
            } else {
                0.0
            }
        }));
    }
    (x, w)
}

/// Every rank's outcome but the stopper's, failing on any rank's error.
fn survivors(outs: Vec<Result<Option<Outcome>>>, stopper: usize) -> Vec<(usize, Outcome)> {
    outs.into_iter()
        .enumerate()
        .filter_map(|(me, out)| {
            let out = out.unwrap_or_else(|e| panic!("rank {me}: {e}"));
            (me != stopper).then(|| (me, out.expect("a survivor has an outcome")))
        })
        .collect()
}

/// A survivor masked the stopper alone, received from it only if it took part in the
/// dispatch, and combined over the other ranks.
fn check_survivor(me: usize, out: &Outcome, stopper: usize, stopper_dispatched: bool) {
    let live = |r: usize| r != stopper;
    assert_eq!(out.masked, (0..WORLD).map(|r| !live(r)).collect::<Vec<_>>());
    let from = |s: usize| stopper_dispatched || live(s);
    assert_eq!(
        out.dispatched,
        expected_rows(me, from),
        "rank {me} dispatch"
    );
    let (x, w) = expected_combine(me, live);
    assert_eq!(out.combined, x, "rank {me} combine");
    assert_eq!(out.combined_w, w, "rank {me} combine weights");
}

fn script(stopper: usize, stop_before: usize, leave: bool) -> Script {
    Script {
        stopper,
        stop_before,
        leave,
    }
}

#[test]
fn a_rank_that_skips_the_dispatch_is_masked_and_the_rest_run_without_it() {
    let outs = run_world(script(3, 0, false), &[], Duration::from_millis(1500));
    for (me, out) in survivors(outs, 3) {
        check_survivor(me, &out, 3, false);
        assert_eq!(out.cached, out.dispatched, "rank {me} cached dispatch");
    }
}

#[test]
fn a_rank_that_skips_the_combine_leaves_its_share_out_of_every_sum() {
    let outs = run_world(script(2, 1, false), &[], Duration::from_millis(1500));
    for (me, out) in survivors(outs, 2) {
        check_survivor(me, &out, 2, true);
    }
}

#[test]
fn a_cached_dispatch_keeps_its_handles_layout_with_the_masked_rows_empty() {
    let stopper = 0;
    let outs = run_world(script(stopper, 2, false), &[], Duration::from_millis(1500));
    for (me, out) in survivors(outs, stopper) {
        assert_eq!(
            out.masked,
            (0..WORLD).map(|r| r == stopper).collect::<Vec<_>>()
        );
        // Same rows as the dispatch, but the stopper's (the first block: rank 0) are zeros
        // with no expert chosen.
        let theirs = expected_rows(me, |s| s == stopper).len();
        let mut want = out.dispatched.clone();
        want[..theirs].fill(0.0);
        assert_eq!(out.cached, want, "rank {me} cached dispatch");
        let rows = theirs / HIDDEN;
        assert!(out.cached_idx[..rows * TOPK].iter().all(|&e| e == -1));
        assert!(out.cached_idx[rows * TOPK..].iter().any(|&e| e >= 0));
    }
}

#[test]
fn a_rank_that_leaves_is_masked_without_waiting_for_the_timeout() {
    let start = Instant::now();
    let outs = run_world(script(1, 0, true), &[], Duration::from_secs(120));
    // The survivors notice the departure; they never sit out the 120 s timeout.
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    for (me, out) in survivors(outs, 1) {
        check_survivor(me, &out, 1, false);
    }
}

#[test]
fn over_tcp_a_rank_that_leaves_or_stays_silent_is_masked() {
    // Departure seen as a closed socket; silence as the deadline.
    for (leave, timeout) in [
        (true, Duration::from_secs(120)),
        (false, Duration::from_millis(1500)),
    ] {
        let start = Instant::now();
        let outs = run_world_on(script(3, 0, leave), &[], timeout, true);
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{:?}",
            start.elapsed()
        );
        for (me, out) in survivors(outs, 3) {
            check_survivor(me, &out, 3, false);
        }
    }
}

#[test]
fn a_rank_masked_by_the_caller_is_neither_sent_to_nor_waited_for() {
    let start = Instant::now();
    let outs = run_world(script(2, 0, false), &[2], Duration::from_secs(120));
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    for (me, out) in survivors(outs, 2) {
        check_survivor(me, &out, 2, false);
    }
}

#[test]
fn shrink_mode_needs_a_world_of_one_rank_per_node() {
    let topo = Topology::new(1, 2).unwrap();
    let fabric = LoopbackFabric::new(2);
    let config = Config {
        num_nvl_bytes: 4096,
        num_rdma_bytes: 0,
        timeout: Duration::from_secs(5),
    };
    let handles: Vec<_> = (0..2)
        .map(|r| {
            let (fabric, config) = (Arc::clone(&fabric), config.clone());
            thread::spawn(move || -> Result<()> {
                let wiring = Endpoint::wiring(&topo, &config);
                let t = fabric.join(r, wiring, "shrink-refused".into(), config.timeout)?;
                let mut ep = Endpoint::new(Box::new(t), topo, config);
                ep.enable_shrink(Arc::new(RankMask::new(2)))
            })
        })
        .collect();
    for h in handles {
        match h.join().unwrap() {
            Err(Error::InvalidArgument { argument, .. }) => assert_eq!(argument, "enable_shrink"),
            other => panic!("expected enable_shrink to be refused, got {other:?}"),
        }
    }
}
