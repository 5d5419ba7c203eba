//! `dualcomm._native`: takes NumPy views of tensors, runs every operation on the buffer's
//! progress engine with the GIL released, and turns core errors into Python exceptions. No
//! protocol logic lives here; the Python package validates tensors and shapes the results.

mod errors;
mod jobs;
mod pool;
mod verbs;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dualcomm_core::routing::{SendPlan, dispatch_layout};
use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::transport::tcp::{SECRET_BYTES, TcpBinding};
use dualcomm_core::transport::{RegionId, Tier, Transport};
use dualcomm_core::{
    ChannelHandle, Channels, CombineArgs, CombineOut, Config, DispatchArgs, Dtype, ElemType,
    Endpoint as CoreEndpoint, Engine, Error, LowLatencyCombineArgs, OpKind, PendingHandle,
    QueuedChannelRoute, QueuedRoute, RankMask, RecvMemory, ShapeWait, Ticket, TopkArgs, Topology,
    recv_handoff,
};
use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use errors::to_py;
use jobs::{Raw, input, now, output, padded_output};
use verbs::{VerbsSetup, join_verbs, open_verbs};

fn config(num_nvl_bytes: usize, num_rdma_bytes: usize, timeout_s: f64) -> PyResult<Config> {
    if !(timeout_s.is_finite() && timeout_s > 0.0) {
        return Err(to_py(Error::invalid(
            "timeout",
            "a positive number of seconds",
            timeout_s,
        )));
    }
    Ok(Config {
        num_nvl_bytes,
        num_rdma_bytes,
        timeout: Duration::from_secs_f64(timeout_s),
    })
}

fn secret_bytes(secret: &[u8]) -> PyResult<[u8; SECRET_BYTES]> {
    secret.try_into().map_err(|_| {
        to_py(Error::invalid(
            "secret",
            format!("{SECRET_BYTES} bytes"),
            format!("{} bytes", secret.len()),
        ))
    })
}

/// The layout and configuration every endpoint constructor starts from.
fn world_of(
    num_nodes: usize,
    ranks_per_node: usize,
    num_nvl_bytes: usize,
    num_rdma_bytes: usize,
    timeout_s: f64,
) -> PyResult<(Topology, Config)> {
    let config = config(num_nvl_bytes, num_rdma_bytes, timeout_s)?;
    let topo = Topology::new(num_nodes, ranks_per_node).map_err(to_py)?;
    Ok((topo, config))
}

/// Hands over a resource an endpoint consumes (a bound listener, a created segment) once.
fn take_once<T>(cell: &Mutex<Option<T>>, name: &str) -> PyResult<T> {
    cell.lock().unwrap().take().ok_or_else(|| {
        to_py(Error::invalid(
            name,
            format!("a {name} not used by another endpoint"),
            "one already used",
        ))
    })
}

fn rows_of<T: numpy::Element>(arr: &PyReadonlyArray2<'_, T>) -> (usize, usize) {
    let s = arr.shape();
    (s[0], s[1])
}

/// The shared memory of a loopback world: ranks are threads of this process.
#[pyclass(module = "dualcomm._native", frozen)]
struct LoopbackWorld {
    fabric: Arc<LoopbackFabric>,
}

#[pymethods]
impl LoopbackWorld {
    #[new]
    fn new(world_size: usize) -> PyResult<Self> {
        if world_size == 0 {
            return Err(to_py(Error::invalid("world_size", "at least 1", 0)));
        }
        Ok(Self {
            fabric: LoopbackFabric::new(world_size),
        })
    }

    #[getter]
    fn world_size(&self) -> usize {
        self.fabric.world_size()
    }
}

/// A bound listening socket for the TCP transport; its address is published through the
/// bootstrap before `Endpoint.tcp` connects everybody.
#[pyclass(module = "dualcomm._native", frozen)]
struct TcpListener {
    inner: Mutex<Option<TcpBinding>>,
    address: String,
}

#[pymethods]
impl TcpListener {
    #[new]
    fn new(host: &str) -> PyResult<Self> {
        let b = TcpBinding::bind(host).map_err(to_py)?;
        Ok(Self {
            address: b.local_addr().to_string(),
            inner: Mutex::new(Some(b)),
        })
    }

    /// `host:port` this listener accepts connections on.
    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }
}

/// This rank's verbs resources (device, regions, one RC queue pair per linked peer), opened
/// before the bootstrap all-gathers every rank's `card` and `Endpoint.verbs` or
/// `Endpoint.shm_verbs` connects them.
#[pyclass(module = "dualcomm._native", frozen)]
struct VerbsPort {
    inner: Mutex<Option<VerbsSetup>>,
    card: Vec<u8>,
    device: String,
    topo: Topology,
    config: Config,
    rdma_only: bool,
}

#[pymethods]
impl VerbsPort {
    /// `rdma_only`: verbs carries only the rdma tier (shared memory the nvl tier). The device
    /// comes from `DUALCOMM_IB_DEVICE` (NCCL_IB_HCA's syntax), the RoCE GID index from
    /// `DUALCOMM_IB_GID_INDEX`.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (rank, num_nodes, ranks_per_node, num_nvl_bytes, num_rdma_bytes, timeout_s, rdma_only=false))]
    fn new(
        py: Python<'_>,
        rank: usize,
        num_nodes: usize,
        ranks_per_node: usize,
        num_nvl_bytes: usize,
        num_rdma_bytes: usize,
        timeout_s: f64,
        rdma_only: bool,
    ) -> PyResult<Self> {
        let (topo, config) = world_of(
            num_nodes,
            ranks_per_node,
            num_nvl_bytes,
            num_rdma_bytes,
            timeout_s,
        )?;
        if rank >= topo.world_size() {
            return Err(to_py(Error::invalid(
                "rank",
                format!("below the world size {}", topo.world_size()),
                rank,
            )));
        }
        let setup = py
            .detach(|| open_verbs(&topo, rank, &config, rdma_only))
            .map_err(to_py)?;
        Ok(Self {
            card: setup.card(),
            device: setup.device(),
            inner: Mutex::new(Some(setup)),
            topo,
            config,
            rdma_only,
        })
    }

    /// What this rank publishes through the bootstrap.
    #[getter]
    fn card<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.card)
    }

    /// The device and port in use, in words.
    #[getter]
    fn device(&self) -> String {
        self.device.clone()
    }
}

