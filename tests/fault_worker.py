"""Rank programs for tests/test_faults.py (issue 8's faults across processes). Each runs in
its own process, joins a gloo process group, builds a `dualcomm.Buffer` from it and saves
what it saw to `OUT_DIR/rank{r}.pt` (rewritten atomically after every phase, so the parent
sees how far a rank got even when it has to kill it), then leaves with `os._exit(0)`."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import mp_worker
import torch
import torch.distributed as dist

import dualcomm
import reference as ref
from dualcomm import DualcommError


def _save(out_dir: str, rank: int, result: dict[str, Any]) -> None:
    final = Path(out_dir) / f"rank{rank}.pt"
    tmp = final.with_name(f".rank{rank}.pt.tmp")
    torch.save(result, tmp)
    os.replace(tmp, final)


def _error(e: BaseException, start: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(e).__name__, "message": str(e)}
    if isinstance(e, DualcommError):
        out["dualcomm"] = True
    if start is not None:
        out["elapsed"] = time.monotonic() - start
    return out


def round_inputs(p: dict[str, Any], i: int) -> list[ref.RankInput]:
    """The inputs of round `i` (each round its own routing and rows)."""
    return mp_worker._inputs(dict(p, seed=p["seed"] + 1000 * i))


def _round_result(buf: dualcomm.Buffer, inp: ref.RankInput, num_experts: int) -> dict[str, Any]:
    out = mp_worker._round(buf, inp, num_experts)
    return {k: out[k] for k in ("recv_x", "recv_idx", "recv_w", "counts", "combined", "combined_w", "in_rank")}


# ---- fault 1: a rank that finishes first and leaves without destroy() ------------------------


def scenario_exit(rank: int, p: dict[str, Any], out_dir: str) -> None:
    result: dict[str, Any] = {"rounds": []}
    buf = mp_worker._buffer(p)
    result["transport"] = buf.transport
    for i in range(p["rounds"]):
        try:
            result["rounds"].append(_round_result(buf, round_inputs(p, i)[rank], p["experts"]))
        except DualcommError as e:
            result["error"] = dict(_error(e), round=i)
            break
    _save(out_dir, rank, result)
    os._exit(0)  # no destroy(), no gloo teardown: straight out, as a finished job's process may


# ---- fault 3: ranks disagree on what the records mean ---------------------------------------


def _fmt_x(rank: int, p: dict[str, Any], inp: ref.RankInput, mismatched_rank: int = 1) -> torch.Tensor:
    """bf16 rows of hidden 8 on every rank but `mismatched_rank`, which has fp32 rows of hidden 4
    (the same 16 bytes per row)."""
    x = inp.x.to(torch.bfloat16).contiguous()
    assert x.shape[1] == 8
    return x.view(torch.float32) if rank == mismatched_rank else x


def scenario_format_combine(rank: int, p: dict[str, Any], out_dir: str) -> None:
    result: dict[str, Any] = {}
    buf = mp_worker._buffer(p)
    inp = mp_worker._inputs(p)[rank]
    try:
        _, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, p["experts"])
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(
            inp.x, is_token_in_rank=itr, num_tokens_per_expert=pe, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights
        )
        result["dispatched"] = True
    except DualcommError as e:
        result["dispatch_error"] = _error(e)
        _save(out_dir, rank, result)
        os._exit(0)
    _save(out_dir, rank, result)
    assert isinstance(recv_x, torch.Tensor)
    rows = recv_x.view(torch.float32) if rank == 1 else recv_x
    start = time.monotonic()
    try:
        combined, _, _ = buf.combine(rows, handle)
        result["combined"] = combined
        result["combined_dtype"] = str(combined.dtype)
    except DualcommError as e:
        result["error"] = _error(e, start)
    _save(out_dir, rank, result)
    os._exit(0)


def scenario_format_dispatch(rank: int, p: dict[str, Any], out_dir: str) -> None:
    result: dict[str, Any] = {}
    buf = mp_worker._buffer(p)
    inp = mp_worker._inputs(p)[rank]
    _, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, p["experts"])
    x = _fmt_x(rank, p, inp)
    start = time.monotonic()
    try:
        recv_x, _, _, _, _, _ = buf.dispatch(
            x, is_token_in_rank=itr, num_tokens_per_expert=pe, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights
        )
        assert isinstance(recv_x, torch.Tensor)
        result["recv_x"] = recv_x
        result["recv_dtype"] = str(recv_x.dtype)
    except DualcommError as e:
        result["error"] = _error(e, start)
    _save(out_dir, rank, result)
    os._exit(0)


# ---- fault 4: one rank's bad argument -------------------------------------------------------


def _bad_call(buf: dualcomm.Buffer, inp: ref.RankInput, p: dict[str, Any]) -> None:
    _, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, p["experts"])
    kw: dict[str, Any] = dict(
        is_token_in_rank=itr, num_tokens_per_expert=pe, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights
    )
    if p["bad"] == "topk_weights":
        kw["topk_weights"] = inp.topk_weights[:, :-1].contiguous()  # one column short
    elif p["bad"] == "expert_alignment":
        kw["expert_alignment"] = 0
    else:
        raise ValueError(p["bad"])
    buf.dispatch(inp.x, **kw)


def scenario_abort(rank: int, p: dict[str, Any], out_dir: str) -> None:
    result: dict[str, Any] = {}
    buf = mp_worker._buffer(p)
    inp = round_inputs(p, 0)[rank]
    dist.barrier()  # everyone calls at about the same time; the clock runs from each rank's own call
    start = time.monotonic()
    try:
        if rank == p["culprit"]:
            _bad_call(buf, inp, p)
        else:
            _, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, p["experts"])
            buf.dispatch(
                inp.x,
                is_token_in_rank=itr,
                num_tokens_per_expert=pe,
                topk_idx=inp.topk_idx,
                topk_weights=inp.topk_weights,
            )
        result["first"] = {"type": None, "elapsed": time.monotonic() - start}
    except DualcommError as e:
        result["first"] = _error(e, start)
    _save(out_dir, rank, result)
    try:
        result["again"] = _round_result(buf, round_inputs(p, 1)[rank], p["experts"])
    except DualcommError as e:
        result["again_error"] = _error(e)
    _save(out_dir, rank, result)
    os._exit(0)


# ---- fault 5: shm ranks in different pid namespaces -----------------------------------------


def scenario_pidns(rank: int, p: dict[str, Any], out_dir: str) -> None:
    result: dict[str, Any] = {"pid_in_namespace": os.getpid()}
    buf = mp_worker._buffer(p)
    result["transport"] = buf.transport
    try:
        result["round"] = _round_result(buf, round_inputs(p, 0)[rank], p["experts"])
    except DualcommError as e:
        result["round_error"] = _error(e)
    _save(out_dir, rank, result)
    dist.barrier()
    if rank == p["victim"]:
        (Path(out_dir) / "victim-ready").touch()
        time.sleep(3600)  # the parent SIGKILLs this process (pid 1 of its namespace) from outside
        os._exit(1)
    inp = round_inputs(p, 1)[rank]
    _, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, p["experts"])
    result["second_started_wall"] = time.time()
    _save(out_dir, rank, result)
    (Path(out_dir) / "survivor-waiting").touch()
    try:
        buf.dispatch(
            inp.x, is_token_in_rank=itr, num_tokens_per_expert=pe, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights
        )
        result["second"] = {"type": None}
    except DualcommError as e:
        result["second"] = _error(e)
    result["second_ended_wall"] = time.time()
    _save(out_dir, rank, result)
    os._exit(0)


SCENARIOS = {
    "exit": scenario_exit,
    "format_combine": scenario_format_combine,
    "format_dispatch": scenario_format_dispatch,
    "abort": scenario_abort,
    "pidns": scenario_pidns,
}


def run_rank(
    rank: int, world: int, port: int, scenario: str, params: dict[str, Any], out_dir: str, master: str = "127.0.0.1"
) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{master}:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        SCENARIOS[scenario](rank, params, out_dir)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        _save(out_dir, rank, {"crash": _error(e)})
    os._exit(0)


if __name__ == "__main__":
    # python fault_worker.py RANK WORLD PORT SCENARIO PARAMS.pt OUT_DIR (for ranks started under
    # `unshare`, where multiprocessing cannot reach).
    import sys

    r, w, port, scenario, params_file, out = sys.argv[1:7]
    run_rank(int(r), int(w), int(port), scenario, torch.load(params_file, weights_only=False), out)
