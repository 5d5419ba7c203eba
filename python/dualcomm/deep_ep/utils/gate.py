"""`deep_ep.utils.gate`: gate scores with a chosen imbalance, for tests and benchmarks written
against DeepEP 2's (`get_unbalanced_scores`).

Rank 0 is the hot rank: it receives `ratio` times the tokens each other rank receives (a
token counts once per rank it has an expert on). Scores are float32 on the default device
(the GPU after `init_dist` on a GPU host), drawn from torch's generator, so `init_seed` makes
them reproducible per rank.
"""

from __future__ import annotations

import math

import torch

#: Scores of the chosen experts lie above this, all others below, so `torch.topk` picks
#: exactly the chosen ones.
_THRESHOLD = 0.9
#: Bisection steps and sample size that calibrate the random mode's skew.
_STEPS = 20
_SAMPLE_TOKENS = 4096


def _check(num_tokens: int, num_experts: int, num_ranks: int, num_topk: int, ratio: float) -> None:
    if num_ranks < 1 or num_experts % num_ranks:
        raise ValueError(f"num_experts: expected a multiple of num_ranks ({num_ranks}), got {num_experts}")
    if not 1 <= num_topk <= num_experts:
        raise ValueError(f"num_topk: expected 1 to num_experts ({num_experts}), got {num_topk}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens: expected a count (>= 0), got {num_tokens}")
    if not ratio >= 1.0:
        raise ValueError(f"ratio: expected at least 1.0 (rank 0's traffic over another rank's), got {ratio}")


def _ranks_touched(scores: torch.Tensor, num_ranks: int, num_topk: int) -> torch.Tensor:
    """Tokens that pick an expert of each rank, `[num_ranks]`."""
    per_rank = scores.shape[1] // num_ranks
    owners = scores.topk(num_topk, dim=1).indices // per_rank
    hit = torch.zeros(scores.shape[0], num_ranks, dtype=torch.bool, device=scores.device)
    hit.scatter_(1, owners, True)
    return hit.sum(0)


def _skewed(num_tokens: int, num_experts: int, num_ranks: int, factor: float) -> torch.Tensor:
    """Uniform scores, rank 0's experts' stretched by `factor`."""
    scores = torch.rand(num_tokens, num_experts, dtype=torch.float32)
    scores[:, : num_experts // num_ranks] *= factor
    return scores


def _random(num_tokens: int, num_experts: int, num_ranks: int, num_topk: int, ratio: float) -> torch.Tensor:
    """Realistic scores: uniform, rank 0's stretched by a factor bisected on a sample until its
    traffic is about `ratio` times the others' mean."""
    if ratio == 1.0 or num_ranks == 1:
        return _skewed(num_tokens, num_experts, num_ranks, 1.0)
    lo, hi = 1.0, 100.0
    sample = max(num_tokens, _SAMPLE_TOKENS)
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        touched = _ranks_touched(_skewed(sample, num_experts, num_ranks, mid), num_ranks, num_topk).float()
        if touched[0] > touched[1:].mean() * ratio:
            hi = mid
        else:
            lo = mid
    return _skewed(num_tokens, num_experts, num_ranks, lo)


def _precise(num_tokens: int, num_experts: int, num_ranks: int, num_topk: int, ratio: float) -> torch.Tensor:
    """Scores whose top-k gives rank 0 exactly `ratio` times each other rank's tokens (up to
    rounding), the other ranks within one token of each other.

    Every token spreads its experts over the most ranks the ratio allows, `m`; rank 0 takes
    `s` of the tokens, `s / ((T * m - s) / (R - 1)) = ratio`, and the other ranks are dealt
    round-robin (a random order of them, repeated) over the remaining rank slots, so each gets
    the same count and a token never gets a rank twice. A token's experts are split as evenly
    as they go over its ranks, and picked at random within each."""
    t, e, r, k = num_tokens, num_experts, num_ranks, num_topk
    per_rank = e // r
    fewest = max(1, math.ceil(k / per_rank))
    most = min(k, r, int((r - 1) / ratio) + 1)
    if fewest > most:
        raise ValueError(
            f"ratio: {ratio} needs tokens on at most {most} ranks, but top-{k} of {per_rank} experts per rank "
            f"spans at least {fewest}"
        )
    m = most
    if r == 1:
        ranks = torch.zeros(t, 1, dtype=torch.long)
    else:
        hot = t if m == r else min(t, round(t * m * ratio / (r - 1 + ratio)))
        special = torch.zeros(t, dtype=torch.bool)
        special[torch.randperm(t)[:hot]] = True
        normal = m - special.long()
        start = normal.cumsum(0) - normal
        order = torch.randperm(r - 1) + 1
        at = start.unsqueeze(1) + torch.arange(m) - special.long().unsqueeze(1)
        ranks = order[at % (r - 1)]
        ranks[special, 0] = 0
    # Experts per (token, rank): k split over m ranks, the remainder to random ones.
    lanes = ranks.shape[1]
    position = torch.rand(t, lanes).argsort(1).argsort(1)
    count = k // lanes + (position < k % lanes).long()
    within = torch.rand(t, lanes, per_rank).argsort(-1)
    experts = ranks.unsqueeze(-1) * per_rank + within
    chosen = experts[torch.arange(per_rank) < count.unsqueeze(-1)].view(t, k)
    scores = torch.rand(t, e, dtype=torch.float32) * _THRESHOLD
    high = _THRESHOLD + 1e-6 + torch.rand(t, k, dtype=torch.float32) * (1.0 - _THRESHOLD - 2e-6)
    return scores.scatter_(1, chosen, high)


def get_unbalanced_scores(
    num_tokens: int, num_experts: int, num_ranks: int, num_topk: int, ratio: float, precise: bool
) -> torch.Tensor:
    """`[num_tokens, num_experts]` float32 gate scores under which rank 0 receives `ratio` times
    the tokens of every other rank: exactly (`precise`, an artificial spread: each token's
    experts on as many ranks as the ratio allows) or on average (realistic, uniform scores
    with rank 0's experts favoured)."""
    _check(num_tokens, num_experts, num_ranks, num_topk, ratio)
    if precise:
        return _precise(num_tokens, num_experts, num_ranks, num_topk, ratio)
    return _random(num_tokens, num_experts, num_ranks, num_topk, ratio)