/// This rank's shared-memory segment, created before any rank maps the others'.
#[pyclass(module = "dualcomm._native", frozen)]
struct ShmSegment {
    inner: Mutex<Option<dualcomm_core::transport::shm::ShmSegment>>,
}

#[pymethods]
impl ShmSegment {
    /// `nvl_only`: the segment of a world where shared memory carries the nvl tier and TCP
    /// the rdma tier (`Endpoint.shm_tcp`).
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (job, rank, num_nodes, ranks_per_node, num_nvl_bytes, num_rdma_bytes, nvl_only=false))]
    fn new(
        job: &str,
        rank: usize,
        num_nodes: usize,
        ranks_per_node: usize,
        num_nvl_bytes: usize,
        num_rdma_bytes: usize,
        nvl_only: bool,
    ) -> PyResult<Self> {
        let topo = Topology::new(num_nodes, ranks_per_node).map_err(to_py)?;
        let config = config(num_nvl_bytes, num_rdma_bytes, 1.0)?;
        let lens = if nvl_only {
            CoreEndpoint::tier_region_lens(&topo, &config, Tier::Nvl)
        } else {
            CoreEndpoint::region_lens(&topo, &config)
        };
        let seg =
            dualcomm_core::transport::shm::ShmSegment::create(job, rank, topo.world_size(), lens)
                .map_err(to_py)?;
        Ok(Self {
            inner: Mutex::new(Some(seg)),
        })
    }
}

/// Removes the name of `rank`'s segment of `job` from /dev/shm (mappings stay valid).
type Tables<'py> = (
    Bound<'py, PyArray1<i32>>,
    Bound<'py, PyArray1<i32>>,
    Bound<'py, PyArray1<i32>>,
    Bound<'py, PyArray1<bool>>,
);

/// The routing tables of `topk_idx` in `topo` (GIL released while they are built).
fn tables<'py>(
    py: Python<'py>,
    topo: &Topology,
    topk_idx: &PyReadonlyArray2<'py, i64>,
    num_experts: usize,
) -> PyResult<Tables<'py>> {
    let (t, k) = rows_of(topk_idx);
    let idx = topk_idx.as_slice().map_err(|_| {
        to_py(Error::invalid(
            "topk_idx",
            "a C-contiguous array",
            "a strided view",
        ))
    })?;
    let l = py
        .detach(|| dispatch_layout(topo, idx, t, k, num_experts))
        .map_err(to_py)?;
    Ok((
        PyArray1::from_vec(py, l.num_tokens_per_rank),
        PyArray1::from_vec(py, l.num_tokens_per_node),
        PyArray1::from_vec(py, l.num_tokens_per_expert),
        PyArray1::from_vec(py, l.is_token_in_rank),
    ))
}

/// `get_dispatch_layout`'s tables for a world of `num_nodes x ranks_per_node` ranks that need
/// not exist (the cost model plans clusters this machine cannot hold).
#[pyfunction]
fn routing_tables<'py>(
    py: Python<'py>,
    topk_idx: PyReadonlyArray2<'py, i64>,
    num_experts: usize,
    num_nodes: usize,
    ranks_per_node: usize,
) -> PyResult<Tables<'py>> {
    let topo = Topology::new(num_nodes, ranks_per_node).map_err(to_py)?;
    tables(py, &topo, &topk_idx, num_experts)
}

/// The RDMA device and port this rank would use (`spec`: `DUALCOMM_IB_DEVICE`'s syntax), in
/// words; `TransportUnavailableError` says what is missing (libibverbs, a device, an active
/// port).
#[pyfunction]
#[pyo3(signature = (spec=None))]
fn find_verbs_device(py: Python<'_>, spec: Option<String>) -> PyResult<String> {
    py.detach(|| verbs::find_device(spec.as_deref()))
        .map_err(to_py)
}

#[pyfunction]
fn unlink_segment(job: &str, rank: usize) {
    dualcomm_core::transport::shm::unlink(&dualcomm_core::transport::shm::segment_name(job, rank));
}

/// The layout of one dispatch, passed back to combine and cached dispatch. It is complete
/// once its dispatch has finished; operations queued behind that dispatch can use it at once.
#[pyclass(module = "dualcomm._native", frozen)]
struct Handle {
    cell: HandleCell,
    num_recv: usize,
    num_tokens: usize,
    buffer_id: u64,
    /// Known when the dispatch returned: tokens from each source rank, and what each rank of
    /// this node sends straight to each other one (row-major, row = sender).
    recv_per_src: Vec<i64>,
    node_matrix: Vec<i64>,
}

/// Where a dispatch leaves its handle for the operations queued behind it: one channel's,
/// or the merged handle of a dispatch over several.
#[derive(Clone)]
enum HandleCell {
    One(PendingHandle),
    Many(PendingHandle<ChannelHandle>),
}

impl HandleCell {
    fn is_set(&self) -> bool {
        match self {
            HandleCell::One(c) => c.get().is_some(),
            HandleCell::Many(c) => c.get().is_some(),
        }
    }

    /// One channel's cell: what the single-channel operations take.
    fn one(&self) -> Result<&PendingHandle, Error> {
        match self {
            HandleCell::One(c) => Ok(c),
            HandleCell::Many(_) => Err(Error::invalid(
                "handle",
                "the handle of a dispatch over one channel",
                "one over several",
            )),
        }
    }
}

impl Handle {
    /// Per received row, its source rank and its index there.
    fn sources(&self) -> PyResult<(&[u32], &[u32])> {
        let unfinished = || {
            to_py(Error::invalid(
                "handle",
                "the handle of a finished dispatch (wait for its event first)",
                "one whose dispatch is still running or failed",
            ))
        };
        match &self.cell {
            HandleCell::One(c) => {
                let h = c.get().ok_or_else(unfinished)?;
                Ok((&h.recv_src_rank, &h.recv_src_idx))
            }
            HandleCell::Many(c) => {
                let h = c.get().ok_or_else(unfinished)?;
                Ok((&h.recv_src_rank, &h.recv_src_idx))
            }
        }
    }
}

#[pymethods]
impl Handle {
    #[getter]
    fn num_recv_tokens(&self) -> usize {
        self.num_recv
    }

    #[getter]
    fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    #[getter]
    fn buffer_id(&self) -> u64 {
        self.buffer_id
    }

