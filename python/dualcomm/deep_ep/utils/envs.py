"""`deep_ep.utils.envs`: `init_dist` and the helpers DeepEP's tests call, with DeepEP's
defaults (bfloat16 default dtype; on a GPU host, one GPU per local rank and CUDA as the
default device), on any host; and DeepEP's hardware probes, which answer 0 or False where
the hardware (or the tool that reports it) is missing, as DeepEP's do."""

from __future__ import annotations

import functools
import inspect
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dualcomm._bootstrap import node_layout

_local_rank: int | None = None
#: The NIC the RDMA probes ask about unless told (`EP_NIC_NAME`, as DeepEP's).
_DEFAULT_NIC_NAME = os.environ.get("EP_NIC_NAME", "mlx5_0")
#: Where the kernel lists InfiniBand devices (read instead of running `ibstat`).
_IB_SYSFS = Path("/sys/class/infiniband")
#: The first NIC with fast RDMA atomics (ConnectX-8), by PCI device name.
_FAST_ATOMICS_HCA = "MT4131"
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


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """Refuses, as DeepEP does, a group of more than two PCIe GPUs (some have NVLink only
    pairwise). Host tensors and GPUs other than PCIe ones need nothing checked."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    name = torch.cuda.get_device_name()
    if "PCIE" in name and group.size() > 2:
        raise AssertionError(
            f"check_nvlink_connections: {name} GPUs have pairwise NVLink only; got a group of {group.size()}"
        )


def check_torch_deterministic() -> None:
    """Refuses deterministic algorithms together with `fill_uninitialized_memory` (DeepEP's
    check: the fill runs a kernel on every `torch.empty`, which races its communication
    stream)."""
    if torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory:  # type: ignore[attr-defined]
        raise AssertionError(
            "check_torch_deterministic: deterministic algorithms with fill_uninitialized_memory; turn one off"
        )


@functools.lru_cache
def get_nvlink_gbs(factor: float = 0.9) -> float:
    """The first GPU's NVLink bandwidth in GB/s over all its links (`nvidia-smi nvlink -s`),
    times `factor`; 0 where it cannot be read (no GPU, no NVLink, no nvidia-smi). Cached."""
    try:
        out = subprocess.run(["nvidia-smi", "nvlink", "-s"], capture_output=True, text=True, check=True, timeout=30)
        first_gpu = re.split(r"^GPU \d+:", out.stdout, flags=re.MULTILINE)[1]
        links = [float(v) for v in re.findall(r"Link \d+:\s*([\d.]+) GB/s", first_gpu)]
        if not links:
            raise ValueError("no active NVLink in its report")
        return sum(links) * factor
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as e:
        print(f"Failed to get NVLink connection speed: {e}")
        return 0


def _nic(nic_name: str) -> Path:
    path = _IB_SYSFS / nic_name
    if not path.is_dir():
        found = sorted(p.name for p in _IB_SYSFS.iterdir()) if _IB_SYSFS.is_dir() else []
        raise FileNotFoundError(f"no RDMA device {nic_name!r} (present: {found or 'none'})")
    return path


@functools.lru_cache
def check_fast_rdma_atomic_support(nic_name: str = _DEFAULT_NIC_NAME) -> bool:
    """Whether `nic_name` is a ConnectX-8 (`MT4131`, DeepEP's test), from its sysfs
    `hca_type`; False where there is no such device. Cached."""
    try:
        return (_nic(nic_name) / "hca_type").read_text().strip() == _FAST_ATOMICS_HCA
    except OSError:
        return False


@functools.lru_cache
def get_rdma_gbs(nic_name: str = _DEFAULT_NIC_NAME) -> float:
    """The link rate of `nic_name`'s first port in GB/s (`400 Gb/sec` reads 50.0), from
    sysfs; 0 where there is no such device. Cached."""
    try:
        ports = sorted((_nic(nic_name) / "ports").iterdir(), key=lambda p: int(p.name))
        rate = (ports[0] / "rate").read_text()
        match = re.match(r"\s*([\d.]+)\s*Gb/sec", rate)
        if match is None:
            raise ValueError(f"unreadable rate {rate.strip()!r}")
        return float(match.group(1)) / 8
    except (OSError, IndexError, ValueError) as e:
        print(f"Failed to get RDMA connection speed: {e}")
        return 0
