"""`deep_ep.utils.envs`: `init_dist` and the helpers DeepEP's tests call, with DeepEP's
defaults (bfloat16 default dtype; on a GPU host, one GPU per local rank and CUDA as the
default device), on any host."""

from __future__ import annotations

import inspect
import os
import random
from typing import Any

import torch
import torch.distributed as dist

from dualcomm._bootstrap import node_layout

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
    `DUALCOMM_RANKS_PER_NODE`, which this sets to `num_local_ranks` unless it is set.

    As DeepEP's, it makes bfloat16 the default dtype and, where CUDA is present, takes GPU
    `local_rank` as this process's device and CUDA as the default device, on NCCL. Ranks
    that outnumber the GPUs share them round-robin, on gloo (NCCL refuses two ranks on one
    GPU). Without CUDA the group is gloo's and tensors stay on the CPU."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "8361"))
    nodes = int(os.environ.get("WORLD_SIZE", "1"))
    node = int(os.environ.get("RANK", "0"))
    os.environ.setdefault("DUALCOMM_RANKS_PER_NODE", str(num_local_ranks))
    global _local_rank
    _local_rank = local_rank
    params: dict[str, Any] = {
        "backend": "gloo",
        "init_method": f"tcp://{addr}:{port}",
        "world_size": nodes * num_local_ranks,
        "rank": node * num_local_ranks + local_rank,
    }
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
        if gpus >= num_local_ranks:
            params["backend"] = "nccl"
            if "device_id" in inspect.signature(dist.init_process_group).parameters:
                params["device_id"] = device
    dist.init_process_group(**params)
    torch.set_default_dtype(torch.bfloat16)
    if gpus:
        torch.set_default_device("cuda")
    init_seed(seed)
    group = dist.new_group(list(range(nodes * num_local_ranks)))
    assert isinstance(group, dist.ProcessGroup)  # every rank is a member
    return dist.get_rank(), dist.get_world_size(), group


def get_physical_domain_size(group: dist.ProcessGroup) -> tuple[int, int]:
    """DeepEP's (RDMA ranks, NVLink ranks): dualcomm's (nodes, ranks per node) for a buffer
    on `group` (`DUALCOMM_RANKS_PER_NODE`, else by host); with `EP_FORCE_NO_NVLINK` set,
    every rank its own node, as DeepEP's. A collective: every rank of `group` calls it."""
    nodes, rpn = node_layout(group)
    if int(os.environ.get("EP_FORCE_NO_NVLINK", "0")):
        return nodes * rpn, 1
    return nodes, rpn


def get_logical_domain_size(group: dist.ProcessGroup, allow_hybrid_mode: bool = True) -> tuple[int, int]:
    """DeepEP's (scale-out ranks, scale-up ranks): the physical domains, or without
    `allow_hybrid_mode` one scale-up domain of every rank."""
    nodes, rpn = get_physical_domain_size(group)
    return (nodes, rpn) if allow_hybrid_mode else (1, nodes * rpn)
