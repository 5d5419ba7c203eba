"""A plain 1F1B pipeline, for comparison: rank r holds stage r; after a warm-up of forwards
each forward is followed by one backward. The batch enters on rank 0 and the loss is
computed on the last rank."""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn

from dualcomm.dualpipe.schedule import PipelineSchedule


class OneFOneB(PipelineSchedule):
    def __init__(
        self,
        module: nn.Module,
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: list[int] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module (this rank's stage), got {type(module).__name__}")
        super().__init__([module], batch_dim, process_group, rank_mapping, overlap=False)

    def _init_topology(self) -> None:
        self._up = [self._neighbour(-1)]
        self._down = [self._neighbour(1)]

    def _check_num_chunks(self, num_chunks: int) -> None:
        if num_chunks <= 0:
            raise ValueError(f"num_chunks: expected a positive number of micro-batches, got {num_chunks}")

    def _schedule(self, num_chunks: int) -> None:
        warm_up = min(self.num_ranks - self.rank - 1, num_chunks)
        for _ in range(warm_up):
            self._forward_chunk(0)
        for _ in range(num_chunks - warm_up):
            self._forward_chunk(0)
            self._backward_chunk(0)
        for _ in range(warm_up):
            self._backward_chunk(0)
