"""Multi-process dispatch + combine benchmark against torch.distributed, in the same run.

    python -m dualcomm.bench [--tokens 1024] [--rounds 5] [--out bench-results]

For each world (processes x emulated nodes) it starts one process per rank (gloo group),
runs the DeepSeek-V3 shapes scaled to this machine (hidden 7168 bf16, top-8 of 256 experts)
through `dualcomm.Buffer`, and does the same job with `all_to_all_single` on gloo: gather the
rows per destination rank, exchange, exchange back, sum per token. Both move the same token
rows; the table gives each one's payload GB/s and the ratio. Where the world spans emulated
nodes it also times plain TCP sockets between the same processes carrying exactly the bytes
dualcomm sent over its tcp tier (each rank to its twin on every other node, all at once):
the ceiling that tier can reach on this machine, as the payload GB/s it would give.
Writes bench.json, and bench.png when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

HIDDEN, TOPK, EXPERTS = 7168, 8, 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gloo_dispatch_combine(x: torch.Tensor, in_rank: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    world = in_rank.shape[1]
    # Dispatch: rows grouped by destination rank, sizes exchanged first.
    order = [torch.nonzero(in_rank[:, d]).flatten() for d in range(world)]
    send = torch.cat([x[o] for o in order])
    send_counts = torch.tensor([len(o) for o in order])
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    recv = torch.empty(int(recv_counts.sum()), x.shape[1], dtype=x.dtype)
    dist.all_to_all_single(recv, send, recv_counts.tolist(), send_counts.tolist())
    # Combine: the rows go back the same way and are summed per token.
    back = torch.empty_like(send)
    dist.all_to_all_single(back, recv, send_counts.tolist(), recv_counts.tolist())
    out = torch.zeros(x.shape, dtype=torch.float32)
    out.index_add_(0, torch.cat(order), back.float())
    return out.to(x.dtype)


def _socket_exchange(rank: int, world: int, nodes: int, nbytes: int, rounds: int) -> float:
    """The median seconds for every rank to send `nbytes`, split evenly over its twins on
    the other nodes, and to receive what each twin sends it, over plain TCP sockets, all at
    once: what dualcomm's tcp tier does with the same bytes, with nothing else to do."""
    import torch.distributed as dist

    rpn = world // nodes
    twins = [n * rpn + rank % rpn for n in range(nodes) if n != rank // rpn]
    listener = socket.create_server(("127.0.0.1", 0))
    # Each rank's port, and how much it sends to each of its twins.
    peers: list[Any] = [None] * world
    dist.all_gather_object(peers, (listener.getsockname()[1], nbytes // max(1, len(twins))))
    ports = [p[0] for p in peers]
    # The lower rank of each pair connects, the higher accepts: one connection per pair.
    out = {t: socket.create_connection(("127.0.0.1", ports[t])) for t in twins if t > rank}
    for _ in range(sum(t < rank for t in twins)):
        conn, _ = listener.accept()
        out[int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "little")] = conn
    for t, conn in out.items():
        if t > rank:
            conn.sendall(rank.to_bytes(4, "little"))
    listener.close()
    payload = bytearray(peers[rank][1])
    sinks = {t: bytearray(peers[t][1]) for t in twins}

    failures: list[BaseException] = []

    def receive(t: int) -> None:
        view, got = memoryview(sinks[t]), 0
        try:
            while got < len(view):
                n = out[t].recv_into(view[got:])
                if n == 0:
                    raise ConnectionError(f"rank {t} closed its socket after {got} of {len(view)} bytes")
                got += n
        except BaseException as e:  # raised on the main thread below, not lost with this one
            failures.append(e)

    times = []
    for _ in range(rounds + 1):
        dist.barrier()
        start = time.perf_counter()
        threads = [threading.Thread(target=receive, args=(t,)) for t in twins]
        for th in threads:
            th.start()
        for t in twins:
            out[t].sendall(payload)
        for th in threads:
            th.join()
        if failures:
            raise failures[0]
        times.append(time.perf_counter() - start)
    for conn in out.values():
        conn.close()
    return statistics.median(times[1:])


def _rank_main(
    rank: int, world: int, port: int, nodes: int, tokens: int, rounds: int, channels: int | None, queue: Any
) -> None:
    import torch.distributed as dist

    from dualcomm import Buffer

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, HIDDEN, generator=g).bfloat16()
    topk_idx = torch.rand(tokens, EXPERTS, generator=g).topk(TOPK, dim=1).indices
    buf = Buffer(
        dist.group.WORLD,
        num_nvl_bytes=64 << 20,
        num_rdma_bytes=64 << 20,
        ranks_per_node=world // nodes,
        explicitly_destroy=True,
        num_channels=channels,
    )
    _, _, _, in_rank, _ = buf.get_dispatch_layout(topk_idx, EXPERTS)
    row = HIDDEN * 2
    # Token rows that leave the rank, each way (what both implementations must move).
    moved = 2 * int(in_rank.sum() - in_rank[:, rank].sum()) * row

    def ours() -> torch.Tensor:
        recv_x, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=in_rank)
        assert isinstance(recv_x, torch.Tensor) and handle is not None
        return buf.combine(recv_x, handle)[0]

    results: dict[str, Any] = {}
    for name, fn in (("dualcomm", ours), ("gloo", lambda: _gloo_dispatch_combine(x, in_rank))):
        fn()  # warm-up
        times = []
        for _ in range(rounds):
            dist.barrier()
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        results[name] = statistics.median(times)
        want = (x.float() * in_rank.sum(1, keepdim=True)).bfloat16()
        results[name + "_ok"] = bool(torch.allclose(out.float(), want.float(), rtol=2e-2, atol=2e-2))
    results["moved"] = moved
    if nodes > 1:
        # Everything that crossed the tier: token rows, headers, counts, credits.
        before = buf.stats()["rdma_wire_bytes"]
        ours()
        results["tcp_bytes"] = buf.stats()["rdma_wire_bytes"] - before
        results["socket"] = _socket_exchange(rank, world, nodes, results["tcp_bytes"], rounds)
    results["transport"] = buf.transport
    results["channels"] = buf.num_channels
    results["stats"] = buf.stats()
    queue.put((rank, results))
    buf.destroy()
    dist.destroy_process_group()


