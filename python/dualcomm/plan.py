"""A cost model of dispatch and combine at cluster scale: `python -m dualcomm.plan`.

These machines cannot hold a 64-GPU job, but its traffic can be counted exactly. For a world
of `nodes x ranks_per_node`, each rank's tokens are routed by a node-limited gate (each token
picks at most `node_limit` nodes, then its top-k experts inside them; uniform or skewed
expert popularity), the Rust core builds the routing tables (`routing_tables`, the same as
`get_dispatch_layout`), and every byte is assigned to a link:

- two-hop (dualcomm, DeepEP): a token crosses the network once per destination node, to the
  rank of the same local index there, which forwards it over NVLink to the ranks that need it;
- flat all-to-all: a token goes to every destination rank directly.

A rank's time is its busiest link (bytes in or out over bandwidth, the hops streaming at
once, as chunked rings let them) plus each hop's latency; an operation takes its slowest
rank. Bandwidth is reported as DeepEP reports it: intranode, bytes received over NVLink per
rank (`recv_x` bytes); internode, "RDMA" bytes per rank counted per (token, destination node)
including the rank's own node, as DeepEP's tests count them. Predictions are compared with
DeepEP's published H800 figures and shown for the transports dualcomm has.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dualcomm._native import routing_tables

#: DeepEP's published H800 results (4096 tokens, hidden 7168, top-8 of 256, FP8 dispatch,
#: BF16 combine; NVLink ~160 GB/s, 400 Gb/s InfiniBand): (nodes, ranks per node) ->
#: (dispatch GB/s, combine GB/s, what the bandwidth counts).
DEEPEP_H800: dict[tuple[int, int], tuple[float, float, str]] = {
    (1, 8): (153.0, 158.0, "nvl"),
    (2, 8): (43.0, 43.0, "rdma"),
    (4, 8): (58.0, 57.0, "rdma"),
    (8, 8): (51.0, 50.0, "rdma"),
}


@dataclass(frozen=True)
class Link:
    gbps: float  # GB/s, one direction
    latency_us: float


@dataclass(frozen=True)
class Scenario:
    nodes: int
    ranks_per_node: int
    tokens: int = 4096
    hidden: int = 7168
    topk: int = 8
    experts: int = 256
    node_limit: int = 4
    skew: float = 0.0  # 0: uniform expert popularity; s > 0: Zipf(s) over experts
    dispatch_bytes_per_elem: float = 1 + 4 / 128  # FP8 rows and their per-128-channel scales
    combine_bytes_per_elem: float = 2.0  # bf16

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


def gate(s: Scenario, rank: int, seed: int) -> torch.Tensor:
    """`[tokens, topk]` expert choices: the best `node_limit` nodes (by their best expert's
    score), then the top-k experts inside them."""
    g = torch.Generator().manual_seed(seed * 100_003 + rank)
    scores = torch.rand(s.tokens, s.experts, generator=g)
    if s.skew > 0:
        popularity = 1.0 / torch.arange(1, s.experts + 1, dtype=torch.float32) ** s.skew
        scores = scores * popularity[torch.randperm(s.experts, generator=torch.Generator().manual_seed(seed))]
    per_node = scores.view(s.tokens, s.nodes, -1)
    limit = min(s.node_limit, s.nodes)
    keep = per_node.amax(2).topk(limit, dim=1).indices
    mask = torch.zeros(s.tokens, s.nodes, dtype=torch.bool).scatter_(1, keep, True)
    masked = torch.where(mask.repeat_interleave(s.experts // s.nodes, dim=1), scores, torch.full_like(scores, -1.0))
    return masked.topk(s.topk, dim=1).indices


@dataclass
class Traffic:
    """Tokens per rank on each link and direction (multiply by a token's bytes)."""

    rdma_out: np.ndarray
    rdma_in: np.ndarray
    nvl_out: np.ndarray
    nvl_in: np.ndarray
    flat_net_out: np.ndarray
    flat_net_in: np.ndarray
    flat_nvl_out: np.ndarray
    flat_nvl_in: np.ndarray
    received: np.ndarray  # tokens each rank receives (its own included): DeepEP's recv_x rows
    deepep_rdma: np.ndarray  # (token, destination node) pairs, own node included


def traffic(s: Scenario, seed: int = 0) -> Traffic:
    w, nodes, rpn = s.world, s.nodes, s.ranks_per_node
    z = lambda: np.zeros(w, dtype=np.int64)  # noqa: E731
    t = Traffic(z(), z(), z(), z(), z(), z(), z(), z(), z(), z())
    for src in range(w):
        _, _, _, flat = routing_tables(gate(s, src, seed).numpy(), s.experts, nodes, rpn)
        in_rank = np.asarray(flat).reshape(s.tokens, nodes, rpn)
        reach = np.asarray(in_rank.any(axis=2))  # [tokens, nodes]
        node, local = divmod(src, rpn)
        per_rank = in_rank.sum(0)  # [nodes, rpn]: tokens for each destination rank
        t.received += per_rank.reshape(w)
        t.deepep_rdma[src] += int(reach.sum())
        for n in range(nodes):
            mine = np.arange(n * rpn, (n + 1) * rpn)
            if n == node:
                others = mine[mine != src]
                t.nvl_out[src] += int(per_rank[n].sum() - per_rank[n, local])
                t.nvl_in[others] += per_rank[n][np.arange(rpn) != local]
                t.flat_nvl_out[src] += int(per_rank[n].sum() - per_rank[n, local])
                t.flat_nvl_in[others] += per_rank[n][np.arange(rpn) != local]
                continue
            fwd = n * rpn + local  # the rank of this local index on node n
            crossing = int(reach[:, n].sum())
            t.rdma_out[src] += crossing
            t.rdma_in[fwd] += crossing
            onward = per_rank[n][np.arange(rpn) != local]
            t.nvl_out[fwd] += int(onward.sum())
            t.nvl_in[mine[np.arange(rpn) != local]] += onward
            t.flat_net_out[src] += int(per_rank[n].sum())
            t.flat_net_in[mine] += per_rank[n]
    return t


@dataclass
class Prediction:
    time_us: float
    gbps: float  # DeepEP's bandwidth definition (see the module)
    net_gb: float  # busiest rank's network bytes, in and out the larger
    nvl_gb: float


def predict(s: Scenario, t: Traffic, nic: Link, nvl: Link, bytes_per_elem: float, two_hop: bool = True) -> Prediction:
    token = s.hidden * bytes_per_elem
    if two_hop:
        net = np.maximum(t.rdma_out, t.rdma_in) * token
        near = np.maximum(t.nvl_out, t.nvl_in) * token
        hops_us = (nic.latency_us if s.nodes > 1 else 0.0) + nvl.latency_us
    else:
        net = np.maximum(t.flat_net_out, t.flat_net_in) * token
        near = np.maximum(t.flat_nvl_out, t.flat_nvl_in) * token
        hops_us = max(nic.latency_us if s.nodes > 1 else 0.0, nvl.latency_us)
    per_rank_s = np.maximum(net / (nic.gbps * 1e9), near / (nvl.gbps * 1e9))
    time_us = float(per_rank_s.max() * 1e6 + hops_us)
    counted = t.received if s.nodes == 1 else t.deepep_rdma
    gbps = float(counted.mean() * token / (time_us * 1e-6) / 1e9)
    return Prediction(time_us, gbps, float(net.max() / 1e9), float(near.max() / 1e9))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dualcomm.plan", description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="1x8,2x8,4x8,8x8", help="nodes x ranks per node, comma-separated")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--node-limit", type=int, default=4)
    p.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of expert popularity (0: uniform)")
    p.add_argument("--nic-gbps", type=float, default=50.0, help="network GB/s per rank (400 Gb/s IB: 50)")
    p.add_argument("--nic-latency-us", type=float, default=3.0)
    p.add_argument("--nvl-gbps", type=float, default=160.0, help="NVLink GB/s per rank (H800: ~160)")
    p.add_argument("--nvl-latency-us", type=float, default=1.0)
    p.add_argument("--tcp-gbps", type=float, default=4.2, help="dualcomm's tcp tier as measured (cargo bench)")
    p.add_argument("--out", type=Path, default=Path("plan-output"))
    a = p.parse_args(argv)
    nic, nvl = Link(a.nic_gbps, a.nic_latency_us), Link(a.nvl_gbps, a.nvl_latency_us)
    tcp = Link(a.tcp_gbps, 60.0)
    rows = []
    print(
        f"{'world':<6}{'op':<9}{'two-hop us':>11}{'GB/s':>8}{'flat us':>10}{'GB/s':>8}"
        f"{'DeepEP':>8}{'model/DeepEP':>13}{'over tcp us':>12}"
    )
    for cfg in a.configs.split(","):
        nodes, rpn = (int(v) for v in cfg.lower().split("x"))
        s = Scenario(nodes, rpn, a.tokens, a.hidden, a.topk, a.experts, a.node_limit, a.skew)
        print(f"[plan] routing {s.world} ranks x {s.tokens} tokens ...", flush=True)
        t = traffic(s)
        for op, elem in (("dispatch", s.dispatch_bytes_per_elem), ("combine", s.combine_bytes_per_elem)):
            two = predict(s, t, nic, nvl, elem)
            flat = predict(s, t, nic, nvl, elem, two_hop=False)
            over_tcp = predict(s, t, tcp, nvl, elem)
            ref = DEEPEP_H800.get((nodes, rpn))
            deepep = None if ref is None else float(ref[0 if op == "dispatch" else 1])
            ratio = "" if deepep is None else f"{two.gbps / deepep:.2f}"
            print(
                f"{cfg:<6}{op:<9}{two.time_us:>11.0f}{two.gbps:>8.1f}{flat.time_us:>10.0f}{flat.gbps:>8.1f}"
                f"{'' if deepep is None else f'{deepep:.0f}':>8}{ratio:>13}{over_tcp.time_us:>12.0f}"
            )
            rows.append(
                dict(
                    world=cfg,
                    op=op,
                    two_hop=asdict(two),
                    flat=asdict(flat),
                    over_tcp=asdict(over_tcp),
                    deepep_gbps=deepep,
                )
            )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "plan.json").write_text(json.dumps(dict(args=vars(a) | {"out": str(a.out)}, rows=rows), indent=2))
    _plot(rows, a.out / "plan.png")
    print(f"saved {a.out / 'plan.json'} and {a.out / 'plan.png'}")


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{r['world']} {r['op'][:4]}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 3.6))
    ax.bar(x - 0.27, [r["two_hop"]["gbps"] for r in rows], 0.27, label="model: two-hop")
    ax.bar(x, [r["flat"]["gbps"] for r in rows], 0.27, label="model: flat all-to-all")
    ax.bar(x + 0.27, [r["deepep_gbps"] or 0 for r in rows], 0.27, label="DeepEP H800 (published)")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("GB/s per rank (DeepEP's definition)")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
