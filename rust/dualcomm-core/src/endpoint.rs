//! One rank's handle on a world: owns its transport and runs operations one at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::handoff::PendingHandle;
use crate::mask::RankMask;
use crate::protocol::combine::{self, CombineArgs, CombineOut, Scratch};
use crate::protocol::dispatch::{
    self, DispatchArgs, DispatchHandle, DispatchOutput, RecvSink, Route,
};
use crate::protocol::layout::RegionPlan;
use crate::protocol::op::{self, OpKind, Session};
use crate::routing::{DispatchLayout, SendPlan, dispatch_layout};
use crate::topology::Topology;
use crate::transport::loopback::LoopbackFabric;
use crate::transport::shm::{ShmSegment, ShmTransport};
use crate::transport::tcp::{SECRET_BYTES, TcpBinding, TcpTransport};
use crate::transport::tiered::Tiered;
#[cfg(feature = "verbs")]
use crate::transport::verbs::setup::{VerbsOptions, VerbsSetup};
use crate::transport::{
    Completion, NUM_REGIONS, Tier, TierCounters, TierWiring, Transport, Wiring,
};

/// Where a queued dispatch sends its tokens: a new plan, or the route of an earlier
/// dispatch, named by its (maybe still pending) handle.
pub enum QueuedRoute {
    Fresh(Arc<SendPlan>),
    Cached(PendingHandle),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Bytes of receive rings for same-node peers (split evenly among the node's ranks).
    pub num_nvl_bytes: usize,
    /// Bytes of receive rings for other nodes (split evenly among the nodes).
    pub num_rdma_bytes: usize,
    /// Deadline of every wait.
    pub timeout: Duration,
}

impl Config {
    /// What every rank of a world must agree on.
    fn fingerprint(&self, topo: &Topology) -> String {
        format!(
            "topology {}x{}, num_nvl_bytes={}, num_rdma_bytes={}",
            topo.num_nodes(),
            topo.ranks_per_node(),
            self.num_nvl_bytes,
            self.num_rdma_bytes
        )
    }
}

/// Traffic of one rank since its endpoint was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Token data (hidden states and FP8 scales) sent per tier.
    pub nvl_payload_bytes: u64,
    pub rdma_payload_bytes: u64,
    /// Every byte sent per tier: payload plus headers, top-k, counts and credits.
    pub nvl_wire_bytes: u64,
    pub rdma_wire_bytes: u64,
    /// Operations completed.
    pub operations: u64,
    /// Incoming connections the transport refused (TCP: bad hello or wrong secret).
    pub rejected_connections: u64,
    /// Peers this rank is connected to over nvl and over rdma: the links of the two-hop
    /// protocol, `ranks_per_node - 1` and `num_nodes - 1`, never a full mesh.
    pub nvl_connections: usize,
    pub rdma_connections: usize,
}