    /// Tokens received from each source rank (receive order is by source rank).
    fn recv_per_src<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, &self.recv_per_src)
    }

    /// `[ranks_per_node * ranks_per_node]`: tokens each rank of this node sends straight to
    /// each other one (row = sender).
    fn node_matrix<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, &self.node_matrix)
    }

    /// Source rank of every received row, in receive order.
    fn recv_src_rank<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u32>>> {
        Ok(PyArray1::from_slice(py, self.sources()?.0))
    }

    /// Index in its source rank's `x` of every received row.
    fn recv_src_idx<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u32>>> {
        Ok(PyArray1::from_slice(py, self.sources()?.1))
    }

    fn __repr__(&self) -> String {
        format!(
            "Handle(num_tokens={}, num_recv_tokens={}, complete={})",
            self.num_tokens,
            self.num_recv,
            self.cell.is_set()
        )
    }
}

/// Waits for `step` (each call waits at most the slice it is given, GIL released) to give
/// a value, looking for signals in between: a blocked collective must not keep Ctrl-C from
/// a user until its deadline.
fn interruptibly<T: Send>(
    py: Python<'_>,
    mut step: impl FnMut(Duration) -> Option<T> + Send,
) -> PyResult<T> {
    const SLICE: Duration = Duration::from_millis(100);
    loop {
        if let Some(v) = py.detach(|| step(SLICE)) {
            return Ok(v);
        }
        py.check_signals()?;
    }
}

/// What a finished job reports: per-expert counts (dispatch with top-k), and when it ran.
struct Finished {
    result: Result<Option<Vec<i64>>, Error>,
    started: f64,
    ended: f64,
    /// Per rank, nanoseconds the job waited to receive from it.
    waits: Vec<u64>,
}

/// An operation running on the progress engine.
#[pyclass(module = "dualcomm._native", frozen)]
struct Event {
    ticket: Mutex<Option<Ticket<Finished>>>,
    outcome: Mutex<Option<Finished>>,
}

impl Event {
    fn new(ticket: Ticket<Finished>) -> Self {
        Self {
            ticket: Mutex::new(Some(ticket)),
            outcome: Mutex::new(None),
        }
    }

    /// Waits for the operation (GIL released); a signal meanwhile (Ctrl-C) raises its
    /// exception here, and the event can be waited on again.
    fn settle(&self, py: Python<'_>) -> PyResult<()> {
        let ticket = self.ticket.lock().unwrap().take();
        if let Some(t) = ticket {
            let got = interruptibly(py, |slice| t.wait_for(slice));
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    *self.ticket.lock().unwrap() = Some(t);
                    return Err(e);
                }
            };
            let f = got.unwrap_or_else(|e| Finished {
                result: Err(e),
                started: 0.0,
                ended: 0.0,
                waits: Vec::new(),
            });
            *self.outcome.lock().unwrap() = Some(f);
        }
        Ok(())
    }
}

#[pymethods]
impl Event {
    /// Blocks (GIL released) until the operation is done; raises its error if it failed.
    /// Returns the per-expert receive counts of a dispatch with top-k, else None.
    fn wait(&self, py: Python<'_>) -> PyResult<Option<Vec<i64>>> {
        self.settle(py)?;
        let o = self.outcome.lock().unwrap();
        match &o.as_ref().expect("settled").result {
            Ok(v) => Ok(v.clone()),
            Err(e) => Err(to_py(e.clone())),
        }
    }

    /// Whether the operation has finished (successfully or not).
    #[getter]
    fn done(&self) -> bool {
        self.outcome.lock().unwrap().is_some()
            || self
                .ticket
                .lock()
                .unwrap()
                .as_ref()
                .is_none_or(Ticket::is_done)
    }

    /// Per rank, the nanoseconds the operation waited for it to start (until its metadata
    /// came); waits for the operation.
    fn wait_ns(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        self.settle(py)?;
        let o = self.outcome.lock().unwrap();
        Ok(o.as_ref().expect("settled").waits.clone())
    }

    /// (start, end) of the operation on the engine, in seconds since the Unix epoch
    /// (comparable with `time.time()`); waits for it.
    fn timestamps(&self, py: Python<'_>) -> PyResult<(f64, f64)> {
        self.settle(py)?;
        let o = self.outcome.lock().unwrap();
        let f = o.as_ref().expect("settled");
        Ok((f.started, f.ended))
    }
}

/// Keeps a rank's transport, and so its registered regions, alive while NumPy views of them exist.
#[pyclass(module = "dualcomm._native", frozen)]
struct RegionOwner {
    _transport: Arc<dyn Transport>,
}

/// One rank of a world; its operations run on a progress thread of their own, over one
/// channel or several (`Endpoint.channels`).
#[pyclass(module = "dualcomm._native", frozen)]
struct Endpoint {
    engine: Engine<Channels>,
    num_channels: usize,
    transport: Arc<dyn Transport>,
    topo: Topology,
    rank: usize,
    id: u64,
    address: Option<String>,
    timeout: Duration,
    destroyed: AtomicBool,
    /// Shrink mode's flags, once `enable_shrink` has run (shared with every channel).
    mask: OnceLock<Arc<RankMask>>,
    /// This rank's share of the receive pool's default bound.
    _pool_share: pool::RankShare,
}

impl Endpoint {
    fn start(ep: CoreEndpoint) -> PyResult<Self> {
        Self::start_channels(vec![ep])
    }

    fn start_channels(eps: Vec<CoreEndpoint>) -> PyResult<Self> {
        let ch = Channels::new(eps).map_err(to_py)?;
        let ep = &ch.endpoints()[0];
        Ok(Self {
            _pool_share: pool::RankShare::new(),
            num_channels: ch.len(),
            topo: *ep.topology(),
            rank: ep.rank(),
            id: ep.id(),
            address: ep.address(),
            timeout: ep.config().timeout,
            destroyed: AtomicBool::new(false),
            mask: OnceLock::new(),
            transport: ep.transport_handle(),
            engine: Engine::start(ch).map_err(to_py)?,
        })
    }

    fn usable(&self) -> PyResult<()> {
        if self.destroyed.load(Ordering::Relaxed) {
            return Err(to_py(Error::Destroyed));
        }
        Ok(())
    }

    fn shrink_mask(&self) -> PyResult<&Arc<RankMask>> {
        self.mask.get().ok_or_else(|| {
            to_py(Error::invalid(
                "enable_shrink",
                "True at construction to mask ranks",
                false,
            ))
        })
    }

