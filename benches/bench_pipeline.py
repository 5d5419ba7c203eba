"""Pipeline schedules on the same model and the same ranks, measured in one run.

    python benches/bench_pipeline.py [--pp 2 --ep 2 --ranks-per-node 1 --steps 8] [--out bench-results]

Runs `dualcomm-train`'s job four times: DualPipe and DualPipeV with the overlapped
forward-backward, DualPipe without it, and plain 1F1B (the baseline). For each it prints the
median step time and its ratio to 1F1B, the pipeline bubble measured from the timeline
against the schedule's formula, and the share of all-to-all time hidden under compute.
Saves `pipeline.png` and `pipeline.json` under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dualcomm.train.cli import make_args, parser, run

VARIANTS = [
    ("1F1B (baseline)", ["--schedule", "1f1b"]),
    ("DualPipe, no overlap", ["--schedule", "dualpipe", "--no-overlap"]),
    ("DualPipe + overlap", ["--schedule", "dualpipe"]),
    ("DualPipeV + overlap", ["--schedule", "dualpipev"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", default="2")
    ap.add_argument("--ep", default="2")
    ap.add_argument("--ranks-per-node", default="1")
    ap.add_argument("--steps", default="8")
    ap.add_argument("--num-chunks", default="8")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ns = ap.parse_args()
    common = ["--pp", ns.pp, "--ep", ns.ep, "--ranks-per-node", ns.ranks_per_node, "--steps", ns.steps]
    common += ["--num-chunks", ns.num_chunks, "--layers", "4", "--quiet"]
    rows: list[dict[str, Any]] = []
    for i, (name, extra) in enumerate(VARIANTS, 1):
        print(f"[{i}/{len(VARIANTS)}] {name} ...", file=sys.stderr, flush=True)
        _, m = run(make_args(parser().parse_args(common + extra)))
        t = m["timeline"]
        rows.append(
            {
                "variant": name,
                "step_ms": m["median_step_s"] * 1e3,
                "bubble_ms": t["bubble_s"] * 1e3,
                "bubble_fraction": t["bubble_fraction"],
                "formula": t["bubble_formula"],
                "formula_ms": t["bubble_formula_s"] * 1e3,
                "hidden": t["comm_hidden_fraction"],
                "comm_ms": t["comm_s_per_rank_step"] * 1e3,
                "blocked_ms": t["blocked_s_per_rank_step"] * 1e3,
                "loss_last": m["loss_last"],
            }
        )
    base = rows[0]["step_ms"]
    print(
        f"\npp={ns.pp} x ep={ns.ep} (ranks per node {ns.ranks_per_node}),"
        f" {ns.num_chunks} micro-batches, {ns.steps} steps"
    )
    head = f"{'variant':<22} {'step ms':>8} {'vs 1F1B':>8} {'bubble ms':>10} {'bubble':>7} {'formula':>20} {'= ms':>7}"
    head += f" {'a2a ms':>7} {'hidden':>7} {'blocked ms':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['variant']:<22} {r['step_ms']:>8.0f} {r['step_ms'] / base:>7.2f}x {r['bubble_ms']:>10.1f}"
            f" {r['bubble_fraction']:>6.0%} {r['formula']:>20} {r['formula_ms']:>7.1f} {r['comm_ms']:>7.1f}"
            f" {r['hidden']:>6.0%} {r['blocked_ms']:>11.1f}"
        )
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "pipeline.json").write_text(json.dumps(rows, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no picture)")
        return 0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [r["variant"] for r in rows]
    a1.barh(names, [r["step_ms"] / base for r in rows], color="#4c78a8")
    a1.axvline(1.0, color="k", lw=0.8)
    a1.set_xlabel("step time / 1F1B step time (same run)")
    a2.barh(names, [r["hidden"] for r in rows], color="#f58518")
    a2.set_xlim(0, 1)
    a2.set_xlabel("share of all-to-all time hidden under compute")
    a2.set_yticklabels([])
    fig.suptitle(f"pp={ns.pp} x ep={ns.ep}: schedules on the same model and ranks")
    fig.tight_layout()
    fig.savefig(ns.out / "pipeline.png", dpi=130)
    print(f"wrote {ns.out / 'pipeline.json'} and {ns.out / 'pipeline.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
