"""An N-rank world inside one Python process, for tests and development.

Each rank is a thread with its own `Buffer`; the Rust core releases the GIL while it moves
data, so the ranks really run concurrently over the loopback transport.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from dualcomm._native import CommTimeoutError, LoopbackWorld, PeerLostError
from dualcomm.buffer import Buffer, LoopbackGroup
from dualcomm.config import auto_channels, env_num_channels

T = TypeVar("T")

#: Default ring sizes for loopback worlds: small enough for many ranks in one process,
#: large enough for DeepSeek-V3 tokens (7168 bf16 + top-8 is ~14.5 KB a record).
DEFAULT_NVL_BYTES = 8 << 20
DEFAULT_RDMA_BYTES = 8 << 20


def run_loopback(
    num_nodes: int,
    ranks_per_node: int,
    fn: Callable[[Buffer], T],
    **buffer_kwargs: Any,
) -> list[T]:
    """Builds a `num_nodes x ranks_per_node` loopback world, calls `fn(buffer)` on every rank
    concurrently and returns the results in rank order.

    If any rank raises, its buffer is destroyed at once (so the other ranks fail fast with
    `PeerLostError` instead of waiting) and the first error is re-raised; errors that are
    only consequences of another rank's failure (`PeerLostError`) are reported only when
    nothing else failed.
    """
    for name, v in (("num_nodes", num_nodes), ("ranks_per_node", ranks_per_node)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            from dualcomm._checks import fail

            raise fail(name, "a positive int", repr(v))
    world_size = num_nodes * ranks_per_node
    buffer_kwargs.setdefault("num_nvl_bytes", DEFAULT_NVL_BYTES)
    buffer_kwargs.setdefault("num_rdma_bytes", DEFAULT_RDMA_BYTES)
    timeout = float(buffer_kwargs.get("timeout", 300.0))
    world = LoopbackWorld(world_size)
    ll_world = LoopbackWorld(world_size) if buffer_kwargs.get("low_latency_mode") else None
    channels = buffer_kwargs.get("num_channels")
    if channels is None:
        channels = env_num_channels() or auto_channels(Buffer.num_sms, world_size)
    # A bad count is the Buffer's to refuse, naming the argument.
    extra = channels - 1 if isinstance(channels, int) and not isinstance(channels, bool) and channels > 1 else 0
    channel_worlds = tuple(LoopbackWorld(world_size) for _ in range(extra))
    results: list[Any] = [None] * world_size
    failures: list[tuple[float, int, BaseException]] = []
    lock = threading.Lock()

    def rank_main(rank: int) -> None:
        buffer: Buffer | None = None
        try:
            group = LoopbackGroup(world, rank, num_nodes, ranks_per_node, ll_world, channel_worlds)
            buffer = Buffer(group, **buffer_kwargs)
            results[rank] = fn(buffer)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
            with lock:
                failures.append((time.monotonic(), rank, e))
            if buffer is not None:
                buffer._leave()

    threads = [
        threading.Thread(target=rank_main, args=(r,), name=f"dualcomm-rank-{r}", daemon=True) for r in range(world_size)
    ]
    for t in threads:
        t.start()
    # Every wait inside has its own deadline; this one only guards against a hung fn.
    deadline = time.monotonic() + 2 * timeout + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        raise CommTimeoutError(f"run_loopback: {stuck} did not finish within {2 * timeout + 60:.0f}s")
    if failures:
        failures.sort(key=lambda f: (isinstance(f[2], PeerLostError), f[0]))
        _, rank, err = failures[0]
        if hasattr(err, "add_note"):
            err.add_note(f"(raised on rank {rank} of a {num_nodes}x{ranks_per_node} loopback world)")
        raise err
    return results
