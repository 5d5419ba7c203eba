"""Tensors on a GPU (or any device but the CPU) through the CPU data path, staged.

Until the GPU data path drives its kernels from the Rust core, a `Buffer` call given CUDA
tensors copies them to host memory (after `previous_event`, on the current stream), runs the
CPU protocol on them, and copies the results back to the tensors' device. The results are
the CPU path's, bit for bit; the bytes cross PCIe twice, so this is correctness for code
written against DeepEP on a GPU machine, not its speed.

With `async_finish=True` the device results are allocated when the call returns and filled
when the event is waited on (`current_stream_wait`, `with event:`), on the current stream,
which is when DeepEP's callers may read them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from dualcomm._arrays import on_host
from dualcomm.event import EventHandle, EventOverlap
from dualcomm.handle import OpaqueTuple

F = TypeVar("F", bound=Callable[..., Any])


def device_of(values: Any) -> torch.device | None:
    """The first non-CPU device among the tensors in `values` (nested in tuples, lists, dicts)."""
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            if v.device.type != "cpu":
                return v.device
        elif isinstance(v, (tuple, list)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return None


def _to_host(v: Any, copies: list[tuple[torch.Tensor, torch.Tensor, int]]) -> Any:
    """Host copies of the device tensors in `v`; each (copy, original, version) goes to
    `copies`, so that arguments the call updates in place can be copied back."""
    if isinstance(v, torch.Tensor):
        if device_of(v) is None:
            return v
        host = v.detach().to("cpu", copy=True).as_subclass(torch.Tensor)
        copies.append((host, v, host._version))
        return host
    if type(v) in (tuple, list):
        return type(v)(_to_host(x, copies) for x in v)
    return v


def device_empty(like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor on `device` with `like`'s shape, dtype and strides (the
    low-latency scales are column-major, as DeepEP returns them)."""
    return torch.empty_like(like, device=device)


def _to_device(v: Any, device: torch.device, pending: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Device tensors for the tensors in `v`, in plain tuples and lists and in handles (whose
    entries DeepEP's callers compute with on the device: `handle[0]`). They are only
    allocated here; the (host, device) pairs to fill go to `pending`. Events and other
    objects pass as they are."""
    if isinstance(v, torch.Tensor):
        dst = device_empty(v, device)
        pending.append((v, dst))
        return dst
    if isinstance(v, OpaqueTuple):
        return v.with_items([_to_device(x, device, pending) for x in v])
    move = getattr(v, "with_tensors", None)
    if callable(move):  # a handle of tensor fields (DeepEP 2's EPHandle)
        return move(lambda t: _to_device(t, device, pending))
    if type(v) in (tuple, list):
        return type(v)(_to_device(x, device, pending) for x in v)
    return v


def staged(method: F) -> F:
    """Runs `method` on host copies when its tensors live on another device (see the module);
    CPU calls pass straight through."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with on_host():
            return run(self, *args, **kwargs)

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        device = device_of((args, kwargs))
        if device is None:
            return method(self, *args, **kwargs)
        # By name, however the caller passed them (positionally or not).
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments
        previous = given.get("previous_event")
        if isinstance(previous, EventHandle) or (isinstance(previous, EventOverlap) and previous.event is not None):
            previous.current_stream_wait()
        copies: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        # An `out` tensor on the device is written in place, as DeepEP's callers expect.
        out_arg = given.get("out")
        if not (isinstance(out_arg, torch.Tensor) and device_of(out_arg) is not None):
            out_arg = None
        for name, value in list(given.items()):
            if name == "self" or name == "previous_event":
                continue
            given[name] = None if (name == "out" and out_arg is not None) else _to_host(value, copies)
        out = method(*bound.args, **bound.kwargs)
        # Arguments the call updated in place (DeepEP's cumulative receive statistics).
        for host, original, version in copies:
            if host._version != version:
                original.copy_(host)
        deferred = bool(given.get("async_finish")) or bool(given.get("return_recv_hook"))
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        if out_arg is not None and isinstance(out, tuple) and isinstance(out[0], torch.Tensor):
            pending.append((out[0], out_arg))
            rest = _to_device(out[1:], device, pending)
            result = (out_arg, *rest)
        else:
            result = _to_device(out, device, pending)
        if not deferred:
            for src, dst in pending:
                dst.copy_(src)
            return result

        def fill() -> None:
            for src, dst in pending:
                dst.copy_(src)
            pending.clear()

        if given.get("return_recv_hook") and isinstance(result, tuple):
            # A receive hook (low-latency mode) completes the receive: the copies follow it.
            return tuple(_after(x, fill) if callable(x) and not isinstance(x, EventOverlap) else x for x in result)
        for item in out if isinstance(out, tuple) else (out,):
            if isinstance(item, EventOverlap):
                item.then(fill)
        return result

    return wrapper  # type: ignore[return-value]


def _after(hook: Callable[[], Any], step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        hook()
        step()

    return run
