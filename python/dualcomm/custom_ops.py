"""Dispatch and combine as `torch.library` custom ops, so `torch.compile` traces a model that
calls them without graph breaks (as pplx-kernels ships its all-to-all), and autograd works
through them: dispatch's backward is a combine of the gradients (top-k weights' included),
combine's backward is a cached dispatch.

Custom ops take tensors and plain numbers only, so the buffer and the dispatch handle travel
as numbers: a buffer by the id `op_buffer_id(buffer)` gives it, a handle as a 0-d int64
tensor that dispatch returns and combine takes. The fake implementations give the receive
side an unbacked (data-dependent) row count, as the number of tokens a rank receives is.

Handles stay resolvable while they are among the `DUALCOMM_MAX_LIVE_HANDLES` (1024) most
recent of the process: enough for every micro-batch a pipeline schedule keeps in flight; an
older one raises `InvalidArgumentError` naming it, never a wrong result.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

from dualcomm import _checks
from dualcomm.buffer import AnyHandle, Buffer

_lock = threading.Lock()
_buffers: weakref.WeakValueDictionary[int, Buffer] = weakref.WeakValueDictionary()
_buffer_ids: weakref.WeakKeyDictionary[Buffer, int] = weakref.WeakKeyDictionary()
_handles: OrderedDict[int, tuple[int, AnyHandle]] = OrderedDict()
_next_id = itertools.count(1)


def _max_live_handles() -> int:
    raw = os.environ.get("DUALCOMM_MAX_LIVE_HANDLES", "1024")
    try:
        value = int(raw)
    except ValueError:
        raise _checks.fail("DUALCOMM_MAX_LIVE_HANDLES", "a positive integer", repr(raw)) from None
    if value < 1:
        raise _checks.fail("DUALCOMM_MAX_LIVE_HANDLES", "a positive integer", value)
    return value


def op_buffer_id(buffer: Buffer) -> int:
    """The number that names `buffer` in the custom ops (the same one every time)."""
    if not isinstance(buffer, Buffer):
        raise _checks.fail("buffer", "a dualcomm.Buffer", _checks.describe(buffer))
    with _lock:
        bid = _buffer_ids.get(buffer)
        if bid is None:
            bid = next(_next_id)
            _buffer_ids[buffer] = bid
            _buffers[bid] = buffer
        return bid


def _buffer(buffer_id: int) -> Buffer:
    buf = _buffers.get(buffer_id)
    if buf is None:
        raise _checks.fail("buffer_id", "the id of a live Buffer (from op_buffer_id)", buffer_id)
    return buf


def _keep(buffer_id: int, handle: AnyHandle) -> torch.Tensor:
    with _lock:
        hid = next(_next_id)
        _handles[hid] = (buffer_id, handle)
        while len(_handles) > _max_live_handles():
            _handles.popitem(last=False)
    return torch.tensor(hid, dtype=torch.int64)


def _resolve(handle_id: torch.Tensor) -> tuple[Buffer, AnyHandle]:
    hid = int(handle_id.item())
    with _lock:
        entry = _handles.get(hid)
        if entry is not None:
            _handles.move_to_end(hid)
    if entry is None:
        raise _checks.fail(
            "handle_id",
            f"the id of one of the {_max_live_handles()} most recent dispatches (DUALCOMM_MAX_LIVE_HANDLES)",
            hid,
        )
    return _buffer(entry[0]), entry[1]


# ---- the ops -------------------------------------------------------------------------------


@torch.library.custom_op("dualcomm::dispatch", mutates_args=())
def _dispatch(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, buffer_id: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from dualcomm.ops import dispatch_with_layout

    buf = _buffer(buffer_id)
    recv_x, recv_idx, recv_w, _, handle, _ = dispatch_with_layout(
        buf, x.contiguous(), topk_idx.contiguous(), topk_weights.contiguous(), num_experts
    )
    assert isinstance(recv_x, torch.Tensor) and recv_idx is not None and recv_w is not None
    return recv_x, recv_idx, recv_w, _keep(buffer_id, handle)


@_dispatch.register_fake
def _(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, buffer_id: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = torch.library.get_ctx().new_dynamic_size()
    k = topk_idx.shape[1]
    return (
        x.new_empty(n, x.shape[1]),
        topk_idx.new_empty(n, k),
        topk_weights.new_empty(n, k),
        torch.empty((), dtype=torch.int64),
    )


@torch.library.custom_op("dualcomm::combine", mutates_args=())
def _combine(y: torch.Tensor, handle_id: torch.Tensor, num_tokens: int) -> torch.Tensor:
    buf, handle = _resolve(handle_id)
    out, _, _ = buf.combine(y.contiguous(), handle)
    return out


@_combine.register_fake
def _(y: torch.Tensor, handle_id: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return y.new_empty(num_tokens, y.shape[1])


@torch.library.custom_op("dualcomm::combine_with_weights", mutates_args=())
def _combine_with_weights(
    y: torch.Tensor, weights: torch.Tensor, handle_id: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    buf, handle = _resolve(handle_id)
    out, out_w, _ = buf.combine(y.contiguous(), handle, topk_weights=weights.contiguous())
    assert out_w is not None
    return out, out_w


@_combine_with_weights.register_fake
def _(
    y: torch.Tensor, weights: torch.Tensor, handle_id: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return y.new_empty(num_tokens, y.shape[1]), weights.new_empty(num_tokens, weights.shape[1])


@torch.library.custom_op("dualcomm::cached_dispatch", mutates_args=())
def _cached_dispatch(x: torch.Tensor, handle_id: torch.Tensor, num_recv: int) -> torch.Tensor:
    buf, handle = _resolve(handle_id)
    recv, *_ = buf.dispatch(x.contiguous(), handle=handle)
    assert isinstance(recv, torch.Tensor)
    return recv


@_cached_dispatch.register_fake
def _(x: torch.Tensor, handle_id: torch.Tensor, num_recv: int) -> torch.Tensor:
    return x.new_empty(num_recv, x.shape[1])


# ---- autograd ------------------------------------------------------------------------------


def _dispatch_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x = inputs[0]
    _, recv_idx, _, handle_id = output
    ctx.save_for_backward(recv_idx, handle_id)
    ctx.num_tokens = x.shape[0]


def _dispatch_backward(ctx: Any, grad_x: torch.Tensor, _gi: Any, grad_w: torch.Tensor, _gh: Any) -> tuple[Any, ...]:
    recv_idx, handle_id = ctx.saved_tensors
    # Only this rank's experts' weights came from the source; the zeros elsewhere pass nothing.
    grad_w = torch.where(recv_idx >= 0, grad_w, torch.zeros_like(grad_w)).float()
    gx, gw = _combine_with_weights(grad_x, grad_w, handle_id, ctx.num_tokens)
    return gx, None, gw, None, None


def _combine_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    y, handle_id, _ = inputs
    ctx.save_for_backward(handle_id)
    ctx.num_recv = y.shape[0]


def _combine_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (handle_id,) = ctx.saved_tensors
    return _cached_dispatch(grad, handle_id, ctx.num_recv), None, None


_dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)
_combine.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---- what callers use ----------------------------------------------------------------------


def dispatch(
    buffer_id: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`get_dispatch_layout` + `dispatch` as one traceable op on the buffer `buffer_id` names
    (take it with `op_buffer_id` outside the compiled code, e.g. when the module is built):
    `(recv_x, recv_topk_idx, recv_topk_weights, handle_id)`; differentiable in `x` and
    `topk_weights`."""
    return torch.ops.dualcomm.dispatch(x, topk_idx, topk_weights, buffer_id, num_experts)  # type: ignore[no-any-return]


def combine(y: torch.Tensor, handle_id: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sums the rows of `y` back to their `num_tokens` source tokens; differentiable in `y`."""
    return torch.ops.dualcomm.combine(y, handle_id, num_tokens)  # type: ignore[no-any-return]
