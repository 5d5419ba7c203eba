"""Which layers each pipeline rank holds, for each schedule, so that every schedule trains
the same model: `num_layers` blocks split into equal contiguous stages.

- DualPipeV: 2 x pp stages; rank r holds stages r and 2pp-1-r.
- DualPipe: pp stages; rank r holds stage r and stage pp-1-r (each stage exists twice; the
  two copies' gradients are summed).
- 1F1B: pp stages; rank r holds stage r.
"""

from __future__ import annotations

from dualcomm.model.config import MoEConfig
from dualcomm.model.expert_parallel import ExpertParallel
from dualcomm.model.stage import MoEStage

SCHEDULES = ("dualpipe", "dualpipev", "1f1b")


def num_stages(schedule: str, pp: int) -> int:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    return 2 * pp if schedule == "dualpipev" else pp


def stage_indices(schedule: str, pp: int, pp_rank: int) -> list[int]:
    n = num_stages(schedule, pp)
    if schedule == "1f1b":
        return [pp_rank]
    return [pp_rank, n - 1 - pp_rank]


def build_stage(cfg: MoEConfig, index: int, stages: int, ep: ExpertParallel) -> MoEStage:
    if cfg.num_layers % stages:
        raise ValueError(f"num_layers: expected a multiple of the number of stages ({stages}), got {cfg.num_layers}")
    per = cfg.num_layers // stages
    return MoEStage(cfg, index * per, per, ep, embed=index == 0, head=index == stages - 1)


def rank_stages(cfg: MoEConfig, schedule: str, pp: int, pp_rank: int, ep: ExpertParallel) -> list[MoEStage]:
    """The stage modules pipeline rank `pp_rank` holds, in the order its schedule takes them."""
    n = num_stages(schedule, pp)
    return [build_stage(cfg, i, n, ep) for i in stage_indices(schedule, pp, pp_rank)]


def global_name(stage: MoEStage, local: str) -> str:
    """The single-process name of a stage's parameter (`blocks.{layer}.…` counts layers globally)."""
    if local.startswith("blocks."):
        _, i, rest = local.split(".", 2)
        return f"blocks.{stage.first_layer + int(i)}.{rest}"
    return local
