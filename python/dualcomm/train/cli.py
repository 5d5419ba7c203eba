"""`dualcomm-train`: trains the bundled MoE model with pipeline x expert parallelism on this
machine's CPU, in processes it starts itself, and reports what the schedule and the
all-to-alls did.

    dualcomm-train                      # DualPipeV, 2 pipeline x 4 expert-parallel ranks, 2 emulated nodes
    dualcomm-train --schedule 1f1b      # the same model and ranks under plain 1F1B
    dualcomm-train --device cuda        # the stages on this machine's GPUs (ranks share them)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dualcomm.launch import run_world
from dualcomm.model import SCHEDULES, MoEConfig
from dualcomm.train.report import analyse, plot_loss, plot_timeline
from dualcomm.train.worker import TrainArgs, train_rank


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {v}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dualcomm-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--schedule", choices=SCHEDULES, default="dualpipev")
    p.add_argument("--pp", type=_positive, default=2, help="pipeline ranks (DualPipe: even)")
    p.add_argument("--ep", type=_positive, default=4, help="expert-parallel ranks per pipeline position")
    p.add_argument(
        "--ranks-per-node", type=_positive, default=2, help="emulated node size of the expert-parallel group"
    )
    p.add_argument("--steps", type=_positive, default=60)
    p.add_argument("--num-chunks", type=_positive, default=None, help="micro-batches per step (default: 2 x pp, >= 4)")
    p.add_argument("--micro-batch", type=_positive, default=2, help="sequences per micro-batch")
    p.add_argument("--hidden", type=_positive, default=64)
    p.add_argument("--layers", type=_positive, default=4, help="transformer blocks in the whole model")
    p.add_argument("--experts", type=_positive, default=8, help="routed experts per layer")
    p.add_argument("--top-k", type=_positive, default=2)
    p.add_argument("--max-nodes", type=_positive, default=1, help="nodes a token may be routed to (node-limited gate)")
    p.add_argument("--seq-len", type=_positive, default=32)
    p.add_argument("--vocab", type=_positive, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-overlap", action="store_true", help="run the forward-backward pairs one after the other")
    p.add_argument("--transport", choices=("auto", "shm+tcp", "tcp", "shm"), default="auto")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the stages run (cuda: every rank on this machine's GPUs, shared round-robin)",
    )
    p.add_argument("--out", type=Path, default=Path("dualcomm-train-output"), help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def make_args(ns: argparse.Namespace) -> TrainArgs:
    """Checks the combination and builds the job description; errors name the flag."""
    if ns.ep % ns.ranks_per_node:
        raise ValueError(f"--ranks-per-node: expected a divisor of --ep ({ns.ep}), got {ns.ranks_per_node}")
    if ns.schedule == "dualpipe" and ns.pp % 2:
        raise ValueError(f"--pp: DualPipe needs an even number of pipeline ranks, got {ns.pp}")
    if ns.experts % ns.ep:
        raise ValueError(f"--experts: expected a multiple of --ep ({ns.ep}), got {ns.experts}")
    nodes = ns.ep // ns.ranks_per_node
    stages = 2 * ns.pp if ns.schedule == "dualpipev" else ns.pp
    if ns.layers % stages:
        raise ValueError(
            f"--layers: expected a multiple of the {stages} pipeline stages of {ns.schedule}, got {ns.layers}"
        )
    chunks = ns.num_chunks or max(4, 2 * ns.pp)
    if ns.schedule == "dualpipe" and (chunks % 2 or chunks < 2 * ns.pp):
        raise ValueError(f"--num-chunks: DualPipe needs an even number >= 2 x pp ({2 * ns.pp}), got {chunks}")
    if ns.schedule == "dualpipev" and chunks < 2 * ns.pp:
        raise ValueError(f"--num-chunks: DualPipeV needs at least 2 x pp ({2 * ns.pp}), got {chunks}")
    if not ns.lr > 0:
        raise ValueError(f"--lr: expected a positive learning rate, got {ns.lr}")
    if ns.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device: expected cpu on this machine (torch sees no CUDA GPU), got cuda")
    groups = nodes if ns.experts % nodes == 0 else 1
    model = MoEConfig(
        vocab_size=ns.vocab,
        hidden=ns.hidden,
        heads=max(1, ns.hidden // 16),
        seq_len=ns.seq_len,
        num_layers=ns.layers,
        num_experts=ns.experts,
        top_k=ns.top_k,
        expert_groups=groups,
        max_groups=min(ns.max_nodes, groups),
        moe_hidden=ns.hidden,
        shared_hidden=ns.hidden,
        seed=ns.seed,
    )
    return TrainArgs(
        schedule=ns.schedule,
        pp=ns.pp,
        ep=ns.ep,
        ranks_per_node=ns.ranks_per_node,
        steps=ns.steps,
        num_chunks=chunks,
        micro_batch=ns.micro_batch,
        lr=ns.lr,
        overlap=not ns.no_overlap,
        model=model,
        timeline_steps=min(3, ns.steps),
        progress=not ns.quiet,
        transport=ns.transport,
        device=ns.device,
    )


def run(a: TrainArgs, timeout: float = 1800.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs the job; returns the per-rank results and the job's metrics."""
    world = a.pp * a.ep
    t0 = time.time()
    results = run_world(train_rank, world, a, timeout=timeout)
    wall = time.time() - t0
    losses = results[0]["losses"]
    steps = [max(r["step_times"][i] for r in results) for i in range(a.steps)]
    steady = steps[len(steps) // 2 :] or steps
    totals: dict[str, int] = {}
    for r in results:
        for k, v in r["stats"].items():
            totals[k] = totals.get(k, 0) + int(v)
    metrics = {
        "schedule": a.schedule,
        "device": a.device,
        "overlap": a.overlap,
        "pp": a.pp,
        "ep": a.ep,
        "ranks_per_node": a.ranks_per_node,
        "emulated_nodes": a.ep // a.ranks_per_node,
        "processes": world,
        "num_chunks": a.num_chunks,
        "micro_batch": a.micro_batch,
        "model": a.model.to_dict(),
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_went_down": losses[-1] < losses[0],
        "median_step_s": statistics.median(steady),
        "tokens_per_s": results[0]["tokens_per_step"] / statistics.median(steady),
        "wall_s": wall,
        "bytes": totals,
        "timeline": analyse(results, a.schedule, a.pp),
    }
    return results, metrics


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def summary(m: dict[str, Any]) -> str:
    t = m["timeline"]
    b = m["bytes"]
    lines = [
        f"  loss             {m['loss_first']:.3f} -> {m['loss_last']:.3f}"
        + ("  (went down)" if m["loss_went_down"] else "  (DID NOT go down)"),
        f"  throughput       {m['tokens_per_s']:,.0f} tokens/s, median step {m['median_step_s'] * 1e3:.0f} ms"
        f" ({m['processes']} processes, {m['wall_s']:.0f} s in all)",
    ]
    if b:
        lines.append(
            f"  all-to-all       nvl {_mb(b.get('nvl_payload_bytes', 0))} payload"
            f" / {_mb(b.get('nvl_wire_bytes', 0))} wire,  rdma {_mb(b.get('rdma_payload_bytes', 0))} payload"
            f" / {_mb(b.get('rdma_wire_bytes', 0))} wire"
        )
        lines.append(
            f"  hidden comm      {t['comm_hidden_fraction']:.0%} of all-to-all time ran under compute"
            f" ({t['comm_exposed_s_per_rank_step'] * 1e3:.1f} of {t['comm_s_per_rank_step'] * 1e3:.1f} ms"
            f" per rank-step exposed; {t['blocked_s_per_rank_step'] * 1e3:.1f} ms blocked in all,"
            " waiting for peers included)"
        )
    c = t["chunk_s"]
    lines.append(
        f"  pipeline bubble  {t['bubble_s'] * 1e3:.1f} ms per rank-step ({t['bubble_fraction']:.0%} of the step);"
        f" formula {t['bubble_formula']} = {t['bubble_formula_s'] * 1e3:.1f} ms"
        f" with F={c['F'] * 1e3:.1f} B={c['B'] * 1e3:.1f} W={c['W'] * 1e3:.1f} F&B={c['F&B'] * 1e3:.1f} ms"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        a = make_args(ns)
    except ValueError as e:
        parser().error(str(e))
    nodes = a.ep // a.ranks_per_node
    print(
        f"dualcomm-train: {a.schedule}{'' if a.overlap else ' (no overlap)'}, pp={a.pp} x ep={a.ep}"
        f" ({nodes} emulated node{'s' * (nodes != 1)} x {a.ranks_per_node} ranks), {a.pp * a.ep} processes;"
        f" {a.model.num_layers} layers, {a.model.num_experts} experts top-{a.model.top_k}, hidden {a.model.hidden};"
        f" {a.steps} steps of {a.num_chunks} micro-batches x {a.micro_batch} x {a.model.seq_len} tokens per replica",
        flush=True,
    )
    results, metrics = run(a)
    print(summary(metrics))
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = f"{a.schedule}{'' if a.overlap else ' (no overlap)'}, pp={a.pp} x ep={a.ep}: last step"
    plot_timeline(results, title, ns.out / "timeline.png")
    plot_loss(metrics["losses"], f"{a.schedule}, pp={a.pp} x ep={a.ep}", ns.out / "loss.png")
    print(f"  wrote            {ns.out / 'metrics.json'}, {ns.out / 'timeline.png'}, {ns.out / 'loss.png'}")
    return 0 if metrics["loss_went_down"] else 1


if __name__ == "__main__":
    sys.exit(main())
