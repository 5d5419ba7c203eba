"""A small loopback world that dispatches and combines, and shows what moved where.

    python -m dualcomm.demo [--nodes 2] [--ranks-per-node 2] [--tokens 64] [--hidden 512]

Four ranks (two emulated nodes of two) route a DeepSeek-V3-style top-k over their experts.
Each token crosses the network (rdma tier) once per destination node and is forwarded inside
the node (nvl tier); the demo counts both and compares with sending every token to every
destination rank directly.
"""

from __future__ import annotations

import argparse
import time

import torch

from dualcomm import Buffer
from dualcomm._arrays import tensor_of
from dualcomm.testing import run_loopback


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dualcomm.demo", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--experts-per-rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    a = _parse()
    world = a.nodes * a.ranks_per_node
    num_experts = world * a.experts_per_rank

    def rank_main(buf: Buffer):
        g = torch.Generator().manual_seed(a.seed * 1000 + buf.rank)
        x = torch.randn(a.tokens, a.hidden, generator=g).bfloat16()
        scores = torch.rand(a.tokens, num_experts, generator=g)
        topk_idx = scores.topk(a.topk, dim=1).indices
        topk_w = torch.softmax(scores.gather(1, topk_idx), dim=1)
        per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
        start = time.perf_counter()
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_node,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_w,
        )
        after_dispatch = buf.stats()
        assert isinstance(recv_x, torch.Tensor) and handle is not None  # bf16 in, bf16 out; a fresh handle
        combined, _, _ = buf.combine(recv_x, handle)
        elapsed = time.perf_counter() - start
        # Partial sums are rounded to bf16 per node before crossing the network, as in DeepEP.
        want = x.float() * in_rank.sum(1, keepdim=True)
        ok = torch.allclose(combined.float(), want, rtol=2e-2, atol=2e-2)
        src = tensor_of(handle.recv_src_rank().astype("int64"))
        from_rank = torch.bincount(src, minlength=world).tolist()
        return dict(
            per_rank=per_rank.tolist(),
            from_rank=from_rank,
            counts=counts,
            dispatch=after_dispatch,
            total=buf.stats(),
            ok=ok,
            elapsed=elapsed,
            remote_pairs=int(in_rank.view(-1, a.nodes, a.ranks_per_node).any(2).sum())
            - int(in_rank.view(-1, a.nodes, a.ranks_per_node)[:, buf.rank // a.ranks_per_node].any(1).sum()),
            remote_rank_pairs=int(in_rank.sum())
            - int(in_rank.view(-1, a.nodes, a.ranks_per_node)[:, buf.rank // a.ranks_per_node].sum()),
        )

    print(
        f"dualcomm loopback demo: {a.nodes} nodes x {a.ranks_per_node} ranks, {a.tokens} tokens/rank, "
        f"hidden {a.hidden} bf16, top-{a.topk} of {num_experts} experts"
    )
    results = run_loopback(a.nodes, a.ranks_per_node, rank_main)
    row_bytes = a.hidden * 2

    print("\ntokens sent (row: source rank, column: destination rank)")
    print("       " + "".join(f"{d:>7}" for d in range(world)))
    for s, r in enumerate(results):
        print(f"  {s:>3}  " + "".join(f"{c:>7}" for c in r["per_rank"]))
    print("\ntokens received, by source rank, and per local expert")
    for d, r in enumerate(results):
        print(f"  rank {d}: from {r['from_rank']}  per expert {r['counts']}")

    print("\npayload bytes sent by each rank (dispatch | combine)")
    print(f"  {'rank':>4} {'nvl':>12} {'rdma':>12} {'nvl':>12} {'rdma':>12}")
    for d, r in enumerate(results):
        dn, dr = r["dispatch"]["nvl_payload_bytes"], r["dispatch"]["rdma_payload_bytes"]
        tn, tr = r["total"]["nvl_payload_bytes"], r["total"]["rdma_payload_bytes"]
        print(f"  {d:>4} {dn:>12,} {dr:>12,} {tn - dn:>12,} {tr - dr:>12,}")

    rdma = sum(r["dispatch"]["rdma_payload_bytes"] for r in results)
    naive = sum(r["remote_rank_pairs"] for r in results) * row_bytes
    pairs = sum(r["remote_pairs"] for r in results)
    print(
        f"\nnetwork (rdma) bytes of dispatch: {rdma:,} = {pairs} (token, remote node) pairs x {row_bytes} B;"
        f"\nsending to every remote destination rank directly would cost {naive:,} "
        f"({naive / max(rdma, 1):.2f}x)"
    )
    ok = all(r["ok"] for r in results)
    print(f"combine(dispatch(x)) == x * fan-out (bf16 tolerance) on every rank: {'yes' if ok else 'NO'}")
    print(f"slowest rank: {max(r['elapsed'] for r in results) * 1e3:.1f} ms for dispatch + combine")
    if not ok or rdma != pairs * row_bytes:
        raise SystemExit("demo check failed")


if __name__ == "__main__":
    main()
