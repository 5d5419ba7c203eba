"""DualPipe, DualPipeV and 1F1B on CPU processes with gloo, against one process running the
same chain of stages over the same micro-batches in plain PyTorch."""

from __future__ import annotations

from typing import Any

import pipeline_workers as pw
import pytest
import torch

from dualcomm.launch import run_world


def reference_step(
    stages: int, hidden: int, seed: int, x: torch.Tensor, target: torch.Tensor, chunks: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Plain PyTorch: every micro-batch through the whole chain, one backward per micro-batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run; keeps the losses bitwise comparable
    try:
        model = pw.build_chain(stages, hidden, seed, deferred=False)
        losses, outs = [], []
        for mx, mt in zip(x.chunk(chunks), target.chunk(chunks)):
            y = model(mx)
            loss = torch.nn.functional.mse_loss(y, mt)
            loss.backward()
            losses.append(loss.detach())
            outs.append(y.detach())
        grads = {f"{i}.{n}": p.grad for i, stage in enumerate(model) for n, p in stage.named_parameters()}
        return torch.stack(losses), torch.cat(outs), grads
    finally:
        torch.set_num_threads(threads)


def run_chain(schedule: str, world: int, **kw: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    p: dict[str, Any] = dict(schedule=schedule, num_chunks=2 * world + 2, micro_batch=3, hidden=16, seed=7, deferred=True)
    p.update(kw)
    if schedule == "dualpipe" and p["num_chunks"] % 2:
        p["num_chunks"] += 1
    g = torch.Generator().manual_seed(11)
    p["x"] = torch.randn(p["num_chunks"] * p["micro_batch"], p["hidden"], generator=g)
    p["target"] = torch.randn(p["num_chunks"] * p["micro_batch"], p["hidden"], generator=g)
    return run_world(pw.chain_rank, world, p, timeout=90), p


@pytest.mark.parametrize(
    "schedule,world",
    [("dualpipe", 2), ("dualpipe", 4), ("dualpipev", 1), ("dualpipev", 2), ("dualpipev", 4), ("1f1b", 2)],
)
@pytest.mark.parametrize("deferred", [True, False], ids=["zero-bubble-linear", "nn.Linear"])
def test_chain_matches_single_process(schedule: str, world: int, deferred: bool) -> None:
    results, p = run_chain(schedule, world, deferred=deferred)
    stages = {"dualpipe": world, "dualpipev": 2 * world, "1f1b": world}[schedule]
    n = p["num_chunks"]
    ref_loss, ref_out, ref_grads = reference_step(stages, p["hidden"], p["seed"], p["x"], p["target"], n)

    # Losses (and inference outputs) bitwise, where each direction's micro-batches end up.
    if schedule == "dualpipe":
        expect = {0: (ref_loss.chunk(2)[1], ref_out.chunk(2)[1]), world - 1: (ref_loss.chunk(2)[0], ref_out.chunk(2)[0])}
    elif schedule == "dualpipev":
        expect = {0: (ref_loss, ref_out)}
    else:
        expect = {world - 1: (ref_loss, ref_out)}
    for rank, r in enumerate(results):
        if rank in expect:
            assert torch.equal(r["loss"], expect[rank][0]), f"rank {rank} training losses"
            assert torch.equal(r["inf_loss"], expect[rank][0]), f"rank {rank} inference losses"
            assert torch.equal(r["inf_out"], expect[rank][1]), f"rank {rank} inference outputs"
        else:
            assert r["loss"] is None and r["inf_out"] is None
        assert r["outputs"] is None

    # Gradients: DualPipe's two copies of each stage are summed, as the reference example does.
    got: dict[str, torch.Tensor] = {}
    for r in results:
        for name, g in r["grads"].items():
            got[name] = got[name] + g if name in got else g
    assert got.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_dualpipe_without_overlap_hook_matches() -> None:
    results, p = run_chain("dualpipe", 2, overlap=False)
    ref_loss, _, _ = reference_step(2, p["hidden"], p["seed"], p["x"], p["target"], p["num_chunks"])
    assert torch.equal(results[0]["loss"], ref_loss.chunk(2)[1])
