"""Bootstrap through a torch.distributed process group: addresses, host names and
configurations are exchanged through the group, rank 0's random job secret is broadcast
through it (it authenticates TCP connections and names the job's shared-memory segments),
and then the chosen transport connects everybody."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from dualcomm import _checks
from dualcomm._native import (
    ConfigMismatchError,
    DualcommError,
    Endpoint,
    ShmSegment,
    TcpListener,
    TransportUnavailableError,
    VerbsPort,
    find_verbs_device,
    unlink_segment,
)
from dualcomm.config import (
    auto_channels,
    deep_ep_ranks_per_node,
    env_ranks_per_node,
    resolve_ring_bytes,
    usable_cores,
)

log = logging.getLogger("dualcomm")
T = TypeVar("T")
_said_rdma_tier: set[str] = set()

# What `DUALCOMM_IB_DEVICE` names (NCCL_IB_HCA's syntax): the devices and ports verbs may use.
IB_DEVICE_ENV = "DUALCOMM_IB_DEVICE"


def _find_verbs() -> tuple[str, str]:
    """This rank's RDMA device and port: ("ok", description) or ("missing", reason)."""
    try:
        return ("ok", find_verbs_device(os.environ.get(IB_DEVICE_ENV) or None))
    except TransportUnavailableError as e:
        return ("missing", str(e))


def _verbs_outcomes(group: Any, world: int) -> list[Any]:
    """Every rank's `_find_verbs`."""
    import torch.distributed as dist

    mine = _find_verbs()
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, mine, group=group)
    return outcomes


def _verbs_missing(outcomes: list[Any]) -> str | None:
    """What keeps verbs from running on some ranks, naming them; None if every rank has a port."""
    missing = {r: why for r, (kind, why) in enumerate(outcomes) if kind == "missing"}
    if not missing:
        return None
    return "; ".join(f"rank {r}: {why}" for r, why in sorted(missing.items()))


def _say_rdma_tier_once(key: str, level: int, message: str, *args: Any) -> None:
    if key not in _said_rdma_tier:
        _said_rdma_tier.add(key)
        log.log(level, message, *args)


def _on_every_rank(group: Any, world: int, what: str, make: Callable[[], T]) -> T:
    """`make()` on every rank: its result, or an error on every rank naming the ranks where it
    failed (no rank goes on to wait for one that failed)."""
    import torch.distributed as dist

    error: DualcommError | None = None
    made: T | None = None
    try:
        made = make()
    except DualcommError as e:
        error = e
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    failed = {r: o for r, o in enumerate(outcomes) if o is not None}
    if failed:
        raise TransportUnavailableError(f"{what} failed on ranks {failed}")
    assert made is not None
    return made


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
    per_host = hosts.count(hosts[0])
    blocks = [hosts[i : i + per_host] for i in range(0, world, per_host)]
    if world % per_host or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        raise _checks.fail(
            "ranks_per_node",
            "an explicit value: ranks are not laid out in equal, contiguous blocks per host",
            f"hosts {hosts}",
        )
    return deep_ep_ranks_per_node(per_host)


def node_layout(group: Any) -> tuple[int, int]:
    """(nodes, ranks per node) a `Buffer` on `group` would have, with no `ranks_per_node`
    passed: `DUALCOMM_RANKS_PER_NODE`, else the host names' blocks (a collective on `group`)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    infos: list[Any] = [None] * world
    dist.all_gather_object(infos, {"host": socket.gethostname()}, group=group)
    rpn = _ranks_per_node(infos, env_ranks_per_node())
    return world // rpn, rpn


def agree_channels(group: Any, requested: int | None, num_sms: int) -> int:
    """The channels every rank runs (each channel is a world of its own, so all must agree):
    `requested` where a rank gave one, else its `auto_channels` for the ranks on its host;
    the smallest over the ranks."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    mine = {"host": socket.gethostname(), "requested": requested, "cores": usable_cores()}
    infos: list[Any] = [None] * world
    dist.all_gather_object(infos, mine, group=group)
    asked = {r: i["requested"] for r, i in enumerate(infos) if i["requested"] is not None}
    if len(set(asked.values())) > 1:
        raise ConfigMismatchError(f"configuration mismatch between ranks: num_channels per rank {asked}")
    hosts = [i["host"] for i in infos]
    wanted = [
        i["requested"] if i["requested"] is not None else auto_channels(num_sms, hosts.count(i["host"]), i["cores"])
        for i in infos
    ]
    return min(wanted)


