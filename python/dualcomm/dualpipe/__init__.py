"""Pipeline schedules: DualPipe, DualPipeV (DeepSeek-V3's bidirectional schedules, with the
reference project's API) and a plain 1F1B for comparison."""

from dualcomm.dualpipe.comm import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualcomm.dualpipe.dualpipe import DualPipe
from dualcomm.dualpipe.dualpipev import DualPipeV
from dualcomm.dualpipe.onefoneb import OneFOneB
from dualcomm.dualpipe.timeline import TIMELINE, Timeline
from dualcomm.dualpipe.utils import Linear, WeightGradStore, run_backward

__all__ = [
    "TIMELINE",
    "DualPipe",
    "DualPipeV",
    "Linear",
    "OneFOneB",
    "Timeline",
    "WeightGradStore",
    "run_backward",
    "set_p2p_tensor_dtype",
    "set_p2p_tensor_shapes",
]
