"""Reads the per-rank timelines of a training job: the pipeline bubble (measured and by the
schedule's formula), the share of all-to-all time hidden under compute, and the pictures."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

COMPUTE = ("F", "B", "W", "FB")
COMM = ("dispatch", "combine")
COLORS = {
    "F": "#4c78a8",
    "B": "#54a24b",
    "W": "#bab0ac",
    "FB": "#b279a2",
    "dispatch": "#f58518",
    "combine": "#e45756",
    "wait": "#222222",
}


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def bubble_formula(schedule: str, pp: int, f: float, b: float, w: float, fb: float) -> tuple[str, float]:
    """The schedule's bubble per rank from the DualPipe paper's table, in seconds, with
    `f`, `b`, `w`, `fb` the measured chunk times (B excludes W where W is deferred)."""
    if schedule == "dualpipe":
        return "(PP/2-1)(F&B+B-3W)", max(0.0, (pp / 2 - 1) * (fb + b - 3 * w))
    if schedule == "dualpipev":
        # DualPipeV on n ranks is DualPipe on 2n ranks folded in half.
        return "(PP-1)(F&B+B-3W)", max(0.0, (pp - 1) * (fb + b - 3 * w))
    return "(PP-1)(F+B)", (pp - 1) * (f + b)


def analyse(results: list[dict[str, Any]], schedule: str, pp: int) -> dict[str, Any]:
    walls, bubbles, exposed, comm, blocked = [], [], [], [], []
    durations: dict[str, list[float]] = {k: [] for k in COMPUTE}
    for r in results:
        for t in r["timelines"]:
            wall = t["end"] - t["start"]
            busy = 0.0
            for kind, _, s, e in t["spans"]:
                if kind in durations:
                    durations[kind].append(e - s)
                    busy += e - s
            walls.append(wall)
            bubbles.append(max(0.0, wall - busy))
            exposed.append(t["summary"]["comm_exposed_s"])
            comm.append(t["summary"]["comm_s"])
            blocked.append(t["summary"]["blocked_s"])
    f, b, w = _mean(durations["F"]), _mean(durations["B"]), _mean(durations["W"])
    fb = _mean(durations["FB"]) or (f + b)
    name, predicted = bubble_formula(schedule, pp, f, b, w, fb)
    total_comm, total_exposed = sum(comm), sum(exposed)
    return {
        "step_wall_s": _mean(walls),
        "bubble_s": _mean(bubbles),
        "bubble_fraction": _mean(bubbles) / _mean(walls) if walls else 0.0,
        "bubble_formula": name,
        "bubble_formula_s": predicted,
        "chunk_s": {"F": f, "B": b, "W": w, "F&B": fb},
        "comm_s_per_rank_step": _mean(comm),
        "comm_exposed_s_per_rank_step": _mean(exposed),
        "blocked_s_per_rank_step": _mean(blocked),
        "comm_hidden_fraction": max(0.0, 1 - total_exposed / total_comm) if total_comm > 0 else 0.0,
    }


def plot_timeline(results: list[dict[str, Any]], title: str, path: Path) -> None:
    """One row per rank for the last recorded step: schedule chunks above, the all-to-alls on
    the progress engine below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(14, 0.9 * len(results) + 1.6))
    for row, r in enumerate(results):
        if not r["timelines"]:
            continue
        t = r["timelines"][-1]
        y = len(results) - 1 - row
        for kind, label, s, e in t["spans"]:
            lane = (y + 0.45, 0.4) if kind in COMPUTE else (y + 0.05, 0.35) if kind in COMM else (y + 0.41, 0.04)
            ax.broken_barh([(s * 1e3, max(e - s, 1e-5) * 1e3)], lane, color=COLORS.get(kind, "k"), linewidth=0)
            if kind in COMPUTE and label:
                ax.text((s + e) / 2 * 1e3, y + 0.65, label, ha="center", va="center", fontsize=5, color="white")
    ax.set_yticks([len(results) - 1 - i + 0.45 for i in range(len(results))])
    ax.set_yticklabels([f"pp{r['pp_rank']} ep{r['ep_rank']}" for r in results])
    ax.set_xlabel(
        "ms since the step started (upper lane: schedule chunks, with a black line where Python is blocked"
        " on an all-to-all; lower lane: all-to-alls on the progress engine)"
    )
    ax.set_title(title)
    ax.legend(
        handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18 if len(results) > 4 else -0.3),
        ncol=len(COLORS),
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_loss(losses: list[float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("mean cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
