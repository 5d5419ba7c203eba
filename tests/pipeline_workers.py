"""What each rank of a pipeline test runs (in its own process, with a gloo group)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualcomm.dualpipe import (
    DualPipe,
    DualPipeV,
    Linear,
    OneFOneB,
    run_backward,
    set_p2p_tensor_dtype,
    set_p2p_tensor_shapes,
)


class ChainStage(nn.Module):
    """An MLP block like the reference DualPipe example's, with weight gradients that the
    schedule may defer (`deferred=True`) or plain `nn.Linear`s."""

    def __init__(self, hidden: int, deferred: bool = True) -> None:
        super().__init__()
        lin = Linear if deferred else nn.Linear
        self.up = lin(hidden, 4 * hidden, bias=False)
        self.down = lin(4 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))

    @classmethod
    def overlapped_forward_backward(
        cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1
    ) -> tuple[Any, Any]:
        outputs0 = module0(*inputs0)
        loss0 = criterion0(outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            run_backward(outputs1, output_grads1)
        return [outputs0], loss0


def chain_criterion(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target).clone()


def build_chain(stages: int, hidden: int, seed: int, deferred: bool) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[ChainStage(hidden, deferred) for _ in range(stages)])


def chain_rank(rank: int, world: int, p: dict[str, Any]) -> dict[str, Any]:
    """Builds this rank's stages of the chain, runs one training and one inference step."""
    schedule, n, mb, hidden = p["schedule"], p["num_chunks"], p["micro_batch"], p["hidden"]
    stages = {"dualpipe": world, "dualpipev": 2 * world, "1f1b": world}[schedule]
    full = build_chain(stages, hidden, p["seed"], p["deferred"])
    x, target = p["x"], p["target"]
    set_p2p_tensor_shapes([(mb, hidden)])
    set_p2p_tensor_dtype(torch.float32)
    first, last = rank == 0, rank == world - 1
    if schedule == "dualpipe":
        held = [rank, world - 1 - rank]
        pipe: Any = DualPipe([full[i] for i in held], overlap=p.get("overlap"))
        inp = x.chunk(2)[0] if first else x.chunk(2)[1] if last else None
        lab = target.chunk(2)[1] if first else target.chunk(2)[0] if last else None
    elif schedule == "dualpipev":
        held = [rank, 2 * world - 1 - rank]
        pipe = DualPipeV([full[i] for i in held], overlap=p.get("overlap"))
        inp, lab = (x, target) if first else (None, None)
    else:
        held = [rank]
        pipe = OneFOneB(full[rank])
        inp, lab = (x if first else None), (target if last else None)
    loss, outputs = pipe.step(inp, num_chunks=n, criterion=chain_criterion, labels=(lab,))
    grads = {f"{i}.{name}": prm.grad.clone() for i in held for name, prm in full[i].named_parameters()}
    full.zero_grad(set_to_none=True)
    with torch.no_grad():
        inf_loss, inf_out = pipe.step(inp, num_chunks=n, criterion=chain_criterion, labels=(lab,), return_outputs=True)
    return {"held": held, "loss": loss, "outputs": outputs, "grads": grads, "inf_loss": inf_loss, "inf_out": inf_out}
