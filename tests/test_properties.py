"""Property test: random worlds, token counts, shapes and ring sizes against the reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from dualcomm import Buffer
from dualcomm.testing import run_loopback


@st.composite
def worlds(draw):
    num_nodes = draw(st.integers(1, 3))
    rpn = draw(st.integers(1, 3))
    world = num_nodes * rpn
    tokens = draw(st.lists(st.integers(0, 12), min_size=world, max_size=world))
    hidden = draw(st.integers(1, 9))
    k = draw(st.integers(1, 4))
    epr = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float32]))
    ring_records = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    return num_nodes, rpn, tokens, hidden, k, epr * world, dtype, ring_records, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_random_worlds_match_reference(case):
    num_nodes, rpn, tokens, hidden, k, num_experts, dtype, ring_records, seed = case
    world = num_nodes * rpn
    inputs = ref.random_inputs(world, tokens, hidden, k, num_experts, dtype, seed)
    record = 24 + hidden * 4 + k * 12  # the largest record either operation uses here

    def body(buf: Buffer):
        inp = inputs[buf.rank]
        _, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, num_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            inp.x,
            is_token_in_rank=itr,
            num_tokens_per_expert=pe,
            topk_idx=inp.topk_idx,
            topk_weights=inp.topk_weights,
        )
        combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        return recv_x, recv_idx, recv_w, combined, combined_w, itr

    out = run_loopback(
        num_nodes,
        rpn,
        body,
        num_nvl_bytes=rpn * record * ring_records,
        num_rdma_bytes=num_nodes * record * ring_records,
        timeout=60,
    )
    for d in range(world):
        want_x, _, want_idx, want_w, _, _ = ref.dispatch(inputs, num_experts, world, d)
        recv_x, recv_idx, recv_w, combined, combined_w, itr = out[d]
        assert torch.equal(recv_x, want_x)
        assert torch.equal(recv_idx, want_idx)
        assert torch.equal(recv_w, want_w)
        assert torch.equal(combined.float(), inputs[d].x.float() * itr.sum(1, keepdim=True))
        inp = inputs[d]
        assert torch.equal(combined_w, torch.where(inp.topk_idx >= 0, inp.topk_weights, 0.0))
