//! Fault injection. One rank's transport is wrapped so that one of its writes is corrupted,
//! truncated, duplicated, misplaced, sent where no ring is, or never sent; or the rank
//! stops in the middle of an operation. Every case must end, within the deadline, in a typed
//! error on the rank that sees the fault (naming the faulty rank) and an error on the others
//! (a peer-loss error, or the same protocol error where they see the fault too): never a
//! panic, an abort or a hang. Each case names the validation branch it reaches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dualcomm_core::protocol::imm::{Imm, ImmKind};
use dualcomm_core::protocol::meta::offsets;
use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::transport::tcp::{TcpBinding, TcpTransport};
use dualcomm_core::transport::{Completion, Departure, MemKey, RegionId, Sge, Transport};
use dualcomm_core::{
    CombineArgs, CombineOut, Config, DispatchArgs, Dtype, ElemType, Endpoint, Error, Result, Route,
    TopkArgs, Topology, VecSink,
};

const FAULTY: usize = 1;
const TOKENS: usize = 12;
const HIDDEN: usize = 4;
const TOPK: usize = 2;
const EXPERTS: usize = 8;
/// Token records: header, f32 row, top-k indices and weights (dispatch).
const RECORD: usize = 24 + HIDDEN * 4 + TOPK * 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Meta,
    Data,
    Credit,
}

/// Which message to tamper with: the `nth` of `class` in operation `op` (0: the dispatch,
/// 1: the combine) that the faulty rank sends to `to` or, for `Fault::AsFrom`, receives
/// from `to`.
#[derive(Debug, Clone, Copy)]
struct Target {
    op: u32,
    class: Class,
    to: usize,
    nth: usize,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Overwrites `bytes` bytes at `at` of the first segment with `value` (little-endian).
    Poke { at: usize, bytes: usize, value: u64 },
    /// XORs the immediate.
    FlipImm(u32),
    /// Replaces the immediate's value (record or credit count).
    ImmValue(u32),
    /// Drops the last byte of the write.
    Truncate,
    /// Posts the write twice.
    Duplicate,
    /// Moves the write by `delta` bytes (back, if negative).
    Shift(isize),
    /// Sends the write to another rank instead.
    Redirect(usize),
    /// Sends the write far beyond the end of the region.
    OutOfBounds,
    /// Neither this write nor any later one is sent; then the rank "crashes" (leaves without
    /// having completed the operation).
    StopHere,
    /// On the faulty rank's receiving side: the completion claims to come from another rank
    /// (what a corrupt completion queue would say).
    AsFrom(usize),
}

struct Faulty {
    inner: Box<dyn Transport>,
    target: Target,
    fault: Fault,
    seen: AtomicUsize,
    fired: AtomicBool,
    stopped: AtomicBool,
    /// What the rank registered (key -> address, length), to read a write it tampers with.
    registered: Mutex<HashMap<u32, (usize, usize)>>,
    /// Tampered copies that were written.
    copies: Mutex<Vec<Vec<u8>>>,
}

fn class_of(imm: u32) -> Option<Class> {
    match Imm(imm).kind()? {
        ImmKind::Meta => Some(Class::Meta),
        ImmKind::Data => Some(Class::Data),
        ImmKind::Credit => Some(Class::Credit),
        ImmKind::Goodbye => None,
    }
}

impl Faulty {
    /// The bytes a write would gather.
    fn gather(&self, src: &[Sge]) -> Vec<u8> {
        let registered = self.registered.lock().unwrap();
        let mut all = Vec::new();
        for e in src {
            let (ptr, _) = match e.key.as_region() {
                Some(r) => {
                    let (p, l) = self.inner.region_memory(r);
                    (p as usize, l)
                }
                None => registered[&e.key.0],
            };
            // SAFETY: registered memory (or this rank's own region), alive while the write
            // that names it is being posted.
            all.extend_from_slice(unsafe {
                std::slice::from_raw_parts((ptr as *const u8).add(e.offset), e.len)
            });
        }
        all
    }

