"""The names dualcomm's operations carry in `torch.profiler` traces.

Each `Buffer` call runs inside a `record_function` span named `dualcomm::<operation>`
(`dualcomm::dispatch`, `dualcomm::combine`, `dualcomm::low_latency::dispatch`, ...), where
DeepEP's show up as its kernels (`deep_ep::intranode::dispatch`): a trace shows where the
time of a step went, and `deep_ep.utils.testing.bench_kineto` times operations by these
names as DeepEP's tests time its kernels. A span covers the call until its results are
complete; with `async_finish=True` that is the issue alone, and a receive hook is a span of
its own under the same name (as DeepEP's receive kernel is a second kernel).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

PREFIX = "dualcomm::"

P = ParamSpec("P")
R = TypeVar("R")


def span_name(operation: str) -> str:
    return PREFIX + operation


def traced(operation: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Runs the decorated call inside a `dualcomm::<operation>` profiler span."""
    name = span_name(operation)

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


def traced_hook(operation: str, hook: Callable[[], None]) -> Callable[[], None]:
    """`hook`, running inside a `dualcomm::<operation>` span when called."""
    return traced(operation)(hook)
