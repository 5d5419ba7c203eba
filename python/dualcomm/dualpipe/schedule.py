"""Chunk mechanics shared by the pipeline schedules.

A rank holds one or two stage modules ("phases"). For each phase it keeps the inputs,
outputs and gradients of every micro-batch in flight, and knows where its activations come
from and go to: a pipeline neighbour, nothing (first or last stage), or `LOCAL`, the other
phase on the same rank (the turn of DualPipeV's V). A schedule is then a sequence of
forward, backward, weight and overlapped forward-backward chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from dualcomm.dualpipe import comm
from dualcomm.dualpipe.timeline import TIMELINE
from dualcomm.dualpipe.utils import WeightGradStore, gather, run_backward, scatter

LOCAL = "local"
Peer = Union[int, str, None]
Outputs = Union[torch.Tensor, tuple[torch.Tensor, ...], None]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class PipelineSchedule(nn.Module):
    """Base of `DualPipe`, `DualPipeV` and `OneFOneB`; subclasses set the topology and the order."""

    #: How many stage modules a rank holds, and what they are (for the error message).
    num_modules: int | None = None
    module_roles = ""

    def __init__(
        self,
        modules: Sequence[nn.Module],
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: list[int] | None = None,
        *,
        overlap: bool | None = None,
    ) -> None:
        super().__init__()
        if self.num_modules is not None and len(modules) != self.num_modules:
            raise ValueError(
                f"modules: expected {self.num_modules} stage modules ({self.module_roles}), got {len(modules)}"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__}: torch.distributed is not initialized; call init_process_group")
        self.module = nn.ModuleList(modules)
        if not _is_int(batch_dim) or batch_dim < 0:
            raise ValueError(f"batch_dim: expected a non-negative int, got {batch_dim!r}")
        self.batch_dim = batch_dim
        self.group = process_group if process_group is not None else dist.group.WORLD
        assert self.group is not None
        self.num_ranks = dist.get_world_size(self.group)
        if rank_mapping is None:
            rank_mapping = list(range(self.num_ranks))
        if sorted(rank_mapping) != list(range(self.num_ranks)):
            raise ValueError(
                f"rank_mapping: expected a permutation of range({self.num_ranks}) (group rank -> pipeline rank), "
                f"got {rank_mapping!r}"
            )
        self._to_group_rank = [0] * self.num_ranks
        for group_rank, pipe_rank in enumerate(rank_mapping):
            self._to_group_rank[pipe_rank] = group_rank
        self.rank = rank_mapping[dist.get_rank(self.group)]
        self.is_first_rank = self.rank == 0
        self.is_last_rank = self.rank == self.num_ranks - 1

        types = {type(m) for m in modules}
        can_overlap = len(modules) == 2 and len(types) == 1 and hasattr(types.pop(), "overlapped_forward_backward")
        if overlap and not can_overlap:
            raise ValueError("overlap=True: both modules must be of one class that defines overlapped_forward_backward")
        self.overlapped_forward_backward = can_overlap if overlap is None else overlap
        params = [p for m in modules for p in m.parameters()]
        self.device = params[0].device if params else torch.device("cpu")
        self.comm = comm.PeerToPeer(self.group, self.device)
        self._up: list[Peer] = []
        self._down: list[Peer] = []
        self._flip = 0
        self._broken: str | None = None
        self._init_topology()
        self._reset_states()

    # ---- topology -------------------------------------------------------------------------

    def _init_topology(self) -> None:
        """Sets `_up`/`_down` (and `_flip`): where each phase's activations come from and go to."""
        raise NotImplementedError

    def _neighbour(self, offset: int) -> int | None:
        r = self.rank + offset
        return self._to_group_rank[r] if 0 <= r < self.num_ranks else None

    def _phase(self, phase: int) -> int:
        """Schedule phase -> module index (DualPipe's second half runs its phases swapped)."""
        return phase ^ self._flip

    def _first_stage(self, p: int) -> bool:
        return self._up[p] is None

    def _last_stage(self, p: int) -> bool:
        return self._down[p] is None

    # ---- state ----------------------------------------------------------------------------

    def _reset_states(self) -> None:
        WeightGradStore.clear()
        n = max(1, len(self.module))
        self.input_chunks: list[list[Any]] = [[] for _ in range(n)]
        self.output_chunks: list[list[Any]] = [[] for _ in range(n)]
        self.input_grad_chunks: list[list[Any]] = [[] for _ in range(n)]
        self.output_grad_chunks: list[list[Any]] = [[] for _ in range(n)]
        self.labels: list[list[Any]] = [[] for _ in range(n)]
        self.loss_chunks: list[torch.Tensor] = []
        self.criterion: Callable[..., torch.Tensor] | None = None
        self.forward_only = False
        self.return_outputs = False
        self._f_id = [0] * n
        self._b_id = [0] * n
        self._send_f_id = [0] * n
        self._send_b_id = [0] * n
        self._recv_f_id = [0] * n
        self._recv_b_id = [0] * n

    def _take_inputs(self, p: int, chunk_id: int) -> list[Any]:
        inputs = self.input_chunks[p][chunk_id]
        if not self.forward_only and not self._first_stage(p):
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad:
                    t.requires_grad_()
        return list(inputs)

    # ---- compute chunks -------------------------------------------------------------------

    def _forward_compute_chunk(self, phase: int) -> None:
        p = self._phase(phase)
        chunk_id = self._f_id[p]
        self._f_id[p] += 1
        inputs = self._take_inputs(p, chunk_id)
        if self.forward_only:
            self.input_chunks[p][chunk_id] = None
        with TIMELINE.span("F", f"{p}.{chunk_id}"):
            outputs = self.module[p](*inputs)
            outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
            if self._last_stage(p) and self.criterion is not None:
                self.loss_chunks.append(self.criterion(*outputs, *self.labels[p][chunk_id]))
        if not self._last_stage(p) or self.return_outputs:
            self.output_chunks[p].append(outputs)

    def _pending_backward(self, p: int) -> tuple[int, torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        chunk_id = self._b_id[p]
        self._b_id[p] += 1
        if self._last_stage(p):
            return chunk_id, self.loss_chunks[chunk_id], [], []
        outputs = self.output_chunks[p][chunk_id]
        if not self.return_outputs:
            self.output_chunks[p][chunk_id] = None
        grads = self.output_grad_chunks[p][chunk_id]
        self.output_grad_chunks[p][chunk_id] = None
        pairs = [(t, g) for t, g in zip(outputs, grads) if g is not None and t.requires_grad]
        return chunk_id, None, [t for t, _ in pairs], [g for _, g in pairs]

    def _finish_backward(self, p: int, chunk_id: int) -> None:
        inputs = self.input_chunks[p][chunk_id]
        self.input_chunks[p][chunk_id] = None
        self.input_grad_chunks[p].append([t.grad if isinstance(t, torch.Tensor) else None for t in inputs])

    def _backward_compute_chunk(self, phase: int, enable_zb: bool = False) -> None:
        if self.forward_only:
            return
        p = self._phase(phase)
        chunk_id, loss, outputs, grads = self._pending_backward(p)
        with TIMELINE.span("B", f"{p}.{chunk_id}"):
            WeightGradStore.enabled = enable_zb
            try:
                if loss is not None:
                    loss.backward()
                    loss.detach_()
                elif outputs:
                    run_backward(outputs, grads)
            finally:
                WeightGradStore.enabled = False
            if enable_zb:
                WeightGradStore.flush()
        self._finish_backward(p, chunk_id)

    def _forward_backward_compute_chunk(self, phase0: int, phase1: int) -> None:
        if self.forward_only:
            self._forward_compute_chunk(phase0)
            return
        if not self.overlapped_forward_backward:
            self._forward_compute_chunk(phase0)
            self._backward_compute_chunk(phase1)
            return
        p0, p1 = self._phase(phase0), self._phase(phase1)
        chunk0 = self._f_id[p0]
        self._f_id[p0] += 1
        inputs0 = self._take_inputs(p0, chunk0)
        with_loss = self._last_stage(p0) and self.criterion is not None
        criterion0 = self.criterion if with_loss else None
        labels0 = self.labels[p0][chunk0] if with_loss else []
        chunk1, loss1, outputs1, grads1 = self._pending_backward(p1)
        module0, module1 = self.module[p0], self.module[p1]
        with TIMELINE.span("FB", f"{p0}.{chunk0}|{p1}.{chunk1}"):
            outputs0, loss0 = type(module0).overlapped_forward_backward(  # type: ignore[attr-defined]
                module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1
            )
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
        if not self._last_stage(p0) or self.return_outputs:
            self.output_chunks[p0].append(outputs0)
        if with_loss:
            self.loss_chunks.append(loss0)
        self._finish_backward(p1, chunk1)

    def _weight_chunk(self) -> None:
        if self.forward_only:
            return
        self.comm.wait_recvs()
        with TIMELINE.span("W"):
            WeightGradStore.pop()

    # ---- communication --------------------------------------------------------------------

    def _other(self, p: int) -> int:
        return 1 - p

    def _recv_forward(self, phase: int) -> None:
        p = self._phase(phase)
        src = self._up[p]
        if src is None or src == LOCAL:
            return
        chunk_id = self._recv_f_id[p]
        self._recv_f_id[p] += 1
        assert isinstance(src, int)
        self.input_chunks[p].append(self.comm.recv(src, comm.ACTIVATION, p, chunk_id))

    def _send_forward(self, phase: int) -> None:
        p = self._phase(phase)
        dst = self._down[p]
        if dst is None:
            return
        chunk_id = self._send_f_id[p]
        self._send_f_id[p] += 1
        outputs = self.output_chunks[p][chunk_id]
        if dst == LOCAL:
            grad = not self.forward_only
            self.input_chunks[self._other(p)].append([t.detach().requires_grad_(grad) for t in outputs])
            return
        assert isinstance(dst, int)
        self.comm.send(outputs, dst, comm.ACTIVATION, p, chunk_id, free=not self.return_outputs)

    def _recv_backward(self, phase: int) -> None:
        if self.forward_only:
            return
        p = self._phase(phase)
        src = self._down[p]
        if src is None or src == LOCAL:
            return
        chunk_id = self._recv_b_id[p]
        self._recv_b_id[p] += 1
        assert isinstance(src, int)
        self.output_grad_chunks[p].append(self.comm.recv(src, comm.GRADIENT, p, chunk_id))

    def _send_backward(self, phase: int) -> None:
        if self.forward_only:
            return
        p = self._phase(phase)
        dst = self._up[p]
        if dst is None:
            return
        chunk_id = self._send_b_id[p]
        self._send_b_id[p] += 1
        grads = self.input_grad_chunks[p][chunk_id]
        self.input_grad_chunks[p][chunk_id] = None
        if dst == LOCAL:
            self.output_grad_chunks[self._other(p)].append(grads)
            return
        assert isinstance(dst, int) and comm.TENSOR_SHAPES is not None
        # A peer waits for one tensor per declared shape: an input that got no gradient sends zeros.
        grads = [
            g if g is not None else torch.zeros(s, dtype=comm.TENSOR_DTYPE, device=self.device)
            for g, s in zip(grads, comm.TENSOR_SHAPES)
        ]
        self.comm.send(grads, dst, comm.GRADIENT, p, chunk_id, free=False)

    # ---- chunks with their communication --------------------------------------------------

    def _forward_chunk(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self._recv_forward(phase)
        self.comm.wait_recvs()
        self._forward_compute_chunk(phase)
        if send:
            self._send_forward(phase)

    def _backward_chunk(self, phase: int, enable_zb: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self._recv_backward(phase)
        self.comm.wait_recvs()
        self._backward_compute_chunk(phase, enable_zb)
        if send:
            self._send_backward(phase)

    def _forward_backward_chunk(self, phase0: int, phase1: int, recv0: bool = True) -> None:
        if recv0:
            self._recv_forward(phase0)
        self._recv_backward(phase1)
        self.comm.wait_recvs()
        self._forward_backward_compute_chunk(phase0, phase1)
        self._send_forward(phase0)
        self._send_backward(phase1)

    # ---- step -----------------------------------------------------------------------------

    def _check_num_chunks(self, num_chunks: int) -> None:
        raise NotImplementedError

    def _schedule(self, num_chunks: int) -> None:
        raise NotImplementedError

    def _check_step(
        self,
        inputs: tuple[torch.Tensor | None, ...],
        num_chunks: int,
        criterion: Callable[..., torch.Tensor] | None,
        labels: Sequence[torch.Tensor | None],
        forward_only: bool,
    ) -> None:
        comm.check_configured()
        if not _is_int(num_chunks):
            raise TypeError(f"num_chunks: expected an int, got {type(num_chunks).__name__}")
        self._check_num_chunks(num_chunks)
        if not isinstance(labels, (list, tuple)):
            raise TypeError(f"labels: expected a list or tuple of tensors, got {type(labels).__name__}")
        phases = range(len(self.module))
        if any(self._first_stage(p) for p in phases) and (not inputs or all(x is None for x in inputs)):
            raise ValueError(f"inputs: pipeline rank {self.rank} holds a first stage and needs the batch's inputs")
        if any(self._last_stage(p) for p in phases) and not forward_only and criterion is None:
            raise ValueError(f"criterion: pipeline rank {self.rank} holds a last stage and needs a loss function")
        chunks = self._micro_batches(num_chunks)
        for name, given in (("inputs", inputs), ("labels", tuple(labels))):
            for i, x in enumerate(given):
                if isinstance(x, torch.Tensor) and (x.dim() <= self.batch_dim or x.shape[self.batch_dim] % chunks):
                    raise ValueError(
                        f"{name}[{i}]: expected dimension {self.batch_dim} (batch_dim) to split into {chunks} "
                        f"equal micro-batches, got shape {tuple(x.shape)}"
                    )

    def _micro_batches(self, num_chunks: int) -> int:
        """How many micro-batches one rank's `inputs` split into."""
        return num_chunks

    def step(
        self,
        *inputs: torch.Tensor | None,
        num_chunks: int = 0,
        criterion: Callable[..., torch.Tensor] | None = None,
        labels: Sequence[torch.Tensor | None] = (),
        return_outputs: bool = False,
    ) -> tuple[torch.Tensor | None, Outputs]:
        """Runs one training step (or, under `torch.no_grad()`, an inference step).

        Returns `(loss, outputs)` on ranks that hold a last stage: the per-micro-batch losses
        stacked, and with `return_outputs` the last stage's outputs for the whole batch;
        `(None, None)` elsewhere.
        """
        if self._broken is not None:
            raise RuntimeError(
                f"step: an earlier step failed mid-way ({self._broken}); this pipeline's messages are out of "
                "step, so build a new process group and pipeline"
            )
        forward_only = not torch.is_grad_enabled()
        try:
            self._check_step(inputs, num_chunks, criterion, labels, forward_only)
            problem: Exception | None = None
        except (TypeError, ValueError, RuntimeError) as e:
            problem = e
        # Every rank learns whether any rank rejected its arguments, so a bad argument on one
        # rank is an error everywhere instead of its neighbours waiting for it forever.
        flags = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(problem is not None)
        dist.all_reduce(flags, group=self.group)
        if problem is not None:
            raise problem
        if flags.any():
            bad = [r for r in range(self.num_ranks) if flags[r]]
            raise RuntimeError(f"step: pipeline rank(s) {bad} rejected their arguments (see the error there)")

        self._reset_states()
        self.forward_only = forward_only
        self.return_outputs = return_outputs
        self.criterion = criterion
        chunks = self._micro_batches(num_chunks)
        for p in range(len(self.module)):
            if self._first_stage(p):
                self.input_chunks[p] = scatter(inputs, chunks, self.batch_dim)
            if self._last_stage(p):
                self.labels[p] = scatter(tuple(labels), chunks, self.batch_dim)

        try:
            for p in range(len(self.module)):
                up, down = self._up[p], self._down[p]
                if isinstance(up, int):
                    self.comm.prepost(up, comm.ACTIVATION, p, chunks)
                if isinstance(down, int) and not forward_only:
                    self.comm.prepost(down, comm.GRADIENT, p, chunks)
            self._schedule(num_chunks)
            if WeightGradStore.cache or not WeightGradStore.funcs_queue.empty():
                raise RuntimeError("internal: weight-gradient chunks were left over at the end of the step")
            self.comm.finish()
        except BaseException as e:
            # Receives posted for this step may still match later messages: the pipeline's
            # point-to-point state is unknown, so it refuses further steps.
            self._broken = f"{type(e).__name__}: {e}"
            raise

        loss: torch.Tensor | None = None
        outputs: Outputs = None
        last = [p for p in range(len(self.module)) if self._last_stage(p)]
        if last:
            if criterion is not None:
                loss = torch.stack(self.loss_chunks)
            if return_outputs:
                whole = gather(self.output_chunks[last[0]], self.batch_dim)
                outputs = whole[0] if len(whole) == 1 else tuple(whole)
        self._reset_states()
        return loss, outputs

    # ---- the bidirectional schedule (DualPipe and DualPipeV share it) ---------------------

    def _dual_schedule(self, ranks: int, rank: int, chunks: int, turn: bool) -> None:
        """DualPipe's eight phases for `ranks` ranks per direction, this rank at position
        `rank`, `chunks` micro-batches per direction; `turn` marks the rank where the two
        directions meet (it hands phase 0's output to phase 1 as soon as it is ready)."""
        # 1. Warm-up: forwards of phase 0 only.
        for _ in range((ranks - rank - 1) * 2):
            self._forward_chunk(0)
        # 2. Forward pairs: phase 0 and phase 1 alternate.
        pairs = rank + 1
        self._recv_forward(0)
        for i in range(pairs):
            self._forward_chunk(0, recv=False, send=turn)
            self._recv_forward(0)
            self._forward_chunk(1, send=(not turn) or (i < pairs - 1))
            if not turn:
                self._send_forward(0)
        # 3. Backward (weights deferred), weights, forward.
        for _ in range(ranks - rank - 1):
            self._backward_chunk(1, enable_zb=True)
            self._recv_forward(1)
            self._weight_chunk()
            self._forward_chunk(1, recv=False)
        # 4. Steady state: overlapped forward-backward pairs in both directions.
        for i in range(chunks - 2 * ranks + rank + 1):
            if i == 0 and turn:
                # Not overlapped: the other direction waits on this forward, so it goes first.
                self._forward_chunk(0, recv=False, send=False)
                self._send_forward(1)
                self._backward_chunk(1, send=False)
                self._send_forward(0)
                self._send_backward(1)
            else:
                self._forward_backward_chunk(0, 1, recv0=i > 0)
            self._forward_backward_chunk(1, 0)
        # 5. Backward, then overlapped pairs as the forwards run out.
        for _ in range(ranks - rank - 1):
            self._backward_chunk(1)
            self._forward_backward_chunk(1, 0)
        # 6. Backwards of both phases; the second half defers its weights.
        steps = rank + 1
        zb = False
        for i in range(steps):
            if i == steps // 2 and rank % 2 == 1:
                zb = True
            self._backward_chunk(1, enable_zb=zb)
            if i == steps // 2 and rank % 2 == 0:
                zb = True
            self._backward_chunk(0, enable_zb=zb)
        # 7. Deferred weights fill the gaps between the last backwards.
        for _ in range(ranks - rank - 1):
            self._weight_chunk()
            self._backward_chunk(0, enable_zb=True)
        # 8. The remaining weights.
        for _ in range(rank + 1):
            self._weight_chunk()
