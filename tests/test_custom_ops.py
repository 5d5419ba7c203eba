"""dualcomm's dispatch and combine as torch.library custom ops: `torch.compile` (inductor,
CPU) traces a small MoE layer over them with no graph break, and its outputs and gradients
match eager mode; the ops' fake implementations and error paths."""

from __future__ import annotations

import compile_worker
import pytest
import torch

import dualcomm
import dualcomm.custom_ops as ops
from dualcomm.launch import run_world
from dualcomm.testing import run_loopback


def test_compiled_moe_layer_matches_eager_across_processes():
    results = run_world(compile_worker.eager_and_compiled, 2, 2, timeout=280)
    for r in results:
        assert r["nvl_payload_bytes"] > 0  # tokens really crossed between the ranks
        for eager, compiled in r["runs"]:
            assert eager.keys() == compiled.keys() and {"y", "grad_x", "experts", "gate.weight"} <= eager.keys()
            for name in eager:
                torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fake_implementations_give_data_dependent_rows():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):
        x = torch.empty(5, 8)
        idx = torch.zeros(5, 2, dtype=torch.int64)
        w = torch.empty(5, 2)
        recv_x, recv_idx, recv_w, hid = torch.ops.dualcomm.dispatch(x, idx, w, 1, 4)
        assert recv_x.shape[1] == 8 and recv_idx.shape[1] == 2 and hid.shape == ()
        assert isinstance(recv_x.shape[0], torch.SymInt)  # unknown until the counts arrive
        assert torch.ops.dualcomm.combine(recv_x, hid, 5).shape == (5, 8)


def test_eager_autograd_matches_the_plain_definition():
    """Through the ops, each token's output is the sum over ranks of its rows, and gradients
    flow back to x and to the weights as a plain-PyTorch computation's would."""

    def body(buf):
        g = torch.Generator().manual_seed(buf.rank)
        x = torch.randn(5, 4, generator=g, requires_grad=True)
        idx = torch.tensor([[0, 3], [1, 2], [2, -1], [3, 0], [1, 1]])
        w = torch.rand(5, 2, generator=g, requires_grad=True)
        rx, ridx, rw, hid = ops.dispatch(ops.op_buffer_id(buf), x, idx, w, 4)
        y = ops.combine(rx * rw.sum(1, keepdim=True), hid, 5)
        y.sum().backward()
        # Plain definition: each distinct rank r of a token gets x scaled by the weights of
        # that token's choices owned by r; the sum over ranks comes back.
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        owner = torch.where(idx >= 0, idx // 2, torch.full_like(idx, -1))
        ref = torch.zeros(5, 4)
        for r in range(2):
            mine = owner == r
            ref = ref + xr * (wr * mine).sum(1, keepdim=True) * mine.any(1, keepdim=True)
        ref.sum().backward()
        return (
            torch.allclose(y, ref, atol=1e-6),
            torch.allclose(x.grad, xr.grad, atol=1e-6),
            torch.allclose(w.grad, wr.grad, atol=1e-6),
        )

    assert run_loopback(1, 2, body) == [(True, True, True)] * 2


def test_stale_or_foreign_ids_are_errors(monkeypatch):
    monkeypatch.setenv("DUALCOMM_MAX_LIVE_HANDLES", "1")

    def body(buf):
        bid = ops.op_buffer_id(buf)
        assert ops.op_buffer_id(buf) == bid
        x, idx, w = torch.ones(2, 4), torch.tensor([[0], [1]]), torch.ones(2, 1)
        first = ops.dispatch(bid, x, idx, w, 2)[3]
        second = ops.dispatch(bid, x, idx, w, 2)
        ops.combine(second[0], second[3], 2)
        with pytest.raises(dualcomm.InvalidArgumentError, match="^handle_id: expected the id of one of the 1 most"):
            ops.combine(second[0], first, 2)
        with pytest.raises(dualcomm.InvalidArgumentError, match="^buffer_id: expected the id of a live Buffer"):
            ops.dispatch(10**9, x, idx, w, 2)
        return True

    assert all(run_loopback(1, 1, body))