def run_world(procs: int, nodes: int, tokens: int, rounds: int, channels: int | None = None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    ps = [
        ctx.Process(target=_rank_main, args=(r, procs, port, nodes, tokens, rounds, channels, queue), daemon=True)
        for r in range(procs)
    ]
    for p in ps:
        p.start()
    got = dict(queue.get(timeout=600) for _ in ps)
    for p in ps:
        p.join(60)
    moved = sum(g["moved"] for g in got.values())
    ours = max(g["dualcomm"] for g in got.values())
    base = max(g["gloo"] for g in got.values())
    socket_s = max((g.get("socket", 0.0) for g in got.values()), default=0.0)
    return dict(
        procs=procs,
        nodes=nodes,
        tokens=tokens,
        payload_mb=moved / 1e6,
        dualcomm_gbps=moved / ours / 1e9,
        gloo_gbps=moved / base / 1e9,
        ratio=base / ours,
        # The payload GB/s the tcp tier's bytes over plain sockets would give (None: no tcp).
        socket_gbps=moved / socket_s / 1e9 if socket_s else None,
        correct=all(g["dualcomm_ok"] and g["gloo_ok"] for g in got.values()),
        rdma_payload_bytes=sum(g["stats"]["rdma_payload_bytes"] for g in got.values()),
        transport=got[0]["transport"],
        channels=got[0]["channels"],
    )


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install 'dualcomm[bench]')")
        return
    labels = [f"{r['procs']}p/{r['nodes']}n\n{r['transport']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    xs = range(len(rows))
    ours = [r["dualcomm_gbps"] for r in rows]
    bars = ax.bar([i - 0.2 for i in xs], ours, 0.4, label="dualcomm")
    ax.bar([i + 0.2 for i in xs], [r["gloo_gbps"] for r in rows], 0.4, label="gloo all_to_all_single")
    # The ratio against gloo in the same run, on each dualcomm bar: what the chart is for.
    ax.bar_label(bars, labels=[f"{r['ratio']:.1f}x" for r in rows], padding=2)
    # Where the tcp tier's bytes alone over plain sockets would put dualcomm: a ceiling mark.
    ceilings = [(i, r["socket_gbps"]) for i, r in zip(xs, rows) if r.get("socket_gbps")]
    if ceilings:
        ax.scatter(
            [i - 0.2 for i, _ in ceilings],
            [c for _, c in ceilings],
            marker="_",
            s=900,
            color="black",
            label="ceiling: tcp tier's bytes over plain sockets",
        )
    ax.set_ylim(0, max(ours + [c for _, c in ceilings] + [1e-9]) * 1.18)
    ax.set_xticks(list(xs), labels)
    ax.set_xlabel("processes / emulated nodes, transport")
    ax.set_ylabel("token payload GB/s")
    ax.set_title(f"dispatch + combine, hidden {HIDDEN} bf16, top-{TOPK} of {EXPERTS} (labels: x gloo)")
    # Below the axes, so that no bar is hidden whatever the heights.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False, fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    print(f"saved {out / 'bench.png'}")


def _socket_cells(r: dict[str, Any]) -> str:
    """The plain-socket ceiling of the tcp tier, and dualcomm's share of it ("-": no tcp)."""
    if r["socket_gbps"] is None:
        return f"{'-':>12} {'-':>10}"
    return f"{r['socket_gbps']:>12.2f} {100 * r['dualcomm_gbps'] / r['socket_gbps']:>9.0f}%"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m dualcomm.bench", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument(
        "--channels", type=int, default=None, help="channels per buffer (default: from Buffer.num_sms and the cores)"
    )
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    worlds = [(2, 1), (2, 2), (4, 1), (4, 2)]
    print(f"dispatch + combine, hidden {HIDDEN} bf16, top-{TOPK} of {EXPERTS}, {a.tokens} tokens/rank")
    print(
        f"{'procs':>5} {'nodes':>5} {'transport':>9} {'ch':>3} {'payload MB':>11}"
        f" {'dualcomm GB/s':>14} {'gloo GB/s':>10} {'ratio':>7} {'socket GB/s':>12} {'of socket':>10}  ok"
    )
    rows = []
    for i, (procs, nodes) in enumerate(worlds, 1):
        r = run_world(procs, nodes, a.tokens, a.rounds, a.channels)
        rows.append(r)
        print(
            f"{procs:>5} {nodes:>5} {r['transport']:>9} {r['channels']:>3} {r['payload_mb']:>11.1f}"
            f" {r['dualcomm_gbps']:>14.2f} {r['gloo_gbps']:>10.2f}"
            f" {r['ratio']:>6.2f}x {_socket_cells(r)}  {'yes' if r['correct'] else 'NO'}   [{i}/{len(worlds)}]",
            flush=True,
        )
    (a.out / "bench.json").write_text(json.dumps(rows, indent=2))
    print(f"saved {a.out / 'bench.json'}")
    _plot(rows, a.out)


if __name__ == "__main__":
    main()
