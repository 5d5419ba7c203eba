"""`dualcomm.Buffer`: DeepEP's `deep_ep.Buffer` API over the Rust core.

The Buffer only checks arguments, turns tensors into byte views and back, and shapes the
return tuples the way DeepEP does. Routing, the two-hop protocol and the reductions run in
Rust with the GIL released.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from dualcomm import _checks, staging
from dualcomm._arrays import on_host, tensor_of
from dualcomm._native import (
    Endpoint,
    Handle,
    LoopbackWorld,
    TransportUnavailableError,
)
from dualcomm.config import Config, auto_channels, env_num_channels, env_ranks_per_node, resolve_ring_bytes
from dualcomm.event import EventHandle, EventOverlap
from dualcomm.handle import DispatchHandle, native_of
from dualcomm.low_latency import LowLatency, LowLatencyHandle, rdma_size_hint
from dualcomm.profiling import traced
from dualcomm.staging import staged

#: A dispatch's handle, as `dispatch` returns it and `combine` takes it.
AnyHandle = Union[DispatchHandle, Handle]

#: What `dispatch` accepts as `x`: bf16/fp32 rows, or FP8 rows with per-128-channel scales.
DispatchInput = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

_ROW_DTYPES = (torch.bfloat16, torch.float32)
_FP8 = torch.float8_e4m3fn
# Dispatch moves rows as bytes (only combine does arithmetic): any of these, as DeepEP's does.
_DISPATCH_DTYPES = (
    torch.bfloat16,
    torch.float32,
    torch.float16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
)
# FP8 scales: float32, or int32 words of packed UE8M0 exponents (DeepGEMM's format), any
# number per token and any strides.
_SCALE_DTYPES = (torch.float32, torch.int32)
_COMBINE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass(frozen=True)
class LoopbackGroup:
    """One rank's membership in an in-process loopback world (see `dualcomm.testing`)."""

    world: LoopbackWorld
    rank: int
    num_nodes: int
    ranks_per_node: int
    #: A second world of the same ranks for low-latency buffers (every rank linked to every other).
    ll_world: LoopbackWorld | None = None
    #: Worlds of the same ranks for channels 1, 2, ... (`Buffer(num_channels=...)`).
    channel_worlds: tuple[LoopbackWorld, ...] = ()

    def size(self) -> int:
        return self.num_nodes * self.ranks_per_node


def _is_process_group(group: object) -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # a torch build without distributed support
        return False
    return dist.is_available() and isinstance(group, dist.ProcessGroup)


def _bytes2d(t: torch.Tensor, row_bytes: int) -> np.ndarray:
    """A zero-copy `[rows, row_bytes]` uint8 NumPy view of a contiguous CPU tensor."""
    return t.view(torch.uint8).reshape(t.shape[0], row_bytes).numpy()


