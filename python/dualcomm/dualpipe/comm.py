"""Point-to-point traffic between pipeline stages.

Shapes and dtype of what crosses a stage boundary are declared up front
(`set_p2p_tensor_shapes`, `set_p2p_tensor_dtype`), as in the reference DualPipe, so a
receiver can allocate before the sender's tensor exists.

On NCCL the operations of one schedule step are posted together with `batch_isend_irecv`.
Gloo has no grouped point-to-point (`batch_isend_irecv` can deadlock there), so each send
and receive is posted on its own at once, with a tag that names the message (activation or
gradient, direction, micro-batch); only receives are waited for before compute, and sends
complete in the background while the stage computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

TENSOR_SHAPES: list[tuple[int, ...]] | None = None
TENSOR_DTYPE: torch.dtype | None = None

ACTIVATION, GRADIENT = 0, 1
_TAG_STRIDE = 1 << 20


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """Shapes of the tensors one stage sends to the next (one micro-batch)."""
    global TENSOR_SHAPES
    if isinstance(shapes, (torch.Size, tuple)) and all(isinstance(s, int) for s in shapes):
        raise TypeError(f"shapes: expected a list of shapes, e.g. [(4, 128, 512)]; got one shape {tuple(shapes)}")
    checked = []
    for i, s in enumerate(shapes):
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s):
            raise TypeError(f"shapes[{i}]: expected a tuple of non-negative ints, got {s!r}")
        checked.append(tuple(s))
    TENSOR_SHAPES = checked


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """Dtype of the tensors one stage sends to the next."""
    global TENSOR_DTYPE
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {dtype!r}")
    TENSOR_DTYPE = dtype


def check_configured() -> None:
    if TENSOR_SHAPES is None or TENSOR_DTYPE is None:
        raise RuntimeError("call set_p2p_tensor_shapes and set_p2p_tensor_dtype before step()")


class PeerToPeer:
    """Sends and receives of one rank of a pipeline group."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.grouped = dist.get_backend(group) == "nccl"
        # Gloo moves host memory only: messages of device tensors go through host copies.
        self.staged = not self.grouped and device.type != "cpu"
        self._ops: list[dist.P2POp] = []
        self._recvs: list[dist.Work] = []
        # (work, tensors to free once sent, whether to, the host copy being sent)
        self._sends: list[tuple[dist.Work, list[torch.Tensor], bool, torch.Tensor]] = []
        # Staged: the host copies the receives waited on land in, and their device tensors.
        self._due: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._to_free: list[torch.Tensor] = []
        self._posted: dict[tuple[int, int, int], _Posted] = {}

    def _tag(self, kind: int, phase: int, chunk_id: int) -> int:
        return (kind * 2 + phase) * _TAG_STRIDE + chunk_id

    def _post_recv(self, src: int, kind: int, phase: int, chunk_id: int) -> _Posted:
        assert TENSOR_SHAPES is not None and TENSOR_DTYPE is not None
        tensors = [torch.empty(s, dtype=TENSOR_DTYPE, device=self.device) for s in TENSOR_SHAPES]
        peer = dist.get_global_rank(self.group, src)
        works, copies = [], []
        for t in tensors:
            into = torch.empty(t.shape, dtype=t.dtype) if self.staged else t
            work = dist.irecv(into, peer, group=self.group, tag=self._tag(kind, phase, chunk_id))
            assert work is not None
            works.append(work)
            if self.staged:
                copies.append((into, t))
        return _Posted(tensors, works, copies)

    def prepost(self, src: int, kind: int, phase: int, count: int) -> None:
        """Posts the receives of a whole step up front (gloo), so each message lands as soon
        as its sender sends it, while this rank computes, not when the schedule reaches it."""
        if self.grouped:
            return
        for chunk_id in range(count):
            self._posted[(kind, phase, chunk_id)] = self._post_recv(src, kind, phase, chunk_id)

    def recv(self, src: int, kind: int, phase: int, chunk_id: int) -> list[torch.Tensor]:
        """The tensors of a message; they are complete after the next `wait_recvs`."""
        if self.grouped:
            assert TENSOR_SHAPES is not None and TENSOR_DTYPE is not None
            tensors = [torch.empty(s, dtype=TENSOR_DTYPE, device=self.device) for s in TENSOR_SHAPES]
            peer = dist.get_global_rank(self.group, src)
            self._ops.extend(dist.P2POp(dist.irecv, t, peer, self.group) for t in tensors)
            return tensors
        posted = self._posted.pop((kind, phase, chunk_id), None)
        if posted is None:
            posted = self._post_recv(src, kind, phase, chunk_id)
        self._recvs.extend(posted.works)
        self._due.extend(posted.copies)
        return posted.tensors

    def send(self, tensors: Sequence[torch.Tensor], dst: int, kind: int, phase: int, chunk_id: int, free: bool) -> None:
        """Posts the sends; with `free` the tensors' storage is released once they are sent."""
        peer = dist.get_global_rank(self.group, dst)
        tag = self._tag(kind, phase, chunk_id)
        items = [t for t in tensors if t is not None]
        for t in items:
            if tuple(t.shape) not in [tuple(s) for s in TENSOR_SHAPES or []] or t.dtype != TENSOR_DTYPE:
                raise ValueError(
                    f"pipeline stage output: expected shapes {TENSOR_SHAPES} with dtype {TENSOR_DTYPE} "
                    f"(set_p2p_tensor_shapes/dtype), got {tuple(t.shape)} {t.dtype}"
                )
            payload = t.detach().contiguous()
            if self.grouped:
                self._ops.append(dist.P2POp(dist.isend, payload, peer, self.group))
            else:
                if self.staged:
                    payload = payload.cpu()
                work = dist.isend(payload, peer, group=self.group, tag=tag)
                assert work is not None
                self._sends.append((work, [t], free, payload))
        if self.grouped and free:
            self._to_free.extend(items)

    def wait_recvs(self) -> None:
        """Makes every posted receive complete (and, on NCCL, posts the step's batch)."""
        if self.grouped:
            if self._ops:
                for work in dist.batch_isend_irecv(self._ops):
                    work.wait()
                self._ops = []
            for t in self._to_free:
                _release(t)
            self._to_free = []
            return
        for work in self._recvs:
            work.wait()
        self._recvs = []
        for host, dev in self._due:
            dev.copy_(host)
        self._due = []
        self._reap_sends(block=False)

    def _reap_sends(self, block: bool) -> None:
        pending = []
        for work, tensors, free, payload in self._sends:
            if block:
                work.wait()
            elif not work.is_completed():
                pending.append((work, tensors, free, payload))
                continue
            if free:
                for t in tensors:
                    _release(t)
        self._sends = pending

    def finish(self) -> None:
        """Waits for everything posted (end of a step)."""
        if self._posted:
            raise RuntimeError(f"internal: receives {sorted(self._posted)} were posted but never used")
        self.wait_recvs()
        self._reap_sends(block=True)


@dataclass
class _Posted:
    """A message's receives: the tensors handed out, their works, and (staged) the host
    copies they land in first."""

    tensors: list[torch.Tensor]
    works: list[dist.Work]
    copies: list[tuple[torch.Tensor, torch.Tensor]]


def _release(t: torch.Tensor) -> None:
    # The autograd graph keeps the output tensor object alive for backward, which only needs
    # its metadata; its storage can go once it is sent.
    if t._base is not None:
        raise ValueError(f"pipeline stage outputs must not be views of other tensors (shape {tuple(t.shape)})")
    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
