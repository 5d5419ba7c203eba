"""DeepEP 2's `ElasticBuffer` and `EPHandle`, over a dualcomm `Buffer`.

DeepEP 2 lays a dispatch out in one of two ways, and `combine` undoes either:

- flat (`do_expand=False`): one row per received token, grouped by source rank, with the
  token's top-k as *local* expert ids (-1 for experts elsewhere) and its full top-k weights;
- expanded (`do_expand=True`): one row per (token, local expert), in per-expert blocks that
  start at multiples of `expert_alignment`.

Its combine is an unweighted sum (the caller weights expert outputs itself): per token, the
bias terms, then each destination rank's row (placed at the highest top-k lane that rank
owns), added lane by lane in fp32 and rounded to bfloat16 once. The top-k weights only travel
back. dualcomm follows that order, so its results are DeepEP's reference results bit for bit.

How the bytes move: both directions are dispatches of the underlying `Buffer` (each token's
row, scales, weights and top-k packed into one byte row; a combine sends each row back to its
source rank with its token index and lane), so they take the two-hop route of that buffer:
across nodes once per node. Rows arrive by source rank, then source token index, which is
DeepEP's `deterministic=True` order, whatever `deterministic` says.

Layouts follow DeepEP's direct mode: one scale-up domain of every rank
(`get_logical_domain_size() == (1, num_ranks)`), DeepEP's layout on one node or with
`allow_hybrid_mode=False`. Engram, pipeline send/receive and all-gather sessions are not
provided (their calls raise `NotImplementedError`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dualcomm import _checks
from dualcomm._arrays import rows_as_bytes, tensor_of
from dualcomm.buffer import Buffer
from dualcomm.event import EventHandle, EventOverlap
from dualcomm.handle import DispatchHandle
from dualcomm.staging import staged

#: DeepEP 2's buffer sizes are multiples of this (`_C.get_elastic_buffer_alignment()`).
BUFFER_ALIGNMENT = 2 << 20
#: The most top-k choices per token DeepEP 2's kernels take.
MAX_TOPK = 32

ElasticInput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass
class _Layout:
    """What a dispatch leaves on its ranks, on the host: the source side's routing and the
    receiving side's rows (shared by an `EPHandle` and its device twin)."""

    inner: DispatchHandle
    num_tokens: int
    #: `[num_tokens, num_topk]` global top-k (-1: none) and each choice's owning rank (-1: none).
    topk_idx: torch.Tensor
    owner: torch.Tensor
    #: Per received row: source rank, source token index, highest lane with a local expert.
    src_rank: torch.Tensor
    src_idx: torch.Tensor
    master_lane: torch.Tensor
    #: `[num_recv, num_topk]` expanded row of each (received row, lane), or -1.
    slots: torch.Tensor


class EPHandle:
    """DeepEP 2's dispatch handle: pass it to `combine` and to a cached `dispatch`.

    Its fields are DeepEP's (see `ElasticBuffer.dispatch`); on a GPU caller's tensors they
    are on the caller's device."""

    def __init__(
        self,
        do_expand: bool,
        num_experts: int,
        expert_alignment: int,
        num_max_tokens_per_rank: int,
        num_sms: int,
        topk_idx: torch.Tensor,
        num_recv_tokens: int,
        num_expanded_tokens: int,
        num_recv_tokens_per_expert_list: list[int],
        psum_num_recv_tokens_per_scaleup_rank: torch.Tensor,
        psum_num_recv_tokens_per_expert: torch.Tensor,
        num_unaligned_recv_tokens_per_expert: torch.Tensor,
        recv_src_metadata: torch.Tensor,
        dst_buffer_slot_idx: torch.Tensor,
        token_metadata_at_forward: torch.Tensor | None = None,
        channel_linked_list: torch.Tensor | None = None,
    ) -> None:
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.topk_idx = topk_idx
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.recv_src_metadata = recv_src_metadata
        self.dst_buffer_slot_idx = dst_buffer_slot_idx
        self.token_metadata_at_forward = token_metadata_at_forward
        self.channel_linked_list = channel_linked_list
        self.cached_recv_src_metadata_before_sort: torch.Tensor | None = None
        self._layout: _Layout | None = None
        self._buffer_id = -1

    def with_tensors(self, convert: Callable[[torch.Tensor], torch.Tensor]) -> EPHandle:
        """This handle with its tensor fields converted (a GPU caller's copies); the layout
        behind it is the same one."""
        twin = copy.copy(self)
        for name, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(twin, name, convert(v))
        return twin

    def __repr__(self) -> str:
        return (
            f"EPHandle(do_expand={self.do_expand}, num_experts={self.num_experts}, "
            f"num_recv_tokens={self.num_recv_tokens}, num_expanded_tokens={self.num_expanded_tokens})"
        )