    /// The dtypes and hidden size of rows a combine sends back, checked against its handle.
    fn combine_rows(
        &self,
        x: &PyReadonlyArray2<'_, u8>,
        dtype: &str,
        out_dtype: &str,
        handle: &Handle,
    ) -> PyResult<(Dtype, Dtype, usize)> {
        let dtype = Dtype::parse(dtype).map_err(to_py)?;
        let out_dtype = Dtype::parse(out_dtype).map_err(to_py)?;
        let (_, xb) = rows_of(x);
        if xb % dtype.size() != 0 {
            return Err(to_py(Error::invalid(
                "x",
                format!("rows of whole {}-byte elements", dtype.size()),
                format!("{xb}-byte rows"),
            )));
        }
        if handle.buffer_id != self.id {
            return Err(to_py(Error::invalid(
                "handle",
                "a handle made by this buffer",
                "a handle from another buffer",
            )));
        }
        Ok((dtype, out_dtype, xb / dtype.size()))
    }

    /// This rank will not run the next operation (of `kind`) it was asked for: `why` goes to
    /// every peer in its place (queued behind the operations in flight), so that their
    /// calls fail at once, naming this rank, instead of waiting for the timeout.
    fn reject_next(&self, kind: OpKind, why: String) {
        if !self.destroyed.load(Ordering::Relaxed) {
            let _ = self.engine.submit(move |ch: &mut Channels| {
                for ep in ch.endpoints_mut() {
                    let _ = ep.abort(kind, &why);
                }
            });
        }
    }
}

enum JobRoute {
    One(QueuedRoute),
    Many(QueuedChannelRoute),
}

type DispatchResult<'py> = (
    Bound<'py, PyArray1<u8>>,
    Option<Bound<'py, PyArray1<u8>>>,
    Option<Bound<'py, PyArray1<i64>>>,
    Option<Bound<'py, PyArray1<f32>>>,
    Option<Vec<i64>>,
    Handle,
    Event,
);

type CombineResult<'py> = (
    Bound<'py, PyArray1<u8>>,
    Option<Bound<'py, PyArray1<f32>>>,
    Event,
);

#[pymethods]
impl Endpoint {
    /// Joins `world` as `rank`; blocks (GIL released) until every rank has joined.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (world, num_nodes, ranks_per_node, rank, num_nvl_bytes, num_rdma_bytes, timeout_s))]
    fn loopback(
        py: Python<'_>,
        world: &LoopbackWorld,
        num_nodes: usize,
        ranks_per_node: usize,
        rank: usize,
        num_nvl_bytes: usize,
        num_rdma_bytes: usize,
        timeout_s: f64,
    ) -> PyResult<Self> {
        let (topo, config) = world_of(
            num_nodes,
            ranks_per_node,
            num_nvl_bytes,
            num_rdma_bytes,
            timeout_s,
        )?;
        let fabric = Arc::clone(&world.fabric);
        let ep = py
            .detach(move || CoreEndpoint::loopback(&fabric, topo, rank, config))
            .map_err(to_py)?;
        Self::start(ep)
    }

    /// Joins a world over TCP; blocks (GIL released) until every rank is connected.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (listener, num_nodes, ranks_per_node, rank, peers, secret, num_nvl_bytes, num_rdma_bytes, timeout_s))]
    fn tcp(
        py: Python<'_>,
        listener: &TcpListener,
        num_nodes: usize,
        ranks_per_node: usize,
        rank: usize,
        peers: Vec<String>,
        secret: Vec<u8>,
        num_nvl_bytes: usize,
        num_rdma_bytes: usize,
        timeout_s: f64,
    ) -> PyResult<Self> {
        let (topo, config) = world_of(
            num_nodes,
            ranks_per_node,
            num_nvl_bytes,
            num_rdma_bytes,
            timeout_s,
        )?;
        let secret = secret_bytes(&secret)?;
        let binding = take_once(&listener.inner, "listener")?;
        let ep = py
            .detach(move || CoreEndpoint::tcp(binding, topo, rank, &peers, secret, config))
            .map_err(to_py)?;
        Self::start(ep)
    }

    /// Joins a world of one host over shared memory; every rank created its segment first.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (segment, job, num_nodes, ranks_per_node, num_nvl_bytes, num_rdma_bytes, timeout_s))]
    fn shm(
        py: Python<'_>,
        segment: &ShmSegment,
        job: String,
        num_nodes: usize,
        ranks_per_node: usize,
        num_nvl_bytes: usize,
        num_rdma_bytes: usize,
        timeout_s: f64,
    ) -> PyResult<Self> {
        let (topo, config) = world_of(
            num_nodes,
            ranks_per_node,
            num_nvl_bytes,
            num_rdma_bytes,
            timeout_s,
        )?;
        let seg = take_once(&segment.inner, "segment")?;
        let ep = py
            .detach(move || CoreEndpoint::shm(seg, &job, topo, config))
            .map_err(to_py)?;
        Self::start(ep)
    }

    /// Joins a world with shared memory inside each node and TCP between nodes; every rank
    /// created its segment (`nvl_only=True`) and bound its listener first.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (segment, job, listener, num_nodes, ranks_per_node, rank, peers, secret, num_nvl_bytes, num_rdma_bytes, timeout_s))]
    fn shm_tcp(
        py: Python<'_>,
        segment: &ShmSegment,
        job: String,
        listener: &TcpListener,
        num_nodes: usize,
        ranks_per_node: usize,
        rank: usize,
        peers: Vec<String>,
        secret: Vec<u8>,
        num_nvl_bytes: usize,
        num_rdma_bytes: usize,
        timeout_s: f64,
    ) -> PyResult<Self> {
        let (topo, config) = world_of(
            num_nodes,
            ranks_per_node,
            num_nvl_bytes,
            num_rdma_bytes,
            timeout_s,
        )?;
        let secret = secret_bytes(&secret)?;
        let seg = take_once(&segment.inner, "segment")?;
        let binding = take_once(&listener.inner, "listener")?;
        let ep = py
            .detach(move || {
                CoreEndpoint::shm_tcp(seg, &job, binding, topo, rank, &peers, secret, config)
            })
            .map_err(to_py)?;
        Self::start(ep)
    }

