//! Whole worlds of threads over the loopback transport, checked against a direct reference:
//! each destination gets the rows of the tokens routed to it, ordered by (source, index);
//! combine returns, per token, the sum over the ranks it went to.

use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use dualcomm_core::transport::Tier;
use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::transport::shm::{ShmSegment, segment_name};
use dualcomm_core::transport::tcp::TcpBinding;
#[cfg(feature = "verbs")]
use dualcomm_core::transport::verbs::setup::{VerbsOptions, VerbsSetup};
use dualcomm_core::{
    CombineArgs, CombineOut, Config, DispatchArgs, Dtype, ElemType, Endpoint, Error, Route,
    TopkArgs, Topology, VecSink,
};
use proptest::prelude::*;

struct Case {
    nodes: usize,
    rpn: usize,
    tokens: Vec<usize>,
    hidden: usize,
    topk: usize,
    experts: usize,
    ring_records: usize,
    seed: u64,
    /// Rows travel as bf16 (2-byte elements: records at odd alignments) instead of f32.
    bf16: bool,
    /// Ranks talk over TCP sockets on 127.0.0.1 instead of the in-memory loopback.
    tcp: bool,
    /// Ranks talk through shared-memory segments instead; with `tcp` too, shared memory
    /// carries the nvl tier and TCP the rdma tier (one transport per tier).
    shm: bool,
    /// Ranks talk over RC queue pairs on the RDMA device this machine has (the test is
    /// skipped without one); with `shm` too, verbs carries only the rdma tier.
    verbs: bool,
}

fn to_bf16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
        .collect()
}

fn from_bf16_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect()
}

struct RankInput {
    x: Vec<f32>,
    topk_idx: Vec<i64>,
    topk_w: Vec<f32>,
}

fn lcg(s: &mut u64) -> u64 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *s >> 33
}

fn inputs(c: &Case) -> Vec<RankInput> {
    let mut s = c.seed;
    c.tokens
        .iter()
        .map(|&t| RankInput {
            // Small integers keep every sum exact, so the comparison can be bitwise.
            x: (0..t * c.hidden)
                .map(|_| (lcg(&mut s) % 17) as f32 - 8.0)
                .collect(),
            topk_idx: (0..t * c.topk)
                .map(|_| (lcg(&mut s) % (c.experts as u64 + 1)) as i64 - 1)
                .collect(),
            topk_w: (0..t * c.topk).map(|_| (lcg(&mut s) % 5) as f32).collect(),
        })
        .collect()
}

fn record_bytes(c: &Case) -> usize {
    24 + c.hidden * 4 + c.topk * 12
}

/// One rank's results: recv x, recv top-k idx and weights, combined x and weights,
/// [rdma, nvl] payload bytes.
type RankResult = (
    Vec<f32>,
    Vec<i64>,
    Vec<f32>,
    Vec<f32>,
    Vec<f32>,
    [u64; 2],
    [usize; 2],
);

