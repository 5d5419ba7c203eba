"""`deep_ep.utils.testing`: timing the way DeepEP's tests time (wall clock on CPU, CUDA events
on a GPU), returning (average, minimum, maximum) seconds without the first measured run."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


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
