"""DeepEP's low-latency mode: `low_latency_dispatch` / `low_latency_combine` for decoding.

A low-latency buffer holds a second endpoint whose topology is one rank per node: every rank
is linked to every other (DeepEP's low-latency kernels reach all ranks over RDMA too), so a
dispatch sends each token straight to the ranks of its experts, with no forwarding hop and
no node deduplication, over whatever transport the job has. Received tokens are laid out per
local expert, `[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]`,
in a fixed order: by source rank, then source token index (DeepEP's order depends on
arrival; the layout ranges and source indices it returns describe either).

The combine weights each expert output by its token's top-k weight and sums per token (see
the Rust core's `low_latency` module for its three deterministic steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dualcomm import _checks
from dualcomm._arrays import tensor_of
from dualcomm._native import Endpoint, Handle, InternalError
from dualcomm.config import AUTO_RING_BYTES, RECORD_HEADER_BYTES, _record_bytes_bound
from dualcomm.event import EventOverlap
from dualcomm.fp8 import pack_ue8m0, per_token_cast_to_fp8
from dualcomm.handle import OpaqueTuple
from dualcomm.profiling import traced_hook

_INT_MASK = (1 << 32) - 1


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """`num_rdma_bytes` for a low-latency buffer: a ring per peer holding
    `num_max_dispatch_tokens_per_rank` records of the largest kind that travels (bf16 tokens
    with top-k and FP8 scales, or the combine's fp32 partial rows)."""
    for name, v in (
        ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
        ("hidden", hidden),
        ("num_ranks", num_ranks),
        ("num_experts", num_experts),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _checks.fail(name, "a positive int", repr(v))
    record = max(_record_bytes_bound(hidden * 2), RECORD_HEADER_BYTES + hidden * 4)
    per_ring = max(num_max_dispatch_tokens_per_rank * record, AUTO_RING_BYTES // 4)
    return (num_ranks * per_ring + 127) // 128 * 128


class LowLatencyHandle(OpaqueTuple):
    """DeepEP's low-latency handle: `(src_info, layout_range, num_max_dispatch_tokens_per_rank,
    hidden, num_experts)`. `src_info[e][j]` is the source token index of expert `e`'s row `j`;
    `layout_range[e][s]` is `(first row << 32) | rows` of source rank `s`'s tokens for `e`."""

    native: Handle
    buffer_id: int
    num_tokens: int
    num_topk: int
    #: `[num_recv, num_topk]`: each received token's choice `k` as a row of the flattened
    #: per-expert layout, or -1; set once the dispatch's data is in.
    slots: torch.Tensor | None
    complete: Callable[[], None]

    def __new__(
        cls, src_info: torch.Tensor, layout_range: torch.Tensor, m: int, hidden: int, e: int
    ) -> LowLatencyHandle:
        return super().__new__(cls, (src_info, layout_range, m, hidden, e))


class LowLatency:
    """The low-latency half of a `Buffer` (see the module)."""

    def __init__(self, ep: Endpoint, rank: int, num_ranks: int) -> None:
        self._ep = ep
        self.rank = rank
        self.num_ranks = num_ranks
        # DeepEP double-buffers: the next combine reads from the one not used last.
        self._combine_buffers: list[torch.Tensor | None] = [None, None]
        #: A GPU caller's buffer of each slot (staged: copied into the host one at combine).
        self._combine_twins: list[torch.Tensor | None] = [None, None]
        self._next_combine = 0

    def _check_handle(self, handle: object) -> LowLatencyHandle:
        if not isinstance(handle, LowLatencyHandle):
            raise _checks.fail("handle", "a handle returned by low_latency_dispatch", _checks.describe(handle))
        if handle.buffer_id != self._ep.id:
            raise _checks.fail("handle", "a handle made by this buffer", "a handle from another buffer")
        return handle

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        async_finish: bool,
        return_recv_hook: bool,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandle, EventOverlap, Callable[[], None] | None]:
        w, m = self.num_ranks, num_max_dispatch_tokens_per_rank
        # A failed check here means this rank will not run the dispatch: its peers hear so.
        with _checks.rejecting(self._ep, "dispatch"):
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise _checks.fail("num_max_dispatch_tokens_per_rank", "a positive int", repr(m))
            if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1 or num_experts % w:
                raise _checks.fail("num_experts", f"a positive multiple of the world size {w}", repr(num_experts))
            xt = _checks.tensor("x", x, (torch.bfloat16,), 2)
            t, hidden = xt.shape
            if t > m:
                raise _checks.fail("x", f"at most num_max_dispatch_tokens_per_rank={m} tokens", t)
            idx = _checks.tensor("topk_idx", topk_idx, (torch.int64,), 2)
            _checks.rows("topk_idx", idx, t, "one per token of x")
            k = idx.shape[1]
            local = num_experts // w
            if cumulative_local_expert_recv_stats is not None:
                stats = cumulative_local_expert_recv_stats
                if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int32 or list(stats.shape) != [local]:
                    raise _checks.fail(
                        "cumulative_local_expert_recv_stats",
                        f"an int32 tensor of shape [{local}]",
                        _checks.describe(stats),
                    )
            wait_stats = self._wait_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats)
            if use_ue8m0 and not round_scale:
                raise _checks.fail("use_ue8m0", "False unless round_scale=True", True)
            if async_finish and return_recv_hook:
                raise _checks.fail("async_finish", "False with return_recv_hook=True (the hook completes it)", True)
            if use_fp8 and hidden % (512 if use_ue8m0 else 128):
                raise _checks.fail(
                    "x", f"a hidden size divisible by {512 if use_ue8m0 else 128} for this FP8 cast", hidden
                )
            if use_fp8:
                data, scales = per_token_cast_to_fp8(xt, round_scale=round_scale)
            else:
                data, scales = xt, None
            per_rank, _, per_expert, in_rank = self._ep.layout(idx.numpy(), num_experts)
            in_rank = in_rank.reshape(t, w)
        elem = data.element_size()
        zeros = np.zeros((t, k), dtype=np.float32)
        recv, recv_scales, recv_idx, _, counts, native, native_event = self._ep.dispatch(
            data.view(torch.uint8).reshape(t, hidden * elem).numpy(),
            str(data.dtype).removeprefix("torch."),
            hidden,
            None if scales is None else scales.view(torch.uint8).reshape(t, scales.shape[1] * 4).numpy(),
            in_rank,
            None,
            idx.numpy(),
            zeros,
            num_experts,
            1,
            per_expert.astype(np.int64),
            0,
        )
        assert counts is not None and len(counts) == local
        recv_count = torch.tensor(counts, dtype=torch.int32)
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += recv_count
        cap = w * m
        # Rows past an expert's count hold no token (DeepEP leaves them as they are, too).
        packed_x = torch.empty(local, cap, hidden, dtype=data.dtype)
        packed_scales: torch.Tensor | None = None
        if use_fp8:
            # Column-major in the last two dimensions, as DeepEP returns them (for TMA).
            cols, sdtype = (hidden // 512, torch.int32) if use_ue8m0 else (hidden // 128, torch.float32)
            packed_scales = torch.empty(local, cols, cap, dtype=sdtype).transpose(1, 2)
        src_info = torch.full((local, cap), -1, dtype=torch.int32)
        layout_range = torch.zeros(local, w, dtype=torch.int64)
        handle = LowLatencyHandle(src_info, layout_range, m, hidden, num_experts)
        handle.native, handle.buffer_id, handle.num_tokens, handle.num_topk = native, self._ep.id, t, k
        handle.slots = None

        def lay_out(_: object) -> None:
            """Once the tokens are in: each local expert's rows, by source rank then index
            (the receive order), all experts in one pass."""
            _add_waits(wait_stats, native_event)
            n = native.num_recv_tokens
            rx = tensor_of(recv).view(data.dtype).reshape(n, hidden)
            assert recv_idx is not None  # a low-latency dispatch always carries top-k
            ridx = tensor_of(recv_idx).reshape(n, k)
            src_rank = tensor_of(native.recv_src_rank().astype(np.int64))
            src_idx = tensor_of(native.recv_src_idx().astype(np.int64))
            # Every (received token, choice) of a local expert, sorted by (expert, token).
            rows = torch.arange(n).repeat_interleave(k)
            experts = ridx.flatten()
            # A token that names one expert twice lands in its rows once.
            first = torch.ones_like(experts, dtype=torch.bool)
            if k > 1:
                earlier = ridx.unsqueeze(2) == ridx.unsqueeze(1)
                first = ~torch.tril(earlier, diagonal=-1).any(2).flatten()
            take = (experts >= 0) & first
            key = experts[take] * n + rows[take]
            order = torch.sort(key, stable=True).values
            e_sorted, r_sorted = order // max(n, 1), order % max(n, 1)
            per_expert = torch.bincount(e_sorted, minlength=local)
            got = per_expert.tolist()
            if got != counts:
                raise InternalError(f"per-expert arrivals {got} differ from the announced {counts}")
            if got and max(got) > cap:
                raise _checks.fail(
                    "num_max_dispatch_tokens_per_rank",
                    f"the same value on every rank (an expert received {max(got)} tokens, more than {w} x {m})",
                    m,
                )
            starts = per_expert.cumsum(0) - per_expert
            position = torch.arange(e_sorted.numel()) - starts[e_sorted]
            flat_slot = e_sorted * cap + position
            # As raw bytes: index_copy_ has no FP8 kernel, and the rows only move.
            dst = packed_x.view(local * cap, hidden).view(torch.uint8)
            dst.index_copy_(0, flat_slot, rx.view(torch.uint8).index_select(0, r_sorted))
            if packed_scales is not None and recv_scales is not None:
                rs = tensor_of(recv_scales).view(torch.float32).reshape(n, hidden // 128)[r_sorted]
                packed = pack_ue8m0(rs) if use_ue8m0 else rs
                packed_scales[e_sorted, position] = packed
            src_info.view(-1)[flat_slot] = src_idx[r_sorted].to(torch.int32)
            pairs = torch.bincount(e_sorted * w + src_rank[r_sorted], minlength=local * w).view(local, w)
            layout_range.copy_(((pairs.cumsum(1) - pairs) << 32) | pairs)
            # Each choice's slot; a repeated expert of a token maps to its one row.
            slot_of = torch.full((local, max(n, 1)), -1, dtype=torch.int64)
            slot_of[e_sorted, r_sorted] = flat_slot
            slots = torch.full((n, k), -1, dtype=torch.int64)
            valid = ridx >= 0
            rr = torch.arange(n).unsqueeze(1).expand(n, k)
            slots[valid] = slot_of[ridx[valid], rr[valid]]
            handle.slots = slots

        waiter = EventOverlap(native_event, extra_tensors=(xt, idx, packed_x), on_done=lay_out)
        handle.complete = waiter.current_stream_wait
        event, hook = _as_deep_ep_returns(waiter, "dispatch", async_finish, return_recv_hook)
        recv_x: Any = (packed_x, packed_scales) if use_fp8 else packed_x
        return recv_x, recv_count, handle, event, hook

    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: object,
        zero_copy: bool,
        async_finish: bool,
        return_recv_hook: bool,
        out: torch.Tensor | None,
        combine_wait_recv_cost_stats: torch.Tensor | None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        # Its first step is a cached dispatch (of the weights): peers hear of a failed check there.
        with _checks.rejecting(self._ep, "cached dispatch"):
            if async_finish and return_recv_hook:
                raise _checks.fail("async_finish", "False with return_recv_hook=True (the hook completes it)", True)
            h = self._check_handle(handle)
            _, _, m, hidden, num_experts = h
            local, cap = num_experts // self.num_ranks, self.num_ranks * m
            wait_stats = self._wait_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats)
            if zero_copy:
                src = self._combine_buffers[self._next_combine]
                if src is None:
                    raise _checks.fail(
                        "zero_copy", "False unless get_next_low_latency_combine_buffer() was filled first", True
                    )
                twin = self._combine_twins[self._next_combine]
                if twin is not None:
                    src.copy_(twin)
            else:
                src = _checks.tensor("x", x, (torch.bfloat16,), 3)
            _checks.shape("x", src, (local, cap, hidden))
            idx = _checks.tensor("topk_idx", topk_idx, (torch.int64,), 2)
            _checks.shape("topk_idx", idx, (h.num_tokens, h.num_topk))
            w = _checks.tensor("topk_weights", topk_weights, (torch.float32,), 2)
            _checks.shape("topk_weights", w, (h.num_tokens, h.num_topk))
            if out is not None:
                out = _checks_out(out, h.num_tokens, hidden)
            if h.slots is None:
                h.complete()  # the caller's experts ran on data it had not waited for: wait now
            assert h.slots is not None
        # A choice masked out now (-1) contributes nothing, whatever its expert returned.
        w = torch.where(idx >= 0, w, torch.zeros_like(w))
        flat = src.contiguous().view(torch.uint8).reshape(local * cap, hidden * 2)
        raw, native_event = self._ep.low_latency_combine(
            flat.numpy(), "bfloat16", h.native, h.slots.numpy(), w.numpy(), "bfloat16"
        )
        self._next_combine ^= 1
        result = tensor_of(raw).view(torch.bfloat16).reshape(h.num_tokens, hidden)
        combined = result if out is None else out

        def on_done(_: object) -> None:
            _add_waits(wait_stats, native_event)
            if out is not None:
                out.copy_(result)

        waiter = EventOverlap(native_event, extra_tensors=(src, idx, w, combined), on_done=on_done)
        event, hook = _as_deep_ep_returns(waiter, "combine", async_finish, return_recv_hook)
        return combined, event, hook

    def _wait_stats(self, name: str, stats: object) -> torch.Tensor | None:
        """DeepEP's `*_wait_recv_cost_stats`: int64 `[num_ranks]`, added to per source rank."""
        if stats is None:
            return None
        w = self.num_ranks
        if (
            not isinstance(stats, torch.Tensor)
            or stats.dtype != torch.int64
            or list(stats.shape) != [w]
            or not stats.is_contiguous()
        ):
            raise _checks.fail(name, f"a contiguous int64 tensor of shape [{w}]", _checks.describe(stats))
        return stats

    # ---- shrink mode -------------------------------------------------------------------------

    def enable_shrink(self) -> None:
        self._ep.enable_shrink()

    def _shrink(self, call: str) -> None:
        if not self._ep.shrink:
            raise _checks.fail("enable_shrink", f"True at construction to call {call}", False)

    def update_mask(self, rank_to_mask: int, mask: bool) -> None:
        self._shrink("low_latency_update_mask_buffer")
        if isinstance(rank_to_mask, bool) or not isinstance(rank_to_mask, int):
            raise _checks.fail("rank_to_mask", f"an int rank in [0, {self.num_ranks})", _checks.describe(rank_to_mask))
        self._ep.set_masked(rank_to_mask, bool(mask))

    def query_mask(self, mask_status: torch.Tensor) -> None:
        self._shrink("low_latency_query_mask_buffer")
        w = self.num_ranks
        if not isinstance(mask_status, torch.Tensor) or mask_status.dtype != torch.int32 or mask_status.numel() != w:
            raise _checks.fail("mask_status", f"an int32 tensor of {w} elements", _checks.describe(mask_status))
        flags = torch.tensor(self._ep.masked_ranks(), dtype=torch.int32)
        mask_status.copy_(flags.view(mask_status.shape))

    def clean_mask(self) -> None:
        self._shrink("low_latency_clean_mask_buffer")
        self._ep.clear_mask()

    def barrier(self) -> None:
        """An operation with no tokens: returns once every rank not masked has reached it,
        masking (in shrink mode) those that do not in time."""
        w = self.num_ranks
        *_, event = self._ep.dispatch(
            np.zeros((0, 1), dtype=np.uint8),
            "uint8",
            1,
            None,
            np.zeros((0, w), dtype=np.bool_),
            None,
            None,
            None,
            w,
            1,
        )
        EventOverlap(event).current_stream_wait()

    def next_combine_buffer(self, handle: object, device: torch.device | None = None) -> torch.Tensor:
        """The `[local experts, ranks x max tokens, hidden]` bf16 tensor the next
        `zero_copy=True` combine reads, for the caller to fill: on `device` if given (a GPU
        caller's; the combine copies it to the host one it reads)."""
        h = self._check_handle(handle)
        _, _, m, hidden, num_experts = h
        shape = (num_experts // self.num_ranks, self.num_ranks * m, hidden)
        slot = self._next_combine
        buf = self._combine_buffers[slot]
        if buf is None or tuple(buf.shape) != shape:
            buf = torch.zeros(shape, dtype=torch.bfloat16)
            self._combine_buffers[slot] = buf
        if device is None:
            self._combine_twins[slot] = None
            return buf
        twin = self._combine_twins[slot]
        if twin is None or tuple(twin.shape) != shape or twin.device != device:
            twin = torch.zeros(shape, dtype=torch.bfloat16, device=device)
            self._combine_twins[slot] = twin
        return twin


def _as_deep_ep_returns(
    waiter: EventOverlap, operation: str, async_finish: bool, return_recv_hook: bool
) -> tuple[EventOverlap, Callable[[], None] | None]:
    """The (event, hook) DeepEP returns for the operation `waiter` waits on: with a receive
    hook, no event (its `event` is None) and the hook, which completes the receive; with
    `async_finish`, the event; else, once the operation is done, a spent event."""
    if return_recv_hook:
        return EventOverlap(), traced_hook(f"low_latency::{operation}", waiter.current_stream_wait)
    if not async_finish:
        waiter.retire()
    return waiter, None


def _add_waits(stats: torch.Tensor | None, event: Any) -> None:
    """Adds the nanoseconds the operation waited for each rank to start it (until its
    metadata came; data moves only after everyone's) to `stats`, per rank. DeepEP counts
    GPU cycles spent waiting for each rank's tokens: the same slow rank stands out."""
    if stats is not None:
        stats += torch.tensor(event.wait_ns(), dtype=torch.int64).to(stats.device)


def _checks_out(out: object, t: int, hidden: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bfloat16 or list(out.shape) != [t, hidden]:
        raise _checks.fail("out", f"a bfloat16 tensor of shape [{t}, {hidden}]", _checks.describe(out))
    if out.device.type != "cpu":
        raise _checks.fail("out", "a CPU tensor", f"a tensor on {out.device}")
    return out
