"""Starts a world of processes on this machine, each with a gloo process group, and
collects what each returns. The trainer and the tests use it; a job on a cluster would
use `torchrun` instead (dualcomm only needs an initialized process group)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, timeout: float, args: tuple, out: Any) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    # A rank still running at the deadline prints where it is stuck before it is killed.
    faulthandler.dump_traceback_later(timeout, exit=False)

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # Ranks share few cores: one compute thread each keeps them from fighting.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes: torch's queue reductions would pass tensors as shared-memory
        # handles that die with this process.
        out.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        out.put((rank, False, traceback.format_exc()))


class WorldFailed(RuntimeError):
    """A rank of a `run_world` world raised, or the world did not finish in time."""


def run_world(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Runs `fn(rank, world, *args)` in `world` fresh processes with a gloo process group
    initialized; returns the results in rank order. `fn` and its results must pickle.

    The first failure (by time) is raised as `WorldFailed` with the rank's traceback; the
    other ranks are then killed rather than left waiting for it.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world: expected a positive int, got {world!r}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world, port, timeout, args, out), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    results: list[Any] = [None] * world
    done = 0
    deadline = time.monotonic() + timeout + 30
    try:
        while done < world:
            try:
                rank, ok, value = out.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise WorldFailed(f"the world of {world} ranks did not finish within {timeout + 30:.0f}s") from None
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise WorldFailed(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})") from None
                continue
            if not ok:
                raise WorldFailed(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
            done += 1
    finally:
        for p in procs:
            p.join(timeout=5 if done == world else 0.1)
            if p.is_alive():
                p.kill()
    return results
