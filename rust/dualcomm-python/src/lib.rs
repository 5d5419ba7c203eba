//! `dualcomm._native`: converts NumPy views of tensors into slices, releases the GIL around
//! every call into the core, and turns core errors into Python exceptions. No logic lives
//! here; the Python package validates tensors and shapes the results.

mod errors;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::transport::tcp::{SECRET_BYTES, TcpBinding};
use dualcomm_core::{
    CombineArgs, Config, DispatchArgs, DispatchHandle, Dtype, Endpoint as CoreEndpoint, Error,
    Route, TopkArgs, Topology,
};
use numpy::{PyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use errors::to_py;

fn slice<'a, T: numpy::Element>(arr: &'a PyReadonlyArray2<'_, T>, name: &str) -> PyResult<&'a [T]> {
    arr.as_slice().map_err(|_| {
        to_py(Error::invalid(
            name,
            "a C-contiguous array",
            "a strided view",
        ))
    })
}

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

/// The layout of one dispatch, passed back to combine and cached dispatch.
#[pyclass(module = "dualcomm._native", frozen)]
struct Handle {
    inner: Arc<DispatchHandle>,
}

#[pymethods]
impl Handle {
    #[getter]
    fn num_recv_tokens(&self) -> usize {
        self.inner.num_recv
    }

    #[getter]
    fn num_tokens(&self) -> usize {
        self.inner.plan.num_tokens()
    }

    #[getter]
    fn buffer_id(&self) -> u64 {
        self.inner.endpoint_id
    }

    /// Source rank of every received row, in receive order.
    fn recv_src_rank<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        PyArray1::from_slice(py, &self.inner.recv_src_rank)
    }

    /// Index in its source rank's `x` of every received row.
    fn recv_src_idx<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        PyArray1::from_slice(py, &self.inner.recv_src_idx)
    }

    fn __repr__(&self) -> String {
        format!(
            "Handle(num_tokens={}, num_recv_tokens={}, dispatch=#{})",
            self.inner.plan.num_tokens(),
            self.inner.num_recv,
            self.inner.tag
        )
    }
}

/// One rank of a world.
#[pyclass(module = "dualcomm._native", frozen)]
struct Endpoint {
    inner: Mutex<CoreEndpoint>,
    rank: usize,
    num_nodes: usize,
    ranks_per_node: usize,
    id: u64,
}

impl Endpoint {
    fn lock(&self) -> MutexGuard<'_, CoreEndpoint> {
        // A panic inside the core would poison this; the endpoint state is still coherent
        // enough to report errors, so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type DispatchResult<'py> = (
    Bound<'py, PyArray1<u8>>,
    Option<Bound<'py, PyArray1<u8>>>,
    Option<Bound<'py, PyArray1<i64>>>,
    Option<Bound<'py, PyArray1<f32>>>,
    Option<Vec<i64>>,
    Handle,
);