fn check_addresses(peers: &[String], topo: &Topology) -> Result<()> {
    if peers.len() != topo.world_size() {
        return Err(Error::invalid(
            "peers",
            format!("one address per rank ({})", topo.world_size()),
            peers.len(),
        ));
    }
    Ok(())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Endpoint {
    id: u64,
    transport: Arc<dyn Transport>,
    /// Operations completed, readable from other threads (the goodbye count).
    completed: Arc<AtomicU64>,
    topo: Topology,
    config: Config,
    seq: u64,
    stash: Vec<Completion>,
    payload: TierCounters,
    scratch: Scratch,
    broken: Option<String>,
    destroyed: bool,
    /// Shrink mode: the ranks this endpoint runs without (see `crate::mask`).
    mask: Option<Arc<RankMask>>,
    /// Per rank, nanoseconds waited for it since `take_waits` last ran.
    waits: Vec<u64>,
}

impl Endpoint {
    /// Joins a loopback world as `rank`; waits for every rank to join.
    pub fn loopback(
        fabric: &Arc<LoopbackFabric>,
        topo: Topology,
        rank: usize,
        config: Config,
    ) -> Result<Self> {
        if fabric.world_size() != topo.world_size() {
            return Err(Error::invalid(
                "num_nodes * ranks_per_node",
                format!("the loopback world's size {}", fabric.world_size()),
                topo.world_size(),
            ));
        }
        let wiring = Self::wiring(&topo, &config);
        let t = fabric.join(rank, wiring, config.fingerprint(&topo), config.timeout)?;
        Ok(Self::new(Box::new(t), topo, config))
    }

    /// Joins a world over TCP: `peers[r]` is rank r's published address (`binding` is this
    /// rank's own, already bound). Waits until every rank is connected both ways.
    pub fn tcp(
        binding: TcpBinding,
        topo: Topology,
        rank: usize,
        peers: &[String],
        secret: [u8; SECRET_BYTES],
        config: Config,
    ) -> Result<Self> {
        check_addresses(peers, &topo)?;
        let wiring = Self::wiring(&topo, &config);
        let t = TcpTransport::establish(binding, rank, peers, secret, wiring, config.timeout)?;
        Ok(Self::new(Box::new(t), topo, config))
    }

    /// Joins a world of one host over shared memory: `segment` is this rank's own, created
    /// on every rank before any rank calls this (`job` names the job's segments).
    pub fn shm(segment: ShmSegment, job: &str, topo: Topology, config: Config) -> Result<Self> {
        let t = ShmTransport::attach(segment, job, Self::wiring(&topo, &config), config.timeout)?;
        Ok(Self::new(Box::new(t), topo, config))
    }

    /// Joins a world with one transport per tier: shared memory inside the node (`segment`,
    /// created on every rank first with `region_lens_of(Tier::Nvl)`), TCP between nodes
    /// (`binding`; `peers[r]` is rank r's address). Only linked ranks map or connect.
    #[allow(clippy::too_many_arguments)]
    pub fn shm_tcp(
        segment: ShmSegment,
        job: &str,
        binding: TcpBinding,
        topo: Topology,
        rank: usize,
        peers: &[String],
        secret: [u8; SECRET_BYTES],
        config: Config,
    ) -> Result<Self> {
        check_addresses(peers, &topo)?;
        let tier = |tier| -> Arc<dyn Wiring> {
            Arc::new(TierWiring {
                inner: Self::wiring(&topo, &config),
                tier,
            })
        };
        let nvl = ShmTransport::attach(segment, job, tier(Tier::Nvl), config.timeout)?;
        let rdma = TcpTransport::establish(
            binding,
            rank,
            peers,
            secret,
            tier(Tier::Rdma),
            config.timeout,
        )?;
        let t = Tiered::new(Box::new(nvl), Box::new(rdma))?;
        Ok(Self::new(Box::new(t), topo, config))
    }

    /// Opens this rank's verbs resources, before the bootstrap exchanges their `card`s: for
    /// every link of the world (`rdma_only` false: `verbs`), or only the rdma tier's, with
    /// shared memory inside each node (`shm_verbs`). Says what is missing as
    /// `TransportUnavailable` (libibverbs, a device, an active port).
    #[cfg(feature = "verbs")]
    pub fn verbs_setup(
        topo: &Topology,
        rank: usize,
        config: &Config,
        rdma_only: bool,
        options: &VerbsOptions,
    ) -> Result<VerbsSetup> {
        let plan: Arc<dyn Wiring> = Self::wiring(topo, config);
        let wiring: Arc<dyn Wiring> = if rdma_only {
            Arc::new(TierWiring {
                inner: plan,
                tier: Tier::Rdma,
            })
        } else {
            plan
        };
        VerbsSetup::open(rank, wiring, options, config.timeout)
    }

    /// Joins a world whose links all run over verbs: `setup` from `verbs_setup` (with
    /// `rdma_only` false), `cards[r]` rank r's card.
    #[cfg(feature = "verbs")]
    pub fn verbs(
        setup: VerbsSetup,
        cards: &[Vec<u8>],
        topo: Topology,
        config: Config,
    ) -> Result<Self> {
        let t = setup.connect(cards)?;
        Ok(Self::new(Box::new(t), topo, config))
    }

    /// Joins a world with shared memory inside each node and verbs between nodes: `segment`
    /// as for `shm_tcp`, `setup` from `verbs_setup` with `rdma_only`.
    #[cfg(feature = "verbs")]
    pub fn shm_verbs(
        segment: ShmSegment,
        job: &str,
        setup: VerbsSetup,
        cards: &[Vec<u8>],
        topo: Topology,
        config: Config,
    ) -> Result<Self> {
        let nvl = ShmTransport::attach(
            segment,
            job,
            Arc::new(TierWiring {
                inner: Self::wiring(&topo, &config),
                tier: Tier::Nvl,
            }),
            config.timeout,
        )?;
        let rdma = setup.connect(cards)?;
        let t = Tiered::new(Box::new(nvl), Box::new(rdma))?;
        Ok(Self::new(Box::new(t), topo, config))
    }

    /// The region sizes of one tier's transport in a composed world (see `shm_tcp`).
    pub fn tier_region_lens(topo: &Topology, config: &Config, tier: Tier) -> [usize; NUM_REGIONS] {
        TierWiring {
            inner: Self::wiring(topo, config),
            tier,
        }
        .region_lens()
    }

    /// The region sizes every rank of a world registers, for a transport made outside.
    pub fn region_lens(topo: &Topology, config: &Config) -> [usize; NUM_REGIONS] {
        Self::wiring(topo, config).region_lens()
    }

    /// The protocol's region plan, as transports need it (see `Wiring`).
    pub fn wiring(topo: &Topology, config: &Config) -> Arc<RegionPlan> {
        Arc::new(RegionPlan::new(
            *topo,
            config.num_nvl_bytes,
            config.num_rdma_bytes,
        ))
    }

    pub fn new(transport: Box<dyn Transport>, topo: Topology, config: Config) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            transport: Arc::from(transport),
            completed: Arc::new(AtomicU64::new(0)),
            topo,
            config,
            seq: 0,
            stash: Vec::new(),
            payload: TierCounters::default(),
            scratch: Scratch::default(),
            broken: None,
            destroyed: false,
            mask: None,
            waits: vec![0; topo.world_size()],
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn usable(&self) -> Result<()> {
        if self.destroyed {
            return Err(Error::Destroyed);
        }
        if let Some(why) = &self.broken {
            return Err(Error::Broken {
                reason: why.clone(),
            });
        }
        Ok(())
    }

    /// Routing tables only; nothing is sent.
    pub fn layout(
        &self,
        topk_idx: &[i64],
        num_tokens: usize,
        num_topk: usize,
        num_experts: usize,
    ) -> Result<DispatchLayout> {
        self.usable()?;
        dispatch_layout(&self.topo, topk_idx, num_tokens, num_topk, num_experts)
    }

    /// The send plan of a fresh dispatch, from `[num_tokens, world_size]` booleans.
    pub fn plan(&self, is_token_in_rank: &[bool], num_tokens: usize) -> Result<Arc<SendPlan>> {
        self.usable()?;
        Ok(Arc::new(SendPlan::from_is_token_in_rank(
            &self.topo,
            is_token_in_rank,
            num_tokens,
        )?))
    }

    /// What an operation borrows: the session, the payload counters, the reusable buffers.
    fn parts(&mut self) -> (Session<'_>, &TierCounters, &mut Scratch) {
        let session = Session {
            transport: &*self.transport,
            topo: self.topo,
            seq: self.seq,
            timeout: self.config.timeout,
            stash: &mut self.stash,
            num_nvl_bytes: self.config.num_nvl_bytes,
            num_rdma_bytes: self.config.num_rdma_bytes,
            mask: self.mask.as_deref(),
            waits: &mut self.waits,
        };
        (session, &self.payload, &mut self.scratch)
    }

    /// Refuses the next operation (`kind`) for a bad argument `e` found above the protocol:
    /// every peer's call of it fails naming this rank, and this endpoint stays usable.
    pub(crate) fn reject<T>(&mut self, kind: OpKind, e: Error) -> Result<T> {
        self.usable()?;
        self.finish(kind, Err(e))
    }

    /// Bad arguments are found before anything is sent: this rank tells its peers (an
    /// abort in place of its metadata), every rank abandons the operation, and the endpoint
    /// stays usable. Any other failure leaves the ranks out of step, so the endpoint refuses
    /// further work and leaves the world.
    fn finish<T>(&mut self, kind: OpKind, r: Result<T>) -> Result<T> {
        match &r {
            Ok(_) | Err(Error::PeerAborted { .. }) => self.advance(),
            Err(e @ Error::InvalidArgument { .. }) => {
                let e = e.clone();
                if let Err(send) = self.abort(kind, &e.to_string()) {
                    self.fail(&send);
                }
            }
            Err(e) => {
                let e = e.clone();
                self.fail(&e);
            }
        }
        r
    }

    fn advance(&mut self) {
        self.seq += 1;
        self.completed.store(self.seq, Ordering::Relaxed);
    }

    /// Abandons the next operation on every rank: `reason` (a rejected argument, as the
    /// caller found it) reaches each peer, whose call raises `PeerAborted` naming this rank.
    /// Returns once every peer has reached that operation. Also for arguments that a layer
    /// above the core checks (the Python binding).
    pub fn abort(&mut self, kind: OpKind, reason: &str) -> Result<()> {
        self.usable()?;
        let (session, _, _) = self.parts();
        match op::abort(session, kind, reason) {
            Ok(()) => {
                self.advance();
                Ok(())
            }
            // Peers may not have heard: the ranks are out of step.
            Err(e) => {
                self.fail(&e);
                Err(e)
            }
        }
    }

    /// Dispatches; received rows go to the buffers `sink` supplies once their size is known.
    pub fn dispatch(
        &mut self,
        args: &DispatchArgs<'_>,
        route: Route<'_>,
        sink: &mut dyn RecvSink,
    ) -> Result<DispatchOutput> {
        self.usable()?;
        let id = self.id;
        let (session, payload, _) = self.parts();
        let kind = match route {
            Route::Fresh(_) => OpKind::Dispatch,
            Route::Cached(_) => OpKind::CachedDispatch,
        };
        let r = dispatch::run(session, id, payload, args, route, sink);
        self.finish(kind, r)
    }

    /// A dispatch queued behind others: a cached one names its earlier dispatch by a handle
    /// that resolves only now. On success `result` resolves to this dispatch's handle.
    pub fn dispatch_queued(
        &mut self,
        args: &DispatchArgs<'_>,
        route: &QueuedRoute,
        sink: &mut dyn RecvSink,
        result: &PendingHandle,
    ) -> Result<DispatchOutput> {
        self.usable()?;
        let out = match route {
            QueuedRoute::Fresh(plan) => self.dispatch(args, Route::Fresh(Arc::clone(plan)), sink),
            QueuedRoute::Cached(h) => match h.resolve() {
                Ok(h) => self.dispatch(args, Route::Cached(h), sink),
                // This rank will not run it: its peers hear so (see `finish`).
                Err(e) => self.finish(OpKind::CachedDispatch, Err(e)),
            },
        }?;
        result.fill(&out.handle);
        Ok(out)
    }

    /// A combine queued behind others, of a dispatch whose handle resolves only now.
    pub fn combine_queued(
        &mut self,
        args: &CombineArgs<'_>,
        handle: &PendingHandle,
        out: CombineOut<'_>,
    ) -> Result<()> {
        self.usable()?;
        match handle.resolve() {
            Ok(h) => self.combine(args, h, out),
            Err(e) => self.finish(OpKind::Combine, Err(e)),
        }
    }

    /// Combines into `out` (`[num_tokens, hidden]` rows and `[num_tokens, num_topk]` weights).
    pub fn combine(
        &mut self,
        args: &CombineArgs<'_>,
        handle: &DispatchHandle,
        out: CombineOut<'_>,
    ) -> Result<()> {
        self.usable()?;
        let id = self.id;
        let (session, payload, scratch) = self.parts();
        let r = combine::run(session, id, payload, args, handle, scratch, out);
        self.finish(OpKind::Combine, r)
    }

    pub fn stats(&self) -> Stats {
        let wire = self.transport.wire_bytes();
        Stats {
            nvl_payload_bytes: self.payload.get(Tier::Nvl),
            rdma_payload_bytes: self.payload.get(Tier::Rdma),
            nvl_wire_bytes: wire[0],
            rdma_wire_bytes: wire[1],
            operations: self.seq,
            rejected_connections: self.transport.rejected_connections(),
            nvl_connections: self.transport.connections()[0],
            rdma_connections: self.transport.connections()[1],
        }
    }

    /// Turns on shrink mode with `mask` (shared with this rank's other channels): peers that
    /// do not start an operation in time, or leave before they do, are masked and the
    /// operation goes on without them. Needs a world where every rank is linked to every
    /// other (one rank per node).
    pub fn enable_shrink(&mut self, mask: Arc<RankMask>) -> Result<()> {
        self.usable()?;
        if self.topo.ranks_per_node() != 1 {
            return Err(Error::invalid(
                "enable_shrink",
                "a world of one rank per node (a low-latency buffer's), where no rank forwards for another",
                format!(
                    "{} nodes x {} ranks",
                    self.topo.num_nodes(),
                    self.topo.ranks_per_node()
                ),
            ));
        }
        if mask.world_size() != self.topo.world_size() {
            return Err(Error::invalid(
                "mask",
                format!("one flag per rank ({})", self.topo.world_size()),
                mask.world_size(),
            ));
        }
        self.mask = Some(mask);
        Ok(())
    }

    /// Per rank, the nanoseconds this rank's operations have spent waiting for it since the
    /// last call (from each operation's start until the rank's metadata came: until it
    /// started the operation too); resets them. DeepEP's `*_wait_recv_cost_stats`, in time
    /// rather than GPU cycles: a slow rank stands out.
    pub fn take_waits(&mut self) -> Vec<u64> {
        let w = self.topo.world_size();
        std::mem::replace(&mut self.waits, vec![0; w])
    }

    /// Shrink mode's flags (None without it).
    pub fn rank_mask(&self) -> Option<Arc<RankMask>> {
        self.mask.clone()
    }

    /// Where peers reach this rank (TCP: `host:port`).
    pub fn address(&self) -> Option<String> {
        self.transport.address()
    }

    /// The transport, for leaving the world from another thread (see `Engine::stop`).
    pub fn transport_handle(&self) -> Arc<dyn Transport> {
        Arc::clone(&self.transport)
    }

    /// The count of completed operations, shared with other threads.
    pub fn completed_ops_handle(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.completed)
    }

    /// After a failure that left the ranks out of step: refuses further work and leaves
    /// the world, so that peers still waiting on this rank fail now with a peer-loss error
    /// instead of at their deadline. (A peer that completed the operation owes nothing.)
    pub fn fail(&mut self, e: &Error) {
        if self.broken.is_none() {
            self.broken = Some(e.to_string());
            self.transport.shutdown(self.seq);
        }
    }

    pub fn is_destroyed(&self) -> bool {
        self.destroyed
    }

    /// Leaves the world; peers waiting on this rank fail with `PeerLost`.
    pub fn destroy(&mut self) {
        self.transport.shutdown(self.seq);
        self.destroyed = true;
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.transport.shutdown(self.seq);
    }
}
