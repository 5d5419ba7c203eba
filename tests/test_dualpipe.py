"""DualPipe, DualPipeV and 1F1B on CPU processes with gloo, against one process running the
same chain of stages over the same micro-batches in plain PyTorch."""

from __future__ import annotations

from typing import Any

import pipeline_workers as pw
import pytest
import torch

import reference as ref
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
    p: dict[str, Any] = dict(
        schedule=schedule, num_chunks=2 * world + 2, micro_batch=3, hidden=16, seed=7, deferred=True
    )
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
    _check_chain(results, p, schedule, world)


@pytest.mark.parametrize("schedule,world", [("dualpipe", 2), ("dualpipev", 2)])
def test_chain_through_host_copies_matches_single_process(schedule: str, world: int) -> None:
    """Messages staged through host copies (how device tensors cross gloo) change nothing."""
    results, p = run_chain(schedule, world, deferred=True, staged=True)
    _check_chain(results, p, schedule, world)


def _check_chain(results: list[dict[str, Any]], p: dict[str, Any], schedule: str, world: int) -> None:
    stages = {"dualpipe": world, "dualpipev": 2 * world, "1f1b": world}[schedule]
    n = p["num_chunks"]
    ref_loss, ref_out, ref_grads = reference_step(stages, p["hidden"], p["seed"], p["x"], p["target"], n)

    # Losses (and inference outputs) bitwise, where each direction's micro-batches end up.
    if schedule == "dualpipe":
        expect = {
            0: (ref_loss.chunk(2)[1], ref_out.chunk(2)[1]),
            world - 1: (ref_loss.chunk(2)[0], ref_out.chunk(2)[0]),
        }
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


# ---- the bundled MoE model: pipeline x expert parallel ------------------------------------


def _moe_reference(cfg: Any, ids: torch.Tensor, labels: torch.Tensor, chunks: int):
    """Plain PyTorch over every expert-parallel replica's data: per-replica, per-micro-batch
    losses and logits, and the gradients of the whole model summed over all of it."""
    from dualcomm.model import ExpertParallel, build_stage

    full = build_stage(cfg, 0, 1, ExpertParallel(None, cfg.num_experts))  # parameter values only
    params = {n: p.detach().clone().requires_grad_() for n, p in full.named_parameters()}
    losses, logits = [], []
    for replica in range(ids.shape[0]):
        rl, rg = [], []
        for mi, ml in zip(ids[replica].chunk(chunks), labels[replica].chunk(chunks)):
            out = ref.moe_model_logits(params, cfg, mi)
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ml.reshape(-1))
            loss.backward()
            rl.append(loss.detach())
            rg.append(out.detach())
        losses.append(torch.stack(rl))
        logits.append(torch.cat(rg))
    return losses, logits, {n: p.grad for n, p in params.items()}


@pytest.mark.parametrize(
    "schedule,pp,ep,rpn",
    [
        ("dualpipe", 2, 2, 1),
        ("dualpipe", 4, 2, 1),
        ("dualpipev", 1, 4, 2),
        ("dualpipev", 2, 2, 1),
        ("dualpipev", 4, 2, 1),
    ],
    ids=[
        "dualpipe-pp2-ep2x1",
        "dualpipe-pp4-ep2x1",
        "dualpipev-pp1-ep2x2",
        "dualpipev-pp2-ep2x1",
        "dualpipev-pp4-ep2x1",
    ],
)
def test_moe_matches_single_process(schedule: str, pp: int, ep: int, rpn: int) -> None:
    from dualcomm.model import MoEConfig

    nodes = ep // rpn
    cfg = MoEConfig(
        vocab_size=32, hidden=16, heads=2, seq_len=8, num_layers=8, num_experts=8, top_k=2,
        expert_groups=max(nodes, 2), max_groups=1, moe_hidden=16, shared_hidden=16, seed=3,
    )  # fmt: skip
    chunks, mb = 2 * pp + 2 if schedule == "dualpipe" else 2 * pp + 1, 2
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (ep, chunks * mb, cfg.seq_len), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (ep, chunks * mb, cfg.seq_len), generator=g)
    p = dict(
        schedule=schedule, pp=pp, ep=ep, rpn=rpn, cfg=cfg, num_chunks=chunks, micro_batch=mb, ids=ids, labels=labels
    )
    results = run_world(pw.moe_rank, pp * ep, p, timeout=110)
    ref_losses, ref_logits, ref_grads = _moe_reference(cfg, ids, labels, chunks)

    for rank, r in enumerate(results):
        pp_rank, ep_rank = divmod(rank, ep)
        want = None
        if schedule == "dualpipev" and pp_rank == 0:
            want = (ref_losses[ep_rank], ref_logits[ep_rank])
        elif schedule == "dualpipe" and pp_rank in (0, pp - 1):
            half = 1 if pp_rank == 0 else 0
            want = (ref_losses[ep_rank].chunk(2)[half], ref_logits[ep_rank].chunk(2)[half])
        if want is None:
            assert r["loss"] is None
            continue
        torch.testing.assert_close(r["loss"], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["inf_loss"], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["inf_out"], want[1], rtol=1e-4, atol=1e-5)

    # Sum every copy: mirrored stages (DualPipe) and data-parallel replicas for dense
    # parameters; each rank's slice of the routed experts lands in its place.
    got = {n: torch.zeros_like(g) for n, g in ref_grads.items()}
    for r in results:
        for name, span, grad in r["grads"]:
            if span is None:
                got[name] += grad
            else:
                got[name][span[0] : span[0] + span[1]] += grad
    for name, want_g in ref_grads.items():
        torch.testing.assert_close(got[name], want_g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    if ep > 1:
        # Tokens crossed emulated nodes: both tiers carried traffic when there is more than one rank per node.
        assert any(r["stats"].get("rdma_payload_bytes", 0) > 0 for r in results), results[0]["stats"]
