"""Gradients through dispatch -> per-expert computation -> combine equal those of a
single-process PyTorch reference of the same MoE layer."""

from __future__ import annotations

import pytest
import torch

from dualcomm import Buffer, ops
from dualcomm.testing import run_loopback


def _moe_reference(xs, idxs, ws, weights, num_experts):
    """out[t] = sum_k w[t,k] * (x[t] @ W[e_k]) over the token's valid experts."""
    outs = []
    for x, idx, w in zip(xs, idxs, ws):
        out = torch.zeros_like(x)
        for k in range(idx.shape[1]):
            e = idx[:, k]
            valid = e >= 0
            y = torch.einsum("th,thd->td", x, weights[e.clamp(min=0)])
            out = out + torch.where(valid.unsqueeze(1), w[:, k : k + 1] * y, torch.zeros_like(y))
        outs.append(out)
    return outs


@pytest.mark.parametrize("topology", [(1, 2), (2, 2), (3, 1)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_gradients_match_reference(topology):
    num_nodes, rpn = topology
    world = num_nodes * rpn
    epr, hidden, k, t = 2, 8, 3, 10
    num_experts = epr * world
    g = torch.Generator().manual_seed(world)
    xs = [torch.randn(t, hidden, generator=g, dtype=torch.float64).float() for _ in range(world)]
    idxs = [torch.rand(t, num_experts, generator=g).topk(k, 1).indices for _ in range(world)]
    idxs[0][0, 1] = -1
    ws = [torch.rand(t, k, generator=g) for _ in range(world)]
    expert_w = torch.randn(num_experts, hidden, hidden, generator=g) / hidden**0.5
    out_grads = [torch.randn(t, hidden, generator=g) for _ in range(world)]

    def body(buf: Buffer):
        r = buf.rank
        x = xs[r].clone().requires_grad_(True)
        w = ws[r].clone().requires_grad_(True)
        mine = expert_w[r * epr : (r + 1) * epr].clone().requires_grad_(True)
        res = ops.dispatch(buf, x, idxs[r], w, num_experts)
        y = torch.zeros_like(res.recv_x)
        for j in range(k):
            e = res.recv_topk_idx[:, j]
            local = (e >= 0).unsqueeze(1)
            h = torch.einsum("th,thd->td", res.recv_x, mine[e.clamp(min=0)])
            y = y + torch.where(local, res.recv_topk_weights[:, j : j + 1] * h, torch.zeros_like(h))
        out = ops.combine(buf, y, res.handle)
        (out * out_grads[r]).sum().backward()
        return out.detach(), x.grad, w.grad, mine.grad

    got = run_loopback(num_nodes, rpn, body)

    rx = [x.clone().requires_grad_(True) for x in xs]
    rw = [w.clone().requires_grad_(True) for w in ws]
    rew = expert_w.clone().requires_grad_(True)
    outs = _moe_reference(rx, idxs, rw, rew, num_experts)
    sum((o * gr).sum() for o, gr in zip(outs, out_grads)).backward()
    for r in range(world):
        out, gx, gw, gexp = got[r]
        torch.testing.assert_close(out, outs[r].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, rx[r].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw, rw[r].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gexp, rew.grad[r * epr : (r + 1) * epr], rtol=1e-5, atol=1e-5)
