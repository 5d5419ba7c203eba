"""FP8 casts with DeepEP's semantics: per token, per 128 channels, e4m3 data and float32
scales chosen so that each block's largest magnitude maps to 448 (e4m3's largest finite).

`round_scale` rounds each scale up to a power of two (so the cast back is exact scaling);
`use_ue8m0` then keeps only the scale's exponent byte (UE8M0), four of them packed into an
int32 along the channel blocks, as DeepEP's low-latency dispatch returns them.
"""

from __future__ import annotations

import torch

from dualcomm import _checks

E4M3_MAX = 448.0
#: DeepEP's floor on a block's magnitude (an all-zero block gets a tiny, finite scale).
AMAX_FLOOR = 1e-4


def per_token_cast_to_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, H]` (H a multiple of 128) to `(float8_e4m3fn [T, H], scales)`: float32 `[T, H/128]`,
    or with `use_ue8m0` int32 `[T, H/512]` holding the scales' exponent bytes."""
    if use_ue8m0 and not round_scale:
        raise _checks.fail("use_ue8m0", "False unless round_scale=True (UE8M0 holds powers of two)", True)
    t, h = x.shape
    if h % 128:
        raise _checks.fail("x", "a hidden size divisible by 128 for FP8", h)
    if use_ue8m0 and h % 512:
        raise _checks.fail("x", "a hidden size divisible by 512 for UE8M0 scales", h)
    blocks = x.float().view(t, h // 128, 128)
    amax = blocks.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    scales = amax / E4M3_MAX
    if round_scale:
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    data = (blocks / scales.unsqueeze(2)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(t, h)
    if not use_ue8m0:
        return data, scales
    return data, pack_ue8m0(scales)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales `[T, C]` (C a multiple of 4) to int32 `[T, C/4]`, the
    exponent byte of scale `4i + j` in byte `j` (little-endian) of word `i`."""
    exponent = (scales.view(torch.int32) >> 23) & 0xFF
    t, c = exponent.shape
    b = exponent.view(t, c // 4, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_ue8m0`: int32 `[T, C/4]` to float32 `[T, C]`."""
    t, words = packed.shape
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32)
    exponent = (packed.unsqueeze(2) >> shifts) & 0xFF
    return (exponent << 23).view(torch.float32).reshape(t, words * 4)


def per_token_cast_back(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """FP8 `[T, H]` and float32 `[T, H/128]` scales (or packed UE8M0) back to bfloat16."""
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    t, h = data.shape
    return (data.float().view(t, h // 128, 128) * scales.unsqueeze(2)).view(t, h).to(torch.bfloat16)
