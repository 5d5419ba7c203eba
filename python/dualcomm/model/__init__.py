"""A small DeepSeek-V3-style Mixture-of-Experts language model whose routed experts are
sharded over an expert-parallel group and reached through `dualcomm.Buffer`, cut into
pipeline stages that overlap one micro-batch's all-to-alls with another's compute."""

from dualcomm.model.config import MoEConfig
from dualcomm.model.expert_parallel import ExpertParallel
from dualcomm.model.partition import SCHEDULES, build_stage, global_name, num_stages, rank_stages, stage_indices
from dualcomm.model.stage import MoEStage, cross_entropy

__all__ = [
    "SCHEDULES",
    "ExpertParallel",
    "MoEConfig",
    "MoEStage",
    "build_stage",
    "cross_entropy",
    "global_name",
    "num_stages",
    "rank_stages",
    "stage_indices",
]
