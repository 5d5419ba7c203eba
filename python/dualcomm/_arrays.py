"""NumPy arrays from the native layer as tensors."""

from __future__ import annotations

import numpy as np
import torch


def tensor_of(a: np.ndarray) -> torch.Tensor:
    """`torch.from_numpy(a)`, except that an empty array becomes a fresh empty tensor: empty
    NumPy arrays all point at the same dangling address, and `torch.save` refuses two
    tensors of different dtypes over one address (a rank with no tokens saving its outputs)."""
    t = torch.from_numpy(a)
    return t if t.numel() else torch.empty_like(t)
