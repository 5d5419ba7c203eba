"""Rank programs for the multi-process tests: each runs in its own process (spawned by
tests/test_multiprocess.py), joins a gloo process group and builds a `dualcomm.Buffer`
from it, then saves what it saw for the parent to check."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import reference as ref
from dualcomm import Buffer, DualcommError


def _buffer(p: dict[str, Any]) -> Buffer:
    return Buffer(
        dist.group.WORLD,
        num_nvl_bytes=p.get("nvl", 1 << 20),
        num_rdma_bytes=p.get("rdma", 1 << 20),
        # `detect_rpn`: left to the Buffer, as an unmodified DeepEP client leaves it.
        ranks_per_node=None if p.get("detect_rpn") else p["rpn"],
        timeout=p.get("timeout", 60.0),
        transport=p.get("transport", "auto"),
        explicitly_destroy=True,
        num_channels=p.get("channels"),
    )


def _round(buf: Buffer, inp: ref.RankInput, num_experts: int) -> dict[str, Any]:
    _, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        inp.x,
        is_token_in_rank=itr,
        num_tokens_per_expert=pe,
        topk_idx=inp.topk_idx,
        topk_weights=inp.topk_weights,
    )
    assert isinstance(recv_x, torch.Tensor)
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    return dict(
        recv_x=recv_x,
        recv_idx=recv_idx,
        recv_w=recv_w,
        counts=counts,
        combined=combined,
        combined_w=combined_w,
        in_rank=itr,
    )


def _inputs(p: dict[str, Any]) -> list[ref.RankInput]:
    world = p["nodes"] * p["rpn"]
    return ref.random_inputs(world, p["tokens"], p["hidden"], p["k"], p["experts"], p["dtype"], p["seed"])


def scenario_match(rank: int, p: dict[str, Any]) -> dict[str, Any]:
    buf = _buffer(p)
    out = _round(buf, _inputs(p)[rank], p["experts"])
    out["stats"] = buf.stats()
    out["address"] = buf.address
    out["transport"] = buf.transport
    out["channels"] = buf.num_channels
    out["layout"] = (buf.num_nodes, buf.ranks_per_node)
    out["per_rdma_rank"] = buf.get_dispatch_layout(_inputs(p)[rank].topk_idx, p["experts"])[1]
    buf.destroy()
    return out


def scenario_killed(rank: int, p: dict[str, Any]) -> dict[str, Any]:
    buf = _buffer(p)
    inp = _inputs(p)[rank]
    _round(buf, inp, p["experts"])
    dist.barrier()
    if rank == p["victim"]:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        _round(buf, inp, p["experts"])
        return dict(error=None, elapsed=time.monotonic() - start)
    except DualcommError as e:
        return dict(error=type(e).__name__, message=str(e), elapsed=time.monotonic() - start)


def _hostile(address: str) -> None:
    host, port = address.rsplit(":", 1)
    version = 2  # the tcp transport's wire version
    hello = b"DCOM" + version.to_bytes(4, "little") + (2).to_bytes(4, "little") + (0).to_bytes(4, "little")
    frame = (
        bytes([1, 0, 1, 0]) + (0).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little") + (64).to_bytes(8, "little")
    )
    attempts = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # garbage
        hello[:9],  # truncated hello
        hello + b"\x00" * 16 + frame + b"\xff" * 64,  # wrong secret, then an out-of-range write
        b"DCOM" + (7).to_bytes(4, "little") + b"\x00" * 24,  # wrong protocol version
    ]
    for payload in attempts:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            try:
                s.recv(1)  # wait until the rank drops us
            except OSError:
                pass


def scenario_hostile(rank: int, p: dict[str, Any]) -> dict[str, Any]:
    buf = _buffer(p)
    addresses: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(addresses, buf.address)
    if rank == 0:
        _hostile(addresses[1])
    dist.barrier()
    out = _round(buf, _inputs(p)[rank], p["experts"])
    out["stats"] = buf.stats()
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def scenario_soak(rank: int, p: dict[str, Any]) -> dict[str, Any]:
    buf = _buffer(p)
    inp = _inputs(p)[rank]
    rss = []
    for i in range(p["rounds"]):
        _round(buf, inp, p["experts"])
        if i in (p["rounds"] // 10, p["rounds"] - 1):
            rss.append(_rss_bytes())
    return dict(rss=rss, operations=buf.stats()["operations"])


def scenario_mismatch(rank: int, p: dict[str, Any]) -> dict[str, Any]:
    if p.get("mismatch") == "channels":
        p = dict(p, channels=2 if rank == 1 else 1)
    else:
        p = dict(p, nvl=p["nvl"] * (2 if rank == 1 else 1))
    try:
        _buffer(p)
    except DualcommError as e:
        return dict(error=type(e).__name__, message=str(e))
    return dict(error=None)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def scenario_verbs(rank: int, p: dict[str, Any]) -> dict[str, Any]:
    """transport='verbs' on this machine, then two 'auto' buffers and what they logged."""
    records = _Records()
    logger = logging.getLogger("dualcomm")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    out: dict[str, Any] = {}
    try:
        _buffer(dict(p, transport="verbs"))
        out["error"] = None
    except DualcommError as e:
        out.update(error=type(e).__name__, message=str(e))
    bufs = [_buffer(dict(p, transport="auto")) for _ in range(2)]
    out["auto"] = [b.transport for b in bufs]
    for b in bufs:
        b.destroy()
    out["log"] = records.messages
    return out


def scenario_low_latency_killed(rank: int, p: dict[str, Any]) -> dict[str, Any]:
    """A low-latency round, then the victim dies before the next low-latency dispatch."""
    hidden, experts, tokens = 256, 2 * p["nodes"] * p["rpn"], 4
    buf = Buffer(
        dist.group.WORLD,
        1 << 20,
        1 << 20,
        low_latency_mode=True,
        ranks_per_node=p["rpn"],
        timeout=p["timeout"],
        explicitly_destroy=True,
    )
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)

    def ll_round() -> None:
        recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, tokens, experts, use_fp8=False)
        buf.low_latency_combine(recv, idx, w, handle)

    ll_round()
    dist.barrier()
    if rank == p["victim"]:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        ll_round()
        return dict(error=None, elapsed=time.monotonic() - start)
    except DualcommError as e:
        return dict(error=type(e).__name__, message=str(e), elapsed=time.monotonic() - start)


SCENARIOS = {
    "low_latency_killed": scenario_low_latency_killed,
    "mismatch": scenario_mismatch,
    "match": scenario_match,
    "killed": scenario_killed,
    "hostile": scenario_hostile,
    "soak": scenario_soak,
    "verbs": scenario_verbs,
}


def run_rank(
    rank: int, world: int, port: int, scenario: str, params: dict[str, Any], out_dir: str, master: str = "127.0.0.1"
) -> None:
    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{master}:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=90),
        )
        result = SCENARIOS[scenario](rank, params)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = {"error": type(e).__name__, "message": str(e)}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    # Skip gloo's teardown: after a peer was killed it could wait on that peer.
    os._exit(0)


if __name__ == "__main__":
    # python mp_worker.py RANK WORLD PORT SCENARIO PARAMS.pt OUT_DIR MASTER (for ranks started
    # inside other network namespaces, where multiprocessing cannot reach).
    import sys

    r, w, port, scenario, params_file, out, master = sys.argv[1:8]
    run_rank(int(r), int(w), int(port), scenario, torch.load(params_file, weights_only=False), out, master)