def _from_bytes(buf: np.ndarray, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    return tensor_of(buf).view(dtype).reshape(rows, cols)


class Buffer:
    """Expert-parallel communication buffer of one rank (DeepEP-compatible).

    Args:
        group: the ranks of the expert-parallel group: a `torch.distributed` ProcessGroup (one
            process per rank; endpoints are exchanged through it), or a `LoopbackGroup` (threads
            of this process, see `dualcomm.testing.run_loopback`).
        num_nvl_bytes: bytes of receive rings for ranks of the same node (split evenly among
            them). Any number of tokens streams through; it must hold one token record.
        num_rdma_bytes: the same for the other nodes.
        num_nvl_bytes, num_rdma_bytes: 0 for a tier that has links means "choose for me"
            (4 MiB per sending rank); more than `DUALCOMM_MAX_BUFFER_BYTES` (256 MiB) is trimmed
            to it (DeepEP's callers size for GPU chunking; the CPU rings gain nothing past it).
        low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl:
            DeepEP's; the last three are accepted and ignored (no queue pairs or NVLink here).
        use_fabric: the keyword DeepEP took from late 2025 to its v2 (fabric memory for
            multi-node NVLink), accepted and ignored.
        explicitly_destroy: as in DeepEP, `destroy()` may be called only with it; without it
            the buffer leaves its world when it is garbage-collected.
        enable_shrink: DeepEP's shrink mode, for `low_latency_mode`: a rank that does not
            start a low-latency operation (or `clean_low_latency_buffer`) within `timeout`,
            or leaves before it does, is masked, and the operation and every later one run
            without it (its tokens are neither sent nor waited for, combine sums over the
            ranks left); `low_latency_update_mask_buffer` / `_query_` / `_clean_` set, read
            and clear the masks. A rank lost after an operation's data started moving
            still fails that operation. Without `low_latency_mode` it changes nothing (as in
            DeepEP, whose normal kernels never mask).
        comm: DeepEP's mpi4py bootstrap, not served (pass a ProcessGroup).
        ranks_per_node: overrides the layout found from host names (a node: the ranks of
            a host, at most 8 as DeepEP's `rank / 8` makes them), so one machine can
            emulate several nodes; `DUALCOMM_RANKS_PER_NODE` sets it for callers that cannot
            pass it (an unmodified DeepEP client).
        timeout: seconds any wait may take before it fails with `CommTimeoutError`.
        transport: "auto" (loopback for a LoopbackGroup; for a process group: shared memory
            when the whole world is one node on this host; "shm+tcp" when each node's ranks
            share a host; else TCP), "shm+tcp" (one transport per tier: shared memory inside
            each node, TCP between nodes, as NVLink and the network on a cluster), "shm"
            (every tier through shared memory, one host only), "tcp", "verbs" (the rdma tier
            over InfiniBand/RoCE: for now it checks every rank for an active port, named
            by `DUALCOMM_IB_DEVICE` as NCCL_IB_HCA, and raises `TransportUnavailableError`
            saying what is missing; "auto" logs once why the rdma tier runs over TCP), or
            "loopback".
    """

    num_sms: int = 20

    def __init__(
        self,
        group: Any,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
        *,
        use_fabric: bool = False,
        ranks_per_node: int | None = None,
        timeout: float = 300.0,
        transport: str = "auto",
        num_channels: int | None = None,
    ) -> None:
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _checks.fail(name, "a non-negative int", _checks.describe(v))
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise _checks.fail("timeout", "a positive number of seconds", _checks.describe(timeout))
        if transport not in ("auto", "loopback", "tcp", "shm", "shm+tcp", "verbs"):
            raise _checks.fail("transport", "'auto', 'shm+tcp', 'tcp', 'shm', 'verbs' or 'loopback'", repr(transport))
        if group is None and comm is not None:
            raise _checks.fail("comm", "None (pass a torch.distributed ProcessGroup as group)", _checks.describe(comm))
        if ranks_per_node is None:
            ranks_per_node = env_ranks_per_node()
        if num_channels is None:
            num_channels = env_num_channels()
        elif isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise _checks.fail("num_channels", "a positive int (or None: from Buffer.num_sms)", repr(num_channels))
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = num_qps_per_rank
        self.group = group
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.explicitly_destroy = explicitly_destroy
        if isinstance(group, LoopbackGroup):
            if transport not in ("auto", "loopback"):
                raise TransportUnavailableError(
                    f"transport={transport!r}: a loopback world runs as threads of one process; "
                    "sockets and shared memory need a torch.distributed process group"
                )
            if ranks_per_node is not None and ranks_per_node != group.ranks_per_node:
                raise _checks.fail(
                    "ranks_per_node", f"{group.ranks_per_node} (the loopback world's layout)", ranks_per_node
                )
            self.transport = "loopback"
            nodes, rpn = group.num_nodes, group.ranks_per_node
            worlds = (group.world, *group.channel_worlds)
            # Left to dualcomm, a group gets no more channels than it has worlds for.
            channels = (
                min(auto_channels(Buffer.num_sms, group.size()), len(worlds)) if num_channels is None else num_channels
            )
            if channels > len(worlds):
                raise _checks.fail(
                    "num_channels",
                    f"at most {len(worlds)} (the loopback group has that many channel worlds)",
                    channels,
                )
            eps = [
                Endpoint.loopback(
                    w,
                    nodes,
                    rpn,
                    group.rank,
                    resolve_ring_bytes(num_nvl_bytes, rpn, rpn > 1),
                    resolve_ring_bytes(num_rdma_bytes, nodes, nodes > 1),
                    float(timeout),
                )
                for w in worlds[:channels]
            ]
            self._ep = eps[0] if channels == 1 else Endpoint.join_channels(eps)
        elif _is_process_group(group):
            if transport == "loopback":
                raise TransportUnavailableError(
                    "transport='loopback': a process group's ranks are separate processes; use 'tcp' or 'auto'"
                )
            from dualcomm._bootstrap import agree_channels, make_endpoint

            channels = agree_channels(group, num_channels, Buffer.num_sms)
            eps = []
            for _ in range(channels):
                ep, self.transport = make_endpoint(
                    group, transport, num_nvl_bytes, num_rdma_bytes, ranks_per_node, float(timeout)
                )
                eps.append(ep)
            self._ep = eps[0] if channels == 1 else Endpoint.join_channels(eps)
        else:
            raise _checks.fail(
                "group", "a torch.distributed ProcessGroup or a dualcomm LoopbackGroup", _checks.describe(group)
            )
        #: Channels each dispatch and combine run over (DeepEP's: one progress thread and
        #: transport each, owning a contiguous range of every rank's tokens).
        self.num_channels: int = self._ep.channels
        self.rank: int = self._ep.rank
        self.num_nodes: int = self._ep.num_nodes
        self.ranks_per_node: int = self._ep.ranks_per_node
        self.group_size: int = self.num_nodes * self.ranks_per_node
        self._ll: LowLatency | None = None
        self._comm_stream: Any = None
        #: What the low-latency endpoint runs on (None without `low_latency_mode`).
        self.low_latency_transport: str | None = None
        if self.low_latency_mode:
            self._ll = LowLatency(
                self._low_latency_endpoint(group, num_rdma_bytes, timeout), self.rank, self.group_size
            )
            if enable_shrink:
                self._ll.enable_shrink()
        self.enable_shrink = bool(enable_shrink)

    def _low_latency_endpoint(self, group: Any, num_rdma_bytes: int, timeout: float) -> Endpoint:
        """The second endpoint of a low-latency buffer: one rank per node, so every rank is
        linked to every other; its rings take `num_rdma_bytes` (0: chosen)."""
        w = self.group_size
        if isinstance(group, LoopbackGroup):
            if group.ll_world is None:
                raise _checks.fail("group", "a LoopbackGroup with an ll_world for low_latency_mode", "none")
            self.low_latency_transport = "loopback"
            return Endpoint.loopback(
                group.ll_world, w, 1, group.rank, 0, resolve_ring_bytes(num_rdma_bytes, w, w > 1), float(timeout)
            )
        from dualcomm._bootstrap import make_endpoint

        ep, self.low_latency_transport = make_endpoint(group, "full-mesh", 0, num_rdma_bytes, 1, float(timeout))
        return ep

    # ---- DeepEP class-level helpers -------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """The SMs DeepEP's kernels may use (even, as DeepEP requires). Buffers made after
        this run `new_num_sms // 2` channels (capped by the cores per rank), as DeepEP's
        kernels do; a buffer keeps the channels it was made with (each is a world of its
        own), so a `Config`'s `num_sms` in a call does not change them."""
        if isinstance(new_num_sms, bool) or not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise _checks.fail("new_num_sms", "a positive even int", repr(new_num_sms))
        Buffer.num_sms = new_num_sms

    @staticmethod
    def _config_for(num_ranks: int, combine: bool) -> Config:
        if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
            raise _checks.fail("num_ranks", "a positive int", repr(num_ranks))
        # Any rank count works here (DeepEP tabulates the ones it tuned). Receive chunks grow
        # with the ranks that share a ring region, as DeepEP's do past one node.
        nvl_recv = 256 if num_ranks <= 8 else 288
        return Config(Buffer.num_sms, 4 if combine else 6, nvl_recv, 6 if combine else 8, 128)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """A dispatch `Config` for `num_ranks` ranks (its hints size a buffer that works)."""
        return Buffer._config_for(num_ranks, combine=False)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """A combine `Config` for `num_ranks` ranks."""
        return Buffer._config_for(num_ranks, combine=True)

    @staticmethod
    def capture() -> EventOverlap:
        """An event at the current point of the current stream (DeepEP's usual `previous_event`)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: FP8 dispatch (the SM90 feature DeepEP's callers gate on this) is served."""
        return True

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """`num_rdma_bytes` for a `low_latency_mode` buffer of `num_ranks` ranks."""
        return rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def get_local_buffer_tensor(
        self,
        dtype: torch.dtype,
        size: torch.Size | None = None,
        offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        """This rank's receive rings of the nvl (or, with `use_rdma_buffer`, the rdma) tier as
        a 1-D `dtype` tensor starting `offset` bytes in (as DeepEP's runtime counts it), or
        shaped `size`. It aliases the memory peers write into: writing it corrupts operations
        in flight, exactly as with DeepEP's buffer. A `low_latency_mode` buffer's rdma buffer
        is, as DeepEP's, where low-latency traffic lands: the low-latency endpoint's rings."""
        if not isinstance(dtype, torch.dtype):
            raise _checks.fail("dtype", "a torch.dtype", _checks.describe(dtype))
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise _checks.fail("offset", "a non-negative int (bytes)", _checks.describe(offset))
        ep = self._ll._ep if use_rdma_buffer and self._ll is not None else self._ep
        raw = torch.from_numpy(ep.local_buffer(bool(use_rdma_buffer)))
        if offset > raw.numel():
            raise _checks.fail("offset", f"at most the buffer's {raw.numel()} bytes", offset)
        item = dtype.itemsize
        tail = raw[offset:]
        n = tail.numel() // item
        # A tier without links has no rings: an empty tensor (a view of no bytes cannot take
        # a wider dtype).
        t = tail[: n * item].view(dtype) if n else torch.empty(0, dtype=dtype, device="cpu")
        if size is None:
            return t
        want = int(torch.Size(size).numel())
        if want > t.numel():
            raise _checks.fail("size", f"at most {t.numel()} elements of {dtype}", list(size))
        return t[:want].view(size)

    def get_comm_stream(self) -> Any:
        """DeepEP's communication stream, one per buffer: a `torch.cuda.Stream` where CUDA is
        present (as DeepEP's callers expect: `wait_stream`, `with torch.cuda.stream(...)`),
        else a `torch.cpu.Stream`, whose methods do nothing. CPU operations run on the
        buffer's progress thread in the order they were issued, whatever stream is current."""
        if self._comm_stream is None:
            self._comm_stream = torch.cuda.Stream() if torch.cuda.is_available() else torch.cpu.Stream()
        return self._comm_stream

    # ---- layout -----------------------------------------------------------------------------

    @traced("get_dispatch_layout")
    @staged
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Returns `(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert,
        is_token_in_rank, event)`; `num_tokens_per_rdma_rank` is None on one node, as in DeepEP."""
        topk = _checks.tensor("topk_idx", topk_idx, (torch.int64,), 2)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int):
            raise _checks.fail("num_experts", "an int", _checks.describe(num_experts))
        if num_experts <= 0 or num_experts % self.group_size:
            raise _checks.fail("num_experts", f"a positive multiple of the world size {self.group_size}", num_experts)
        per_rank, per_node, per_expert, in_rank = self._ep.layout(topk.numpy(), num_experts)
        t = topk.shape[0]
        return (
            tensor_of(per_rank),
            tensor_of(per_node) if self.num_nodes > 1 else None,
            tensor_of(per_expert),
            tensor_of(in_rank).reshape(t, self.group_size),
            # Computed before it returns; asked for asynchronously, a (reached) stream point, as
            # DeepEP returns an event then and None otherwise.
            EventOverlap(EventHandle() if async_finish else None),
        )

    # ---- dispatch ---------------------------------------------------------------------------

    def _split_x(self, x: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(x, tuple):
            if len(x) != 2:
                raise _checks.fail("x", "a tensor or a (data, scales) pair", len(x))
            data = _checks.tensor("x[0]", x[0], _DISPATCH_DTYPES, 2)
            if data.element_size() != 1:
                raise _checks.fail("x[0]", "1-byte elements (FP8 data) with scales", data.dtype)
            scales = _checks.tensor("x[1]", x[1], _SCALE_DTYPES, 2)
            _checks.rows("x[1]", scales, data.shape[0], "one row of scales per token of x[0]")
            return data, scales
        return _checks.tensor("x", x, _DISPATCH_DTYPES, 2), None

    @traced("dispatch")
    @staged
    def dispatch(
        self,
        x: DispatchInput,
        handle: AnyHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[
        DispatchInput,
        torch.Tensor | None,
        torch.Tensor | None,
        list[int] | None,
        DispatchHandle | None,
        EventOverlap,
    ]:
        """Sends each token to every rank that owns one of its experts (once per rank), over
        the network once per destination node.

        Returns `(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)`. Received rows are ordered by source rank, then source token index.
        With `handle` (cached dispatch) the layout of that earlier dispatch is repeated and
        the top-k outputs and the list are None, as in DeepEP.

        `num_recv_tokens_per_expert_list` (per local expert, rounded up to `expert_alignment`)
        travels with the counts, so it is filled when the call returns, with or without top-k,
        whenever `num_tokens_per_expert` is given. With `num_worst_tokens > 0` the receive
        tensors have exactly that many rows (those past the received ones zero, their top-k
        indices -1) and the list is empty, as in DeepEP; fewer rows than arrive is an error.
        """
        with self._rejecting("dispatch" if handle is None else "cached dispatch"):
            data, scales = self._split_x(x)
            t, hidden = data.shape
            if isinstance(expert_alignment, bool) or not isinstance(expert_alignment, int) or expert_alignment < 1:
                raise _checks.fail("expert_alignment", "an int >= 1", _checks.describe(expert_alignment))
            if isinstance(num_worst_tokens, bool) or not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
                raise _checks.fail("num_worst_tokens", "an int >= 0", _checks.describe(num_worst_tokens))
            per_expert_np: np.ndarray | None = None
            native_handle: Handle | None = None
            if handle is not None:
                native_handle = self._check_handle(handle)
                # A handle of a dispatch padded to `num_worst_tokens` pads its cached ones too.
                if not num_worst_tokens and isinstance(handle, DispatchHandle):
                    num_worst_tokens = handle.padded_rows
                if topk_idx is not None or topk_weights is not None:
                    raise _checks.fail(
                        "topk_idx",
                        "None with a handle (a cached dispatch repeats the layout; top-k is not resent)",
                        _checks.describe(topk_idx if topk_idx is not None else topk_weights),
                    )
                in_rank_np = None
                in_rank = None
            else:
                in_rank = self._plan_for(t, is_token_in_rank, topk_idx, num_tokens_per_expert)
                self._check_counts(in_rank, num_tokens_per_rank, num_tokens_per_rdma_rank)
                in_rank_np = in_rank.numpy()
                if num_tokens_per_expert is not None:
                    counts = _checks.tensor(
                        "num_tokens_per_expert", num_tokens_per_expert, (torch.int32, torch.int64), 1
                    )
                    per_expert_np = counts.to(torch.int64).numpy()
            topk_np: tuple[np.ndarray, np.ndarray] | None = None
            num_experts = 0
            if handle is None and topk_idx is not None:
                idx = _checks.tensor("topk_idx", topk_idx, (torch.int64,), 2)
                _checks.rows("topk_idx", idx, t, "one per token of x")
                if topk_weights is None:
                    raise _checks.fail("topk_weights", f"a float32 tensor of shape {list(idx.shape)}", None)
                w = _checks.tensor("topk_weights", topk_weights, (torch.float32,), 2)
                _checks.shape("topk_weights", w, idx.shape)
                if num_tokens_per_expert is None:
                    raise _checks.fail("num_tokens_per_expert", "a tensor (its length is the number of experts)", None)
                num_experts = int(num_tokens_per_expert.numel())
                topk_np = (idx.numpy(), w.numpy())
            elif handle is None and topk_weights is not None:
                raise _checks.fail("topk_idx", "a tensor when topk_weights is given", None)

        elem = data.element_size()
        recv, recv_scales, recv_idx, recv_w, per_expert_now, new_handle, native_event = self._ep.dispatch(
            _bytes2d(data, hidden * elem),
            str(data.dtype).removeprefix("torch."),
            hidden,
            None if scales is None else _bytes2d(scales, scales.shape[1] * scales.element_size()),
            in_rank_np,
            native_handle,
            None if topk_np is None else topk_np[0],
            None if topk_np is None else topk_np[1],
            num_experts,
            expert_alignment,
            per_expert_np,
            num_worst_tokens,
        )
        n = num_worst_tokens or new_handle.num_recv_tokens
        recv_data = _from_bytes(recv, data.dtype, n, hidden)
        recv_x: DispatchInput = recv_data
        if scales is not None and recv_scales is not None:
            recv_x = (recv_data, _from_bytes(recv_scales, scales.dtype, n, scales.shape[1]))
        k = 0 if topk_np is None else topk_np[0].shape[1]
        recv_topk_idx = None if recv_idx is None else tensor_of(recv_idx).reshape(n, k)
        recv_topk_w = None if recv_w is None else tensor_of(recv_w).reshape(n, k)
        per_expert: list[int] | None = None
        on_done = None
        if num_worst_tokens:
            per_expert = [] if handle is None else None
        elif per_expert_np is not None:
            per_expert = list(per_expert_now or [])
        elif topk_np is not None:
            # Counted from the received top-k: known once the data is in.
            per_expert = []
            on_done = per_expert.extend
        event = EventOverlap(native_event, extra_tensors=(recv_data,), on_done=on_done)
        if not async_finish:
            event.retire()
        # A cached dispatch hands back no handle, as DeepEP's: the caller keeps the one it passed.
        out_handle: DispatchHandle | None = None
        if handle is None:
            out_handle = DispatchHandle(new_handle, self.num_nodes, self.ranks_per_node, self.rank, in_rank)
            out_handle.padded_rows = num_worst_tokens
        return (recv_x, recv_topk_idx, recv_topk_w, per_expert, out_handle, event)

    def _rejecting(self, op: str) -> contextlib.AbstractContextManager[None]:
        return _checks.rejecting(self._ep, op)

    def _check_handle(self, handle: object) -> Handle:
        native = native_of(handle)
        if native is None:
            raise _checks.fail("handle", "a handle returned by dispatch", _checks.describe(handle))
        if native.buffer_id != self._ep.id:
            raise _checks.fail("handle", "a handle made by this buffer", "a handle from another buffer")
        return native

    def _plan_for(
        self,
        t: int,
        is_token_in_rank: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        num_tokens_per_expert: torch.Tensor | None,
    ) -> torch.Tensor:
        if is_token_in_rank is not None:
            in_rank = _checks.tensor("is_token_in_rank", is_token_in_rank, (torch.bool,), 2)
            _checks.shape("is_token_in_rank", in_rank, (t, self.group_size))
            return in_rank
        if topk_idx is not None and num_tokens_per_expert is not None:
            return self.get_dispatch_layout(topk_idx, int(num_tokens_per_expert.numel()))[3]
        raise _checks.fail(
            "is_token_in_rank",
            f"a [{t}, {self.group_size}] bool tensor (from get_dispatch_layout), or a handle",
            None,
        )

    def _check_counts(
        self,
        in_rank: torch.Tensor,
        per_rank: torch.Tensor | None,
        per_node: torch.Tensor | None,
    ) -> None:
        """The counts DeepEP takes must agree with is_token_in_rank, or they would lie."""
        if per_rank is not None:
            got = _checks.tensor("num_tokens_per_rank", per_rank, (torch.int32, torch.int64), 1)
            want = in_rank.sum(0)
            if not torch.equal(got.to(torch.int64), want.to(torch.int64)):
                raise _checks.fail(
                    "num_tokens_per_rank",
                    f"{want.tolist()} (the column sums of is_token_in_rank)",
                    got.tolist(),
                )
        if per_node is not None:
            got = _checks.tensor("num_tokens_per_rdma_rank", per_node, (torch.int32, torch.int64), 1)
            want = in_rank.reshape(-1, self.num_nodes, self.ranks_per_node).any(2).sum(0)
            if not torch.equal(got.to(torch.int64), want.to(torch.int64)):
                raise _checks.fail("num_tokens_per_rdma_rank", f"{want.tolist()} (tokens per node)", got.tolist())

    # ---- combine ----------------------------------------------------------------------------

    @traced("combine")
    @staged
    def combine(
        self,
        x: torch.Tensor,
        handle: AnyHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Sends every received row back and sums, per original token, the rows of all ranks
        it went to (fp32 accumulation; reduced per node, then over nodes).

        Returns `(combined_x, combined_topk_weights, event)`."""
        with self._rejecting("combine"):
            native = self._check_handle(handle)
            if isinstance(x, tuple):
                raise _checks.fail("x", "a bfloat16 or float32 tensor (combine does not take FP8)", "a tuple")
            rows = _checks.tensor("x", x, _ROW_DTYPES, 2)
            n = native.num_recv_tokens
            # After a dispatch padded to `num_worst_tokens`, callers pass the padded rows (as
            # DeepEP's do); the rows past what arrived are padding and go nowhere.
            padded = handle.padded_rows if isinstance(handle, DispatchHandle) else 0
            if padded and rows.shape[0] == padded:
                rows = rows[:n].contiguous()
            _checks.rows("x", rows, n, "as many as the handle's dispatch delivered here (or its num_worst_tokens)")
            w_np = None
            if topk_weights is not None:
                w = _checks.tensor("topk_weights", topk_weights, (torch.float32,), 2)
                if padded and w.shape[0] == padded:
                    w = w[:n].contiguous()
                _checks.rows("topk_weights", w, n, "one per row of x")
                w_np = w.numpy()
            biases = self._biases(bias, native.num_tokens, rows.shape[1])
            name = _COMBINE_NAMES[rows.dtype]
            out_name = "float32" if biases else name
            hidden = rows.shape[1]
        out, out_w, native_event = self._ep.combine(
            _bytes2d(rows, hidden * rows.element_size()), name, native, w_np, out_name
        )
        t = native.num_tokens
        summed = _from_bytes(out, torch.float32 if biases else rows.dtype, t, hidden)
        combined = summed
        on_done = None
        if biases:
            # The sum arrives in fp32; the biases are added to it when it is complete.
            combined = torch.empty(t, hidden, dtype=rows.dtype)

            def on_done(_: object) -> None:
                total = summed
                for b in biases:
                    total = total + b.float()
                combined.copy_(total)

        combined_w = None
        if out_w is not None and w_np is not None:
            combined_w = tensor_of(out_w).reshape(t, w_np.shape[1])
        event = EventOverlap(native_event, extra_tensors=(combined,), on_done=on_done)
        if not async_finish:
            event.retire()
        return combined, combined_w, event

    @staticmethod
    def _biases(bias: object, t: int, hidden: int) -> list[torch.Tensor]:
        if bias is None:
            return []
        items = bias if isinstance(bias, tuple) else (bias,)
        if len(items) > 2:
            raise _checks.fail("bias", "a tensor or a tuple of at most two tensors", f"{len(items)} items")
        out = []
        for i, b in enumerate(items):
            if b is None:
                continue
            bt = _checks.tensor(f"bias[{i}]", b, _ROW_DTYPES, 2)
            _checks.shape(f"bias[{i}]", bt, (t, hidden))
            out.append(bt)
        return out

    # ---- low-latency mode -------------------------------------------------------------------

    def _low_latency(self, call: str) -> LowLatency:
        if self._ll is None:
            raise _checks.fail("low_latency_mode", f"True at construction to call {call}", False)
        return self._ll

    @traced("low_latency::dispatch")
    @staged
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandle, EventOverlap, Any]:
        """DeepEP's low-latency dispatch: each token goes straight to the ranks of its experts.

        Returns `(recv_x, recv_count, handle, event, hook)`: `recv_x` is bf16
        `[local experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]`, or with
        `use_fp8` the FP8 data and its scales (float32 `[.., hidden / 128]`, or with
        `use_ue8m0` int32 `[.., hidden / 512]` of packed exponent bytes; column-major in the
        last two dimensions). Only the first `recv_count[e]` rows of expert `e` are tokens,
        ordered by source rank, then source token index. With `return_recv_hook`, the call
        returns once the sends are issued and `hook()` completes the receive.
        """
        return self._low_latency("low_latency_dispatch").dispatch(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
            async_finish,
            return_recv_hook,
        )

    @traced("low_latency::combine")
    @staged
    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Any]:
        """DeepEP's low-latency combine: per token, the sum over its top-k choices of weight
        times the expert's output row (fp32, in a fixed order), as bfloat16 `[num_tokens,
        hidden]` (written into `out` if given). Returns `(combined_x, event, hook)`.
        `use_logfmt` is accepted and changes nothing: rows travel at full precision."""
        return self._low_latency("low_latency_combine").combine(
            x,
            topk_idx,
            topk_weights,
            handle,
            zero_copy,
            async_finish,
            return_recv_hook,
            out,
            combine_wait_recv_cost_stats,
        )

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The bf16 tensor the next `low_latency_combine(..., zero_copy=True)` reads, on the
        device of the handle's tensors."""
        ll = self._low_latency("get_next_low_latency_combine_buffer")
        with on_host():
            return ll.next_combine_buffer(handle, staging.device_of(handle))

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP zeroes the flags of its low-latency buffer here. dualcomm's rings carry their
        own credits and need no cleaning, so this checks its arguments; with `enable_shrink`
        it is also, as DeepEP's, a barrier of the ranks not masked, which masks any that
        does not reach it within the timeout."""
        ll = self._low_latency("clean_low_latency_buffer")
        rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
        if self.enable_shrink:
            ll.barrier()

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks (`mask=True`) or unmasks `rank_to_mask` from the next low-latency operation
        on: this rank neither sends to it nor waits for it (`enable_shrink` buffers). Ranks
        count their operations, and a masked rank misses the ones run without it: unmask
        only a rank that has run as many as the others (one masked with no operation run
        since), or the next operation fails with a `ProtocolError` naming it out of step."""
        self._low_latency("low_latency_update_mask_buffer").update_mask(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Writes each rank's mask into `mask_status` (int32 `[num_ranks]`): 1 for masked."""
        with on_host():
            self._low_latency("low_latency_query_mask_buffer").query_mask(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank."""
        self._low_latency("low_latency_clean_mask_buffer").clean_mask()

    # ---- bookkeeping ------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Bytes this rank sent per tier since the buffer was made: `nvl_payload_bytes` and
        `rdma_payload_bytes` count token data (hidden states, FP8 scales); the `*_wire_bytes`
        count everything (headers, top-k, counts, credits too)."""
        out = dict(self._ep.stats())
        if self._ll is not None:
            out.update({f"low_latency_{k}": v for k, v in self._ll._ep.stats().items()})
        return out

    def destroy(self) -> None:
        """Leaves the world at once: operations in flight fail, later calls raise
        `BufferDestroyedError`, and peers waiting on this rank fail with `PeerLostError`.
        As in DeepEP, only a buffer made with `explicitly_destroy=True` may be destroyed."""
        if not self.explicitly_destroy:
            raise _checks.fail(
                "explicitly_destroy",
                "True at construction to call destroy() (without it the buffer leaves when it is collected)",
                False,
            )
        self._leave()

    def _leave(self) -> None:
        """`destroy()` for dualcomm's own harnesses, whatever `explicitly_destroy` says."""
        self._ep.destroy()
        if self._ll is not None:
            self._ll._ep.destroy()

    @property
    def address(self) -> str | None:
        """Where peers reach this rank (`host:port` over TCP; None in a loopback world)."""
        return self._ep.address

    @property
    def destroyed(self) -> bool:
        return bool(self._ep.destroyed)

    def __repr__(self) -> str:
        return (
            f"Buffer(rank={self.rank}, group_size={self.group_size}, "
            f"topology={self.num_nodes}x{self.ranks_per_node}, num_nvl_bytes={self.num_nvl_bytes}, "
            f"num_rdma_bytes={self.num_rdma_bytes})"
        )