    /// Writes `bytes` (a tampered copy, kept registered for the world's lifetime).
    fn send_copy(
        &self,
        peer: usize,
        region: RegionId,
        offset: usize,
        bytes: Vec<u8>,
        imm: u32,
    ) -> Result<()> {
        // SAFETY: the copy is kept in `copies` until the wrapper drops.
        let key = unsafe { self.inner.register(bytes.as_ptr(), bytes.len())? };
        let src = Sge {
            key,
            offset: 0,
            len: bytes.len(),
        };
        self.copies.lock().unwrap().push(bytes);
        self.inner.write_with_imm(peer, region, offset, &[src], imm)
    }

    fn hits(&self, peer: usize, imm: u32) -> bool {
        let t = self.target;
        if self.fired.load(Ordering::Relaxed)
            || peer != t.to
            || Imm(imm).epoch() != t.op
            || class_of(imm) != Some(t.class)
        {
            return false;
        }
        if self.seen.fetch_add(1, Ordering::Relaxed) != t.nth {
            return false;
        }
        self.fired.store(true, Ordering::Relaxed);
        true
    }
}

impl Transport for Faulty {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn region_len(&self, region: RegionId) -> usize {
        self.inner.region_len(region)
    }

    unsafe fn register(&self, ptr: *const u8, len: usize) -> Result<MemKey> {
        // SAFETY: the caller's contract, passed on.
        let key = unsafe { self.inner.register(ptr, len)? };
        self.registered
            .lock()
            .unwrap()
            .insert(key.0, (ptr as usize, len));
        Ok(key)
    }

    fn deregister(&self, key: MemKey) {
        self.registered.lock().unwrap().remove(&key.0);
        self.inner.deregister(key);
    }

    fn region_memory(&self, region: RegionId) -> (*const u8, usize) {
        self.inner.region_memory(region)
    }

    fn flush(&self, deadline: Instant) -> Result<()> {
        self.inner.flush(deadline)
    }

    fn write_with_imm(
        &self,
        peer: usize,
        region: RegionId,
        offset: usize,
        src: &[Sge],
        imm: u32,
    ) -> Result<()> {
        if self.stopped.load(Ordering::Relaxed) {
            return Ok(()); // swallowed: the far side never hears of it
        }
        if matches!(self.fault, Fault::AsFrom(_)) || !self.hits(peer, imm) {
            return self.inner.write_with_imm(peer, region, offset, src, imm);
        }
        let w = |peer, offset, src: &[Sge], imm| {
            self.inner.write_with_imm(peer, region, offset, src, imm)
        };
        match self.fault {
            Fault::Poke { at, bytes, value } => {
                let mut all = self.gather(src);
                all[at..at + bytes].copy_from_slice(&value.to_le_bytes()[..bytes]);
                self.send_copy(peer, region, offset, all, imm)
            }
            Fault::FlipImm(bits) => w(peer, offset, src, imm ^ bits),
            Fault::ImmValue(v) => w(peer, offset, src, (imm & !Imm::MAX_VALUE) | v),
            Fault::Truncate => {
                let mut all = self.gather(src);
                all.pop();
                self.send_copy(peer, region, offset, all, imm)
            }
            Fault::Duplicate => {
                w(peer, offset, src, imm)?;
                w(peer, offset, src, imm)
            }
            Fault::Shift(delta) => w(peer, offset.wrapping_add_signed(delta), src, imm),
            Fault::Redirect(other) => w(other, offset, src, imm),
            Fault::OutOfBounds => w(peer, self.inner.region_len(region) + 8, src, imm),
            Fault::StopHere => {
                self.stopped.store(true, Ordering::Relaxed);
                let inner = &self.inner;
                // Crash a little later, as a process would: peers first see silence.
                thread::sleep(Duration::from_millis(200));
                inner.shutdown(0);
                Ok(())
            }
            Fault::AsFrom(_) => unreachable!("a receiving-side fault"),
        }
    }

    fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize> {
        let from = out.len();
        let n = self.inner.poll(out, deadline)?;
        if let Fault::AsFrom(other) = self.fault {
            for c in &mut out[from..] {
                if self.hits(c.src, c.imm) {
                    c.src = other;
                }
            }
        }
        Ok(n)
    }

    unsafe fn local(&self, region: RegionId, offset: usize, len: usize) -> Result<&[u8]> {
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { self.inner.local(region, offset, len) }
    }

    fn peer_gone(&self, peer: usize) -> Option<Departure> {
        self.inner.peer_gone(peer)
    }

    fn shutdown(&self, completed_ops: u64) {
        self.inner.shutdown(completed_ops)
    }

