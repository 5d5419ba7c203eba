"""Low-latency mode against normal mode, measured in the same run (a ratio, not a target).

    python benches/bench_low_latency.py [--tokens 128] [--iters 30] [--out bench-results]

Four processes on this machine as 2 emulated nodes of 2 ranks (normal mode: shared memory
inside a node, TCP between; low-latency mode: every rank linked to every other through
shared memory), each dispatching `--tokens` bf16 tokens of hidden 2048, top-8 of 32 experts,
then combining them. Prints the median per-rank latency of dispatch + combine for both
modes and their ratio; saves `low_latency.png`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HIDDEN, TOPK, EXPERTS, WORLD, NODES = 2048, 8, 32, 4, 2


def rank_main(rank: int, world: int, tokens: int, iters: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from dualcomm import Buffer
    from dualcomm.ops import dispatch_with_layout

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, HIDDEN, generator=g).bfloat16()
    idx = torch.rand(tokens, EXPERTS, generator=g).topk(TOPK, dim=1).indices
    w = torch.rand(tokens, TOPK, generator=g)
    hint = Buffer.get_low_latency_rdma_size_hint(tokens, HIDDEN, world, EXPERTS)
    buf = Buffer(
        dist.group.WORLD, 16 << 20, hint, low_latency_mode=True, ranks_per_node=world // NODES, explicitly_destroy=True
    )

    def normal() -> None:
        recv, _, recv_w, _, handle, _ = dispatch_with_layout(buf, x, idx, w, EXPERTS)
        assert isinstance(recv, torch.Tensor)
        buf.combine(recv, handle, topk_weights=recv_w)

    def low_latency() -> None:
        recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, tokens, EXPERTS, use_fp8=False)
        buf.low_latency_combine(recv, idx, w, handle)

    times: dict[str, list[float]] = {"normal": [], "low_latency": []}
    for name, fn in (("normal", normal), ("low_latency", low_latency)):
        for i in range(iters + 3):
            dist.barrier()
            t = time.perf_counter()
            fn()
            if i >= 3:  # warm-up rounds fault in the buffers
                times[name].append(time.perf_counter() - t)
        if rank == 0:
            print(f"  {name}: {iters} rounds done", flush=True)
    buf.destroy()
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dualcomm.launch import run_world

    print(
        f"[low-latency] {WORLD} processes ({NODES} nodes x {WORLD // NODES}), {a.tokens} tokens/rank, hidden {HIDDEN}"
    )
    res = run_world(rank_main, WORLD, a.tokens, a.iters, timeout=600)
    normal = statistics.median(r["normal"] for r in res)
    ll = statistics.median(r["low_latency"] for r in res)
    print(f"{'mode':<14}{'dispatch+combine (ms)':>24}{'vs normal':>12}")
    print(f"{'normal':<14}{normal * 1e3:>24.2f}{1.0:>12.2f}")
    print(f"{'low-latency':<14}{ll * 1e3:>24.2f}{ll / normal:>12.2f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    a.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bars = ax.bar(["normal", "low-latency"], [normal * 1e3, ll * 1e3], color=["#888", "#2a7"])
    for b, v in zip(bars, [1.0, ll / normal]):
        ax.annotate(f"{v:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    ax.set_ylabel("dispatch + combine, ms (median)")
    ax.set_title(f"{a.tokens} tokens/rank, {WORLD} ranks, hidden {HIDDEN}")
    fig.tight_layout()
    fig.savefig(a.out / "low_latency.png", dpi=120)
    print(f"saved {a.out / 'low_latency.png'}")


if __name__ == "__main__":
    main()
