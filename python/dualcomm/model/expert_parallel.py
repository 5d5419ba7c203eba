"""The four all-to-alls of an MoE layer on the expert-parallel group, started asynchronously
on the buffer's progress engine: dispatch and combine for the forward, and their
gradients for the backward (combine's backward is a cached dispatch, dispatch's backward
a combine). Each returns a `Pending`; `wait()` gives the result and records, on the
timeline, when the engine moved the data and how long Python sat blocked on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

from dualcomm.buffer import Buffer
from dualcomm.dualpipe.timeline import TIMELINE, WAIT
from dualcomm.event import EventOverlap
from dualcomm.ops import dispatch_with_layout

T = TypeVar("T")


class Pending(Generic[T]):
    def __init__(self, kind: str, label: str, event: EventOverlap | None, started: float, finish: Callable[[], T]):
        self.kind, self.label = kind, label
        self._event, self._finish = event, finish
        if event is not None:
            # Starting it blocked Python from `started` until now (a dispatch waits for the counts).
            TIMELINE.add(WAIT, kind, started, time.time())

    def wait(self) -> T:
        if self._event is not None:
            with TIMELINE.span(WAIT, self.kind):
                self._event.current_stream_wait()
            stamps = self._event.timestamps()
            if stamps is not None:
                TIMELINE.add(self.kind, self.label, *stamps)
        return self._finish()


class ExpertParallel:
    """Routes a layer's tokens to the ranks that own their experts. Rank r of W owns experts
    `[r*E/W, (r+1)*E/W)`. Without a buffer (one expert-parallel rank) every step is local."""

    def __init__(self, buffer: Buffer | None, num_experts: int) -> None:
        self.buffer = buffer
        self.num_experts = num_experts
        size = 1 if buffer is None else buffer.group_size
        rank = 0 if buffer is None else buffer.rank
        if num_experts % size:
            raise ValueError(
                f"num_experts: expected a multiple of the expert-parallel size ({size}), got {num_experts}"
            )
        self.local_experts = num_experts // size
        self.first_expert = rank * self.local_experts

    def dispatch(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, label: str = "") -> Pending[Any]:
        """-> (recv_x, recv_local_idx, recv_w, handle)."""
        if self.buffer is None:
            return Pending("dispatch", label, None, 0.0, lambda: (x, idx, w, None))
        start = time.time()
        recv_x, recv_idx, recv_w, _, handle, event = dispatch_with_layout(
            self.buffer, x, idx, w, self.num_experts, async_finish=True
        )
        # The call itself blocks until every rank's counts are in.
        return Pending("dispatch", label, event, start, lambda: (recv_x, recv_idx, recv_w, handle))

    def combine(self, y: torch.Tensor, handle: Any, label: str = "") -> Pending[torch.Tensor]:
        if self.buffer is None:
            return Pending("combine", label, None, 0.0, lambda: y)
        start = time.time()
        out, _, event = self.buffer.combine(y, handle, async_finish=True)
        return Pending("combine", label, event, start, lambda: out)

    def combine_backward(self, grad: torch.Tensor, handle: Any, label: str = "") -> Pending[torch.Tensor]:
        """The gradient of every received row: the gradient of the sum it went into."""
        if self.buffer is None:
            return Pending("dispatch", label, None, 0.0, lambda: grad)
        start = time.time()
        recv, _, _, _, _, event = self.buffer.dispatch(grad, handle=handle, async_finish=True)
        assert isinstance(recv, torch.Tensor)
        return Pending("dispatch", label, event, start, lambda: recv)

    def dispatch_backward(
        self, grad_x: torch.Tensor, grad_w: torch.Tensor, recv_idx: torch.Tensor, handle: Any, label: str = ""
    ) -> Pending[tuple[torch.Tensor, torch.Tensor]]:
        """Gradients of the tokens and their top-k weights: the sum over the copies."""
        # A rank only holds (and differentiates) weights of its own experts; the other slots
        # were constants here.
        grad_w = torch.where(recv_idx >= 0, grad_w, torch.zeros_like(grad_w))
        if self.buffer is None:
            return Pending("combine", label, None, 0.0, lambda: (grad_x, grad_w))
        start = time.time()
        gx, gw, event = self.buffer.combine(
            grad_x.contiguous(), handle, topk_weights=grad_w.contiguous(), async_finish=True
        )
        assert gw is not None
        return Pending("combine", label, event, start, lambda: (gx, gw))
