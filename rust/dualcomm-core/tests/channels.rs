//! Dispatch and combine over several channels per rank (each channel a loopback world of
//! its own), checked against a direct reference and bitwise against one channel.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::{
    ChannelRoute, Channels, CombineArgs, CombineOut, Config, DispatchArgs, Dtype, ElemType,
    Endpoint, Error, RecvBuffers, RecvShape, RecvSink, TopkArgs, Topology, VecSink,
};

/// A `VecSink` that keeps the shape it was asked for: what the caller (the Python binding)
/// sizes its outputs and reports its counts from.
#[derive(Default)]
struct ShapeSink {
    inner: VecSink,
    shape: Option<RecvShape>,
}

impl RecvSink for ShapeSink {
    fn prepare(&mut self, shape: RecvShape) -> dualcomm_core::Result<RecvBuffers<'_>> {
        self.shape = Some(shape.clone());
        self.inner.prepare(shape)
    }
}

const HIDDEN: usize = 16;
const TOPK: usize = 3;

fn lcg(s: &mut u64) -> u64 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *s >> 33
}

struct Input {
    x: Vec<f32>,
    idx: Vec<i64>,
    w: Vec<f32>,
}

/// Per rank: `tokens[r]` rows. With `exact`, small integers (every sum exact, whatever its
/// order); otherwise values whose fp32 sums depend on the order they are taken in.
fn inputs(tokens: &[usize], experts: usize, exact: bool, seed: u64) -> Vec<Input> {
    let mut s = seed;
    tokens
        .iter()
        .map(|&t| Input {
            x: (0..t * HIDDEN)
                .map(|_| {
                    let v = lcg(&mut s);
                    if exact {
                        (v % 17) as f32 - 8.0
                    } else {
                        (v % 1_000_003) as f32 * 1.37e-3 - 700.0 + 1.0 / ((v % 97) as f32 + 1.0)
                    }
                })
                .collect(),
            idx: (0..t * TOPK)
                .map(|_| (lcg(&mut s) % (experts as u64 + 1)) as i64 - 1)
                .collect(),
            w: (0..t * TOPK)
                .map(|_| (lcg(&mut s) % 5) as f32 * 0.3)
                .collect(),
        })
        .collect()
}

/// One rank's results of a dispatch and a combine of the received rows unchanged.
#[derive(Debug, PartialEq)]
struct Got {
    recv_x: Vec<u8>,
    recv_idx: Vec<i64>,
    recv_w: Vec<f32>,
    src: Vec<(u32, u32)>,
    per_expert: Vec<i64>,
    comb_x: Vec<u8>,
    comb_w: Vec<f32>,
    payload: u64,
}

/// Rank `r`'s channels: its endpoint in each channel's world.
fn rank_channels(fabrics: &[Arc<LoopbackFabric>], topo: Topology, r: usize) -> Channels {
    let eps = fabrics
        .iter()
        .map(|f| Endpoint::loopback(f, topo, r, config()).unwrap())
        .collect();
    Channels::new(eps).unwrap()
}

fn config() -> Config {
    Config {
        // Small rings, so that every channel streams through many refills.
        num_nvl_bytes: 4 * 1024,
        num_rdma_bytes: 4 * 1024,
        timeout: Duration::from_secs(30),
    }
}

fn args<'a>(
    inp: &'a Input,
    x: &'a [u8],
    t: usize,
    experts: usize,
    per_expert: &'a [u64],
) -> DispatchArgs<'a> {
    DispatchArgs {
        num_tokens: t,
        x,
        x_row_bytes: HIDDEN * 4,
        x_dtype: ElemType::F32,
        hidden: HIDDEN,
        scales: &[],
        scale_row_bytes: 0,
        topk: Some(TopkArgs {
            idx: &inp.idx,
            weights: &inp.w,
            num_topk: TOPK,
            num_experts: experts,
        }),
        num_tokens_per_expert: per_expert,
        expert_alignment: 4,
    }
}

/// What rank `r` multiplies its received rows by before combining them (with `scaled`), so
/// that a token's rows differ and their sum depends on its order.
fn rank_scale(r: usize) -> f32 {
    1.0 + 0.1373 * (r as f32 + 1.0)
}

