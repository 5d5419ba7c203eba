"""Pieces the schedules share with user code: deferred weight gradients, backward from
given output gradients, and micro-batch splitting."""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


class WeightGradStore:
    """Weight-gradient closures put aside during a backward chunk and run later (zero bubble).

    A layer whose backward can split input and weight gradients checks `enabled`; when it is
    set it `put`s the weight part instead of running it. The schedule `flush`es after each
    backward chunk (one queue entry per chunk) and `pop`s entries, first in first out, when it
    has a gap to fill.
    """

    enabled: bool = False
    cache: list[Callable[[], None]] = []
    funcs_queue: queue.Queue[list[Callable[[], None]]] = queue.Queue()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        cls.funcs_queue.put(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        if cls.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop: no weight-gradient chunk is queued")
        for func in cls.funcs_queue.get():
            func()

    @classmethod
    def clear(cls) -> None:
        cls.enabled = False
        cls.cache = []
        cls.funcs_queue = queue.Queue()


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor | None]) -> None:
    """Backward from `tensors` with the given gradients, accumulating into leaves' `.grad`.

    Unlike `torch.autograd.backward` it accepts outputs that some gradient does not reach.
    """
    torch.autograd.backward(list(tensors), grad_tensors=list(grad_tensors))


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _DeferredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        # The parameters themselves (not saved copies): their .grad is written by the closure.
        ctx.weight, ctx.bias = weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias

        def weight_grads() -> None:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            _accumulate(weight, g2.t() @ x.reshape(-1, x.shape[-1]))
            if bias is not None:
                _accumulate(bias, g2.sum(0))

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grads)
        else:
            weight_grads()
        return grad_out @ weight, None, None


class Linear(torch.nn.Linear):
    """`nn.Linear` whose weight gradient can be deferred through `WeightGradStore`.

    The weight (and bias) gradients are written to `.grad` by the layer itself, so the
    schedule can run them in a later gap; the input gradient flows back at once.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        out: torch.Tensor = _DeferredLinear.apply(x, self.weight, self.bias)
        return out


def chunk_tensor(x: torch.Tensor | None, chunks: int, dim: int) -> list[torch.Tensor | None]:
    if x is None:
        return [None] * chunks
    if x.shape[dim] % chunks != 0:
        raise ValueError(
            f"inputs: dimension {dim} (batch_dim) must split into {chunks} equal micro-batches; got size {x.shape[dim]}"
        )
    return list(x.tensor_split(chunks, dim))


def scatter(inputs: Any, chunks: int, dim: int) -> list[list[torch.Tensor | None]]:
    """Splits each input along `dim` into `chunks` micro-batches: one list of inputs per micro-batch."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    for i, x in enumerate(inputs):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs[{i}]: expected a torch.Tensor or None, got {type(x).__name__}")
    split = [chunk_tensor(x, chunks, dim) for x in inputs]
    if not split:
        return [[] for _ in range(chunks)]
    return [list(mb) for mb in zip(*split)]


def gather(micro_outputs: list[list[torch.Tensor]], dim: int) -> list[torch.Tensor]:
    """Concatenates per-micro-batch outputs back into whole-batch outputs."""
    return [torch.cat(parts, dim) for parts in zip(*micro_outputs)]