    fn wire_bytes(&self) -> [u64; 2] {
        self.inner.wire_bytes()
    }

    fn connections(&self) -> [usize; 2] {
        self.inner.connections()
    }
}

/// Every rank's outcome of one dispatch and one combine (the first error, if any).
fn run_world(target: Target, fault: Fault) -> Vec<Result<()>> {
    run_world_on(target, fault, false)
}

/// As `run_world`, over TCP sockets (`tcp`) instead of the in-memory loopback.
fn run_world_on(target: Target, fault: Fault, tcp: bool) -> Vec<Result<()>> {
    let topo = Topology::new(2, 2).unwrap();
    let fabric = LoopbackFabric::new(4);
    let mut bindings: Vec<Option<TcpBinding>> = (0..4)
        .map(|_| tcp.then(|| TcpBinding::bind("127.0.0.1").unwrap()))
        .collect();
    let addrs: Vec<String> = bindings
        .iter()
        .flatten()
        .map(|b| b.local_addr().to_string())
        .collect();
    let config = Config {
        // Rings of two records, so that credits flow during the operation.
        num_nvl_bytes: 2 * 2 * RECORD,
        num_rdma_bytes: 2 * 2 * RECORD,
        timeout: Duration::from_secs(20),
    };
    let handles: Vec<_> = (0..4)
        .map(|r| {
            let (fabric, config) = (Arc::clone(&fabric), config.clone());
            let (binding, addrs) = (bindings[r].take(), addrs.clone());
            thread::spawn(move || -> Result<()> {
                let t: Box<dyn Transport> = match binding {
                    Some(b) => {
                        let wiring = Endpoint::wiring(&topo, &config);
                        Box::new(TcpTransport::establish(
                            b,
                            r,
                            &addrs,
                            [3; 16],
                            wiring,
                            config.timeout,
                        )?)
                    }
                    None => {
                        let wiring = Endpoint::wiring(&topo, &config);
                        Box::new(fabric.join(r, wiring, "faults".into(), config.timeout)?)
                    }
                };
                let t: Box<dyn Transport> = if r == FAULTY {
                    Box::new(Faulty {
                        inner: t,
                        target,
                        fault,
                        seen: AtomicUsize::new(0),
                        fired: AtomicBool::new(false),
                        stopped: AtomicBool::new(false),
                        registered: Mutex::new(HashMap::new()),
                        copies: Mutex::new(Vec::new()),
                    })
                } else {
                    t
                };
                let mut ep = Endpoint::new(t, topo, config);
                one_round(&mut ep, r)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("no rank panics"))
        .collect()
}

fn one_round(ep: &mut Endpoint, rank: usize) -> Result<()> {
    let x: Vec<f32> = (0..TOKENS * HIDDEN).map(|i| (i + rank) as f32).collect();
    // Every token goes to two experts on different nodes: both tiers carry traffic.
    let idx: Vec<i64> = (0..TOKENS)
        .flat_map(|t| [(t % 4) as i64, 4 + ((t + rank) % 4) as i64])
        .collect();
    let wts = vec![0.5f32; TOKENS * TOPK];
    let layout = ep.layout(&idx, TOKENS, TOPK, EXPERTS)?;
    let plan = ep.plan(&layout.is_token_in_rank, TOKENS)?;
    let per_expert: Vec<u64> = layout
        .num_tokens_per_expert
        .iter()
        .map(|&c| c as u64)
        .collect();
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
        Route::Fresh(plan),
        &mut recv,
    )?;
    let mut comb_x = vec![0u8; TOKENS * HIDDEN * 4];
    let mut comb_w = vec![0f32; TOKENS * TOPK];
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
            weights: &mut comb_w,
        },
    )
}

/// Runs the case over loopback and checks the outcome (see `case_on`).
fn case(target: Target, fault: Fault, expect: &str) -> Vec<Result<()>> {
    case_on(target, fault, expect, false)
}

/// The sender's own transport refuses the write (it knows where it may write): an internal
/// error on the faulty rank, peer-loss on the others; nothing lands at the peer.
fn refused_by_the_writer(target: Target, fault: Fault, tcp: bool) {
    let got = case_on(target, fault, "outside the slots this rank owns", tcp);
    assert!(
        matches!(got[FAULTY], Err(Error::Internal { .. })),
        "{got:?}"
    );
}

