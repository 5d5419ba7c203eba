"""Size and shape of the bundled DeepSeek-V3-style MoE model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int = 64
    hidden: int = 64
    heads: int = 4
    seq_len: int = 32
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    #: Experts are grouped as the expert-parallel ranks group into nodes; each token picks at
    #: most `max_groups` groups (nodes) first, then its top-k experts inside them.
    expert_groups: int = 2
    max_groups: int = 1
    moe_hidden: int = 64
    shared_hidden: int = 64
    route_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "route_scale":
                if not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"route_scale: expected a positive number, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and name != "seed"):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden: expected a multiple of heads ({self.heads}), got {self.hidden}")
        if self.num_experts % self.expert_groups:
            raise ValueError(
                f"expert_groups: expected a divisor of num_experts ({self.num_experts}), got {self.expert_groups}"
            )
        if self.max_groups > self.expert_groups:
            raise ValueError(
                f"max_groups: expected at most expert_groups ({self.expert_groups}), got {self.max_groups}"
            )
        if self.top_k > self.max_groups * (self.num_experts // self.expert_groups):
            raise ValueError(
                f"top_k: expected at most max_groups x experts per group "
                f"({self.max_groups * (self.num_experts // self.expert_groups)}), got {self.top_k}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