def make_endpoint(
    group: Any,
    transport: str,
    num_nvl_bytes: int,
    num_rdma_bytes: int,
    ranks_per_node: int | None,
    timeout: float,
) -> tuple[Endpoint, str]:
    """Exchanges what the ranks need through `group` and joins them; returns the endpoint
    and the transport used. "auto" takes shared memory when the whole world is one node on
    this host; one transport per tier ("shm+tcp": shared memory inside each node, TCP between
    nodes, as a cluster has NVLink inside and the network between) when every node's ranks
    share a host; TCP for everything otherwise. "full-mesh" (a low-latency buffer's second
    endpoint, one rank per node) takes shared memory when every rank is on this host, TCP
    otherwise."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    listener = TcpListener(local_address()) if transport in ("auto", "tcp", "shm+tcp", "full-mesh") else None
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
    hosts = [i["host"] for i in infos]
    one_host = len(set(hosts)) == 1
    nodes_on_one_host = all(len(set(hosts[n : n + rpn])) == 1 for n in range(0, world, rpn))
    if transport == "shm" and not one_host:
        raise TransportUnavailableError(
            f"transport='shm': the ranks run on several hosts ({sorted(set(hosts))}); use 'shm+tcp', 'tcp' or 'auto'"
        )
    if transport == "shm+tcp" and not nodes_on_one_host:
        raise TransportUnavailableError(
            f"transport='shm+tcp': the ranks of a node must share a host for shared memory, but nodes of "
            f"{rpn} ranks span hosts {hosts}; set ranks_per_node to the ranks per host, or use 'tcp'"
        )
    if transport == "verbs":
        missing = _verbs_missing(_verbs_outcomes(group, world))
        if missing is not None:
            raise TransportUnavailableError(f"transport='verbs': {missing}; use 'tcp' or 'auto'")
        transport = "shm+verbs" if nodes_on_one_host and rpn > 1 else "verbs"
    if transport == "full-mesh":
        transport = "shm" if one_host else "tcp"
    if transport == "auto" and world > rpn:
        outcomes = _verbs_outcomes(group, world)
        missing = _verbs_missing(outcomes)
        if missing is None:
            transport = "shm+verbs" if nodes_on_one_host and rpn > 1 else "verbs"
            _say_rdma_tier_once(
                "verbs", logging.INFO, "dualcomm: the rdma tier runs over verbs (%s)", outcomes[rank][1]
            )
        else:
            _say_rdma_tier_once("no-device", logging.INFO, "dualcomm: the rdma tier runs over tcp: %s", missing)
    if transport == "auto":
        if one_host and rpn == world:
            transport = "shm"
        elif nodes_on_one_host and rpn > 1:
            transport = "shm+tcp"
        else:
            transport = "tcp"
    job = secret.hex()[:16]
    nodes = world // rpn
    # Every rank resolves the same sizes: the requests were compared above.
    num_nvl_bytes = resolve_ring_bytes(num_nvl_bytes, rpn, rpn > 1)
    num_rdma_bytes = resolve_ring_bytes(num_rdma_bytes, nodes, nodes > 1)
    port: VerbsPort | None = None
    cards: list[Any] = [None] * world
    if transport in ("verbs", "shm+verbs"):
        rdma_only = transport == "shm+verbs"
        port = _on_every_rank(
            group,
            world,
            f"transport={transport!r}: opening the RDMA device",
            lambda: VerbsPort(rank, nodes, rpn, num_nvl_bytes, num_rdma_bytes, float(timeout), rdma_only=rdma_only),
        )
        dist.all_gather_object(cards, port.card, group=group)
    if transport == "verbs":
        assert port is not None
        ep = Endpoint.verbs(port, cards)
        dist.barrier(group)  # every queue pair is ready before anybody's first write
        return ep, transport
    if transport in ("shm", "shm+tcp", "shm+verbs"):
        # Every segment exists, or every rank learns which could not be made (no rank waits).
        segment = _on_every_rank(
            group,
            world,
            f"transport={transport!r}: shared memory",
            lambda: ShmSegment(job, rank, nodes, rpn, num_nvl_bytes, num_rdma_bytes, nvl_only=transport != "shm"),
        )
        try:
            if transport == "shm+verbs":
                assert port is not None
                ep = Endpoint.shm_verbs(segment, job, port, cards)
            elif transport == "shm":
                ep = Endpoint.shm(segment, job, nodes, rpn, num_nvl_bytes, num_rdma_bytes, float(timeout))
            else:
                assert listener is not None
                peers = [i["address"] for i in infos]
                ep = Endpoint.shm_tcp(
                    segment,
                    job,
                    listener,
                    nodes,
                    rpn,
                    rank,
                    peers,
                    secret,
                    num_nvl_bytes,
                    num_rdma_bytes,
                    float(timeout),
                )
        finally:
            dist.barrier(group)  # every segment is mapped (or failed): the names can go
            unlink_segment(job, rank)
        return ep, transport
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