/// Runs a dispatch, a cached dispatch of the same tokens (which must deliver the same) and a
/// combine on every rank of a `nodes x rpn` world with `nc` channels per rank.
fn run(
    nodes: usize,
    rpn: usize,
    nc: usize,
    ins: &Arc<Vec<Input>>,
    experts: usize,
    scaled: bool,
) -> Vec<Got> {
    let topo = Topology::new(nodes, rpn).unwrap();
    let w = topo.world_size();
    let fabrics: Vec<_> = (0..nc).map(|_| LoopbackFabric::new(w)).collect();
    let threads: Vec<_> = (0..w)
        .map(|r| {
            let fabrics = fabrics.clone();
            let ins = Arc::clone(ins);
            thread::spawn(move || {
                let mut ch = rank_channels(&fabrics, topo, r);
                let inp = &ins[r];
                let t = inp.x.len() / HIDDEN;
                let x: Vec<u8> = bytemuck::cast_slice(&inp.x).to_vec();
                let layout = ch.endpoint(0).layout(&inp.idx, t, TOPK, experts).unwrap();
                let per_expert: Vec<u64> = layout
                    .num_tokens_per_expert
                    .iter()
                    .map(|&c| c as u64)
                    .collect();
                let a = args(inp, &x, t, experts, &per_expert);
                let mut sink = ShapeSink::default();
                let out = ch
                    .dispatch(&a, ChannelRoute::Fresh(&layout.is_token_in_rank), &mut sink)
                    .unwrap();
                // The shape the caller sized its outputs by says what the dispatch returns.
                let shape = sink.shape.expect("the sink was asked for buffers");
                assert_eq!(shape.num_recv, out.num_recv, "rank {r}");
                assert_eq!(
                    shape.num_recv_tokens_per_expert.as_ref(),
                    Some(&out.num_recv_tokens_per_expert),
                    "aligned per-expert counts of rank {r}"
                );
                assert_eq!(shape.recv_per_src, out.handle.recv_per_src, "rank {r}");
                let recv = sink.inner;
                let mut again = VecSink::default();
                let cached = ch
                    .dispatch(&a, ChannelRoute::Cached(&out.handle), &mut again)
                    .unwrap();
                assert_eq!(cached.num_recv, out.num_recv);
                assert_eq!(again.x, recv.x, "cached dispatch of rank {r}");
                assert_eq!(cached.handle.recv_src_idx, out.handle.recv_src_idx);
                let rows: Vec<f32> = bytemuck::pod_collect_to_vec::<u8, f32>(&recv.x)
                    .iter()
                    .map(|&v| if scaled { v * rank_scale(r) } else { v })
                    .collect();
                let rows: &[u8] = bytemuck::cast_slice(&rows);
                // Garbage in the outputs: combine must write every element.
                let mut comb_x = vec![0xAAu8; t * HIDDEN * 4];
                let mut comb_w = vec![f32::NAN; t * TOPK];
                ch.combine(
                    &CombineArgs {
                        x: rows,
                        hidden: HIDDEN,
                        dtype: Dtype::F32,
                        weights: Some(&recv.topk_weights),
                        num_topk: TOPK,
                        out_dtype: Dtype::F32,
                        rows_at: &[],
                    },
                    &out.handle,
                    CombineOut {
                        x: &mut comb_x,
                        weights: &mut comb_w,
                    },
                )
                .unwrap();
                let st = ch.stats();
                let h = &out.handle;
                Got {
                    recv_x: recv.x,
                    recv_idx: recv.topk_idx,
                    recv_w: recv.topk_weights,
                    src: h
                        .recv_src_rank
                        .iter()
                        .copied()
                        .zip(h.recv_src_idx.iter().copied())
                        .collect(),
                    per_expert: out.num_recv_tokens_per_expert,
                    comb_x,
                    comb_w,
                    payload: st.nvl_payload_bytes + st.rdma_payload_bytes,
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// What rank `d` must receive, straight from the inputs: (source, index) of each row in
/// order, and the rows.
fn reference(ins: &[Input], d: usize, epr: usize) -> (Vec<(u32, u32)>, Vec<f32>, Vec<i64>) {
    let mut src = Vec::new();
    let mut x = Vec::new();
    let mut idx = Vec::new();
    for (s, inp) in ins.iter().enumerate() {
        for tok in 0..inp.x.len() / HIDDEN {
            let row = &inp.idx[tok * TOPK..(tok + 1) * TOPK];
            if row.iter().any(|&e| e >= 0 && e as usize / epr == d) {
                src.push((s as u32, tok as u32));
                x.extend_from_slice(&inp.x[tok * HIDDEN..(tok + 1) * HIDDEN]);
                idx.extend(row.iter().map(|&e| {
                    if e >= 0 && e as usize / epr == d {
                        e - (d * epr) as i64
                    } else {
                        -1
                    }
                }));
            }
        }
    }
    (src, x, idx)
}

#[test]
fn two_channels_deliver_and_combine_as_the_reference_says() {
    let (nodes, rpn, experts) = (2, 2, 8);
    let w = nodes * rpn;
    let epr = experts / w;
    // Token counts below, at and above the channel count, and none.
    let ins = Arc::new(inputs(&[41, 0, 1, 64], experts, true, 3));
    for nc in [2, 3] {
        let got = run(nodes, rpn, nc, &ins, experts, false);
        for d in 0..w {
            let (src, x, idx) = reference(&ins, d, epr);
            let g = &got[d];
            assert_eq!(g.src, src, "{nc} channels: receive order of rank {d}");
            assert_eq!(
                g.recv_x,
                bytemuck::cast_slice::<f32, u8>(&x),
                "{nc} channels: rows of rank {d}"
            );
            assert_eq!(g.recv_idx, idx, "{nc} channels: top-k of rank {d}");
            // Per local expert, counted once per token, rounded up to the alignment (4).
            let want: Vec<i64> = (0..epr)
                .map(|e| {
                    let n = idx.chunks(TOPK).filter(|r| r.contains(&(e as i64))).count() as i64;
                    (n + 3) / 4 * 4
                })
                .collect();
            assert_eq!(
                g.per_expert, want,
                "{nc} channels: per-expert counts of rank {d}"
            );
            // Combine of the unchanged rows: x times the number of ranks the token reached.
            let inp = &ins[d];
            let comb: Vec<f32> = bytemuck::pod_collect_to_vec(&g.comb_x);
            for tok in 0..inp.x.len() / HIDDEN {
                let row = &inp.idx[tok * TOPK..(tok + 1) * TOPK];
                let n = (0..w)
                    .filter(|&r| row.iter().any(|&e| e >= 0 && e as usize / epr == r))
                    .count() as f32;
                for i in 0..HIDDEN {
                    assert_eq!(comb[tok * HIDDEN + i], inp.x[tok * HIDDEN + i] * n);
                }
                for (k, &e) in row.iter().enumerate() {
                    let want = if e >= 0 { inp.w[tok * TOPK + k] } else { 0.0 };
                    assert_eq!(g.comb_w[tok * TOPK + k], want);
                }
            }
        }
    }
}

#[test]
fn any_channel_count_is_bitwise_one_channel() {
    let (nodes, rpn, experts) = (2, 3, 12);
    let ins = Arc::new(inputs(&[77, 13, 50, 2, 90, 31], experts, false, 11));
    let one = run(nodes, rpn, 1, &ins, experts, true);
    let epr = experts / (nodes * rpn);
    // Against plain sums in f64: close (the fp32 sums depend on their order, which is what
    // must not change with the channel count).
    for (d, g) in one.iter().enumerate() {
        let inp = &ins[d];
        let comb: Vec<f32> = bytemuck::pod_collect_to_vec(&g.comb_x);
        for tok in 0..inp.x.len() / HIDDEN {
            let row = &inp.idx[tok * TOPK..(tok + 1) * TOPK];
            let scale: f64 = (0..nodes * rpn)
                .filter(|&r| row.iter().any(|&e| e >= 0 && e as usize / epr == r))
                .map(|r| f64::from(rank_scale(r)))
                .sum();
            for i in 0..HIDDEN {
                let want = f64::from(inp.x[tok * HIDDEN + i]) * scale;
                let got = f64::from(comb[tok * HIDDEN + i]);
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "rank {d} token {tok}: {got} vs {want}"
                );
            }
        }
    }
    for nc in [2, 3, 4] {
        let many = run(nodes, rpn, nc, &ins, experts, true);
        for (d, (a, b)) in one.iter().zip(&many).enumerate() {
            assert_eq!(a, b, "{nc} channels differ from one on rank {d}");
        }
    }
}

#[test]
fn a_bad_token_in_one_channel_fails_every_rank_and_leaves_the_channels_usable() {
    // Token 15 is channel 1's, token 5 channel 0's (the one that hands out the rows).
    for bad_token in [15, 5] {
        bad_token_in_one_channel(bad_token);
    }
}

fn bad_token_in_one_channel(bad_token: usize) {
    let (nodes, rpn, experts, nc) = (1, 2, 4, 2);
    let topo = Topology::new(nodes, rpn).unwrap();
    let w = topo.world_size();
    let ins = Arc::new(inputs(&[20, 20], experts, true, 5));
    let fabrics: Vec<_> = (0..nc).map(|_| LoopbackFabric::new(w)).collect();
    let threads: Vec<_> = (0..w)
        .map(|r| {
            let (fabrics, ins) = (fabrics.clone(), Arc::clone(&ins));
            thread::spawn(move || {
                let mut ch = rank_channels(&fabrics, topo, r);
                let inp = &ins[r];
                let x: Vec<u8> = bytemuck::cast_slice(&inp.x).to_vec();
                let layout = ch.endpoint(0).layout(&inp.idx, 20, TOPK, experts).unwrap();
                let mut bad_idx = inp.idx.clone();
                // An expert that does not exist.
                if r == 1 {
                    bad_idx[bad_token * TOPK] = 99;
                }
                let bad = Input {
                    x: inp.x.clone(),
                    idx: bad_idx,
                    w: inp.w.clone(),
                };
                let a = args(&bad, &x, 20, experts, &[]);
                let first = ch.dispatch(
                    &a,
                    ChannelRoute::Fresh(&layout.is_token_in_rank),
                    &mut VecSink::default(),
                );
                let a = args(inp, &x, 20, experts, &[]);
                let second = ch.dispatch(
                    &a,
                    ChannelRoute::Fresh(&layout.is_token_in_rank),
                    &mut VecSink::default(),
                );
                (first.err(), second.map(|o| o.num_recv))
            })
        })
        .collect();
    let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    match &got[1].0 {
        Some(Error::InvalidArgument { argument, .. }) => {
            assert_eq!(*argument, format!("topk_idx[{bad_token}, 0]"))
        }
        other => panic!("rank 1: {other:?}"),
    }
    match &got[0].0 {
        Some(Error::PeerAborted { peer, .. }) => assert_eq!(*peer, 1),
        other => panic!("rank 0: {other:?}"),
    }
    for (r, g) in got.iter().enumerate() {
        assert!(g.1.is_ok(), "rank {r}'s next dispatch: {:?}", g.1);
    }
}

#[test]
fn a_handle_of_another_channel_count_is_refused() {
    let w = 2;
    let topo = Topology::new(1, w).unwrap();
    let ins = Arc::new(inputs(&[8, 8], 4, true, 9));
    let fabrics: Vec<_> = (0..3).map(|_| LoopbackFabric::new(w)).collect();
    let threads: Vec<_> = (0..w)
        .map(|r| {
            let (fabrics, ins) = (fabrics.clone(), Arc::clone(&ins));
            thread::spawn(move || {
                let mut eps: Vec<Endpoint> = fabrics
                    .iter()
                    .map(|f| Endpoint::loopback(f, topo, r, config()).unwrap())
                    .collect();
                let third = eps.pop().unwrap();
                let mut two = Channels::new(eps).unwrap();
                let mut one = Channels::new(vec![third]).unwrap();
                let inp = &ins[r];
                let x: Vec<u8> = bytemuck::cast_slice(&inp.x).to_vec();
                let layout = one.endpoint(0).layout(&inp.idx, 8, TOPK, 4).unwrap();
                let a = args(inp, &x, 8, 4, &[]);
                let route = ChannelRoute::Fresh(&layout.is_token_in_rank);
                let out = two.dispatch(&a, route, &mut VecSink::default()).unwrap();
                one.dispatch(
                    &a,
                    ChannelRoute::Cached(&out.handle),
                    &mut VecSink::default(),
                )
                .err()
            })
        })
        .collect();
    for t in threads {
        match t.join().unwrap() {
            Some(Error::InvalidArgument { argument, .. }) => assert_eq!(argument, "handle"),
            other => panic!("{other:?}"),
        }
    }
}
