"""NumPy arrays from the native layer as tensors, and the host as where they are made."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch


def on_host() -> contextlib.AbstractContextManager[object]:
    """The CPU as the default device while the CPU data path makes its tensors, whatever the
    caller's default is (DeepEP's `init_dist` makes it CUDA)."""
    if torch.get_default_device().type == "cpu":
        return contextlib.nullcontext()
    return torch.device("cpu")


def tensor_of(a: np.ndarray) -> torch.Tensor:
    """`torch.from_numpy(a)`, except that an empty array becomes a fresh empty tensor: empty
    NumPy arrays all point at the same dangling address, and `torch.save` refuses two
    tensors of different dtypes over one address (a rank with no tokens saving its outputs)."""
    t = torch.from_numpy(a)
    return t if t.numel() else torch.empty_like(t)


def row_bytes(t: torch.Tensor) -> int:
    """Bytes in one row (first dimension) of `t`."""
    return t.element_size() * math.prod(t.shape[1:])


def rows_as_bytes(t: torch.Tensor) -> torch.Tensor:
    """`t`'s rows as bytes, `[rows, bytes per row]` (explicit widths: there may be no rows)."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], row_bytes(t))
