"""A small MoE layer over dualcomm's custom ops, run eagerly and under `torch.compile` in
each rank's process (tests/test_custom_ops.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dualcomm.custom_ops as ops
from dualcomm import Buffer


class TinyMoE(nn.Module):
    """Gate, top-k, dispatch, dense-masked experts (no data-dependent indexing), combine."""

    def __init__(self, buffer: Buffer, hidden: int, experts: int, topk: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate = nn.Linear(hidden, experts)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(experts, hidden, generator=g) * 0.3)
            self.gate.bias.zero_()
        self.local = experts // buffer.group_size
        self.experts = nn.Parameter(torch.randn(self.local, hidden, hidden, generator=g) * 0.1)
        self.buffer_id = ops.op_buffer_id(buffer)  # taken outside the compiled code
        self.num_experts, self.topk = experts, topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(x).softmax(-1).topk(self.topk)
        recv_x, recv_idx, recv_w, handle = ops.dispatch(self.buffer_id, x, idx, weights, self.num_experts)
        out = torch.zeros_like(recv_x)
        for e in range(self.local):
            coef = (recv_w * (recv_idx == e)).sum(1, keepdim=True)
            out = out + coef * (recv_x @ self.experts[e])
        return ops.combine(out, handle, x.shape[0])


def _step(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    x = x.clone().requires_grad_()
    y = model(x)
    (y * upstream).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"y": y.detach(), "grad_x": x.grad, **grads}


def eager_and_compiled(rank: int, world: int, steps: int) -> dict[str, Any]:
    buffer = Buffer(dist.group.WORLD, 1 << 20, 0, explicitly_destroy=True)
    torch.manual_seed(100 + rank)
    model = TinyMoE(buffer, hidden=16, experts=2 * world, topk=2, seed=7)
    # fullgraph: any graph break (an op Dynamo cannot trace) is an error, not a silent fallback.
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    runs = []
    for _ in range(steps):
        x, upstream = torch.randn(6, 16), torch.randn(6, 16)
        runs.append((_step(model, x, upstream), _step(compiled, x, upstream)))
    rdma = buffer.stats()
    buffer.destroy()
    return {"runs": runs, "nvl_payload_bytes": rdma["nvl_payload_bytes"]}
