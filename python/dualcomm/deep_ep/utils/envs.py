"""`deep_ep.utils.envs`: `init_dist` as DeepEP's tests call it, on gloo (CPU tensors)."""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist


def init_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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
