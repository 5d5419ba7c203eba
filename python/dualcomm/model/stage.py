"""A pipeline stage of the MoE model, cut where the all-to-alls are.

A stage runs as a sequence of compute pieces (attention with the gate and the shared expert;
the routed experts; the head) separated by communication (dispatch, combine). Each piece is
its own small autograd graph between detached leaves, and the stage is written as a
generator that yields at every all-to-all it starts. Run alone (`forward`, or the backward
of its output) each all-to-all is simply waited for. `overlapped_forward_backward` drives
the backward of one micro-batch and the forward of another together, so that every
all-to-all of one runs on the progress engine while the other computes:

    backward (module1)                     forward (module0)
    head / combine-join backward     ->    attention forward   (hides combine backward)
    experts backward                 <-    ...                 (hides dispatch forward)
    ...                                    experts forward     (hides dispatch backward)
    attention backward               <-    ...                 (hides combine forward)
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualcomm.dualpipe.utils import Linear, run_backward
from dualcomm.model.config import MoEConfig
from dualcomm.model.expert_parallel import ExpertParallel, Pending
from dualcomm.model.layers import (
    Attention,
    Gate,
    RMSNorm,
    RoutedExperts,
    SharedExpert,
    init_layer_parameters,
    seeded_normal,
)

Steps = Generator[Pending[Any], Any, Any]


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int, ep: ExpertParallel) -> None:
        super().__init__()
        self.layer = layer
        self.norm1 = RMSNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.hidden)
        self.gate = Gate(cfg)
        self.shared = SharedExpert(cfg.hidden, cfg.shared_hidden)
        self.experts = RoutedExperts(cfg, ep.first_expert, ep.local_experts)
        init_layer_parameters(self, cfg, f"layer{layer}")

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (h + shared expert, normalized h for the routed experts, top-k idx, top-k weights)."""
        h = x + self.attn(self.norm1(x))
        hn = self.norm2(h)
        idx, w = self.gate(hn.reshape(-1, hn.shape[-1]))
        return h + self.shared(hn), hn, idx, w


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


@dataclass
class _BlockRecord:
    layer: int
    x: torch.Tensor | None  # the leaf attention started from (None: the embedding's output)
    h2: torch.Tensor
    hn: torch.Tensor
    w: torch.Tensor
    recv_x: torch.Tensor
    recv_idx: torch.Tensor
    recv_w: torch.Tensor
    recv_y: torch.Tensor
    handle: Any


@dataclass
class StageRun:
    """What one micro-batch's forward through a stage left for its backward."""

    source: torch.Tensor  # what forward was called with
    input: torch.Tensor | None  # the leaf the pieces started from (None: token ids)
    blocks: list[_BlockRecord] = field(default_factory=list)
    head_in: torch.Tensor | None = None
    output: torch.Tensor | None = None
    connected: torch.Tensor | None = None  # the output handed to the caller
    done: bool = False


def drive(*steps: Steps) -> list[Any]:
    """Runs step generators round-robin: each runs until it has started an all-to-all, then
    the next one computes while that all-to-all moves; returns what each returned."""
    results: list[Any] = [None] * len(steps)
    pending: list[Pending[Any] | None] = [None] * len(steps)
    started = [False] * len(steps)
    live = set(range(len(steps)))
    while live:
        for i, gen in enumerate(steps):
            if i not in live:
                continue
            try:
                p = pending[i]
                if not started[i]:
                    started[i] = True
                    pending[i] = next(gen)
                else:
                    pending[i] = gen.send(p.wait() if p is not None else None)
            except StopIteration as stop:
                results[i] = stop.value
                live.discard(i)
    return results


