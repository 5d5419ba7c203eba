"""`deep_ep.utils.refs`: DeepEP 2's references for `ElasticBuffer`, in plain PyTorch over
`torch.distributed` (gloo on CPU, NCCL on a GPU), for tests written against DeepEP 2's.

- `dispatch`: every token to each rank that owns one of its experts, received by source rank
  then token (`deterministic=True` order), top-k indices made local (-1 elsewhere), and each
  row's `src_token_global_idx = src_rank * num_max_tokens_per_rank + token`.
- `generate_pre_combine_data`: expert outputs that are a function of a token's global index
  only, so that every rank can make the rows a combine should sum.
- `ordered_accumulate`, `combine`: the sums of DeepEP 2's combine in its order (fp32, lane by
  lane; a rank's lanes first summed into its largest lane and rounded when reductions
  happen on the way).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dualcomm._arrays import row_bytes, rows_as_bytes
from dualcomm.deep_ep.utils.envs import get_global_seed

#: A large prime that scatters consecutive token seeds over the seed range.
_SEED_PRIME = 131071


def _as_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """`[n, ...]` tensors side by side as one `[n, bytes]` uint8 tensor (one exchange moves
    them all, whatever their dtypes: gloo has no FP8)."""
    return torch.cat([rows_as_bytes(p) for p in parts], dim=1)


def _from_rows(rows: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, at = [], 0
    for t in like:
        width = row_bytes(t)
        piece = rows[:, at : at + width].contiguous().view(t.dtype)
        out.append(piece.view(rows.shape[0], *t.shape[1:]))
        at += width
    return out


def dispatch(
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    num_max_tokens_per_rank: int,
    num_experts: int,
) -> tuple[
    torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor
]:
    """DeepEP 2's reference dispatch on the default group: returns `recv_x` (with its scales
    for an FP8 pair), `recv_topk_idx` (local experts, -1 for others), `recv_topk_weights`
    (None without `topk_weights`), `recv_src_token_idx` (int32 global indices) and
    `num_recv_tokens_per_rank` (int32, on the default device, as DeepEP's). Rows arrive by
    source rank, then token."""
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    if num_experts % num_ranks:
        raise ValueError(f"num_experts: expected a multiple of the {num_ranks} ranks, got {num_experts}")
    per_rank = num_experts // num_ranks
    data, scales = x if isinstance(x, tuple) else (x, None)
    num_tokens, num_topk = topk_idx.shape
    if data.shape[0] != num_tokens:
        raise ValueError(f"x: expected {num_tokens} rows (as topk_idx), got {data.shape[0]}")
    if not 0 <= num_tokens <= num_max_tokens_per_rank:
        raise ValueError(
            f"num_max_tokens_per_rank: expected at least the {num_tokens} tokens, got {num_max_tokens_per_rank}"
        )
    device = data.device
    owner = torch.where(topk_idx >= 0, topk_idx // per_rank, -1)
    src_idx = torch.arange(num_tokens, dtype=torch.int32, device=device) + rank * num_max_tokens_per_rank
    weights = [topk_weights] if topk_weights is not None else []
    fields = [data] + ([scales] if scales is not None else []) + [topk_idx, *weights, src_idx]
    send, send_counts = [], []
    for dst in range(num_ranks):
        rows = (owner == dst).any(dim=1).nonzero().squeeze(1)
        send.append(_as_rows([f[rows] for f in fields]))
        send_counts.append(int(rows.numel()))
    counts = torch.tensor(send_counts, dtype=torch.int64, device=device)
    recv_counts_t = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts_t, counts)
    recv_counts = recv_counts_t.tolist()
    send_rows = torch.cat(send, dim=0)
    recv_rows = torch.empty((sum(recv_counts), send_rows.shape[1]), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv_rows, send_rows, recv_counts, send_counts)
    recv = _from_rows(recv_rows, fields)
    recv_x = (recv[0], recv[1]) if scales is not None else recv[0]
    recv_idx, recv_src = recv[2 if scales is not None else 1], recv[-1]
    recv_weights = recv[-2] if topk_weights is not None else None
    mine = (recv_idx >= rank * per_rank) & (recv_idx < (rank + 1) * per_rank)
    recv_idx = torch.where(mine, recv_idx - rank * per_rank, torch.full_like(recv_idx, -1))
    return recv_x, recv_idx, recv_weights, recv_src, torch.tensor(recv_counts, dtype=torch.int32)


def generate_pre_combine_data(
    src_token_global_idx: torch.Tensor, num_max_tokens_per_rank: int, num_topk: int, hidden: int
) -> torch.Tensor:
    """`[n, num_topk, hidden]` bf16 expert outputs for the tokens `src_token_global_idx`:
    lane `j` of token `g` at column `k` is `sin(u * (k + 1) + sin(global_seed))` with
    `u = (s * 131071 % S + 1) / S`, `s = g * num_topk + j` and `S = ranks * num_max_tokens_per_rank
    * num_topk` (DeepEP 2's formula, so data made on different ranks agrees)."""
    span = dist.get_world_size() * num_max_tokens_per_rank * num_topk
    device = src_token_global_idx.device
    seeds = src_token_global_idx.long().unsqueeze(1) * num_topk + torch.arange(num_topk, device=device)
    u = ((seeds * _SEED_PRIME % span).float() + 1) / span
    columns = torch.arange(1, hidden + 1, dtype=torch.float32, device=device)
    return torch.sin(u.unsqueeze(-1) * columns + math.sin(float(get_global_seed()))).to(torch.bfloat16)


def ordered_accumulate(data: torch.Tensor, initial_value: torch.Tensor | None = None) -> torch.Tensor:
    """`[n, k, hidden]` summed over `k` in lane order, each lane taken as fp32, into fp32 zeros
    or into a copy of `initial_value` (in its own dtype, as DeepEP's), then rounded to
    `data`'s dtype."""
    n, k, hidden = data.shape
    acc = (
        torch.zeros((n, hidden), dtype=torch.float32, device=data.device)
        if initial_value is None
        else initial_value.clone()
    )
    for j in range(k):
        acc += data[:, j].float()
    return acc.to(data.dtype)


def _reduce_groups(data: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Each token's lanes of one group (`group[t, j]`) summed in lane order into fp32, rounded
    to `data`'s dtype and put at the group's largest lane; its other lanes zero."""
    k = data.shape[1]
    out = torch.empty_like(data)
    for j in range(k):
        # Lane j holds its group's sum if no later lane is of the same group.
        later = group[:, j + 1 :] == group[:, j : j + 1]
        last = ~later.any(dim=1)
        acc = torch.zeros(data.shape[0], data.shape[2], dtype=torch.float32, device=data.device)
        for i in range(j + 1):
            same = (group[:, i] == group[:, j]).unsqueeze(1)
            # Adding an exact zero leaves an fp32 sum unchanged, so masked lanes do not count.
            acc += torch.where(same, data[:, i].float(), 0.0)
        out[:, j] = torch.where(last.unsqueeze(1), acc.to(data.dtype), 0)
    return out


def combine(
    y: torch.Tensor,
    topk_idx: torch.Tensor,
    num_scaleout_ranks: int,
    num_scaleup_ranks: int,
    num_experts: int,
    bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
    reduce_in_local: bool,
    reduce_in_scaleup: bool,
) -> torch.Tensor:
    """DeepEP 2's combine of `y` (`[n, k, hidden]`, lane `j` the output of expert
    `topk_idx[:, j]`) in its summation order: with `reduce_in_local` each rank's lanes first
    (as its expanded rows are), with `reduce_in_scaleup` then each scale-up domain's; then the
    bias (`b0 + b1` in fp32 for a pair) and the lanes in order, in fp32, rounded once."""
    if reduce_in_scaleup and not reduce_in_local:
        raise ValueError("reduce_in_scaleup: a scale-up reduction needs reduce_in_local as well")
    num_ranks = num_scaleout_ranks * num_scaleup_ranks
    per_rank = num_experts // num_ranks
    if reduce_in_local:
        y = _reduce_groups(y, topk_idx // per_rank)
    if reduce_in_scaleup:
        y = _reduce_groups(y, topk_idx // (per_rank * num_scaleup_ranks))
    start: torch.Tensor | None = None
    if isinstance(bias, tuple):
        start = bias[0].float() + bias[1].float()
    elif bias is not None:
        start = bias.float()
    return ordered_accumulate(y, start)
