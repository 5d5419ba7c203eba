"""One rank of a `dualcomm-train` job: a pipeline rank for one stage pair and an
expert-parallel rank for a slice of every layer's routed experts.

Global rank = pp_rank * ep + ep_rank. The ranks of one pipeline position form an
expert-parallel group (one `dualcomm.Buffer`, possibly spanning emulated nodes); the ranks
of one expert-parallel index form a pipeline, a data-parallel replica of the dense weights.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from dualcomm.buffer import Buffer
from dualcomm.dualpipe import TIMELINE, DualPipe, DualPipeV, OneFOneB, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualcomm.dualpipe.schedule import PipelineSchedule
from dualcomm.model import (
    ExpertParallel,
    MoEConfig,
    MoEStage,
    cross_entropy,
    global_name,
    rank_stages,
    stage_indices,
)
from dualcomm.train.data import batch


@dataclass(frozen=True)
class TrainArgs:
    schedule: str
    pp: int
    ep: int
    ranks_per_node: int
    steps: int
    num_chunks: int
    micro_batch: int
    lr: float
    overlap: bool
    model: MoEConfig
    timeline_steps: int = 3
    progress: bool = True
    transport: str = "auto"
    #: "cpu", or "cuda": the stages, their activations and the all-to-alls' tensors on a
    #: GPU (ranks share the machine's GPUs round-robin); messages cross gloo through host
    #: memory.
    device: str = "cpu"


def _new_group(ranks: list[int]) -> dist.ProcessGroup:
    # Ranks outside `ranks` get a placeholder they never use.
    return cast(dist.ProcessGroup, dist.new_group(ranks))


class _Groups:
    def __init__(self, a: TrainArgs, rank: int) -> None:
        pp, ep = a.pp, a.ep
        self.pp_rank, self.ep_rank = divmod(rank, ep)
        # Every rank creates every group, in the same order (torch.distributed requires it).
        ep_groups = [_new_group(list(range(i * ep, (i + 1) * ep))) for i in range(pp)]
        pp_groups = [_new_group([e + i * ep for i in range(pp)]) for e in range(ep)]
        self.ep_group = ep_groups[self.pp_rank]
        self.pp_group = pp_groups[self.ep_rank]
        self.mirror_group: dist.ProcessGroup | None = None
        if a.schedule == "dualpipe":
            for e in range(ep):
                for r in range(pp // 2):
                    g = _new_group([r * ep + e, (pp - 1 - r) * ep + e])
                    if e == self.ep_rank and self.pp_rank in (r, pp - 1 - r):
                        self.mirror_group = g


def _flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The gradients of `params` as one host tensor (gloo reduces host memory)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return torch.cat([p.grad.reshape(-1).cpu() for p in params]) if params else torch.zeros(0)  # type: ignore[union-attr]


def _unflatten(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        assert p.grad is not None
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def reduce_gradients(stages: list[MoEStage], groups: _Groups, a: TrainArgs) -> None:
    """Sums the gradients of every copy of a parameter and scales to the mean over all
    micro-batches of all replicas: DualPipe's mirrored stage copies, then the dense weights'
    data-parallel copies across the expert-parallel group (routed experts have one copy)."""
    if groups.mirror_group is not None:
        # Both partners order the pair as (lower stage, higher stage).
        ordered = stages if groups.pp_rank < a.pp // 2 else stages[::-1]
        params = [p for s in ordered for p in s.parameters()]
        flat = _flat_grads(params)
        dist.all_reduce(flat, group=groups.mirror_group)
        _unflatten(params, flat)
    dense = [p for s in stages for p in s.dense_parameters()]
    flat = _flat_grads(dense)
    if a.ep > 1:
        dist.all_reduce(flat, group=groups.ep_group)
    _unflatten(dense, flat)
    scale = 1.0 / (a.ep * a.num_chunks)
    for s in stages:
        for p in s.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)


def _build_pipe(a: TrainArgs, stages: list[MoEStage], group: dist.ProcessGroup) -> PipelineSchedule:
    if a.schedule == "dualpipe":
        return DualPipe(stages, process_group=group, overlap=a.overlap)
    if a.schedule == "dualpipev":
        return DualPipeV(stages, process_group=group, overlap=a.overlap)
    return OneFOneB(stages[0], process_group=group)


def _step_inputs(a: TrainArgs, pp_rank: int, ids: torch.Tensor, labels: torch.Tensor) -> tuple[Any, Any]:
    first, last = pp_rank == 0, pp_rank == a.pp - 1
    if a.schedule == "dualpipe":
        if a.pp == 1:
            raise ValueError("pp: DualPipe needs an even number of pipeline ranks")
        if first:
            return ids.chunk(2)[0], labels.chunk(2)[1]
        if last:
            return ids.chunk(2)[1], labels.chunk(2)[0]
        return None, None
    if a.schedule == "dualpipev":
        return (ids, labels) if first else (None, None)
    return (ids if first else None), (labels if last else None)


def _progress(step: int, steps: int, loss: float, tok_s: float, start_loss: float) -> None:
    line = f"step {step}/{steps}  loss {loss:.3f} (from {start_loss:.3f})  {tok_s:,.0f} tok/s"
    if sys.stderr.isatty():
        width = 28
        filled = int(width * step / steps)
        sys.stderr.write(f"\r  [{'#' * filled}{'-' * (width - filled)}] {line} ")
        if step == steps:
            sys.stderr.write("\n")
    elif step == steps or step % max(1, steps // 10) == 0:
        # A log file gets a line every tenth of the run instead of a redrawn bar.
        sys.stderr.write(f"  {line}\n")
    sys.stderr.flush()


def _device(a: TrainArgs, rank: int) -> torch.device:
    if a.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device: expected cpu on this machine (torch sees no CUDA GPU), got {a.device}")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def train_rank(rank: int, world: int, a: TrainArgs) -> dict[str, Any]:
    device = _device(a, rank)
    groups = _Groups(a, rank)
    cfg = a.model
    buffer = (
        Buffer(
            groups.ep_group,
            4 << 20,
            4 << 20,
            ranks_per_node=a.ranks_per_node,
            transport=a.transport,
            explicitly_destroy=True,
        )
        if a.ep > 1
        else None
    )
    ep = ExpertParallel(buffer, cfg.num_experts)
    stages = [s.to(device) for s in rank_stages(cfg, a.schedule, a.pp, groups.pp_rank, ep)]
    pipe = _build_pipe(a, stages, groups.pp_group)
    set_p2p_tensor_shapes([(a.micro_batch, cfg.seq_len, cfg.hidden)])
    set_p2p_tensor_dtype(torch.float32)
    params = [p for s in stages for p in s.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    rows = a.num_chunks * a.micro_batch
    tokens_per_step = rows * cfg.seq_len * a.ep

    losses: list[float] = []
    step_times: list[float] = []
    timelines: list[dict[str, Any]] = []
    t_start = time.time()
    for step in range(a.steps):
        ids, labels = batch(cfg.seed, step, groups.ep_rank, rows, cfg.seq_len, cfg.vocab_size)
        ids, labels = ids.to(device), labels.to(device)
        inp, lab = _step_inputs(a, groups.pp_rank, ids, labels)
        record = step >= a.steps - a.timeline_steps
        dist.barrier()  # all ranks start the step together: the timeline's zero
        TIMELINE.clear()
        TIMELINE.enabled = record
        t0 = time.time()
        loss, _ = pipe.step(inp, num_chunks=a.num_chunks, criterion=cross_entropy, labels=(lab,))
        t1 = time.time()
        TIMELINE.enabled = False
        reduce_gradients(stages, groups, a)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.time() - t0)
        if record:
            timelines.append(
                {
                    "start": t0,
                    "end": t1,
                    "spans": [(s.kind, s.label, s.start - t0, s.end - t0) for s in TIMELINE.spans],
                    "summary": TIMELINE.summary(),
                }
            )
        # The mean loss over every micro-batch of every replica, for the progress line.
        acc = torch.zeros(2, dtype=torch.float64)
        if loss is not None:
            acc += torch.tensor([loss.sum().item(), loss.numel()], dtype=torch.float64)
        dist.all_reduce(acc)
        mean_loss = (acc[0] / acc[1]).item() if acc[1] > 0 else math.nan
        losses.append(mean_loss)
        if rank == 0 and a.progress:
            elapsed = time.time() - t_start
            _progress(step + 1, a.steps, mean_loss, tokens_per_step * (step + 1) / elapsed, losses[0])
    stats = buffer.stats() if buffer is not None else {}
    if buffer is not None:
        buffer.destroy()
    # Final weights, by single-process name; routed experts keyed with their first expert.
    weights = {
        (global_name(s, n), s.ep.first_expert if "experts." in n else None): p.detach().cpu().clone()
        for s in stages
        for n, p in s.named_parameters()
    }
    return {
        "weights": weights,
        "rank": rank,
        "pp_rank": groups.pp_rank,
        "ep_rank": groups.ep_rank,
        "stages": stage_indices(a.schedule, a.pp, groups.pp_rank),
        "losses": losses,
        "step_times": step_times,
        "tokens_per_step": tokens_per_step,
        "timelines": timelines,
        "stats": stats,
        "wall": time.time() - t_start,
    }