class ElasticBuffer:
    """DeepEP 2's `ElasticBuffer` (see the module). Arguments as DeepEP's; `over` builds it on
    an existing dualcomm `Buffer` of `group` (a loopback world's, in tests) instead of a new one."""

    def __init__(
        self,
        group: Any,
        num_bytes: int | None = None,
        num_cpu_bytes: int = 0,
        num_max_tokens_per_rank: int = 0,
        hidden: int = 0,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        deterministic: bool = False,
        allow_hybrid_mode: bool = True,
        allow_multiple_reduction: bool = True,
        prefer_overlap_with_compute: bool = True,
        sl_idx: int = 3,
        num_allocated_qps: int = 0,
        num_cpu_timeout_secs: int = 300,
        num_gpu_timeout_secs: int = 100,
        explicitly_destroy: bool = False,
        *,
        over: Buffer | None = None,
    ) -> None:
        self.num_max_tokens_per_rank = _checks.integer("num_max_tokens_per_rank", num_max_tokens_per_rank, 0)
        hidden = _checks.integer("hidden", hidden, 0)
        num_topk = _checks.integer("num_topk", num_topk, 0)
        if _checks.integer("num_cpu_bytes", num_cpu_bytes, 0):
            raise _checks.fail("num_cpu_bytes", "0 (dualcomm keeps no Engram storage)", num_cpu_bytes)
        if num_bytes is None:
            num_bytes = ElasticBuffer._size_hint(
                1, self.num_max_tokens_per_rank, hidden, num_topk, bool(use_fp8_dispatch)
            )
        elif _checks.integer("num_bytes", num_bytes, 0) % BUFFER_ALIGNMENT:
            raise _checks.fail("num_bytes", f"a multiple of {BUFFER_ALIGNMENT} (2 MiB)", num_bytes)
        if not num_cpu_timeout_secs or float(num_cpu_timeout_secs) <= 0:
            raise _checks.fail("num_cpu_timeout_secs", "a positive number of seconds", num_cpu_timeout_secs)
        if over is None:
            b = Buffer(group, 0, 0, explicitly_destroy=True, timeout=float(num_cpu_timeout_secs))
        elif not isinstance(over, Buffer) or over.group is not group:
            raise _checks.fail("over", "None or a dualcomm Buffer of this group", _checks.describe(over))
        else:
            b = over
        #: A buffer made here is destroyed with this one; the caller's (`over`) is left as it is.
        self._owns_buffer = over is None
        self.group = group
        self.rank_idx: int = b.rank
        self.num_ranks: int = b.group_size
        self.num_bytes: int = int(num_bytes)
        self.deterministic = bool(deterministic)
        self.allow_hybrid_mode = bool(allow_hybrid_mode)
        self.allow_multiple_reduction = bool(allow_multiple_reduction)
        self.prefer_overlap_with_compute = bool(prefer_overlap_with_compute)
        self.num_allocated_qps = _checks.integer("num_allocated_qps", num_allocated_qps, 0)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.num_rdma_ranks, self.num_nvlink_ranks = b.num_nodes, b.ranks_per_node
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.scaleout_rank_idx = self.rank_idx // self.num_scaleup_ranks
        self.scaleup_rank_idx = self.rank_idx % self.num_scaleup_ranks
        self.runtime: Buffer | None = b

    # ---- sizes and topology -------------------------------------------------------------------

    @staticmethod
    def _size_hint(num_ranks: int, m: int, hidden: int, num_topk: int, use_fp8: bool) -> int:
        row = hidden * (1 if use_fp8 else 2) + (hidden // 128) * 4 * use_fp8 + max(num_topk, 1) * 12 + 64
        return _align(num_ranks * max(m, 1) * row, BUFFER_ALIGNMENT)

    @staticmethod
    def get_buffer_size_hint(
        group: Any,
        num_max_tokens_per_rank: int,
        hidden: int,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        allow_hybrid_mode: bool = True,
        allow_multiple_reduction: bool = True,
    ) -> int:
        """`num_bytes` for a buffer receiving up to `num_max_tokens_per_rank` tokens from every
        rank (a multiple of 2 MiB). dualcomm's rings stream any number through less."""
        size = group.size() if callable(getattr(group, "size", None)) else None
        if not isinstance(size, int) or size < 1:
            raise _checks.fail("group", "a process group (or loopback group)", _checks.describe(group))
        return ElasticBuffer._size_hint(
            size,
            _checks.integer("num_max_tokens_per_rank", num_max_tokens_per_rank, 1),
            _checks.integer("hidden", hidden, 1),
            _checks.integer("num_topk", num_topk, 0) or 32,
            bool(use_fp8_dispatch),
        )

    def get_physical_domain_size(self) -> tuple[int, int]:
        """(RDMA ranks, NVLink ranks): dualcomm's (nodes, ranks per node)."""
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self) -> tuple[int, int]:
        """(scale-out ranks, scale-up ranks) the layouts follow: `(1, num_ranks)` (the module)."""
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def get_theoretical_num_sms(
        self,
        num_experts: int,
        num_topk: int,
        num_scaleout_topk: int = 0,
        rdma_gbs: float = 0,
        nvlink_gbs: float = 0,
        sm_read_gbs: float = 200,
        sm_write_gbs: float = 50,
    ) -> int:
        """An even SM count of at least 4, as DeepEP's: `Buffer.num_sms` (the GPU path's)."""
        _checks.integer("num_experts", num_experts, 1)
        _checks.integer("num_topk", num_topk, 0)
        return max(4, Buffer.num_sms // 2 * 2)

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        qps = min(_checks.integer("num_sms", num_sms, 1), 9)
        return min(qps, self.num_allocated_qps) if self.num_allocated_qps else qps

    @staticmethod
    def capture() -> EventHandle:
        """An event at the current point of the current stream."""
        return EventHandle()

    def get_comm_stream(self) -> Any:
        return self._live().get_comm_stream()

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False, sequential: bool = True) -> None:
        """Returns once every rank has reached it (an operation with no tokens)."""
        b = self._live()
        empty = torch.zeros((0, 1), dtype=torch.uint8)
        b.dispatch(empty, is_token_in_rank=torch.zeros((0, self.num_ranks), dtype=torch.bool))

    def destroy(self) -> None:
        if not self.explicitly_destroy:
            raise _checks.fail("explicitly_destroy", "True at construction to call destroy()", False)
        if self.runtime is not None and self._owns_buffer:
            self.runtime.destroy()
        self.runtime = None

    def _live(self) -> Buffer:
        if self.runtime is None:
            raise _checks.fail("buffer", "a buffer not yet destroyed", "a destroyed ElasticBuffer")
        return self.runtime

    # ---- dispatch ------------------------------------------------------------------------------

    @staged
    def dispatch(
        self,
        x: ElasticInput,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        num_experts: int | None = None,
        num_max_tokens_per_rank: int | None = None,
        expert_alignment: int | None = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event: Any = None,
        previous_event_before_epilogue: Any = None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
        handle: EPHandle | None = None,
        do_handle_copy: bool = True,
        do_cpu_sync: bool | None = None,
        do_expand: bool = False,
        do_zero_padding: bool = False,
        use_tma_aligned_col_major_sf: bool = False,
    ) -> tuple[ElasticInput, torch.Tensor | None, torch.Tensor | None, EPHandle, EventOverlap]:
        """Sends each token once to every rank owning one of its experts. Returns
        `(recv_x, recv_topk_idx, recv_topk_weights, handle, event)`, laid out flat or
        expanded (the module). Without `do_cpu_sync` the tensors have the worst-case rows
        (`num_max_tokens_per_rank * num_ranks` flat) and the handle's
        `psum_num_recv_tokens_per_scaleup_rank[-1]` says how many hold tokens."""
        b = self._live()
        _check_stream_args(previous_event, allocate_on_comm_stream)
        data, sf = _split_input(x)
        t, hidden = data.shape
        if handle is not None:
            h = self._check_handle(handle)
            layout = h._layout
            assert layout is not None
            if topk_idx is not None:
                raise _checks.fail("topk_idx", "None with a handle (the handle's is used)", _checks.describe(topk_idx))
            if do_cpu_sync:
                raise _checks.fail("do_cpu_sync", "None or False with a handle", do_cpu_sync)
            if cumulative_local_expert_recv_stats is not None:
                raise _checks.fail("cumulative_local_expert_recv_stats", "None with a handle", "a tensor")
            for name, given, want in (
                ("num_experts", num_experts, h.num_experts),
                ("expert_alignment", expert_alignment, h.expert_alignment),
                ("num_max_tokens_per_rank", num_max_tokens_per_rank, h.num_max_tokens_per_rank),
            ):
                if given is not None and given != want:
                    raise _checks.fail(name, f"the handle's {want} (or None)", given)
            if t != layout.num_tokens:
                raise _checks.fail("x", f"the handle's {layout.num_tokens} tokens", t)
            if do_expand != h.do_expand:
                raise _checks.fail("do_expand", f"the handle's {h.do_expand}", do_expand)
            idx, num_experts, m, align = layout.topk_idx, h.num_experts, h.num_max_tokens_per_rank, h.expert_alignment
            do_cpu_sync = False
        else:
            if num_experts is None:
                raise _checks.fail("num_experts", "an int (no handle to take it from)", None)
            num_experts = _checks.integer("num_experts", num_experts, 1)
            if num_experts % self.num_ranks:
                raise _checks.fail("num_experts", f"a multiple of the world size {self.num_ranks}", num_experts)
            m = self.num_max_tokens_per_rank if num_max_tokens_per_rank is None else num_max_tokens_per_rank
            m = _checks.integer("num_max_tokens_per_rank", m, 1)
            align = _checks.integer("expert_alignment", 1 if expert_alignment is None else expert_alignment, 1)
            idx = _checks.tensor("topk_idx", topk_idx, (torch.int64,), 2)
            _checks.rows("topk_idx", idx, t, "one per token of x")
            do_cpu_sync = True if do_cpu_sync is None else bool(do_cpu_sync)
        k = idx.shape[1]
        if t > m:
            raise _checks.fail("x", f"at most num_max_tokens_per_rank={m} tokens", t)
        if k > MAX_TOPK:
            raise _checks.fail("topk_idx", f"at most {MAX_TOPK} choices per token", k)
        if do_zero_padding and not do_expand:
            raise _checks.fail("do_zero_padding", "False unless do_expand=True", True)
        weights = None
        if topk_weights is not None:
            weights = _checks.tensor("topk_weights", topk_weights, (torch.float32,), 2)
            _checks.shape("topk_weights", weights, (t, k))
        stats = cumulative_local_expert_recv_stats
        local = num_experts // self.num_ranks
        if stats is not None and (
            not isinstance(stats, torch.Tensor) or stats.dtype != torch.int32 or list(stats.shape) != [local]
        ):
            raise _checks.fail(
                "cumulative_local_expert_recv_stats", f"an int32 tensor of shape [{local}]", _checks.describe(stats)
            )
        if handle is None:
            owner = _owners(idx, num_experts, self.num_ranks)
        else:
            assert layout is not None
            owner = layout.owner
        in_rank = torch.zeros(t, self.num_ranks, dtype=torch.bool)
        valid = owner >= 0
        in_rank[torch.arange(t).unsqueeze(1).expand(t, k)[valid], owner[valid]] = True

        # Each token's row, scales, weights and top-k, as one byte row.
        w_rows = torch.zeros(t, k, dtype=torch.float32) if weights is None else weights
        parts = [rows_as_bytes(data)] + ([rows_as_bytes(sf)] if sf is not None else [])
        parts += [rows_as_bytes(w_rows), rows_as_bytes(idx)]
        payload = torch.cat(parts, 1)
        if handle is None:
            recv, *_, inner, _ = b.dispatch(payload, is_token_in_rank=in_rank)
            assert isinstance(inner, DispatchHandle)
        else:
            assert layout is not None
            inner = layout.inner
            recv = b.dispatch(payload, handle=inner)[0]
        assert isinstance(recv, torch.Tensor)
        n = recv.shape[0]
        widths = [p.shape[1] for p in parts]
        cols = list(torch.split(recv, widths, 1)) if n else [torch.empty(0, w, dtype=torch.uint8) for w in widths]
        rx = cols[0].contiguous().view(data.dtype)
        rsf = cols[1].contiguous().view(sf.dtype) if sf is not None else None
        rw = cols[-2].contiguous().view(torch.float32)
        ridx = cols[-1].contiguous().view(torch.int64)

        if handle is None:
            layout = self._receive_layout(inner, t, idx, owner, ridx, local, align)
        assert layout is not None
        me = self.rank_idx
        recv_local = torch.where((ridx >= 0) & (ridx // local == me), ridx - me * local, torch.full_like(ridx, -1))
        per_expert = torch.bincount(recv_local[recv_local >= 0], minlength=local)
        aligned = (per_expert + align - 1) // align * align
        starts = aligned.cumsum(0) - aligned
        if stats is not None:
            stats += per_expert.to(torch.int32)
        # A cached dispatch has its handle's sizes (exact if that dispatch synced, else worst case).
        if handle is not None:
            rows = h.num_recv_tokens
        else:
            rows = n if do_cpu_sync else m * self.num_ranks
        psum_rank = torch.bincount(layout.src_rank, minlength=self.num_ranks).cumsum(0).to(torch.int32)
        metadata = torch.full((rows, k + 2), -1, dtype=torch.int32)
        metadata[:n, 0] = (layout.src_rank * m + layout.src_idx).to(torch.int32)
        metadata[:n, 1] = (layout.src_rank * k + layout.master_lane).to(torch.int32)

        recv_topk_idx: torch.Tensor | None
        if not do_expand:
            out_x = _rows_into(rx, rows)
            out_sf = None if rsf is None else _rows_into(rsf, rows, use_tma_aligned_col_major_sf)
            recv_topk_idx = _rows_into(recv_local, rows, fill=-1)
            recv_w = None if weights is None else _rows_into(rw, rows)
            psum_expert = aligned.cumsum(0).to(torch.int32)
            num_expanded = 0
        else:
            if handle is not None:
                num_expanded = h.num_expanded_tokens
            elif do_cpu_sync:
                num_expanded = int(aligned.sum())
            else:
                num_expanded = _align(self.num_ranks * m * min(k, local) + (align - 1) * local, align)
            slots = layout.slots
            metadata[:n, 2:] = slots.to(torch.int32)
            taken = slots >= 0
            src_rows = torch.arange(n).unsqueeze(1).expand(n, k)[taken]
            dst = slots[taken]
            out_x = _scatter_rows(rx, src_rows, dst, num_expanded)
            out_sf = None
            if rsf is not None:
                out_sf = _scatter_rows(rsf, src_rows, dst, num_expanded, use_tma_aligned_col_major_sf)
            recv_topk_idx = None
            recv_w = None
            if weights is not None:
                recv_w = torch.zeros(num_expanded, dtype=torch.float32)
                recv_w[dst] = rw[taken]
            psum_expert = (starts + per_expert).to(torch.int32)
        recv_x: ElasticInput = out_x if out_sf is None else (out_x, out_sf)
        if handle is not None:
            h.num_sms = num_sms or h.num_sms
            return recv_x, recv_topk_idx, recv_w, handle, _event(async_with_compute_stream)
        new = EPHandle(
            bool(do_expand),
            num_experts,
            align,
            m,
            num_sms,
            idx.clone() if do_handle_copy else idx,
            rows,
            num_expanded,
            aligned.tolist() if do_cpu_sync else [],
            psum_rank,
            psum_expert,
            per_expert.to(torch.int32),
            metadata,
            _sender_slots(in_rank, owner, me, m),
        )
        new._layout = layout
        new._buffer_id = id(self)
        return recv_x, recv_topk_idx, recv_w, new, _event(async_with_compute_stream)

    def _receive_layout(
        self,
        inner: DispatchHandle,
        num_tokens: int,
        idx: torch.Tensor,
        owner: torch.Tensor,
        ridx: torch.Tensor,
        local: int,
        align: int,
    ) -> _Layout:
        """The receiving side's rows of a new dispatch: their sources, master lanes (the
        highest lane naming an expert here) and the expanded row of each (row, local lane):
        per-expert blocks starting at multiples of `align`, in source token order."""
        n, k = ridx.shape
        me = self.rank_idx
        src_rank = tensor_of(inner.recv_src_rank().astype(np.int64))
        src_idx = tensor_of(inner.recv_src_idx().astype(np.int64))
        mine = (ridx >= 0) & (ridx // local == me)
        lanes = torch.arange(k).expand(n, k)
        master = (
            torch.where(mine, lanes, torch.full_like(lanes, -1)).amax(1) if n else torch.zeros(0, dtype=torch.int64)
        )
        slots = torch.full((n, k), -1, dtype=torch.int64)
        r, j = mine.nonzero(as_tuple=True)
        e = ridx[r, j] - me * local
        order = torch.sort(e * max(n, 1) + r, stable=True).indices
        e, r, j = e[order], r[order], j[order]
        counts = torch.bincount(e, minlength=local)
        aligned = (counts + align - 1) // align * align
        block = aligned.cumsum(0) - aligned
        position = torch.arange(e.numel()) - (counts.cumsum(0) - counts)[e]
        slots[r, j] = block[e] + position
        return _Layout(inner, num_tokens, idx, owner, src_rank, src_idx, master, slots)

    def _check_handle(self, handle: object) -> EPHandle:
        if not isinstance(handle, EPHandle) or handle._layout is None:
            raise _checks.fail("handle", "an EPHandle returned by dispatch", _checks.describe(handle))
        if handle._buffer_id != id(self):
            raise _checks.fail("handle", "a handle made by this buffer", "a handle from another buffer")
        return handle

    # ---- combine -------------------------------------------------------------------------------

    @staged
    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event: Any = None,
        previous_event_before_epilogue: Any = None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Sends each expert-side row back to its source token and sums there: the bias
        terms, then the rows lane by lane (each rank's row at the highest lane it owns), in
        fp32, rounded to bfloat16 once. Returns `(combined_x, combined_topk_weights, event)`:
        `combined_topk_weights[t][j]` is the weight the rank owning expert `topk_idx[t][j]`
        sent back for lane `j` (0 for no expert); None without `topk_weights`."""
        b = self._live()
        _check_stream_args(previous_event, allocate_on_comm_stream)
        h = self._check_handle(handle)
        layout = h._layout
        assert layout is not None
        xt = _checks.tensor("x", x, (torch.bfloat16,), 2)
        n, k = layout.slots.shape
        hidden = xt.shape[1]
        rows_needed = int(layout.slots.max()) + 1 if h.do_expand and n else n
        if xt.shape[0] < rows_needed:
            raise _checks.fail("x", f"at least the dispatch's {rows_needed} received rows", xt.shape[0])
        w = None
        if topk_weights is not None:
            if h.do_expand and not self.allow_multiple_reduction:
                raise _checks.fail(
                    "topk_weights", "None for an expanded combine without allow_multiple_reduction", "a tensor"
                )
            w = _checks.tensor("topk_weights", topk_weights, (torch.float32,), 1 if h.do_expand else 2)
            if w.shape[0] < rows_needed or (not h.do_expand and w.shape[1] != k):
                want = f"[>= {rows_needed}]" if h.do_expand else f"[>= {rows_needed}, {k}]"
                raise _checks.fail("topk_weights", f"a float32 tensor of shape {want}", list(w.shape))
        t = layout.num_tokens
        biases = [] if bias is None else list(bias) if isinstance(bias, tuple) else [bias]
        if len(biases) > 2:
            raise _checks.fail("bias", "None, a tensor or a pair of tensors", f"{len(biases)} tensors")
        for i, term in enumerate(biases):
            _checks.shape(f"bias[{i}]", _checks.tensor(f"bias[{i}]", term, (torch.bfloat16,), 2), (t, hidden))

        data, weights, lane, tokens, dest = self._rows_back(xt, w, h, layout)
        payload = torch.cat(
            [
                rows_as_bytes(data),
                rows_as_bytes(weights),
                rows_as_bytes(torch.stack([tokens, lane], 1).to(torch.int32)),
            ],
            1,
        )
        back = torch.zeros(data.shape[0], self.num_ranks, dtype=torch.bool)
        back[torch.arange(data.shape[0]), dest] = True
        recv, *_, inner, _ = b.dispatch(payload, is_token_in_rank=back)
        assert isinstance(recv, torch.Tensor) and isinstance(inner, DispatchHandle)
        q = recv.shape[0]
        sender = tensor_of(inner.recv_src_rank().astype(np.int64))
        cols = torch.split(recv, [hidden * 2, k * 4, 8], 1) if q else None
        rows_in = cols[0].contiguous().view(torch.bfloat16) if cols else torch.empty(0, hidden, dtype=torch.bfloat16)
        w_in = cols[1].contiguous().view(torch.float32) if cols else torch.empty(0, k)
        meta = cols[2].contiguous().view(torch.int32).to(torch.int64) if cols else torch.empty(0, 2, dtype=torch.int64)
        tok, at = meta[:, 0], meta[:, 1]

        acc = torch.zeros(t, hidden, dtype=torch.float32)
        for term in biases:
            acc += term.float()
        # Lane by lane, in order: a lane holds at most one row per token.
        for j in range(k):
            sel = at == j
            acc.index_add_(0, tok[sel], rows_in[sel].float())
        combined = acc.bfloat16()
        combined_w = None
        if w is not None:
            combined_w = torch.zeros(t, k, dtype=torch.float32)
            owned = layout.owner[tok] == sender.unsqueeze(1)
            rr, jj = owned.nonzero(as_tuple=True)
            combined_w[tok[rr], jj] = w_in[rr, jj]
        return combined, combined_w, _event(async_with_compute_stream)

    def _rows_back(
        self, x: torch.Tensor, w: torch.Tensor | None, h: EPHandle, layout: _Layout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows this rank sends back: (data, weights per lane, lane, source token, source
        rank). Flat: each received row as it is. Expanded: a token's local slots summed in
        lane order (fp32, rounded once), or with `allow_multiple_reduction=False` each slot."""
        n, k = layout.slots.shape
        slots = layout.slots
        taken = slots >= 0
        zeros = torch.zeros(n, k, dtype=torch.float32)
        if not h.do_expand:
            weights = zeros if w is None else w[:n]
            return x[:n], weights, layout.master_lane, layout.src_idx, layout.src_rank
        if not self.allow_multiple_reduction:
            r, lanes = taken.nonzero(as_tuple=True)
            data = x[slots[r, lanes]]
            return data, torch.zeros(r.numel(), k), lanes, layout.src_idx[r], layout.src_rank[r]
        acc = torch.zeros(n, x.shape[1], dtype=torch.float32)
        for j in range(k):
            sel = taken[:, j]
            acc[sel] += x[slots[sel, j]].float()
        weights = zeros
        if w is not None:
            weights = torch.where(taken, w[slots.clamp(min=0)], zeros)
        return acc.bfloat16(), weights, layout.master_lane, layout.src_idx, layout.src_rank

    # ---- what dualcomm does not provide ----------------------------------------------------------

    def _unsupported(self, call: str) -> Any:
        raise NotImplementedError(f"ElasticBuffer.{call}: not provided by dualcomm (dispatch and combine are)")

    def engram_write(self, *args: Any, **kwargs: Any) -> None:
        self._unsupported("engram_write")

    def engram_fetch(self, *args: Any, **kwargs: Any) -> Any:
        return self._unsupported("engram_fetch")

    def pp_set_config(self, *args: Any, **kwargs: Any) -> None:
        self._unsupported("pp_set_config")

    def pp_send(self, *args: Any, **kwargs: Any) -> None:
        self._unsupported("pp_send")

    def pp_recv(self, *args: Any, **kwargs: Any) -> None:
        self._unsupported("pp_recv")

    def agrs_set_config(self, *args: Any, **kwargs: Any) -> None:
        self._unsupported("agrs_set_config")

    def all_gather(self, *args: Any, **kwargs: Any) -> Any:
        return self._unsupported("all_gather")


def _split_input(x: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(x, tuple):
        if len(x) != 2:
            raise _checks.fail("x", "a bfloat16 tensor or an (FP8 data, scales) pair", f"a tuple of {len(x)}")
        data = _checks.tensor("x[0]", x[0], (torch.float8_e4m3fn,), 2)
        sf = x[1]
        if not isinstance(sf, torch.Tensor) or sf.dim() != 2 or sf.dtype not in (torch.float32, torch.int32):
            raise _checks.fail("x[1]", "a 2-D float32 or int32 tensor of scales", _checks.describe(sf))
        _checks.rows("x[1]", sf, data.shape[0], "one row of scales per token")
        return data, sf.contiguous()
    data = _checks.tensor("x", x, (torch.bfloat16,), 2)
    if data.shape[1] * data.element_size() % 16:
        raise _checks.fail("x", "rows of a multiple of 16 bytes", data.shape[1] * data.element_size())
    return data, None


def _check_stream_args(previous_event: Any, allocate_on_comm_stream: bool) -> None:
    if previous_event is not None and not allocate_on_comm_stream:
        raise _checks.fail("allocate_on_comm_stream", "True with a previous_event (as DeepEP requires)", False)


def _event(async_with_compute_stream: bool) -> EventOverlap:
    """DeepEP's: an event only when asked for; the work is done either way here."""
    return EventOverlap(EventHandle() if async_with_compute_stream else None)


def _owners(idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """Each choice's rank (-1 for none), refusing experts out of range and repeats."""
    valid = idx >= 0
    if bool((idx[valid] >= num_experts).any()) or bool((idx < -1).any()):
        raise _checks.fail("topk_idx", f"expert ids in [0, {num_experts}) or -1", "ids out of range")
    if idx.shape[1] > 1:
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)) & valid.unsqueeze(2)
        if bool(torch.triu(same, diagonal=1).any()):
            raise _checks.fail("topk_idx", "no expert twice in one token's choices", "a repeated expert")
    local = num_experts // num_ranks
    return torch.where(valid, idx // local, torch.full_like(idx, -1))


def _sender_slots(in_rank: torch.Tensor, owner: torch.Tensor, rank: int, m: int) -> torch.Tensor:
    """DeepEP's `dst_buffer_slot_idx`: on the highest lane naming each destination rank,
    `rank * m +` the token's place among those this rank sends there; -1 elsewhere."""
    t, k = owner.shape
    valid = owner >= 0
    later = torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1)
    shadowed = ((owner.unsqueeze(2) == owner.unsqueeze(1)) & later & valid.unsqueeze(1)).any(2)
    master = valid & ~shadowed
    place = in_rank.to(torch.int64).cumsum(0) - 1
    at = place.gather(1, owner.clamp(min=0)) if t else torch.zeros(0, k, dtype=torch.int64)
    return torch.where(master, rank * m + at, torch.full_like(at, -1)).to(torch.int32)


def _rows_into(rows: torch.Tensor, total: int, col_major: bool = False, fill: int = 0) -> torch.Tensor:
    """`rows` as the first rows of a `total`-row tensor (the rest `fill`); with `col_major`,
    column-major with the row stride padded to 4 (DeepEP's TMA-aligned scales)."""
    n, width = rows.shape
    if col_major:
        out = torch.full((width, _align(total, 4)), fill, dtype=rows.dtype).t()[:total]
    else:
        out = torch.full((total, width), fill, dtype=rows.dtype)
    if rows.dtype.itemsize == 1 and rows.is_floating_point():
        out.view(torch.uint8)[:n] = rows.view(torch.uint8)  # FP8 has no fill or copy kernels everywhere
    else:
        out[:n] = rows
    return out


def _scatter_rows(
    rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, total: int, col_major: bool = False
) -> torch.Tensor:
    """A `total`-row zero tensor with `rows[src[i]]` at row `dst[i]`."""
    out = _rows_into(rows[:0], total, col_major)
    if rows.dtype.itemsize == 1 and rows.is_floating_point():
        out.view(torch.uint8)[dst] = rows.view(torch.uint8)[src]
    else:
        out[dst] = rows[src]
    return out
