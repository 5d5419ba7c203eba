"""The layers of one transformer block: RMSNorm, causal attention, a shared expert, the
node-limited gate and the routed experts (stacked, so a rank can hold any slice of them).

Every parameter is drawn from a generator seeded by (model seed, global layer, name), so any
split of the model over pipeline and expert-parallel ranks holds exactly the values a
single process would.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualcomm.dualpipe.utils import Linear
from dualcomm.model.config import MoEConfig


def seeded_normal(shape: tuple[int, ...], seed: int, key: str, std: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(ord(c) * 131**i for i, c in enumerate(key))) % 2**63)
    return torch.randn(shape, generator=g) * std


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.out = Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, h))


class SharedExpert(nn.Module):
    """SwiGLU feed-forward that every token goes through."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_up = Linear(hidden, 2 * inner, bias=False)
        self.down = Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)


class Gate(nn.Module):
    """Sigmoid affinities; each token first keeps its best `max_groups` expert groups (by the
    sum of the two best affinities in the group), then its top-k experts among them. The
    weights are the chosen affinities, normalized to sum to `route_scale`."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        scores = torch.sigmoid(F.linear(x, self.weight))
        per_group = cfg.num_experts // cfg.expert_groups
        with torch.no_grad():
            grouped = scores.view(-1, cfg.expert_groups, per_group)
            group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
            keep = group_score.topk(cfg.max_groups, dim=-1).indices
            mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            masked = scores.masked_fill(~mask.repeat_interleave(per_group, 1), -1.0)
            idx = masked.topk(cfg.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        return idx, w / w.sum(-1, keepdim=True) * cfg.route_scale


class RoutedExperts(nn.Module):
    """SwiGLU experts `[first, first + count)` of a layer, with stacked weights."""

    def __init__(self, cfg: MoEConfig, first: int, count: int) -> None:
        super().__init__()
        self.first, self.count = first, count
        self.gate_up = nn.Parameter(torch.empty(count, 2 * cfg.moe_hidden, cfg.hidden))
        self.down = nn.Parameter(torch.empty(count, cfg.hidden, cfg.moe_hidden))

    def forward(self, x: torch.Tensor, local_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`x [R, H]` rows, `local_idx [R, K]` (expert index in this slice, -1: not here),
        `weights [R, K]`: the weighted sum of each row's experts that live here."""
        out = torch.zeros_like(x)
        for j in range(self.count):
            rows, slots = (local_idx == j).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            gate, up = F.linear(x[rows], self.gate_up[j]).chunk(2, -1)
            y = F.linear(F.silu(gate) * up, self.down[j])
            out = out.index_add(0, rows, y * weights[rows, slots].unsqueeze(1))
        return out


def init_layer_parameters(module: nn.Module, cfg: MoEConfig, layer_key: str) -> None:
    """Fills every parameter from its seeded generator. Routed experts are drawn for the whole
    layer and sliced, so each rank's slice equals the single-process layer's."""
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                key = f"{layer_key}.{mod_name}.{p_name}"
                if isinstance(mod, RMSNorm):
                    p.fill_(1.0)
                elif isinstance(mod, RoutedExperts):
                    full = seeded_normal((cfg.num_experts, *p.shape[1:]), cfg.seed, key)
                    p.copy_(full[mod.first : mod.first + mod.count])
                else:
                    p.copy_(seeded_normal(tuple(p.shape), cfg.seed, key))