type CombineResult<'py> = (Bound<'py, PyArray1<u8>>, Option<Bound<'py, PyArray1<f32>>>);

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
        let config = config(num_nvl_bytes, num_rdma_bytes, timeout_s)?;
        let topo = Topology::new(num_nodes, ranks_per_node).map_err(to_py)?;
        let fabric = Arc::clone(&world.fabric);
        let ep = py
            .detach(move || CoreEndpoint::loopback(&fabric, topo, rank, config))
            .map_err(to_py)?;
        Ok(Self {
            rank,
            num_nodes,
            ranks_per_node,
            id: ep.id(),
            inner: Mutex::new(ep),
        })
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
        let config = config(num_nvl_bytes, num_rdma_bytes, timeout_s)?;
        let topo = Topology::new(num_nodes, ranks_per_node).map_err(to_py)?;
        let secret: [u8; SECRET_BYTES] = secret.as_slice().try_into().map_err(|_| {
            to_py(Error::invalid(
                "secret",
                format!("{SECRET_BYTES} bytes"),
                format!("{} bytes", secret.len()),
            ))
        })?;
        let binding = listener.inner.lock().unwrap().take().ok_or_else(|| {
            to_py(Error::invalid(
                "listener",
                "a listener not used by another endpoint",
                "one already used",
            ))
        })?;
        let ep = py
            .detach(move || CoreEndpoint::tcp(binding, topo, rank, &peers, secret, config))
            .map_err(to_py)?;
        Ok(Self {
            rank,
            num_nodes,
            ranks_per_node,
            id: ep.id(),
            inner: Mutex::new(ep),
        })
    }

    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }

    #[getter]
    fn num_nodes(&self) -> usize {
        self.num_nodes
    }

    #[getter]
    fn ranks_per_node(&self) -> usize {
        self.ranks_per_node
    }

    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// Routing tables: (per rank, per node, per expert, is_token_in_rank flattened).
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
        let (t, k) = rows_of(&topk_idx);
        let idx = slice(&topk_idx, "topk_idx")?;
        let l = py
            .detach(|| self.lock().layout(idx, t, k, num_experts))
            .map_err(to_py)?;
        Ok((
            PyArray1::from_vec(py, l.num_tokens_per_rank),
            PyArray1::from_vec(py, l.num_tokens_per_node),
            PyArray1::from_vec(py, l.num_tokens_per_expert),
            PyArray1::from_vec(py, l.is_token_in_rank),
        ))
    }

    /// Dispatches `x` (rows of opaque bytes). Exactly one of `is_token_in_rank` and
    /// `handle` is given.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (x, scales, is_token_in_rank, handle, topk_idx, topk_weights, num_experts, expert_alignment))]
    fn dispatch<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, u8>,
        scales: Option<PyReadonlyArray2<'py, u8>>,
        is_token_in_rank: Option<PyReadonlyArray2<'py, bool>>,
        handle: Option<PyRef<'py, Handle>>,
        topk_idx: Option<PyReadonlyArray2<'py, i64>>,
        topk_weights: Option<PyReadonlyArray2<'py, f32>>,
        num_experts: usize,
        expert_alignment: usize,
    ) -> PyResult<DispatchResult<'py>> {
        let (t, xb) = rows_of(&x);
        let x_s = slice(&x, "x")?;
        let (scales_s, sb) = match &scales {
            Some(s) => (slice(s, "x scales")?, rows_of(s).1),
            None => (&[][..], 0),
        };
        let topk = match (&topk_idx, &topk_weights) {
            (Some(i), Some(w)) => Some(TopkArgs {
                idx: slice(i, "topk_idx")?,
                weights: slice(w, "topk_weights")?,
                num_topk: rows_of(i).1,
                num_experts,
            }),
            _ => None,
        };
        let has_topk = topk.is_some();
        let args = DispatchArgs {
            num_tokens: t,
            x: x_s,
            x_row_bytes: xb,
            scales: scales_s,
            scale_row_bytes: sb,
            topk,
            expert_alignment,
        };
        let cached = handle.as_ref().map(|h| Arc::clone(&h.inner));
        let itr = match &is_token_in_rank {
            Some(a) => Some(slice(a, "is_token_in_rank")?),
            None => None,
        };
        let out = py
            .detach(|| {
                let mut ep = self.lock();
                match (&cached, itr) {
                    (Some(h), _) => ep.dispatch(&args, Route::Cached(h)),
                    (None, Some(itr)) => {
                        let plan = ep.plan(itr, t)?;
                        ep.dispatch(&args, Route::Fresh(plan))
                    }
                    (None, None) => Err(Error::invalid(
                        "is_token_in_rank",
                        "a [num_tokens, world_size] bool tensor (or a handle)",
                        "None",
                    )),
                }
            })
            .map_err(to_py)?;
        Ok((
            PyArray1::from_vec(py, out.recv_x),
            scales
                .is_some()
                .then(|| PyArray1::from_vec(py, out.recv_scales)),
            has_topk.then(|| PyArray1::from_vec(py, out.recv_topk_idx)),
            has_topk.then(|| PyArray1::from_vec(py, out.recv_topk_weights)),
            has_topk.then_some(out.num_recv_tokens_per_expert),
            Handle { inner: out.handle },
        ))
    }

    /// Combines rows (`dtype` "bfloat16" or "float32", as raw bytes) back to their sources.
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
        let dtype = Dtype::parse(dtype).map_err(to_py)?;
        let out_dtype = Dtype::parse(out_dtype).map_err(to_py)?;
        let (_, xb) = rows_of(&x);
        if xb % dtype.size() != 0 {
            return Err(to_py(Error::invalid(
                "x",
                format!("rows of whole {}-byte elements", dtype.size()),
                format!("{xb}-byte rows"),
            )));
        }
        let weights = match &topk_weights {
            Some(w) => Some((slice(w, "topk_weights")?, rows_of(w).1)),
            None => None,
        };
        let args = CombineArgs {
            x: slice(&x, "x")?,
            hidden: xb / dtype.size(),
            dtype,
            weights: weights.map(|w| w.0),
            num_topk: weights.map_or(0, |w| w.1),
            out_dtype,
        };
        let h = Arc::clone(&handle.inner);
        let out = py
            .detach(|| self.lock().combine(&args, &h))
            .map_err(to_py)?;
        let has_w = weights.is_some();
        Ok((
            PyArray1::from_vec(py, out.x),
            has_w.then(|| PyArray1::from_vec(py, out.weights)),
        ))
    }

    /// Bytes sent per tier (payload and wire) and operations completed.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock().stats();
        let d = PyDict::new(py);
        d.set_item("nvl_payload_bytes", s.nvl_payload_bytes)?;
        d.set_item("rdma_payload_bytes", s.rdma_payload_bytes)?;
        d.set_item("nvl_wire_bytes", s.nvl_wire_bytes)?;
        d.set_item("rdma_wire_bytes", s.rdma_wire_bytes)?;
        d.set_item("operations", s.operations)?;
        d.set_item("rejected_connections", s.rejected_connections)?;
        Ok(d)
    }

    fn destroy(&self, py: Python<'_>) {
        py.detach(|| self.lock().destroy());
    }

    /// Where peers reach this rank (`host:port` over TCP; None in a loopback world).
    #[getter]
    fn address(&self) -> Option<String> {
        self.lock().address()
    }

    #[getter]
    fn destroyed(&self) -> bool {
        self.lock().is_destroyed()
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LoopbackWorld>()?;
    m.add_class::<Endpoint>()?;
    m.add_class::<Handle>()?;
    m.add_class::<TcpListener>()?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
