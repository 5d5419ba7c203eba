"""Plain-PyTorch reference for expert-parallel dispatch and combine.

Written from the definition, with no dualcomm code: a token goes to every rank that owns
one of its experts; ranks own contiguous blocks of experts; each rank receives rows ordered
by source rank, then source token index; combine sums, per token, the rows of every rank it
went to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RankInput:
    x: torch.Tensor  # [T, H] (bf16 / fp32), or FP8 data
    topk_idx: torch.Tensor  # [T, K] int64
    topk_weights: torch.Tensor  # [T, K] float32
    scales: torch.Tensor | None = None  # [T, H/128] for FP8


def layout(topk_idx: torch.Tensor, num_experts: int, num_nodes: int, ranks_per_node: int):
    world = num_nodes * ranks_per_node
    t = topk_idx.shape[0]
    chosen = torch.zeros(t, num_experts, dtype=torch.bool)
    valid = topk_idx >= 0
    rows = torch.arange(t).unsqueeze(1).expand_as(topk_idx)
    chosen[rows[valid], topk_idx[valid]] = True
    in_rank = chosen.view(t, world, num_experts // world).any(2)
    per_node = in_rank.view(t, num_nodes, ranks_per_node).any(2).sum(0).int()
    return in_rank.sum(0).int(), per_node, chosen.sum(0).int(), in_rank


def dispatch(inputs: list[RankInput], num_experts: int, world: int, dest: int, alignment: int = 1):
    """What `dest` receives: (x, scales, local topk idx, local topk weights, per-expert counts,
    [(source rank, source index)] in receive order)."""
    epr = num_experts // world
    lo, hi = dest * epr, (dest + 1) * epr
    xs, scales, idxs, ws, origin = [], [], [], [], []
    for s, inp in enumerate(inputs):
        local = (inp.topk_idx >= lo) & (inp.topk_idx < hi)
        goes = local.any(1)
        xs.append(inp.x[goes])
        if inp.scales is not None:
            scales.append(inp.scales[goes])
        idxs.append(torch.where(local, inp.topk_idx - lo, torch.full_like(inp.topk_idx, -1))[goes])
        ws.append(torch.where(local, inp.topk_weights, torch.zeros_like(inp.topk_weights))[goes])
        origin += [(s, int(i)) for i in torch.nonzero(goes).flatten()]
    recv_idx = torch.cat(idxs)
    counts = []
    for e in range(epr):
        c = int((recv_idx == e).any(1).sum())
        counts.append((c + alignment - 1) // alignment * alignment)
    return (
        torch.cat(xs),
        torch.cat(scales) if scales else None,
        recv_idx,
        torch.cat(ws),
        counts,
        origin,
    )


def combine(
    rows_per_rank: list[torch.Tensor],
    origins: list[list[tuple[int, int]]],
    source: int,
    num_tokens: int,
) -> torch.Tensor:
    """Per token of `source`: the fp32 sum of the rows every rank holds for it."""
    hidden = rows_per_rank[0].shape[1]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for rows, origin in zip(rows_per_rank, origins):
        for j, (s, i) in enumerate(origin):
            if s == source:
                out[i] += rows[j].float()
    return out


def random_inputs(
    world: int,
    tokens: list[int],
    hidden: int,
    num_topk: int,
    num_experts: int,
    dtype: torch.dtype,
    seed: int,
    masked_fraction: float = 0.2,
) -> list[RankInput]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        t = tokens[r]
        # Distinct experts per token, as a gate picks them, then some masked with -1.
        scores = torch.rand(t, num_experts, generator=g)
        idx = scores.topk(min(num_topk, num_experts), dim=1).indices
        if num_topk > num_experts:
            idx = torch.cat([idx, torch.full((t, num_topk - num_experts), -1)], 1)
        mask = torch.rand(t, num_topk, generator=g) < masked_fraction
        idx = torch.where(mask, torch.full_like(idx, -1), idx)
        w = torch.rand(t, num_topk, generator=g)
        if dtype == torch.float8_e4m3fn:
            x = (torch.randn(t, hidden, generator=g) * 4).to(dtype)
            scales = torch.rand(t, hidden // 128, generator=g) + 0.5
            out.append(RankInput(x, idx, w, scales))
        else:
            # Small integers: sums are exact in fp32 and bf16, so checks can be bitwise.
            x = torch.randint(-8, 9, (t, hidden), generator=g).to(dtype)
            out.append(RankInput(x, idx, w))
    return out


# ---- the bundled MoE model, written out in plain PyTorch ---------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    a, b = (x @ gate_up.T).chunk(2, -1)
    return (a * torch.sigmoid(a) * b) @ down.T


def moe_route(scores: torch.Tensor, groups: int, max_groups: int, k: int) -> torch.Tensor:
    """Top-k experts of each token among its best `max_groups` groups (group score: sum of
    its two best affinities)."""
    t, e = scores.shape
    per = e // groups
    chosen = []
    for i in range(t):
        g_scores = [
            sorted(scores[i, g * per : (g + 1) * per].tolist(), reverse=True)[: min(2, per)] for g in range(groups)
        ]
        best_groups = sorted(range(groups), key=lambda g: -sum(g_scores[g]))[:max_groups]
        allowed = [ex for g in best_groups for ex in range(g * per, (g + 1) * per)]
        allowed.sort(key=lambda ex: -scores[i, ex].item())
        chosen.append(allowed[:k])
    return torch.tensor(chosen, dtype=torch.int64)


def moe_model_logits(p: dict[str, torch.Tensor], cfg: Any, ids: torch.Tensor) -> torch.Tensor:
    """The whole model on one process: `p` maps the single-process parameter names
    (`embed.weight`, `blocks.{layer}.…`, `norm.weight`, `head.weight`) to tensors."""
    b, s = ids.shape
    hd = cfg.hidden // cfg.heads
    h = p["embed.weight"][ids]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for layer in range(cfg.num_layers):
        q = f"blocks.{layer}."
        x = _rms(h, p[q + "norm1.weight"])
        qkv = (x @ p[q + "attn.qkv.weight"].T).view(b, s, 3, cfg.heads, hd)
        qh, kh, vh = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = (qh @ kh.transpose(-1, -2)) / hd**0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ vh).transpose(1, 2).reshape(b, s, cfg.hidden)
        h = h + y @ p[q + "attn.out.weight"].T
        hn = _rms(h, p[q + "norm2.weight"])
        flat = hn.reshape(-1, cfg.hidden)
        scores = torch.sigmoid(flat @ p[q + "gate.weight"].T)
        idx = moe_route(scores.detach(), cfg.expert_groups, cfg.max_groups, cfg.top_k)
        w = scores.gather(1, idx)
        w = w / w.sum(-1, keepdim=True) * cfg.route_scale
        routed = torch.zeros_like(flat)
        for e in range(cfg.num_experts):
            rows, slots = (idx == e).nonzero(as_tuple=True)
            if len(rows):
                out = _swiglu(flat[rows], p[q + "experts.gate_up"][e], p[q + "experts.down"][e])
                routed = routed.index_add(0, rows, out * w[rows, slots, None])
        shared = _swiglu(hn, p[q + "shared.gate_up.weight"], p[q + "shared.down.weight"])
        h = h + shared + routed.view_as(h)
    return _rms(h, p["norm.weight"]) @ p["head.weight"].T


def moe_model_loss(p: dict[str, torch.Tensor], cfg: Any, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = moe_model_logits(p, cfg, ids)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
