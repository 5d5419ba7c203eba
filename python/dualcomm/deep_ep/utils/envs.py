"""`deep_ep.utils.envs`: `init_dist` as DeepEP's tests call it, on gloo (CPU tensors)."""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist

_local_rank: int | None = None
_local_seed = 0
_global_seed = 0


def init_seed(global_seed: int) -> None:
    """Seeds `random` and torch with `global_seed` plus this rank, as DeepEP's tests do (each
    rank draws its own data)."""
    global _local_seed, _global_seed
    rank = dist.get_rank() if dist.is_initialized() else 0
    _local_seed, _global_seed = global_seed + rank, global_seed
    random.seed(_local_seed)
    torch.manual_seed(_local_seed)


def get_local_seed() -> int:
    return _local_seed


def get_global_seed() -> int:
    return _global_seed


def dist_print(s: str = "", once_in_node: bool = False) -> None:
    """Prints `s` on every rank (only on each node's first rank with `once_in_node`), then
    waits for every rank."""
    if _local_rank is None:
        raise RuntimeError("dist_print: call init_dist first (it records this process's local rank)")
    if not once_in_node or _local_rank == 0:
        print(s, flush=True)
    dist.barrier()


def init_dist(local_rank: int, num_local_ranks: int, seed: int = 0) -> tuple[int, int, dist.ProcessGroup]:
    """Joins `WORLD_SIZE` nodes (environment, default 1) of `num_local_ranks` ranks each at
    `MASTER_ADDR:MASTER_PORT`, this process being `local_rank` of node `RANK`; returns the
    global rank, the world size and a group of every rank. dualcomm's nodes follow
    `DUALCOMM_RANKS_PER_NODE`, which this sets to `num_local_ranks` unless it is set."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "8361"))
    nodes = int(os.environ.get("WORLD_SIZE", "1"))
    node = int(os.environ.get("RANK", "0"))
    os.environ.setdefault("DUALCOMM_RANKS_PER_NODE", str(num_local_ranks))
    global _local_rank
    _local_rank = local_rank
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{addr}:{port}",
        world_size=nodes * num_local_ranks,
        rank=node * num_local_ranks + local_rank,
    )
    init_seed(seed)
    group = dist.new_group(list(range(nodes * num_local_ranks)))
    assert isinstance(group, dist.ProcessGroup)  # every rank is a member
    return dist.get_rank(), dist.get_world_size(), group
