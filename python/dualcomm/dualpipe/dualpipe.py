"""DualPipe: two pipelines over the same ranks, running in opposite directions.

Rank r of n holds stage r of the forward-direction pipeline (`modules[0]`) and stage
n-1-r of the reverse-direction pipeline (`modules[1]`), so every stage exists twice and
the gradients of the two copies are summed after the step. The first rank gets the first
half of the batch, the last rank the second half.
"""

from __future__ import annotations

from dualcomm.dualpipe.schedule import PipelineSchedule


class DualPipe(PipelineSchedule):
    num_modules = 2
    module_roles = "this rank's stage of the forward direction and of the reverse direction"

    def _init_topology(self) -> None:
        n = self.num_ranks
        if n % 2 != 0:
            raise ValueError(f"process_group: DualPipe needs an even number of pipeline ranks, got {n}")
        self.is_in_second_half = self.rank >= n // 2
        self.is_middle_rank = self.rank in (n // 2 - 1, n // 2)
        self._flip = int(self.is_in_second_half)
        prev, nxt = self._neighbour(-1), self._neighbour(1)
        # Module 0 runs towards higher ranks, module 1 towards lower ones.
        self._up = [prev, nxt]
        self._down = [nxt, prev]

    def _check_num_chunks(self, num_chunks: int) -> None:
        n = self.num_ranks
        if num_chunks <= 0 or num_chunks % 2 != 0 or num_chunks < 2 * n:
            raise ValueError(
                f"num_chunks: DualPipe needs an even number of micro-batches >= 2 x pipeline ranks "
                f"(>= {2 * n} here), got {num_chunks}"
            )

    def _micro_batches(self, num_chunks: int) -> int:
        return num_chunks // 2

    def _schedule(self, num_chunks: int) -> None:
        half = self.num_ranks // 2
        self._dual_schedule(half, min(self.rank, self.num_ranks - 1 - self.rank), num_chunks // 2, self.is_middle_rank)
