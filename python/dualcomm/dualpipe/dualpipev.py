"""DualPipeV: DualPipe's schedule on half the ranks, with the two directions folded into a V.

Rank r of n holds stage r (`modules[0]`) and stage 2n-1-r (`modules[1]`) of a 2n-stage
model: activations run down the ranks through the first stages, turn on the last rank and
run back up through the second half. Each stage exists once (no mirrored gradients); the
whole batch enters on rank 0, which also computes the loss.
"""

from __future__ import annotations

from dualcomm.dualpipe.schedule import LOCAL, PipelineSchedule


class DualPipeV(PipelineSchedule):
    num_modules = 2
    module_roles = "stage r and stage 2n-1-r of a 2n-stage model"

    def _init_topology(self) -> None:
        prev, nxt = self._neighbour(-1), self._neighbour(1)
        self._up = [prev, LOCAL if self.is_last_rank else nxt]
        self._down = [LOCAL if self.is_last_rank else nxt, prev]

    def _check_num_chunks(self, num_chunks: int) -> None:
        if num_chunks <= 0 or num_chunks < 2 * self.num_ranks:
            raise ValueError(
                f"num_chunks: DualPipeV needs at least 2 x pipeline ranks micro-batches "
                f"(>= {2 * self.num_ranks} here), got {num_chunks}"
            )

    def _schedule(self, num_chunks: int) -> None:
        self._dual_schedule(self.num_ranks, self.rank, num_chunks, self.is_last_rank)