/// Runs the case and checks the outcome: some rank reports `expect` (a protocol error
/// naming the faulty rank, unless `by` says otherwise); no rank succeeds silently with the
/// fault unnoticed; every error is typed and arrives well before the deadline.
fn case_on(target: Target, fault: Fault, expect: &str, tcp: bool) -> Vec<Result<()>> {
    let start = Instant::now();
    let got = run_world_on(target, fault, tcp);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "{fault:?} at {target:?} took {took:?}: {got:?}"
    );
    let blamed = match fault {
        Fault::AsFrom(other) => other,
        _ => FAULTY,
    };
    // `expect` may list alternatives, separated by '|'.
    let says = |text: &str| expect.split('|').any(|e| text.contains(e));
    let detected = got.iter().any(|r| match r {
        Err(Error::Protocol { peer, detail }) => *peer == blamed && says(detail),
        Err(e @ Error::Internal { .. }) => says(&e.to_string()),
        Err(e @ Error::PeerLost { .. }) => says(&e.to_string()),
        _ => false,
    });
    assert!(
        detected,
        "{fault:?} at {target:?}: no rank reported \"{expect}\": {got:?}"
    );
    for (r, res) in got.iter().enumerate() {
        match res {
            Err(Error::Protocol { .. } | Error::PeerLost { .. } | Error::Internal { .. }) => {}
            // A rank whose part was over before the fault struck may finish.
            Ok(()) if r != FAULTY => {}
            // The rank that crashed on purpose finds itself gone.
            Err(Error::Destroyed) if r == FAULTY && matches!(fault, Fault::StopHere) => {}
            other => panic!("{fault:?} at {target:?}: rank {r} ended with {other:?}"),
        }
    }
    got
}

fn meta_to(to: usize) -> Target {
    Target {
        op: 0,
        class: Class::Meta,
        to,
        nth: 0,
    }
}

fn data(op: u32, to: usize, nth: usize) -> Target {
    Target {
        op,
        class: Class::Data,
        to,
        nth,
    }
}

fn poke(at: usize, bytes: usize, value: u64) -> Fault {
    Fault::Poke { at, bytes, value }
}

fn meta_rdma() -> Target {
    // Rank 3 is rank 1's twin on the other node.
    meta_to(3)
}

fn credit(op: u32, to: usize) -> Target {
    Target {
        op,
        class: Class::Credit,
        to,
        nth: 0,
    }
}

// ---- metadata (op.rs, meta.rs) ----

#[test]
fn oversized_count_is_refused_before_anything_is_sized() {
    case(
        meta_rdma(),
        poke(offsets::TOKENS, 8, 1 << 40),
        "above the limit",
    );
}

#[test]
fn node_count_above_the_senders_tokens() {
    case(
        meta_rdma(),
        poke(offsets::NODE_COUNT, 8, 1000),
        "for node 1 out of its",
    );
}

#[test]
fn rank_count_above_the_node_count() {
    case(
        meta_rdma(),
        poke(offsets::COUNTS + 8, 8, 1000),
        "for one rank of node 1",
    );
}

#[test]
fn relayed_count_above_the_sources_tokens() {
    // Rank 1's record to rank 0 relays, per node, the source it forwards from there.
    case(
        meta_to(0),
        poke(offsets::COUNTS, 8, 1000),
        "relayed 1000 tokens",
    );
}

#[test]
fn different_expert_count_per_rank() {
    case(
        meta_rdma(),
        poke(offsets::LOCAL_EXPERTS, 4, 3),
        "counts tokens for 3 experts per rank",
    );
}

#[test]
fn count_entries_other_than_the_topology_needs() {
    case(
        meta_rdma(),
        poke(offsets::NUM_COUNTS, 4, 1),
        "1 counts in its metadata, expected 2",
    );
}

#[test]
fn count_entries_beyond_the_record() {
    case(
        meta_to(0),
        poke(offsets::NUM_COUNTS, 4, 1 << 20),
        "with 1048576 counts",
    );
}

#[test]
fn expert_count_above_the_limit() {
    // After rank 1's two rank counts: its tokens for rank 2's experts, then rank 3's.
    case(
        meta_rdma(),
        poke(offsets::COUNTS + 16 + 8, 4, u32::MAX as u64),
        "tokens for one expert, above the limit",
    );
}

