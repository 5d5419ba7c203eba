"""Core benchmarks against baselines measured in the same run (ratios, not absolute targets).

    python benches/bench_core.py [--out bench-results]

1. Routing tables (T=4096, top-8 of 256 experts, 64 ranks as 8 nodes x 8) through
   `Buffer.get_dispatch_layout` against a plain-PyTorch implementation of the same tables.
2. Loopback dispatch + combine (hidden 7168 bf16, top-8, the DeepSeek-V3 shapes) against
   (a) one memcpy of the same payload bytes (torch `copy_`, one thread) and (b) the same job
   done with plain PyTorch indexing in one process.

3. The same on a 2x2 loopback world against tokens per rank (128 to 8192), each size against
   a memcpy of its bytes.

Prints tables; saves `loopback.png` (throughput per world) and `tokens_curve.png`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dualcomm import Buffer
from dualcomm.testing import run_loopback


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def torch_layout(topk_idx: torch.Tensor, num_experts: int, num_nodes: int, rpn: int):
    t = topk_idx.shape[0]
    world = num_nodes * rpn
    chosen = torch.zeros(t, num_experts + 1, dtype=torch.bool)
    chosen.scatter_(1, torch.where(topk_idx < 0, num_experts, topk_idx), True)
    chosen = chosen[:, :num_experts]
    in_rank = chosen.view(t, world, -1).any(2)
    per_node = in_rank.view(t, num_nodes, rpn).any(2).sum(0)
    return in_rank.sum(0), per_node, chosen.sum(0), in_rank


def bench_routing(reps: int) -> None:
    t, k, e, nodes, rpn = 4096, 8, 256, 8, 8
    g = torch.Generator().manual_seed(0)
    topk_idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices

    def rank_main(buf: Buffer):
        if buf.rank != 0:
            return None
        ours = median_seconds(lambda: buf.get_dispatch_layout(topk_idx, e), reps)
        base = median_seconds(lambda: torch_layout(topk_idx, e, nodes, rpn), reps)
        mine = buf.get_dispatch_layout(topk_idx, e)
        ref = torch_layout(topk_idx, e, nodes, rpn)
        assert torch.equal(mine[3], ref[3]) and torch.equal(mine[2].long(), ref[2])
        return ours, base

    ours, base = run_loopback(nodes, rpn, rank_main, num_nvl_bytes=1 << 16, num_rdma_bytes=1 << 16)[0]
    print(f"\nrouting tables: T={t} K={k} E={e} W={nodes * rpn} (median of {reps})")
    print(f"  {'implementation':<34}{'time':>12}{'speed-up':>10}")
    print(f"  {'plain PyTorch (scatter/any/sum)':<34}{base * 1e6:>10.0f}us{1.0:>9.2f}x")
    print(f"  {'dualcomm get_dispatch_layout':<34}{ours * 1e6:>10.0f}us{base / ours:>9.2f}x")


def torch_dispatch_combine(xs, in_ranks):
    """The same job in one process with plain PyTorch: gather rows per destination, then
    scatter-add them back per source."""
    world = len(xs)
    recv = [torch.cat([xs[s][in_ranks[s][:, d]] for s in range(world)]) for d in range(world)]
    out = []
    for s in range(world):
        acc = torch.zeros_like(xs[s], dtype=torch.float32)
        for d in range(world):
            sel = in_ranks[s][:, d]
            acc[sel] += xs[s][sel].float()
        out.append(acc.to(xs[s].dtype))
    return recv, out


def bench_loopback(worlds, tokens: int, rounds: int):
    hidden, k = 7168, 8
    rows = []
    print(
        f"\nloopback dispatch + combine: hidden {hidden} bf16, top-{k}, {tokens} tokens/rank, "
        f"{rounds} rounds after one warm-up"
    )
    print(
        f"  {'world':<6}{'payload MB':>11}{'dualcomm GB/s':>15}{'memcpy GB/s':>13}{'ratio':>8}"
        f"{'torch GB/s':>12}{'vs torch':>10}"
    )
    for nodes, rpn in worlds:
        world = nodes * rpn
        num_experts = 8 * world
        g = torch.Generator().manual_seed(world)
        xs = [torch.randn(tokens, hidden, generator=g).bfloat16() for _ in range(world)]
        idx = [torch.rand(tokens, num_experts, generator=g).topk(k, dim=1).indices for _ in range(world)]

        def rank_main(buf: Buffer, xs=xs, idx=idx, num_experts=num_experts):
            x = xs[buf.rank]
            pr, pn, pe, itr, _ = buf.get_dispatch_layout(idx[buf.rank], num_experts)
            # One untimed round first touches the rings and the pooled outputs: the steady
            # state of a training step is what is measured.
            recv_x, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=itr)
            assert isinstance(recv_x, torch.Tensor) and handle is not None
            buf.combine(recv_x, handle)
            before = buf.stats()
            start = time.perf_counter()
            for _ in range(rounds):
                recv_x, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=itr)
                assert isinstance(recv_x, torch.Tensor) and handle is not None
                buf.combine(recv_x, handle)
            elapsed = time.perf_counter() - start
            after = buf.stats()
            moved = sum(after[key] - before[key] for key in ("nvl_payload_bytes", "rdma_payload_bytes"))
            return elapsed, moved, itr

        out = run_loopback(nodes, rpn, rank_main, num_nvl_bytes=32 << 20, num_rdma_bytes=32 << 20)
        secs = max(o[0] for o in out)
        moved = sum(o[1] for o in out)
        ours = moved / secs
        src = torch.empty(moved // rounds, dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src).fill_(2)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        memcpy = (moved // rounds) / median_seconds(lambda d=dst, s=src: d.copy_(s), 3)
        torch.set_num_threads(threads)
        in_ranks = [o[2] for o in out]
        base_secs = median_seconds(lambda xs=xs, ir=in_ranks: torch_dispatch_combine(xs, ir), 2)
        torch_rate = (moved / rounds) / base_secs
        rows.append((f"{nodes}x{rpn}", ours / 1e9, memcpy / 1e9, torch_rate / 1e9))
        print(
            f"  {nodes}x{rpn:<4}{moved / 1e6:>11.1f}{ours / 1e9:>15.2f}{memcpy / 1e9:>13.2f}"
            f"{100 * ours / memcpy:>7.1f}%{torch_rate / 1e9:>12.2f}{ours / torch_rate:>9.2f}x",
            flush=True,
        )
    return rows


def bench_tokens_curve(token_counts: list[int], rounds: int) -> list[tuple[int, float, float, float]]:
    """Dispatch and combine payload GB/s on a 2x2 loopback world against tokens per rank, with
    one memcpy of the same bytes measured at each size: a throughput that falls as tokens grow
    means some cost grows faster than the work."""
    hidden, k, nodes, rpn = 7168, 8, 2, 2
    world, experts = nodes * rpn, 256
    curve = []
    print(f"\ntokens curve: 2x2 loopback, hidden {hidden} bf16, top-{k} of {experts}, best of {rounds}")
    print(f"  {'tokens':>7}{'dispatch GB/s':>15}{'combine GB/s':>14}{'memcpy GB/s':>13}")
    for tokens in token_counts:
        g = torch.Generator().manual_seed(tokens)
        xs = [torch.randn(tokens, hidden, generator=g).bfloat16() for _ in range(world)]
        idx = [torch.rand(tokens, experts, generator=g).topk(k, dim=1).indices for _ in range(world)]

        def rank_main(buf: Buffer, xs=xs, idx=idx):
            _, _, _, itr, _ = buf.get_dispatch_layout(idx[buf.rank], experts)
            best = [float("inf"), float("inf")]
            moved = 0
            for _ in range(rounds):
                before = buf.stats()
                t = time.perf_counter()
                recv_x, _, _, _, handle, _ = buf.dispatch(xs[buf.rank], is_token_in_rank=itr)
                best[0] = min(best[0], time.perf_counter() - t)
                assert isinstance(recv_x, torch.Tensor) and handle is not None
                t = time.perf_counter()
                buf.combine(recv_x, handle)
                best[1] = min(best[1], time.perf_counter() - t)
                after = buf.stats()
                moved = sum(after[key] - before[key] for key in ("nvl_payload_bytes", "rdma_payload_bytes")) // 2
            return best, moved

        out = run_loopback(nodes, rpn, rank_main, num_nvl_bytes=32 << 20, num_rdma_bytes=32 << 20)
        moved = sum(o[1] for o in out)
        d_secs, c_secs = max(o[0][0] for o in out), max(o[0][1] for o in out)
        src = torch.empty(max(moved, 1), dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src).fill_(2)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        memcpy = moved / median_seconds(lambda d=dst, s=src: d.copy_(s), 3)
        torch.set_num_threads(threads)
        curve.append((tokens, moved / d_secs / 1e9, moved / c_secs / 1e9, memcpy / 1e9))
        print(f"  {tokens:>7}{curve[-1][1]:>15.2f}{curve[-1][2]:>14.2f}{curve[-1][3]:>13.2f}", flush=True)
    return curve


def plot_curve(curve: list[tuple[int, float, float, float]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    tokens = [c[0] for c in curve]
    for col, name in ((1, "dispatch"), (2, "combine"), (3, "memcpy of the same bytes")):
        ax.plot(tokens, [c[col] for c in curve], marker="o", label=name, ls="--" if col == 3 else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank (2x2 loopback)")
    ax.set_ylabel("payload GB/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "tokens_curve.png", dpi=120)
    print(f"saved {out / 'tokens_curve.png'}")


def plot(rows, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install '.[bench]')")
        return
    labels = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for i, (name, col) in enumerate([("dualcomm", 1), ("memcpy (1 copy)", 2), ("plain PyTorch", 3)]):
        bars = ax.bar([j + (i - 1) * width for j in range(len(rows))], [r[col] for r in rows], width, label=name)
        if col == 1:
            # The ratios the table prints, on dualcomm's bars: share of memcpy, times PyTorch.
            ax.bar_label(
                bars,
                labels=[f"{100 * r[1] / r[2]:.0f}%\n{r[1] / r[3]:.1f}x" for r in rows],
                fontsize=8,
                padding=2,
            )
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("world (nodes x ranks per node), loopback")
    ax.set_ylabel("payload GB/s")
    ax.set_title("dispatch + combine, hidden 7168 bf16, top-8 (labels: % of memcpy, x PyTorch)", fontsize=10)
    ax.margins(y=0.15)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "loopback.png", dpi=120)
    print(f"saved {out / 'loopback.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--curve", default="128,512,2048,8192", help="tokens per rank for the curve ('' to skip)")
    a = p.parse_args()
    bench_routing(a.reps)
    rows = bench_loopback([(1, 2), (2, 1), (2, 2), (1, 4)], a.tokens, a.rounds)
    plot(rows, a.out)
    if a.curve:
        plot_curve(bench_tokens_curve([int(v) for v in a.curve.split(",")], a.rounds), a.out)


if __name__ == "__main__":
    main()