    /// Joins a world whose links all run over verbs; `cards[r]` is rank r's `VerbsPort.card`.
    #[staticmethod]
    fn verbs(py: Python<'_>, port: &VerbsPort, cards: Vec<Vec<u8>>) -> PyResult<Self> {
        if port.rdma_only {
            return Err(to_py(Error::invalid(
                "port",
                "a VerbsPort for every link (rdma_only=False)",
                "one for the rdma tier only",
            )));
        }
        let (topo, config) = (port.topo, port.config.clone());
        let setup = take_once(&port.inner, "port")?;
        let ep = py
            .detach(move || join_verbs(None, setup, &cards, topo, config))
            .map_err(to_py)?;
        Self::start(ep)
    }

    /// Joins a world with shared memory inside each node and verbs between nodes: `segment`
    /// made with `nvl_only=True`, `port` with `rdma_only=True`.
    #[staticmethod]
    fn shm_verbs(
        py: Python<'_>,
        segment: &ShmSegment,
        job: String,
        port: &VerbsPort,
        cards: Vec<Vec<u8>>,
    ) -> PyResult<Self> {
        if !port.rdma_only {
            return Err(to_py(Error::invalid(
                "port",
                "a VerbsPort for the rdma tier (rdma_only=True)",
                "one for every link",
            )));
        }
        let (topo, config) = (port.topo, port.config.clone());
        let seg = take_once(&segment.inner, "segment")?;
        let setup = take_once(&port.inner, "port")?;
        let ep = py
            .detach(move || join_verbs(Some((seg, job)), setup, &cards, topo, config))
            .map_err(to_py)?;
        Self::start(ep)
    }

    /// One rank's channels (DeepEP's): `endpoints[c]` is this rank in the world of channel
    /// c, every rank joining the same number in the same order. The endpoints are used up
    /// (later calls on them raise); the result runs each dispatch and combine over all of
    /// them, each on its own thread with a contiguous range of every rank's tokens, with
    /// results bitwise those of one channel.
    #[staticmethod]
    fn join_channels(py: Python<'_>, endpoints: Vec<PyRef<'_, Endpoint>>) -> PyResult<Self> {
        if let Some(ep) = endpoints.iter().find(|ep| ep.num_channels != 1) {
            return Err(to_py(Error::invalid(
                "endpoints",
                "endpoints of one channel each",
                format!("one of {} channels", ep.num_channels),
            )));
        }
        let mut eps = Vec::with_capacity(endpoints.len());
        for ep in &endpoints {
            ep.usable()?;
            ep.destroyed.store(true, Ordering::Relaxed);
            let engine: &Engine<Channels> = &ep.engine;
            let ch = py.detach(|| engine.detach()).map_err(to_py)?;
            eps.extend(ch.into_endpoints());
        }
        Self::start_channels(eps)
    }