/// Runs dispatch then combine (of the received rows unchanged) on every rank.
fn run(c: &Case) -> Vec<RankResult> {
    let topo = Topology::new(c.nodes, c.rpn).unwrap();
    let w = topo.world_size();
    let fabric = LoopbackFabric::new(w);
    let mut bindings: Vec<Option<TcpBinding>> = (0..w)
        .map(|_| c.tcp.then(|| TcpBinding::bind("127.0.0.1").unwrap()))
        .collect();
    let addrs: Vec<String> = bindings
        .iter()
        .flatten()
        .map(|b| b.local_addr().to_string())
        .collect();
    let secret = [7u8; 16];
    let ins = Arc::new(inputs(c));
    let rec = record_bytes(c).max(24 + c.hidden * 4 + c.topk * 4);
    let config = Config {
        num_nvl_bytes: c.rpn * rec * c.ring_records,
        num_rdma_bytes: c.nodes * rec * c.ring_records,
        timeout: Duration::from_secs(30),
    };
    static JOBS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let job = format!(
        "test{}x{}",
        std::process::id(),
        JOBS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut segments: Vec<Option<ShmSegment>> = (0..w)
        .map(|r| {
            c.shm.then(|| {
                let lens = if c.tcp || c.verbs {
                    Endpoint::tier_region_lens(&topo, &config, Tier::Nvl)
                } else {
                    Endpoint::region_lens(&topo, &config)
                };
                ShmSegment::create(&job, r, w, lens).unwrap()
            })
        })
        .collect();
    // Verbs ranks publish their cards here, then connect once all are in.
    let cards = Arc::new(Mutex::new(vec![Vec::new(); w]));
    let published = Arc::new(Barrier::new(w));
    let handles: Vec<_> = (0..w)
        .map(|r| {
            let (fabric, ins, config) = (Arc::clone(&fabric), Arc::clone(&ins), config.clone());
            let (cards, published, verbs) = (Arc::clone(&cards), Arc::clone(&published), c.verbs);
            let (binding, addrs) = (bindings[r].take(), addrs.clone());
            let (segment, job) = (segments[r].take(), job.clone());
            let (t, k, e, h, bf16) = (c.tokens[r], c.topk, c.experts, c.hidden, c.bf16);
            thread::spawn(move || {
                let setup = verbs.then(|| {
                    let s = open_verbs(&topo, r, &config, segment.is_some());
                    cards.lock().unwrap()[r] = s.card();
                    published.wait();
                    s
                });
                let cards = cards.lock().unwrap().clone();
                let mut ep = match (segment, binding, setup) {
                    (seg, None, Some(s)) => join_verbs(seg, &job, s, &cards, topo, config),
                    (_, _, Some(_)) => unreachable!("verbs with tcp"),
                    (Some(seg), Some(b), None) => {
                        Endpoint::shm_tcp(seg, &job, b, topo, r, &addrs, secret, config).unwrap()
                    }
                    (Some(seg), None, None) => Endpoint::shm(seg, &job, topo, config).unwrap(),
                    (None, Some(b), None) => {
                        Endpoint::tcp(b, topo, r, &addrs, secret, config).unwrap()
                    }
                    (None, None, None) => Endpoint::loopback(&fabric, topo, r, config).unwrap(),
                };
                let inp = &ins[r];
                let (dtype, elem) = if bf16 {
                    (Dtype::Bf16, 2)
                } else {
                    (Dtype::F32, 4)
                };
                let x_bytes: Vec<u8> = if bf16 {
                    to_bf16_bytes(&inp.x)
                } else {
                    bytemuck::cast_slice(&inp.x).to_vec()
                };
                let layout = ep.layout(&inp.topk_idx, t, k, e).unwrap();
                let plan = ep.plan(&layout.is_token_in_rank, t).unwrap();
                let per_expert: Vec<u64> = layout
                    .num_tokens_per_expert
                    .iter()
                    .map(|&c| c as u64)
                    .collect();
                let mut recv = VecSink::default();
                let out = ep
                    .dispatch(
                        &DispatchArgs {
                            num_tokens: t,
                            x: &x_bytes,
                            x_row_bytes: h * elem,
                            x_dtype: if bf16 { ElemType::Bf16 } else { ElemType::F32 },
                            hidden: h,
                            scales: &[],
                            scale_row_bytes: 0,
                            topk: Some(TopkArgs {
                                idx: &inp.topk_idx,
                                weights: &inp.topk_w,
                                num_topk: k,
                                num_experts: e,
                            }),
                            // Announced in the metadata, and checked against what arrives.
                            num_tokens_per_expert: &per_expert,
                            expert_alignment: 1,
                        },
                        Route::Fresh(plan),
                        &mut recv,
                    )
                    .unwrap();
                let recv_x: Vec<f32> = if bf16 {
                    from_bf16_bytes(&recv.x)
                } else {
                    bytemuck::pod_collect_to_vec(&recv.x)
                };
                // Garbage in the output buffers: combine must write every element.
                let mut comb_x = vec![0xAAu8; t * h * 4];
                let mut comb_w = vec![f32::NAN; t * k];
                ep.combine(
                    &CombineArgs {
                        rows_at: &[],
                        x: &recv.x,
                        hidden: h,
                        dtype,
                        weights: Some(&recv.topk_weights),
                        num_topk: k,
                        out_dtype: Dtype::F32,
                    },
                    &out.handle,
                    CombineOut {
                        x: &mut comb_x,
                        weights: &mut comb_w,
                    },
                )
                .unwrap();
                let st = ep.stats();
                (
                    recv_x,
                    recv.topk_idx,
                    recv.topk_weights,
                    bytemuck::pod_collect_to_vec(&comb_x),
                    comb_w,
                    [st.rdma_payload_bytes, st.nvl_payload_bytes],
                    [st.nvl_connections, st.rdma_connections],
                )
            })
        })
        .collect();
    let got = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Every segment name of this world went as soon as every rank had mapped them.
    let residue: Vec<usize> = (0..w)
        .filter(|&r| Path::new(&format!("/dev/shm{}", segment_name(&job, r))).exists())
        .collect();
    assert!(
        residue.is_empty(),
        "segments of ranks {residue:?} left in /dev/shm"
    );
    got
}

/// This rank's verbs resources (every link's, or with `rdma_only` the rdma tier's).
#[cfg(feature = "verbs")]
fn open_verbs(topo: &Topology, rank: usize, config: &Config, rdma_only: bool) -> VerbsSetup {
    let opts = VerbsOptions::from_env().unwrap();
    Endpoint::verbs_setup(topo, rank, config, rdma_only, &opts).unwrap()
}

/// Verbs alone, or shared memory inside nodes with verbs between them.
#[cfg(feature = "verbs")]
fn join_verbs(
    segment: Option<ShmSegment>,
    job: &str,
    setup: VerbsSetup,
    cards: &[Vec<u8>],
    topo: Topology,
    config: Config,
) -> Endpoint {
    match segment {
        Some(seg) => Endpoint::shm_verbs(seg, job, setup, cards, topo, config).unwrap(),
        None => Endpoint::verbs(setup, cards, topo, config).unwrap(),
    }
}

/// Why the verbs cases cannot run here, if they cannot.
#[cfg(feature = "verbs")]
fn verbs_missing() -> Option<String> {
    let device = VerbsOptions::from_env().unwrap().device;
    dualcomm_core::transport::verbs::device::find(device.as_deref())
        .err()
        .map(|e| e.to_string())
}

// Without the feature the verbs cases skip before any of these is reached.
#[cfg(not(feature = "verbs"))]
struct VerbsSetup;

#[cfg(not(feature = "verbs"))]
impl VerbsSetup {
    fn card(&self) -> Vec<u8> {
        unreachable!("a verbs case in a build without the verbs feature")
    }
}

#[cfg(not(feature = "verbs"))]
fn open_verbs(_: &Topology, _: usize, _: &Config, _: bool) -> VerbsSetup {
    unreachable!("a verbs case in a build without the verbs feature")
}

#[cfg(not(feature = "verbs"))]
fn join_verbs(
    _: Option<ShmSegment>,
    _: &str,
    _: VerbsSetup,
    _: &[Vec<u8>],
    _: Topology,
    _: Config,
) -> Endpoint {
    unreachable!("a verbs case in a build without the verbs feature")
}

#[cfg(not(feature = "verbs"))]
fn verbs_missing() -> Option<String> {
    Some("built without the verbs feature".into())
}

fn check(c: &Case) {
    if c.verbs
        && let Some(why) = verbs_missing()
    {
        eprintln!("skipped: {why}");
        return;
    }
    let topo = Topology::new(c.nodes, c.rpn).unwrap();
    let w = topo.world_size();
    let epr = c.experts / w;
    let ins = inputs(c);
    let got = run(c);
    let goes_to = |r: usize, tok: usize, d: usize| {
        ins[r].topk_idx[tok * c.topk..(tok + 1) * c.topk]
            .iter()
            .any(|&e| e >= 0 && e as usize / epr == d)
    };
    let mut rdma_pairs = 0;
    for r in 0..w {
        for tok in 0..c.tokens[r] {
            let nodes: std::collections::BTreeSet<usize> = (0..w)
                .filter(|&d| goes_to(r, tok, d))
                .map(|d| topo.node_of(d))
                .collect();
            rdma_pairs += nodes.iter().filter(|&&n| n != topo.node_of(r)).count();
        }
    }
    for d in 0..w {
        let (recv_x, recv_idx, recv_w, comb_x, comb_w, _, connections) = &got[d];
        // Only the links of the two-hop protocol: the node's other ranks, and the twins.
        assert_eq!(
            connections,
            &[c.rpn - 1, c.nodes - 1],
            "connections of rank {d} (nvl, rdma)"
        );
        let mut want_x = Vec::new();
        let mut want_idx = Vec::new();
        let mut want_w = Vec::new();
        for (s, inp) in ins.iter().enumerate() {
            for tok in 0..c.tokens[s] {
                if goes_to(s, tok, d) {
                    want_x.extend_from_slice(&inp.x[tok * c.hidden..(tok + 1) * c.hidden]);
                    for k in 0..c.topk {
                        let e = inp.topk_idx[tok * c.topk + k];
                        let local = e >= 0 && e as usize / epr == d;
                        want_idx.push(if local { e - (d * epr) as i64 } else { -1 });
                        want_w.push(if local {
                            inp.topk_w[tok * c.topk + k]
                        } else {
                            0.0
                        });
                    }
                }
            }
        }
        assert_eq!(recv_x, &want_x, "recv_x of rank {d}");
        assert_eq!(recv_idx, &want_idx, "recv_topk_idx of rank {d}");
        assert_eq!(recv_w, &want_w, "recv_topk_weights of rank {d}");
        // Combine of the unchanged rows: x times the number of ranks the token reached.
        let inp = &ins[d];
        for tok in 0..c.tokens[d] {
            let n = (0..w).filter(|&r| goes_to(d, tok, r)).count() as f32;
            for i in 0..c.hidden {
                assert_eq!(comb_x[tok * c.hidden + i], inp.x[tok * c.hidden + i] * n);
            }
            for k in 0..c.topk {
                let e = inp.topk_idx[tok * c.topk + k];
                let want = if e >= 0 {
                    inp.topk_w[tok * c.topk + k]
                } else {
                    0.0
                };
                // Each (token, k) weight lives on exactly one rank: the expert's owner.
                assert_eq!(comb_w[tok * c.topk + k], want, "combined weight rank {d}");
            }
        }
    }
    let rdma: u64 = got.iter().map(|g| g.5[0]).sum();
    // Dispatch and combine each cross the network once per (token, remote node).
    let elem = if c.bf16 { 2 } else { 4 };
    assert_eq!(rdma, 2 * (rdma_pairs * c.hidden * elem) as u64);
}

#[test]
fn two_by_two_small_rings_stream() {
    check(&Case {
        nodes: 2,
        rpn: 2,
        tokens: vec![50, 0, 37, 64],
        hidden: 8,
        topk: 3,
        experts: 8,
        ring_records: 1,
        seed: 7,
        bf16: true,
        tcp: false,
        shm: false,
        verbs: false,
    });
}

#[test]
fn three_by_three() {
    check(&Case {
        nodes: 3,
        rpn: 3,
        tokens: vec![20; 9],
        hidden: 5,
        topk: 4,
        experts: 18,
        ring_records: 3,
        seed: 11,
        bf16: false,
        tcp: false,
        shm: false,
        verbs: false,
    });
}

#[test]
fn single_rank() {
    check(&Case {
        nodes: 1,
        rpn: 1,
        tokens: vec![9],
        hidden: 4,
        topk: 2,
        experts: 4,
        ring_records: 1,
        seed: 3,
        bf16: true,
        tcp: false,
        shm: false,
        verbs: false,
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_worlds(nodes in 1usize..4, rpn in 1usize..4, seed in any::<u64>(),
                     max_t in 0usize..30, hidden in 1usize..6, topk in 1usize..5,
                     epr in 1usize..3, ring_records in 1usize..4, bf16 in any::<bool>()) {
        let w = nodes * rpn;
        let mut s = seed;
        let tokens = (0..w).map(|_| (lcg(&mut s) as usize) % (max_t + 1)).collect();
        check(&Case { nodes, rpn, tokens, hidden, topk, experts: epr * w, ring_records, seed, bf16, tcp: false, shm: false, verbs: false });
    }
}

#[test]
fn tcp_two_by_two_small_rings() {
    check(&Case {
        nodes: 2,
        rpn: 2,
        tokens: vec![40, 0, 33, 64],
        hidden: 7,
        topk: 3,
        experts: 8,
        ring_records: 2,
        seed: 21,
        bf16: true,
        tcp: true,
        shm: false,
        verbs: false,
    });
}

#[test]
fn tcp_four_nodes() {
    check(&Case {
        nodes: 4,
        rpn: 1,
        tokens: vec![25, 30, 1, 17],
        hidden: 16,
        topk: 2,
        experts: 8,
        ring_records: 5,
        seed: 22,
        bf16: false,
        tcp: true,
        shm: false,
        verbs: false,
    });
}

#[test]
fn shm_two_by_two_small_rings() {
    check(&Case {
        nodes: 2,
        rpn: 2,
        tokens: vec![40, 0, 33, 64],
        hidden: 7,
        topk: 3,
        experts: 8,
        ring_records: 2,
        seed: 23,
        bf16: true,
        tcp: false,
        shm: true,
        verbs: false,
    });
    check(&Case {
        nodes: 1,
        rpn: 3,
        tokens: vec![60, 10, 0],
        hidden: 33,
        topk: 2,
        experts: 6,
        ring_records: 1,
        seed: 24,
        bf16: false,
        tcp: false,
        shm: true,
        verbs: false,
    });
}

/// One transport per tier, as on a cluster: shared memory inside each (emulated) node, TCP
/// between nodes. With 4 nodes of 2 ranks every rank holds 1 nvl and 3 rdma connections.
#[test]
fn shm_inside_nodes_tcp_between_them() {
    check(&Case {
        nodes: 4,
        rpn: 2,
        tokens: vec![30, 0, 17, 25, 8, 40, 1, 22],
        hidden: 6,
        topk: 3,
        experts: 16,
        ring_records: 2,
        seed: 31,
        bf16: true,
        tcp: true,
        shm: true,
        verbs: false,
    });
    check(&Case {
        nodes: 2,
        rpn: 3,
        tokens: vec![10, 20, 30, 40, 50, 60],
        hidden: 5,
        topk: 2,
        experts: 12,
        ring_records: 3,
        seed: 32,
        bf16: false,
        tcp: true,
        shm: true,
        verbs: false,
    });
}

/// A node of 72 ranks (an NVL72 rack is one NVLink domain): local-rank masks wider than 64
/// bits, tokens forwarded to ranks whose bits lie above 64.
/// The whole protocol over verbs on one machine with one NIC: every rank's queue pairs on
/// the same device, connected to each other (skipped without an RDMA device).
#[test]
fn verbs_between_nodes() {
    check(&Case {
        nodes: 2,
        rpn: 1,
        tokens: vec![40, 33],
        hidden: 16,
        topk: 2,
        experts: 4,
        ring_records: 2,
        seed: 21,
        bf16: true,
        tcp: false,
        shm: false,
        verbs: true,
    });
}

#[test]
fn shm_inside_nodes_verbs_between_them() {
    check(&Case {
        nodes: 2,
        rpn: 2,
        tokens: vec![30, 0, 27, 41],
        hidden: 8,
        topk: 3,
        experts: 8,
        ring_records: 1,
        seed: 5,
        bf16: false,
        tcp: false,
        shm: true,
        verbs: true,
    });
}

#[test]
fn nodes_of_72_ranks() {
    let w = 144;
    check(&Case {
        nodes: 2,
        rpn: 72,
        tokens: (0..w).map(|r| [3, 0, 5][r % 3]).collect(),
        hidden: 2,
        topk: 4,
        experts: 288,
        ring_records: 2,
        seed: 72,
        bf16: false,
        tcp: false,
        shm: false,
        verbs: false,
    });
}

#[test]
fn vanished_peer_is_an_error_not_a_hang() {
    let topo = Topology::new(1, 2).unwrap();
    let fabric = LoopbackFabric::new(2);
    let config = Config {
        num_nvl_bytes: 1 << 16,
        num_rdma_bytes: 0,
        timeout: Duration::from_secs(20),
    };
    let f2 = Arc::clone(&fabric);
    let c2 = config.clone();
    let quitter = thread::spawn(move || {
        let mut ep = Endpoint::loopback(&f2, topo, 1, c2).unwrap();
        ep.destroy();
    });
    let mut ep = Endpoint::loopback(&fabric, topo, 0, config).unwrap();
    quitter.join().unwrap();
    let plan = ep.plan(&[true, true], 1).unwrap();
    let x = [0u8; 4];
    let start = std::time::Instant::now();
    let err = ep
        .dispatch(
            &DispatchArgs {
                num_tokens: 1,
                x: &x,
                x_row_bytes: 4,
                x_dtype: ElemType::U8,
                hidden: 4,
                scales: &[],
                scale_row_bytes: 0,
                topk: None,
                num_tokens_per_expert: &[],
                expert_alignment: 1,
            },
            Route::Fresh(plan),
            &mut VecSink::default(),
        )
        .unwrap_err();
    assert!(matches!(err, Error::PeerLost { peer: 1, .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// A sink that keeps the receive shape it was shown (as a binding's caller sees it).
#[derive(Default)]
struct ShapeSink {
    shape: Option<dualcomm_core::RecvShape>,
    inner: VecSink,
}

impl dualcomm_core::RecvSink for ShapeSink {
    fn prepare(
        &mut self,
        shape: dualcomm_core::RecvShape,
    ) -> dualcomm_core::Result<dualcomm_core::RecvBuffers<'_>> {
        self.shape = Some(shape.clone());
        self.inner.prepare(shape)
    }
}

/// Without top-k, the per-expert receive counts and the node's rank matrix come from the
/// metadata (DeepEP fills `num_recv_tokens_per_expert_list` from `num_tokens_per_expert`):
/// known when the receive buffers are asked for, before any token moves.
#[test]
fn per_expert_counts_and_the_rank_matrix_travel_in_the_metadata() {
    for (nodes, rpn) in [(1, 3), (2, 2), (3, 1)] {
        let topo = Topology::new(nodes, rpn).unwrap();
        let w = topo.world_size();
        let epr = 3;
        let fabric = LoopbackFabric::new(w);
        let config = Config {
            num_nvl_bytes: 1 << 16,
            num_rdma_bytes: 1 << 16,
            timeout: Duration::from_secs(20),
        };
        // Rank r sends token t to every rank, and counts (r + e + 1) % 4 tokens per expert e.
        let tokens = 4;
        let counts =
            |r: usize| -> Vec<u64> { (0..w * epr).map(|e| ((r + e + 1) % 4) as u64).collect() };
        let handles: Vec<_> = (0..w)
            .map(|r| {
                let (fabric, config) = (Arc::clone(&fabric), config.clone());
                let per_expert = counts(r);
                thread::spawn(move || {
                    let mut ep = Endpoint::loopback(&fabric, topo, r, config).unwrap();
                    let plan = ep.plan(&vec![true; tokens * w], tokens).unwrap();
                    let x = vec![r as u8; tokens * 2];
                    let mut sink = ShapeSink::default();
                    let out = ep
                        .dispatch(
                            &DispatchArgs {
                                num_tokens: tokens,
                                x: &x,
                                x_row_bytes: 2,
                                x_dtype: ElemType::U8,
                                hidden: 2,
                                scales: &[],
                                scale_row_bytes: 0,
                                topk: None,
                                num_tokens_per_expert: &per_expert,
                                expert_alignment: 2,
                            },
                            Route::Fresh(plan),
                            &mut sink,
                        )
                        .unwrap();
                    (out.num_recv_tokens_per_expert, sink.shape.unwrap())
                })
            })
            .collect();
        for (d, h) in handles.into_iter().enumerate() {
            let (per_expert, shape) = h.join().unwrap();
            let want: Vec<i64> = (0..epr)
                .map(|e| {
                    let n: u64 = (0..w).map(|s| counts(s)[d * epr + e]).sum();
                    (n.div_ceil(2) * 2) as i64
                })
                .collect();
            assert_eq!(per_expert, want, "rank {d} of {nodes}x{rpn}");
            assert_eq!(shape.num_recv_tokens_per_expert.as_ref(), Some(&want));
            assert_eq!(shape.recv_per_src, vec![tokens as u64; w]);
            assert_eq!(shape.node_matrix, vec![tokens as u64; rpn * rpn]);
        }
    }
}
