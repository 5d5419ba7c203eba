"""Bootstrap through a torch.distributed process group: addresses, host names and
configurations are exchanged through the group, rank 0's random job secret is broadcast
through it (it authenticates TCP connections and names the job's shared-memory segments),
and then the chosen transport connects everybody."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

from dualcomm import _checks
from dualcomm._native import (
    ConfigMismatchError,
    Endpoint,
    ShmSegment,
    TcpListener,
    TransportUnavailableError,
    unlink_segment,
)


def local_address() -> str:
    """The address this rank listens on: `DUALCOMM_ADDR` if set; loopback when the job's
    master is local; else the interface this host uses to reach the master."""
    explicit = os.environ.get("DUALCOMM_ADDR")
    if explicit:
        return explicit
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        resolved = socket.gethostbyname(master)
    except OSError:
        return "127.0.0.1"
    if ipaddress.ip_address(resolved).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((resolved, 9))  # no packet is sent: this only picks the route
        return str(s.getsockname()[0])


def _ranks_per_node(infos: list[dict[str, Any]], override: int | None) -> int:
    world = len(infos)
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 1 or world % override:
            raise _checks.fail("ranks_per_node", f"a positive divisor of the group size {world}", repr(override))
        return override
    hosts = [i["host"] for i in infos]
    rpn = hosts.count(hosts[0])
    blocks = [hosts[i : i + rpn] for i in range(0, world, rpn)]
    if world % rpn or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        raise _checks.fail(
            "ranks_per_node",
            "an explicit value: ranks are not laid out in equal, contiguous blocks per host",
            f"hosts {hosts}",
        )
    return rpn


def make_endpoint(
    group: Any,
    transport: str,
    num_nvl_bytes: int,
    num_rdma_bytes: int,
    ranks_per_node: int | None,
    timeout: float,
) -> tuple[Endpoint, str]:
    """Exchanges what the ranks need through `group` and joins them; returns the endpoint
    and the transport used. "auto" takes shared memory when every rank is on this host and
    no nodes are emulated, TCP otherwise (emulated nodes talk over TCP, as real ones would)."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    listener = TcpListener(local_address()) if transport in ("auto", "tcp") else None
    mine = {
        "address": None if listener is None else listener.address,
        "host": socket.gethostname(),
        "config": f"num_nvl_bytes={num_nvl_bytes}, num_rdma_bytes={num_rdma_bytes}, "
        f"ranks_per_node={ranks_per_node}, transport={transport}",
    }
    infos: list[Any] = [None] * world
    dist.all_gather_object(infos, mine, group=group)
    secret_box = [os.urandom(16) if rank == 0 else None]
    dist.broadcast_object_list(secret_box, src=dist.get_global_rank(group, 0), group=group)
    configs = [i["config"] for i in infos]
    for other, cfg in enumerate(configs):
        if cfg != configs[rank]:
            raise ConfigMismatchError(
                f"configuration mismatch between ranks: rank {rank} has {configs[rank]}, rank {other} has {cfg}"
            )
    rpn = _ranks_per_node(infos, ranks_per_node)
    secret = secret_box[0]
    assert isinstance(secret, bytes)
    one_host = len({i["host"] for i in infos}) == 1
    if transport == "shm" and not one_host:
        raise TransportUnavailableError(
            "transport='shm': the ranks run on several hosts "
            f"({sorted({i['host'] for i in infos})}); use 'tcp' or 'auto'"
        )
    if transport == "shm" or (transport == "auto" and one_host and rpn == world):
        job = secret.hex()[:16]
        segment = ShmSegment(job, rank, world // rpn, rpn, num_nvl_bytes, num_rdma_bytes)
        dist.barrier(group)  # every segment exists
        try:
            ep = Endpoint.shm(segment, job, world // rpn, rpn, num_nvl_bytes, num_rdma_bytes, float(timeout))
        finally:
            dist.barrier(group)  # every segment is mapped (or failed): the names can go
            unlink_segment(job, rank)
        return ep, "shm"
    assert listener is not None
    ep = Endpoint.tcp(
        listener,
        world // rpn,
        rpn,
        rank,
        [i["address"] for i in infos],
        secret,
        num_nvl_bytes,
        num_rdma_bytes,
        float(timeout),
    )
    return ep, "tcp"
