"""Rank programs for tests/test_deep_ep_refs.py (spawned processes import them by name)."""

from __future__ import annotations

from typing import Any

import torch


def rank_inputs(rank: int, max_tokens: int, hidden: int, num_topk: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tokens, made from its rank alone so that the test can make every rank's."""
    g = torch.Generator().manual_seed(100 + rank)
    num_tokens = max_tokens - rank
    x = torch.randn(num_tokens, hidden, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:num_topk] for _ in range(num_tokens)])
    idx[torch.rand(num_tokens, num_topk, generator=g) < 0.2] = -1
    weights = torch.rand(num_tokens, num_topk, generator=g)
    return dict(x=x, topk_idx=idx, topk_weights=weights)


def refs_dispatch(
    rank: int, world: int, max_tokens: int, hidden: int, num_topk: int, num_experts: int
) -> dict[str, Any]:
    from dualcomm.deep_ep.utils.math import per_token_cast_to_fp8
    from dualcomm.deep_ep.utils.refs import dispatch

    inp = rank_inputs(rank, max_tokens, hidden, num_topk, num_experts)
    plain = dispatch(inp["x"], inp["topk_idx"], inp["topk_weights"], max_tokens, num_experts)
    (fp8_x, fp8_sf), *rest = dispatch(per_token_cast_to_fp8(inp["x"]), inp["topk_idx"], None, max_tokens, num_experts)
    # FP8 tensors do not cross processes: their bytes do.
    return dict(plain=plain, fp8=((fp8_x.view(torch.uint8), fp8_sf), *rest))
