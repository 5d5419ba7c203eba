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
    if p.get("staged"):
        # Messages through host copies, as for device tensors over gloo (on CPU tensors here:
        # the bookkeeping of the copies is what runs).
        pipe.comm.staged = True
    loss, outputs = pipe.step(inp, num_chunks=n, criterion=chain_criterion, labels=(lab,))
    grads = {f"{i}.{name}": prm.grad.clone() for i in held for name, prm in full[i].named_parameters()}
    full.zero_grad(set_to_none=True)
    with torch.no_grad():
        inf_loss, inf_out = pipe.step(inp, num_chunks=n, criterion=chain_criterion, labels=(lab,), return_outputs=True)
    return {"held": held, "loss": loss, "outputs": outputs, "grads": grads, "inf_loss": inf_loss, "inf_out": inf_out}


def moe_rank(rank: int, world: int, p: dict[str, Any]) -> dict[str, Any]:
    """One rank of a pp x ep world training the bundled MoE model for one step."""
    import torch.distributed as dist

    from dualcomm import Buffer
    from dualcomm.model import ExpertParallel, cross_entropy, global_name, rank_stages

    pp, ep, cfg, schedule = p["pp"], p["ep"], p["cfg"], p["schedule"]
    pp_rank, ep_rank = divmod(rank, ep)
    ep_groups = [dist.new_group(list(range(i * ep, (i + 1) * ep))) for i in range(pp)]
    pp_groups = [dist.new_group([e + i * ep for i in range(pp)]) for e in range(ep)]
    buffer = (
        Buffer(ep_groups[pp_rank], 1 << 20, 1 << 20, ranks_per_node=p["rpn"], explicitly_destroy=True)
        if ep > 1
        else None
    )
    stages = rank_stages(cfg, schedule, pp, pp_rank, ExpertParallel(buffer, cfg.num_experts))
    mb, n = p["micro_batch"], p["num_chunks"]
    set_p2p_tensor_shapes([(mb, cfg.seq_len, cfg.hidden)])
    set_p2p_tensor_dtype(torch.float32)
    cls = DualPipe if schedule == "dualpipe" else DualPipeV
    pipe = cls(stages, process_group=pp_groups[ep_rank], overlap=p.get("overlap"))
    ids, labels = p["ids"][ep_rank], p["labels"][ep_rank]
    first, last = pp_rank == 0, pp_rank == pp - 1
    if schedule == "dualpipe":
        inp = ids.chunk(2)[0] if first else ids.chunk(2)[1] if last else None
        lab = labels.chunk(2)[1] if first else labels.chunk(2)[0] if last else None
    else:
        inp, lab = (ids, labels) if first else (None, None)
    loss, _ = pipe.step(inp, num_chunks=n, criterion=cross_entropy, labels=(lab,))
    grads = []
    for stage in stages:
        for name, prm in stage.named_parameters():
            experts = name.split(".")[-2] == "experts"
            span = (stage.ep.first_expert, stage.ep.local_experts) if experts else None
            grads.append((global_name(stage, name), span, prm.grad.clone()))
    with torch.no_grad():
        inf_loss, inf_out = pipe.step(inp, num_chunks=n, criterion=cross_entropy, labels=(lab,), return_outputs=True)
    stats = buffer.stats() if buffer is not None else {}
    if buffer is not None:
        buffer.destroy()
    return {"loss": loss, "grads": grads, "inf_loss": inf_loss, "inf_out": inf_out, "stats": stats}


def error_cases(rank: int, world: int, _: Any) -> dict[str, str]:
    """Runs each bad call on both ranks of a 2-rank pipeline; returns `case -> 'Type: message'`."""
    import torch.distributed as dist

    from dualcomm.dualpipe import comm

    seen: dict[str, str] = {}

    def expect(case: str, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the test inspects type and message
            seen[case] = f"{type(e).__name__}: {e}"
        else:
            seen[case] = "no error"

    stage = lambda: ChainStage(8)  # noqa: E731
    singles = [dist.new_group([r]) for r in range(world)]
    x = torch.randn(8, 8)
    comm.TENSOR_SHAPES, comm.TENSOR_DTYPE = None, None
    pipe = DualPipe([stage(), stage()])
    expect("not configured", lambda: pipe.step(x, num_chunks=4, criterion=chain_criterion, labels=(x,)))
    set_p2p_tensor_shapes([(4, 8)])  # 8 rows per rank, 2 micro-batches each
    set_p2p_tensor_dtype(torch.float32)
    expect("three modules", lambda: DualPipe([stage(), stage(), stage()]))
    expect("odd pipeline", lambda: DualPipe([stage(), stage()], process_group=singles[rank]))
    expect("bad mapping", lambda: DualPipe([stage(), stage()], rank_mapping=[0, 0]))
    expect("odd chunks", lambda: pipe.step(x, num_chunks=5, criterion=chain_criterion, labels=(x,)))
    expect("few chunks", lambda: pipe.step(x, num_chunks=2, criterion=chain_criterion, labels=(x,)))
    expect("no criterion", lambda: pipe.step(x, num_chunks=4, labels=(x,)))
    expect("no inputs", lambda: pipe.step(num_chunks=4, criterion=chain_criterion, labels=(x,)))
    expect("uneven batch", lambda: pipe.step(x[:7], num_chunks=4, criterion=chain_criterion, labels=(x[:7],)))
    expect("one shape", lambda: set_p2p_tensor_shapes((2, 8)))  # type: ignore[arg-type]
    vpipe = DualPipeV([stage(), stage()])
    # Only rank 0 takes inputs in DualPipeV: rank 1 must fail too rather than wait for it.
    expect("v no inputs", lambda: vpipe.step(None, num_chunks=4, criterion=chain_criterion, labels=(None,)))
    expect("v few chunks", lambda: vpipe.step(x, num_chunks=3, criterion=chain_criterion, labels=(x,)))
    # After all that, a good step still works on both ranks.
    expect("good", lambda: pipe.step(x, num_chunks=4, criterion=chain_criterion, labels=(x,)))

    class Exploding(ChainStage):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("stage exploded")

    broken = DualPipe([Exploding(8), Exploding(8)])
    expect("stage raises", lambda: broken.step(x, num_chunks=4, criterion=chain_criterion, labels=(x,)))
    expect("after failure", lambda: broken.step(x, num_chunks=4, criterion=chain_criterion, labels=(x,)))
    return seen
