"""Synthetic language the model can learn on a CPU in a minute: each sequence counts up
from a random start with a random stride (mod the vocabulary), so the next token follows
from the previous two. Batches are a pure function of (seed, step, replica)."""

from __future__ import annotations

import torch


def batch(seed: int, step: int, replica: int, rows: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids, labels), each `[rows, seq_len]`; labels are the ids shifted by one."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + replica) % 2**63)
    start = torch.randint(0, vocab, (rows, 1), generator=g)
    stride = torch.randint(1, 4, (rows, 1), generator=g)
    seq = (start + stride * torch.arange(seq_len + 1)) % vocab
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