#[test]
fn expert_count_that_the_tokens_contradict() {
    // Rank 1 sends rank 3 three tokens for its expert 6 (see `one_round`), and announces 9.
    case(
        meta_rdma(),
        poke(offsets::COUNTS + 16 + 8, 4, 9),
        "tokens for local expert 0 of rank 3 arrived through it, it announced 9",
    );
}

#[test]
fn direct_count_above_the_senders_tokens() {
    // Rank 1's record to rank 0: (count, tokens) per node, then its own tokens per rank of
    // its node.
    case(
        meta_to(0),
        poke(offsets::COUNTS + 32, 8, 1000),
        "for one rank of its node out of its",
    );
}

#[test]
fn unknown_operation() {
    case(meta_to(0), poke(offsets::KIND, 4, 9), "unknown operation");
}

#[test]
fn different_operation() {
    case(
        meta_rdma(),
        poke(offsets::KIND, 4, 3),
        "every rank must make the same calls",
    );
}

#[test]
fn different_record_size() {
    case(
        meta_to(0),
        poke(offsets::RECORD_BYTES, 4, RECORD as u64 + 4),
        "-byte token records",
    );
}

#[test]
fn different_record_format() {
    case(
        meta_rdma(),
        poke(offsets::HIDDEN, 4, 2),
        "must agree on every rank",
    );
}

#[test]
fn unknown_element_type() {
    case(
        meta_to(0),
        poke(offsets::DTYPE, 4, 99),
        "unknown element type",
    );
}

#[test]
fn abort_on_behalf_of_another_rank() {
    // Rank 1's record to its twin turned into an abort on behalf of rank 0 (the origin
    // field is 0): a twin speaks only for itself.
    case(
        meta_rdma(),
        poke(offsets::KIND, 4, 4),
        "which it does not speak for",
    );
}

#[test]
fn metadata_twice() {
    case(meta_to(0), Fault::Duplicate, "metadata sent twice");
}

#[test]
fn metadata_of_the_wrong_length() {
    case(meta_to(0), Fault::Truncate, "metadata of");
}

#[test]
fn metadata_outside_its_slot_is_refused_by_the_writer() {
    refused_by_the_writer(meta_to(0), Fault::Shift(8), false);
}

#[test]
fn metadata_from_a_rank_with_no_link() {
    // As if rank 2 (other node, other local index) had written to rank 1.
    case(
        meta_to(0),
        Fault::AsFrom(2),
        "metadata from a rank with no link here",
    );
}

// ---- immediates (op.rs) ----

#[test]
fn malformed_immediate() {
    // Kind bits 0: no such message.
    case(
        data(0, 0, 0),
        Fault::FlipImm(1 << 29),
        "malformed immediate",
    );
}

#[test]
fn goodbye_immediate_reaching_the_protocol() {
    // Data turned into a goodbye: transports consume goodbyes; the protocol refuses one.
    case(data(0, 0, 0), Fault::FlipImm(5 << 29), "control message");
}

#[test]
fn data_of_the_next_operation() {
    // Only metadata can legitimately run one operation ahead.
    case(data(0, 0, 0), Fault::FlipImm(1 << 27), "ran ahead");
}

#[test]
fn immediate_of_another_epoch() {
    case(data(0, 0, 0), Fault::FlipImm(2 << 27), "operation epoch");
}

#[test]
fn data_from_a_rank_with_no_ring() {
    case(
        data(0, 0, 0),
        Fault::AsFrom(2),
        "data from a rank with no ring here",
    );
}

#[test]
fn credit_from_a_rank_with_no_ring() {
    case(
        credit(0, 0),
        Fault::AsFrom(2),
        "credit from a rank with no ring here",
    );
}

#[test]
fn write_to_a_rank_with_no_link_is_refused_by_the_writer() {
    refused_by_the_writer(data(0, 0, 0), Fault::Redirect(2), false);
    refused_by_the_writer(credit(0, 0), Fault::Redirect(2), false);
}

// ---- rings (ring.rs) ----

#[test]
fn truncated_write() {
    case(data(0, 0, 0), Fault::Truncate, "expected whole records");
}

#[test]
fn write_announcing_no_records() {
    case(data(0, 0, 0), Fault::ImmValue(0), "expected whole records");
}