class _Connect(torch.autograd.Function):
    """Links a stage's output to its input for autograd; its backward runs the stage's
    backward pieces one after the other."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, source: Any, stage: MoEStage, run: StageRun) -> torch.Tensor:  # type: ignore[override]
        ctx.stage, ctx.run = stage, run
        assert run.output is not None
        return run.output.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        run: StageRun = ctx.run
        if run.done:
            raise RuntimeError("this micro-batch's stage backward already ran (overlapped_forward_backward)")
        (grad_in,) = drive(ctx.stage._backward_steps(run, grad))
        ctx.stage._finish(run)
        return None, grad_in, None, None


class MoEStage(nn.Module):
    """Layers `[first_layer, first_layer + num_layers)` of the model, with the embedding on
    the first stage and the final norm and output head on the last."""

    def __init__(
        self,
        cfg: MoEConfig,
        first_layer: int,
        num_layers: int,
        ep: ExpertParallel,
        *,
        embed: bool,
        head: bool,
    ) -> None:
        super().__init__()
        self.cfg, self.ep = cfg, ep
        self.first_layer, self.num_layers = first_layer, num_layers
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden) if embed else None
        self.blocks = nn.ModuleList([Block(cfg, first_layer + i, ep) for i in range(num_layers)])
        self.norm = RMSNorm(cfg.hidden) if head else None
        self.head = Linear(cfg.hidden, cfg.vocab_size, bias=False) if head else None
        with torch.no_grad():
            if self.embed is not None:
                self.embed.weight.copy_(seeded_normal(tuple(self.embed.weight.shape), cfg.seed, "embed", std=1.0))
            if self.head is not None:
                self.head.weight.copy_(seeded_normal(tuple(self.head.weight.shape), cfg.seed, "head"))
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._runs: deque[weakref.ref[StageRun]] = deque()

    def _anchor(self, device: torch.device) -> torch.Tensor:
        """A leaf that requires grad, on the output's device, so that autograd links every
        stage output (even one whose input needs no grad) to its backward."""
        if device not in self._anchors:
            self._anchors[device] = torch.empty(0, device=device, requires_grad=True)
        return self._anchors[device]

    def _blocks(self) -> list[Block]:
        return [cast(Block, b) for b in self.blocks]

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for b in self._blocks() for p in b.experts.parameters()]

    def dense_parameters(self) -> list[nn.Parameter]:
        expert = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in expert]

    # ---- pieces -----------------------------------------------------------------------------

    def _forward_steps(self, x: torch.Tensor, grad: bool) -> Steps:
        ctx: Callable[[], Any] = torch.enable_grad if grad else torch.no_grad
        if self.embed is not None:
            run = StageRun(source=x, input=None)
            with ctx():
                h = self.embed(x)
            attn_leaf: torch.Tensor | None = None
        else:
            h = _leaf(x, grad)
            run = StageRun(source=x, input=h)
            attn_leaf = h
        for block in self._blocks():
            tag = f"L{block.layer}"
            with ctx():
                h2, hn, idx, w = block.attend(h)
            recv_x, recv_idx, recv_w, handle = yield self.ep.dispatch(
                hn.detach().reshape(-1, self.cfg.hidden).contiguous(), idx, w.detach().contiguous(), f"{tag} fwd"
            )
            with ctx():
                rx, rw = _leaf(recv_x, grad), _leaf(recv_w, grad)
                recv_y = block.experts(rx, recv_idx, rw)
            y = yield self.ep.combine(recv_y.detach(), handle, f"{tag} fwd")
            if grad:
                run.blocks.append(_BlockRecord(block.layer, attn_leaf, h2, hn, w, rx, recv_idx, rw, recv_y, handle))
            h = attn_leaf = _leaf(h2.detach() + y.view_as(h2), grad)
        if self.head is not None:
            assert self.norm is not None
            run.head_in = h
            with ctx():
                run.output = self.head(self.norm(h))
        else:
            run.output = h
        return run

    def _backward_steps(self, run: StageRun, grad: torch.Tensor) -> Steps:
        hidden = self.cfg.hidden
        if run.head_in is not None:
            assert run.output is not None
            run_backward([run.output], [grad])
            grad = _grad_or_zeros(run.head_in)
        for rec in reversed(run.blocks):
            tag = f"L{rec.layer} bwd"
            grad_recv_y = yield self.ep.combine_backward(grad.reshape(-1, hidden).contiguous(), rec.handle, tag)
            if rec.recv_y.requires_grad:
                run_backward([rec.recv_y], [grad_recv_y])
            grad_hn, grad_w = yield self.ep.dispatch_backward(
                _grad_or_zeros(rec.recv_x), _grad_or_zeros(rec.recv_w), rec.recv_idx, rec.handle, tag
            )
            run_backward([rec.h2, rec.hn, rec.w], [grad, grad_hn.view_as(rec.hn), grad_w])
            grad = _grad_or_zeros(rec.x) if rec.x is not None else grad
        return None if run.input is None else _grad_or_zeros(run.input)

    # ---- runs -------------------------------------------------------------------------------

    def _connect(self, run: StageRun) -> torch.Tensor:
        assert run.output is not None
        out: torch.Tensor = _Connect.apply(self._anchor(run.output.device), run.source, self, run)
        run.connected = out
        self._runs.append(weakref.ref(run))
        return out

    def _finish(self, run: StageRun) -> None:
        run.done = True
        run.blocks, run.connected, run.output, run.head_in = [], None, None, None

    def _next_run(self, outputs: Sequence[torch.Tensor]) -> StageRun:
        while self._runs:
            run = self._runs.popleft()()
            if run is not None and not run.done:
                if outputs and outputs[0] is not run.connected:
                    raise RuntimeError("overlapped_forward_backward: backward chunks must come in forward order")
                return run
        raise RuntimeError("overlapped_forward_backward: this stage has no forward waiting for its backward")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        (run,) = drive(self._forward_steps(x, grad))
        if not grad:
            assert run.output is not None
            return run.output
        return self._connect(run)

    @classmethod
    def overlapped_forward_backward(
        cls,
        module0: MoEStage,
        inputs0: list[torch.Tensor],
        criterion0: Callable[..., torch.Tensor] | None,
        labels0: list[torch.Tensor],
        module1: MoEStage,
        loss1: torch.Tensor | None,
        outputs1: list[torch.Tensor],
        output_grads1: list[torch.Tensor],
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        run1 = module1._next_run(outputs1)
        if loss1 is not None:
            assert run1.connected is not None
            (grad1,) = torch.autograd.grad(loss1, run1.connected)
            loss1.detach_()
        else:
            grad1 = output_grads1[0]
        # The backward starts first: its first all-to-all then moves while the forward's
        # attention computes.
        grad_in1, run0 = drive(module1._backward_steps(run1, grad1), module0._forward_steps(inputs0[0], True))
        source = run1.source
        module1._finish(run1)
        if grad_in1 is not None and source.requires_grad:
            source.grad = grad_in1 if source.grad is None else source.grad + grad_in1
        out0 = module0._connect(run0)
        loss0 = criterion0(out0, *labels0) if criterion0 is not None else None
        return [out0], loss0


def _grad_or_zeros(t: torch.Tensor) -> torch.Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss of one micro-batch (the trainer's criterion)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
