"""`deep_ep.utils.math`: the numeric helpers DeepEP's tests use, for any device."""

from __future__ import annotations

import torch

from dualcomm.fp8 import E4M3_MAX, unpack_ue8m0


def safe_div(a: float, b: float) -> float:
    """`a / b`, with 0 for `0 / 0` (a rate over nothing moved); other divisions by zero raise."""
    try:
        return a / b
    except ZeroDivisionError:
        if a == 0:
            return 0
        raise


def ceil_div(x: int, y: int) -> int:
    return -(-x // y)


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """One minus the cosine-like similarity of `x + 1` and `y + 1` (0 for equal tensors)."""
    a, b = x.double() + 1, y.double() + 1
    return float(1 - 2 * (a * b).sum() / (a.square() + b.square()).sum())


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and 128 channels (the last block padded with zeros): e4m3 data scaled so the
    block's largest magnitude (at least 1e-4) is 448, and the float32 scales `[T, ceil(H/128)]`."""
    t, h = x.shape
    padded = torch.nn.functional.pad(x, (0, align(h, 128) - h)).view(t, -1, 128)
    amax = padded.abs().float().amax(dim=2).clamp(min=1e-4)
    data = (padded * (E4M3_MAX / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(t, -1)[:, :h].contiguous()
    return data, amax / E4M3_MAX


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor) -> torch.Tensor:
    """The inverse, to bfloat16; int32 scales are packed UE8M0 exponent bytes."""
    if x_fp8.numel() == 0:
        return x_fp8.to(torch.bfloat16)
    t, h = x_fp8.shape
    if x_scales.dtype == torch.int32:
        x_scales = unpack_ue8m0(x_scales)
    padded = torch.nn.functional.pad(x_fp8.float(), (0, align(h, 128) - h)).view(t, -1, 128)
    return (padded * x_scales.reshape(t, -1, 1)).view(t, -1)[:, :h].to(torch.bfloat16).contiguous()


def inplace_unique(x: torch.Tensor, num_slots: int) -> None:
    """Each row of `x` becomes its distinct values in `[0, num_slots)`, largest first, then -1s."""
    present = torch.zeros(x.size(0), num_slots + 1, dtype=torch.bool, device=x.device)
    present.scatter_(1, torch.where(x < 0, num_slots, x), True)
    values = torch.arange(num_slots, device=x.device).expand(x.size(0), -1)
    kept = torch.where(present[:, :num_slots], values, torch.full_like(values, -1))
    ordered = kept.sort(dim=1, descending=True).values
    x.fill_(-1)
    n = min(num_slots, x.size(1))
    x[:, :n] = ordered[:, :n]


def create_grouped_scores(scores: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """`scores [T, E]` with the experts outside each token's chosen groups zeroed: the E experts
    fall into `num_groups` equal groups (nodes, for a node-limited gate) and `group_idx [T, g]`
    names the groups a token keeps."""
    t, e = scores.shape
    keep = torch.zeros(t, num_groups, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, group_idx, True)
    return (scores.view(t, num_groups, -1) * keep.unsqueeze(-1)).view(t, e)


def hash_tensor(t: torch.Tensor) -> int:
    """The sum of the tensor's 4-byte words (of its bytes, for other element sizes)."""
    t = t.contiguous()
    return int(t.view(torch.int32 if t.element_size() == 4 else torch.uint8).sum().item())


def hash_tensors(*tensors: object) -> int:
    value = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            value ^= hash_tensors(*t)
        elif isinstance(t, torch.Tensor):
            value ^= hash_tensor(t)
    return value


def count_bytes(*tensors: object) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += count_bytes(*t)
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total