#[test]
fn write_past_the_rings_end() {
    case(
        data(0, 0, 0),
        Fault::ImmValue(1000),
        "expected whole records",
    );
}

#[test]
fn write_into_another_senders_ring_is_refused_by_the_writer() {
    refused_by_the_writer(data(0, 0, 0), Fault::Shift(-(RECORD as isize)), false);
    refused_by_the_writer(data(0, 0, 0), Fault::Shift(-(RECORD as isize)), true);
}

#[test]
fn duplicated_write() {
    // The copy claims ring space never credited or records never announced, or (when it
    // fits) repeats tokens already taken.
    case(
        data(0, 3, 0),
        Fault::Duplicate,
        "wrote past the credits|were announced|expected whole records|out of order",
    );
}

#[test]
fn more_credits_than_records_outstanding() {
    case(credit(0, 0), Fault::ImmValue(1000), "credits with only");
}

#[test]
fn write_outside_the_region_is_refused_by_the_writer() {
    refused_by_the_writer(data(0, 0, 0), Fault::OutOfBounds, false);
}

#[test]
fn tcp_world_without_faults_succeeds() {
    let t = Target {
        op: 3,
        class: Class::Data,
        to: 0,
        nth: 0,
    };
    let got = run_world_on(t, Fault::Truncate, true);
    assert!(got.iter().all(Result::is_ok), "{got:?}");
}

// ---- token records (dispatch.rs, record.rs) ----

#[test]
fn record_from_an_unknown_rank() {
    // Straight over nvl to rank 0, which serves only its own local index.
    case(data(0, 0, 0), poke(0, 4, 99), "which it does not serve");
}

#[test]
fn forwarded_record_claims_another_source() {
    // Over rdma to the twin, which checks the source before it forwards.
    case(data(0, 3, 0), poke(0, 4, 0), "record claims source");
}

#[test]
fn forwarded_record_with_an_empty_mask() {
    case(data(0, 3, 0), poke(8, 8, 0), "record claims source");
}

#[test]
fn forwarded_record_with_a_mask_beyond_the_node() {
    case(data(0, 3, 0), poke(8, 8, 1 << 5), "record claims source");
}

#[test]
fn forwarded_record_for_more_ranks_than_its_counts_say() {
    // Every local rank of node 1 in the mask: more tokens for one of them than announced.
    case(data(0, 3, 0), poke(8, 8, 0b11), "than the|were announced");
}

#[test]
fn token_index_out_of_range() {
    case(
        data(0, 0, 0),
        poke(4, 4, 1000),
        "out of order or out of range",
    );
}

// ---- combine (combine.rs) ----

#[test]
fn combine_row_for_a_token_never_forwarded() {
    // Rank 1's rows to rank 0, the forwarder of its node for sources of local index 0.
    case(
        data(1, 0, 0),
        poke(4, 4, 1000),
        "which this rank did not forward",
    );
}

#[test]
fn combine_partial_for_a_token_that_never_went_there() {
    // Rank 1 is the forwarder on node 0 for rank 3: its partials go back over rdma.
    case(data(1, 3, 0), poke(4, 4, 1000), "never went to node");
}

#[test]
fn combine_with_the_handle_of_another_operation() {
    let t = Target {
        op: 1,
        class: Class::Meta,
        to: 0,
        nth: 0,
    };
    case(
        t,
        poke(offsets::TAG, 8, 77),
        "combines with the handle of operation",
    );
}

// ---- a rank that stops ----

#[test]
fn rank_that_stops_mid_dispatch() {
    let got = case(data(0, 3, 1), Fault::StopHere, "is gone");
    assert!(
        got.iter()
            .enumerate()
            .all(|(r, res)| r == FAULTY || matches!(res, Err(Error::PeerLost { .. }))),
        "{got:?}"
    );
}

#[test]
fn rank_that_stops_mid_combine() {
    case(data(1, 0, 0), Fault::StopHere, "is gone");
}

/// Guard against a wrapper that tampers with nothing: without a fault the world succeeds.
#[test]
fn untouched_world_succeeds() {
    let t = Target {
        op: 3, // no such operation in one round: nothing is touched
        class: Class::Data,
        to: 0,
        nth: 0,
    };
    let got = run_world(t, Fault::Truncate);
    assert!(got.iter().all(Result::is_ok), "{got:?}");
}