    /// How many channels this endpoint runs its operations over.
    #[getter]
    fn channels(&self) -> usize {
        self.num_channels
    }

    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }

    #[getter]
    fn num_nodes(&self) -> usize {
        self.topo.num_nodes()
    }

    #[getter]
    fn ranks_per_node(&self) -> usize {
        self.topo.ranks_per_node()
    }

    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// Where peers reach this rank (`host:port` over TCP; None in a loopback world).
    #[getter]
    fn address(&self) -> Option<String> {
        self.address.clone()
    }

    #[getter]
    fn destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Relaxed)
    }

    /// Routing tables: (per rank, per node, per expert, is_token_in_rank flattened). Computed
    /// here, at once: it needs no communication.
    #[allow(clippy::type_complexity)]
    fn layout<'py>(
        &self,
        py: Python<'py>,
        topk_idx: PyReadonlyArray2<'py, i64>,
        num_experts: usize,
    ) -> PyResult<(
        Bound<'py, PyArray1<i32>>,
        Bound<'py, PyArray1<i32>>,
        Bound<'py, PyArray1<i32>>,
        Bound<'py, PyArray1<bool>>,
    )> {
        self.usable()?;
        tables(py, &self.topo, &topk_idx, num_experts)
    }

    /// Starts a dispatch of `x` (rows of opaque bytes) on the engine and returns once the
    /// receive counts are known, with the receive arrays (filled when the event completes),
    /// the handle and the event. Exactly one of `is_token_in_rank` and `handle` is given.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (x, x_dtype, hidden, scales, is_token_in_rank, handle, topk_idx, topk_weights, num_experts, expert_alignment, num_tokens_per_expert=None, num_worst_tokens=0))]
    fn dispatch<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, u8>,
        x_dtype: &str,
        hidden: usize,
        scales: Option<PyReadonlyArray2<'py, u8>>,
        is_token_in_rank: Option<PyReadonlyArray2<'py, bool>>,
        handle: Option<PyRef<'py, Handle>>,
        topk_idx: Option<PyReadonlyArray2<'py, i64>>,
        topk_weights: Option<PyReadonlyArray2<'py, f32>>,
        num_experts: usize,
        expert_alignment: usize,
        num_tokens_per_expert: Option<PyReadonlyArray1<'py, i64>>,
        num_worst_tokens: usize,
    ) -> PyResult<DispatchResult<'py>> {
        self.usable()?;
        let kind = if handle.is_some() {
            OpKind::CachedDispatch
        } else {
            OpKind::Dispatch
        };
        let (t, xb) = rows_of(&x);
        // Everything up to the submission: a failure here is this rank's own, and its peers
        // hear of it (`reject_next`) instead of waiting for it.
        let staged = (|| -> PyResult<_> {
            let x_dtype = ElemType::parse("x dtype", x_dtype).map_err(to_py)?;
            let mut keep: Vec<Py<PyAny>> = Vec::new();
            let (x_raw, k0) = input(&x, "x")?;
            keep.push(k0);
            let (scales_raw, sb) = match &scales {
                Some(s) => {
                    let (r, k) = input(s, "x scales")?;
                    keep.push(k);
                    (r, rows_of(s).1)
                }
                None => (Raw::empty(), 0),
            };
            let topk = match (&topk_idx, &topk_weights) {
                (Some(i), Some(w)) => {
                    let (ir, ik) = input(i, "topk_idx")?;
                    let (wr, wk) = input(w, "topk_weights")?;
                    keep.extend([ik, wk]);
                    Some((ir, wr, rows_of(i).1))
                }
                _ => None,
            };
            // The route: a new plan (computed here, so bad input fails in the caller), or the
            // handle of an earlier dispatch (resolved when the job runs, after that dispatch).
            let route = match (&handle, &is_token_in_rank) {
                (Some(h), _) => {
                    if h.buffer_id != self.id {
                        return Err(to_py(Error::invalid(
                            "handle",
                            "a handle made by this buffer",
                            "a handle from another buffer",
                        )));
                    }
                    match &h.cell {
                        HandleCell::One(c) => JobRoute::One(QueuedRoute::Cached(c.clone())),
                        HandleCell::Many(c) => {
                            JobRoute::Many(QueuedChannelRoute::Cached(c.clone()))
                        }
                    }
                }
                (None, Some(itr)) => {
                    let itr = itr.as_slice().map_err(|_| {
                        to_py(Error::invalid(
                            "is_token_in_rank",
                            "a C-contiguous array",
                            "a strided view",
                        ))
                    })?;
                    if self.num_channels > 1 {
                        // Each channel plans its own token range when the job runs.
                        JobRoute::Many(QueuedChannelRoute::Fresh(itr.to_vec()))
                    } else {
                        JobRoute::One(QueuedRoute::Fresh(Arc::new(
                            SendPlan::from_is_token_in_rank(&self.topo, itr, t).map_err(to_py)?,
                        )))
                    }
                }
                (None, None) => {
                    return Err(to_py(Error::invalid(
                        "is_token_in_rank",
                        "a [num_tokens, world_size] bool tensor (or a handle)",
                        "None",
                    )));
                }
            };
            let per_expert: Vec<u64> = match &num_tokens_per_expert {
                Some(c) => c
                    .as_slice()
                    .map_err(|_| {
                        to_py(Error::invalid(
                            "num_tokens_per_expert",
                            "a contiguous array",
                            "a strided view",
                        ))
                    })?
                    .iter()
                    .map(|&c| {
                        u64::try_from(c).map_err(|_| {
                            to_py(Error::invalid(
                                "num_tokens_per_expert",
                                "non-negative counts",
                                c,
                            ))
                        })
                    })
                    .collect::<PyResult<_>>()?,
                None => Vec::new(),
            };
            Ok((
                x_dtype, keep, x_raw, scales_raw, sb, topk, route, per_expert,
            ))
        })();
        let (x_dtype, keep, x_raw, scales_raw, sb, topk, route, per_expert) =
            staged.inspect_err(|e| self.reject_next(kind, e.to_string()))?;
        let has_topk = topk.is_some();
        let cell = match &route {
            JobRoute::One(QueuedRoute::Cached(c)) => HandleCell::One(c.clone()),
            JobRoute::One(QueuedRoute::Fresh(_)) => HandleCell::One(PendingHandle::new()),
            JobRoute::Many(QueuedChannelRoute::Cached(c)) => HandleCell::Many(c.clone()),
            JobRoute::Many(QueuedChannelRoute::Fresh(_)) => HandleCell::Many(PendingHandle::new()),
        };
        let job_cell = cell.clone();
        let (mut sink, request) = recv_handoff::<Vec<Py<PyAny>>>(self.rank, self.timeout);
        sink.hold(keep);
        let ticket = self
            .engine
            .submit(move |ch: &mut Channels| {
                let started = now();
                // SAFETY: `sink` holds the input arrays until this job ends.
                let args = unsafe {
                    DispatchArgs {
                        num_tokens: t,
                        x: x_raw.slice(),
                        x_row_bytes: xb,
                        x_dtype,
                        hidden,
                        scales: scales_raw.slice(),
                        scale_row_bytes: sb,
                        topk: topk.map(|(i, w, k)| TopkArgs {
                            idx: i.slice(),
                            weights: w.slice(),
                            num_topk: k,
                            num_experts,
                        }),
                        num_tokens_per_expert: &per_expert,
                        expert_alignment,
                    }
                };
                let result = match (&route, &job_cell) {
                    (JobRoute::One(r), HandleCell::One(c)) => ch
                        .endpoint(0)
                        .dispatch_queued(&args, r, &mut sink, c)
                        .map(|out| Some(out.num_recv_tokens_per_expert)),
                    (JobRoute::Many(r), HandleCell::Many(c)) => ch
                        .dispatch_queued(&args, r, &mut sink, c)
                        .map(|out| Some(out.num_recv_tokens_per_expert)),
                    _ => unreachable!("the cell is made from the route above"),
                };
                Finished {
                    result,
                    started,
                    ended: now(),
                    waits: ch.take_waits(),
                }
            })
            .map_err(to_py)?;
        // Wait (GIL released) for the receive counts, or for the job to end without them.
        // A signal meanwhile (Ctrl-C) raises here; the request goes, and the job with it.
        let mut waiting = Some(request);
        let shape = interruptibly(py, |slice| {
            // Borrowed mutably: the request may cross to the waiting thread, not be shared.
            let request = waiting.as_mut().expect("still waiting");
            match request.shape_for(slice) {
                ShapeWait::Known(s) => Some(Some(s)),
                ShapeWait::Failed => Some(None),
                ShapeWait::Pending => None,
            }
        })?;
        let request = waiting.expect("still waiting");
        let Some(shape) = shape else {
            let err = match py.detach(|| ticket.wait()) {
                Ok(Finished { result: Err(e), .. }) | Err(e) => e,
                Ok(_) => Error::Internal {
                    rank: self.rank,
                    detail: "dispatch ended without receive counts".into(),
                },
            };
            return Err(to_py(err));
        };
        let n = shape.num_recv;
        // DeepEP's `num_worst_tokens`: that many rows, the ones past what arrives padded.
        let rows = if num_worst_tokens > 0 {
            num_worst_tokens
        } else {
            n
        };
        let made = (|| -> PyResult<_> {
            if n > rows {
                return Err(to_py(Error::invalid(
                    "num_worst_tokens",
                    format!(
                        "at least the {n} tokens this rank receives (the dispatch was under \
                         way: this buffer has left its world, make a new one)"
                    ),
                    num_worst_tokens,
                )));
            }
            let (recv_x, x_out) = padded_output::<u8>(py, rows, n, shape.x_row_bytes, 0)?;
            let (recv_scales, s_out) = padded_output::<u8>(py, rows, n, shape.scale_row_bytes, 0)?;
            let (recv_idx, i_out) = padded_output::<i64>(py, rows, n, shape.num_topk, -1)?;
            let (recv_w, w_out) = padded_output::<f32>(py, rows, n, shape.num_topk, 0.0)?;
            let keep_out = vec![
                recv_x.as_any().clone().unbind(),
                recv_scales.as_any().clone().unbind(),
                recv_idx.as_any().clone().unbind(),
                recv_w.as_any().clone().unbind(),
            ];
            let raw = RecvMemory {
                x: x_out,
                scales: s_out,
                topk_idx: i_out,
                topk_weights: w_out,
                keep: keep_out,
            };
            Ok(((recv_x, recv_scales, recv_idx, recv_w), raw))
        })();
        let (arrays, reply, own_error) = match made {
            Ok((arrays, raw)) => (Some(arrays), Ok(raw), None),
            Err(e) => (None, Err(e.to_string()), Some(e)),
        };
        // If the job gave up waiting, its error arrives through the event.
        request.answer(reply);
        let Some((recv_x, recv_scales, recv_idx, recv_w)) = arrays else {
            // The job fails too (and leaves the world, so peers do not wait for it).
            let job_error = py.detach(|| ticket.wait());
            if let Some(e) = own_error
                && e.is_instance_of::<errors::InvalidArgumentError>(py)
            {
                return Err(e);
            }
            let err = match job_error {
                Ok(Finished { result: Err(e), .. }) | Err(e) => e,
                Ok(_) => Error::Internal {
                    rank: self.rank,
                    detail: "dispatch completed without receive buffers".into(),
                },
            };
            return Err(to_py(err));
        };
        Ok((
            recv_x,
            scales.is_some().then_some(recv_scales),
            has_topk.then_some(recv_idx),
            has_topk.then_some(recv_w),
            shape.num_recv_tokens_per_expert.clone(),
            Handle {
                cell,
                num_recv: n,
                num_tokens: t,
                buffer_id: self.id,
                recv_per_src: shape.recv_per_src.iter().map(|&c| c as i64).collect(),
                node_matrix: shape.node_matrix.iter().map(|&c| c as i64).collect(),
            },
            Event::new(ticket),
        ))
    }

    /// Starts DeepEP's low-latency combine on the engine: `x` holds the expert outputs in the
    /// per-expert layout (raw rows of `dtype`), `slots` maps each received token's choices to
    /// rows of `x` (-1: not this rank's), `topk_weights` are this rank's own tokens' weights.
    /// Returns the output array (`[num_tokens, hidden]` in `out_dtype`, filled when the event
    /// completes) and the event.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (x, dtype, handle, slots, topk_weights, out_dtype))]
    fn low_latency_combine<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, u8>,
        dtype: &str,
        handle: PyRef<'py, Handle>,
        slots: PyReadonlyArray2<'py, i64>,
        topk_weights: PyReadonlyArray2<'py, f32>,
        out_dtype: &str,
    ) -> PyResult<(Bound<'py, PyArray1<u8>>, Event)> {
        self.usable()?;
        let staged = (|| -> PyResult<_> {
            let (dtype, out_dtype, hidden) = self.combine_rows(&x, dtype, out_dtype, &handle)?;
            let (_, k) = rows_of(&topk_weights);
            let (x_raw, k0) = input(&x, "x")?;
            let (s_raw, k1) = input(&slots, "slots")?;
            let (w_raw, k2) = input(&topk_weights, "topk_weights")?;
            let (out_x, ox) = output::<u8>(py, handle.num_tokens * hidden * out_dtype.size())?;
            let keep = vec![k0, k1, k2, out_x.as_any().clone().unbind()];
            Ok((
                dtype, out_dtype, hidden, k, keep, x_raw, s_raw, w_raw, out_x, ox,
            ))
        })();
        let (dtype, out_dtype, hidden, k, keep, x_raw, s_raw, w_raw, out_x, ox) =
            staged.inspect_err(|e| self.reject_next(OpKind::CachedDispatch, e.to_string()))?;
        let cell = handle.cell.one().map_err(to_py)?.clone();
        let ticket = self
            .engine
            .submit(move |ch: &mut Channels| {
                let ep = ch.endpoint(0);
                let _held = keep;
                let started = now();
                // SAFETY: `_held` keeps every array alive until this job ends; the output was
                // made for this job alone.
                let result = unsafe {
                    ep.low_latency_combine_queued(
                        &LowLatencyCombineArgs {
                            x: x_raw.slice(),
                            dtype,
                            hidden,
                            slots: s_raw.slice(),
                            num_topk: k,
                            topk_weights: w_raw.slice(),
                            out_dtype,
                        },
                        &cell,
                        ox.slice_mut(),
                    )
                };
                Finished {
                    result: result.map(|()| None),
                    started,
                    ended: now(),
                    waits: ch.take_waits(),
                }
            })
            .map_err(to_py)?;
        Ok((out_x, Event::new(ticket)))
    }

    /// Starts a combine of rows (`dtype` "bfloat16" or "float32", as raw bytes) on the engine;
    /// returns the output arrays (filled when the event completes) and the event.
    #[pyo3(signature = (x, dtype, handle, topk_weights, out_dtype))]
    fn combine<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, u8>,
        dtype: &str,
        handle: PyRef<'py, Handle>,
        topk_weights: Option<PyReadonlyArray2<'py, f32>>,
        out_dtype: &str,
    ) -> PyResult<CombineResult<'py>> {
        self.usable()?;
        // Everything up to the submission fails on this rank alone: its peers hear of it.
        let staged = (|| -> PyResult<_> {
            let (dtype, out_dtype, hidden) = self.combine_rows(&x, dtype, out_dtype, &handle)?;
            let mut keep: Vec<Py<PyAny>> = Vec::new();
            let (x_raw, k0) = input(&x, "x")?;
            keep.push(k0);
            let weights = match &topk_weights {
                Some(w) => {
                    let (r, k) = input(w, "topk_weights")?;
                    keep.push(k);
                    Some((r, rows_of(w).1))
                }
                None => None,
            };
            let k = weights.map_or(0, |w| w.1);
            let t = handle.num_tokens;
            let out_bytes = t
                .checked_mul(hidden)
                .and_then(|n| n.checked_mul(out_dtype.size()))
                .ok_or_else(|| {
                    to_py(Error::invalid(
                        "x",
                        "a result size that fits in memory",
                        hidden,
                    ))
                })?;
            let (out_x, ox) = output::<u8>(py, out_bytes)?;
            let (out_w, ow) = output::<f32>(py, t * k)?;
            keep.push(out_x.as_any().clone().unbind());
            keep.push(out_w.as_any().clone().unbind());
            Ok((
                dtype, out_dtype, hidden, keep, x_raw, weights, k, out_x, ox, out_w, ow,
            ))
        })();
        let (dtype, out_dtype, hidden, keep, x_raw, weights, k, out_x, ox, out_w, ow) =
            staged.inspect_err(|e| self.reject_next(OpKind::Combine, e.to_string()))?;
        let cell = handle.cell.clone();
        let ticket = self
            .engine
            .submit(move |ch: &mut Channels| {
                let _held = keep;
                let started = now();
                // SAFETY: `_held` keeps every array alive until this job ends; the outputs
                // were made for this job alone.
                let (args, out) = unsafe {
                    (
                        CombineArgs {
                            rows_at: &[],
                            x: x_raw.slice(),
                            hidden,
                            dtype,
                            weights: weights.map(|w| w.0.slice()),
                            num_topk: k,
                            out_dtype,
                        },
                        CombineOut {
                            x: ox.slice_mut(),
                            weights: ow.slice_mut(),
                        },
                    )
                };
                let result = match &cell {
                    HandleCell::One(c) => ch.endpoint(0).combine_queued(&args, c, out),
                    HandleCell::Many(c) => ch.combine_queued(&args, c, out),
                };
                Finished {
                    result: result.map(|()| None),
                    started,
                    ended: now(),
                    waits: ch.take_waits(),
                }
            })
            .map_err(to_py)?;
        Ok((
            out_x,
            weights.is_some().then_some(out_w),
            Event::new(ticket),
        ))
    }

    /// Bytes sent per tier (payload and wire), operations completed, refused connections.
    /// Waits for the operations in flight.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = py
            .detach(|| self.engine.call(|ch: &mut Channels| ch.stats()))
            .map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("nvl_payload_bytes", s.nvl_payload_bytes)?;
        d.set_item("rdma_payload_bytes", s.rdma_payload_bytes)?;
        d.set_item("nvl_wire_bytes", s.nvl_wire_bytes)?;
        d.set_item("rdma_wire_bytes", s.rdma_wire_bytes)?;
        d.set_item("operations", s.operations)?;
        d.set_item("rejected_connections", s.rejected_connections)?;
        d.set_item("nvl_connections", s.nvl_connections)?;
        d.set_item("rdma_connections", s.rdma_connections)?;
        Ok(d)
    }

    /// Tells every peer that this rank will not run the next operation, `op` ("dispatch",
    /// "cached dispatch" or "combine"), because of `reason` (an argument the caller rejected):
    /// their calls raise `PeerAbortedError` naming this rank. Queued behind the operations
    /// in flight; does not wait.
    fn abort(&self, op: &str, reason: String) -> PyResult<()> {
        let kind = match op {
            "dispatch" => OpKind::Dispatch,
            "cached dispatch" => OpKind::CachedDispatch,
            "combine" => OpKind::Combine,
            other => {
                return Err(to_py(Error::invalid(
                    "op",
                    "'dispatch', 'cached dispatch' or 'combine'",
                    other,
                )));
            }
        };
        self.reject_next(kind, reason);
        Ok(())
    }

    /// This rank's receive rings of one tier (DeepEP's `get_local_buffer_tensor`): the raw
    /// registered bytes peers write into, as a NumPy view that keeps them alive.
    fn local_buffer<'py>(&self, py: Python<'py>, rdma: bool) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let region = if rdma {
            RegionId::RdmaRings
        } else {
            RegionId::NvlRings
        };
        let (ptr, len) = self.transport.region_memory(region);
        let owner = Bound::new(
            py,
            RegionOwner {
                _transport: Arc::clone(&self.transport),
            },
        )?;
        // SAFETY: `len` bytes at `ptr` belong to the transport, which `owner` (the array's
        // base object) keeps alive as long as the array; peers write there as DeepEP's do.
        unsafe {
            let view = numpy::ndarray::ArrayView1::from_shape_ptr(len, ptr);
            Ok(PyArray1::borrow_from_array(&view, owner.into_any()))
        }
    }

    /// Turns on shrink mode (DeepEP's `enable_shrink`; see `dualcomm_core::mask`): a peer
    /// that does not start an operation within the timeout, or leaves before it does, is
    /// masked and the operation goes on without it. Only for one rank per node.
    fn enable_shrink(&self, py: Python<'_>) -> PyResult<()> {
        self.usable()?;
        if self.mask.get().is_some() {
            return Ok(());
        }
        let mask = Arc::new(RankMask::new(self.topo.world_size()));
        let shared = Arc::clone(&mask);
        py.detach(|| {
            self.engine.call(move |ch: &mut Channels| {
                ch.endpoints_mut()
                    .iter_mut()
                    .try_for_each(|ep| ep.enable_shrink(Arc::clone(&shared)))
            })
        })
        .map_err(to_py)?
        .map_err(to_py)?;
        let _ = self.mask.set(mask);
        Ok(())
    }

    /// Whether shrink mode is on.
    #[getter]
    fn shrink(&self) -> bool {
        self.mask.get().is_some()
    }

    /// Masks (or unmasks) `rank` from the next operation on (shrink mode).
    fn set_masked(&self, rank: i64, masked: bool) -> PyResult<()> {
        let mask = self.shrink_mask()?;
        let w = self.topo.world_size();
        if rank < 0 || rank as usize >= w {
            return Err(to_py(Error::invalid(
                "rank_to_mask",
                format!("a rank in [0, {w})"),
                rank,
            )));
        }
        mask.set(rank as usize, masked);
        Ok(())
    }

    /// Per rank, whether it is masked (shrink mode).
    fn masked_ranks(&self) -> PyResult<Vec<bool>> {
        Ok(self.shrink_mask()?.snapshot())
    }

    /// Unmasks every rank (shrink mode).
    fn clear_mask(&self) -> PyResult<()> {
        self.shrink_mask()?.clear();
        Ok(())
    }

    /// Leaves the world at once (operations in flight fail); later calls raise.
    fn destroy(&self, py: Python<'_>) {
        self.destroyed.store(true, Ordering::Relaxed);
        py.detach(|| self.engine.stop());
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LoopbackWorld>()?;
    m.add_class::<Endpoint>()?;
    m.add_class::<Handle>()?;
    m.add_class::<Event>()?;
    m.add_class::<TcpListener>()?;
    m.add_class::<VerbsPort>()?;
    m.add_class::<ShmSegment>()?;
    m.add_function(wrap_pyfunction!(unlink_segment, m)?)?;
    m.add_function(wrap_pyfunction!(find_verbs_device, m)?)?;
    m.add_function(wrap_pyfunction!(routing_tables, m)?)?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
