"""`deep_ep.utils.testing`: timing the way DeepEP's tests time. `bench` takes the wall clock
(synchronised on a GPU) and returns (average, minimum, maximum) seconds without the first
measured run; `bench_kineto` times named operations in a `torch.profiler` trace, as DeepEP's
times its kernels, by the spans dualcomm's operations carry (`dualcomm.profiling`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from dualcomm.profiling import PREFIX


def bench(
    fn: Callable[[], object],
    num_warmups: int = 50,
    num_tests: int = 50,
    post_fn: Callable[[], object] | None = None,
    flush_l2: bool = True,
) -> tuple[float, float, float]:
    for _ in range(num_warmups):
        fn()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times = []
    for _ in range(num_tests):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if post_fn is not None:
            post_fn()
    kept = times[1:] or times
    return sum(kept) / len(kept), min(kept), max(kept)


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def bench_kineto(
    fn: Callable[[], object],
    kernel_names: str | tuple[str, ...],
    num_tests: int = 30,
    suppress_kineto_output: bool = False,
    trace_path: str | None = None,
    flush_l2: bool = True,
    barrier_comm_profiling: bool = False,
    num_kernels_per_period: int = 1,
    barrier: Callable[[], object] | None = None,
) -> float | list[float] | list[list[float]]:
    """Average seconds of each operation named in `kernel_names` over `num_tests` profiled
    calls of `fn` (after one unprofiled call): the spans `dualcomm::...<name>`, as DeepEP
    reads `...::<name>` kernels from its trace. A name that never ran times 0 (dualcomm has
    no separate `notify` step: counts travel with the operation). With
    `num_kernels_per_period` n > 1, each name gives n averages, one per position within a
    period (a dispatch with a receive hook is two spans: issue, then receive). `trace_path`
    saves the Chrome trace; `barrier_comm_profiling` lines the ranks up before every call
    (`barrier`, or a `torch.distributed` barrier); `flush_l2` applies on a GPU only.
    `EP_USE_NVIDIA_TOOLS=1` skips profiling and returns 1s, as DeepEP's does."""
    if not isinstance(kernel_names, (str, tuple)) or not all(isinstance(n, str) for n in kernel_names):
        raise TypeError(f"kernel_names: expected a str or a tuple of str, got {kernel_names!r}")
    is_tuple = isinstance(kernel_names, tuple)
    names = kernel_names if isinstance(kernel_names, tuple) else (kernel_names,)
    if num_kernels_per_period < 1:
        raise ValueError(f"num_kernels_per_period: expected at least 1, got {num_kernels_per_period}")
    if int(os.environ.get("EP_USE_NVIDIA_TOOLS", "0")):
        return [1.0] * len(names) if is_tuple else 1.0
    fn()
    _synchronize()
    line_up = barrier_comm_profiling and not int(os.environ.get("EP_DISABLE_BARRIER_PROFILING", "0"))
    gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    with _quiet(suppress_kineto_output):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(num_tests):
                if flush_l2 and gpu:
                    torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda").zero_()
                if line_up:
                    if barrier is not None:
                        barrier()
                    elif dist.is_initialized():
                        dist.barrier()
                fn()
            _synchronize()
    if trace_path is not None:
        prof.export_chrome_trace(trace_path)
    spans = sorted(
        (e for e in prof.events() if e.name.startswith(PREFIX)),
        key=lambda e: e.time_range.start,
    )
    results: list[Any] = []
    for name in names:
        durations = [e.time_range.elapsed_us() / 1e6 for e in spans if e.name.endswith("::" + name)]
        if num_kernels_per_period == 1:
            results.append(sum(durations) / len(durations) if durations else 0.0)
            continue
        if len(durations) % num_kernels_per_period:
            raise RuntimeError(
                f"bench_kineto: {len(durations)} '{name}' spans are not periods of {num_kernels_per_period}"
            )
        periods = len(durations) // num_kernels_per_period
        n = num_kernels_per_period
        results.append([sum(durations[j::n]) / max(periods, 1) for j in range(n)])
    return results if is_tuple else results[0]
