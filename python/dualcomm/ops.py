"""Autograd-aware dispatch and combine.

The backward of dispatch is a combine of the gradients (a token's gradient is the sum of
the gradients of its copies); the backward of combine is a cached dispatch (every copy of
a token receives the gradient of the sum). Every rank must run backward in the same order,
as with any collective.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from dualcomm._native import Handle
from dualcomm.buffer import Buffer


class DispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert_list: list[int]
    handle: Handle


class _HandleBox:
    """Carries the handle out of `forward` (autograd outputs must be tensors)."""

    handle: Handle | None = None
    per_expert: list[int] | None = None


def dispatch_with_layout(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    expert_alignment: int = 1,
    async_finish: bool = False,
) -> tuple[Any, ...]:
    """`get_dispatch_layout` then `dispatch`, as DeepEP users write them; returns dispatch's tuple."""
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    return buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        expert_alignment=expert_alignment,
        async_finish=async_finish,
    )


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        buffer: Buffer,
        topk_idx: torch.Tensor,
        num_experts: int,
        expert_alignment: int,
        box: _HandleBox,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recv_x, recv_idx, recv_w, counts, handle, _ = dispatch_with_layout(
            buffer, x, topk_idx, topk_weights, num_experts, expert_alignment
        )
        assert isinstance(recv_x, torch.Tensor) and recv_idx is not None and recv_w is not None
        box.handle, box.per_expert = handle, counts
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx: Any, grad_x: torch.Tensor, _grad_idx: Any, grad_w: torch.Tensor) -> Any:
        (recv_idx,) = ctx.saved_tensors
        # Only a rank's own experts' weights came from the source; the zeros elsewhere are
        # constants and pass no gradient.
        grad_w = torch.where(recv_idx >= 0, grad_w, torch.zeros_like(grad_w)).float()
        gx, gw, _ = ctx.buffer.combine(grad_x.contiguous(), ctx.handle, topk_weights=grad_w)
        return gx, gw, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, buffer: Buffer, handle: Handle) -> torch.Tensor:  # type: ignore[override]
        ctx.buffer, ctx.handle = buffer, handle
        out, _, _ = buffer.combine(x, handle)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        recv, *_ = ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle)
        return recv, None, None


def dispatch(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    expert_alignment: int = 1,
) -> DispatchResult:
    """Differentiable dispatch: gradients flow to `x` and `topk_weights`."""
    box = _HandleBox()
    recv_x, recv_idx, recv_w = _Dispatch.apply(x, topk_weights, buffer, topk_idx, num_experts, expert_alignment, box)
    assert box.handle is not None and box.per_expert is not None
    return DispatchResult(recv_x, recv_idx, recv_w, box.per_expert, box.handle)


def combine(buffer: Buffer, x: torch.Tensor, handle: Handle) -> torch.Tensor:
    """Differentiable combine: the gradient reaches every received row."""
    out: torch.Tensor = _Combine.apply(x, buffer, handle)
    return out
