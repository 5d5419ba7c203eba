"""Low-latency mode against DeepEP's low-latency test semantics (see low_latency_checks.py),
on loopback worlds and across processes, plus bitwise determinism, normal mode on the same
buffer, and the errors a low-latency caller can meet."""

from __future__ import annotations

import client_workers
import low_latency_checks as checks
import pytest
import torch

import dualcomm
from dualcomm.launch import run_world
from dualcomm.testing import run_loopback

HIDDEN, TOKENS, TOPK, MAX_TOKENS = 512, 12, 3, 16
VARIANTS = 2 * 2 * (1 + 1 + 2)  # x kinds x hook x (bf16, fp8, fp8 rounded, fp8 rounded UE8M0)


def _run(num_nodes: int, rpn: int, seed: int):
    world = num_nodes * rpn
    experts = 4 * world
    inputs = checks.make_inputs(world, TOKENS, HIDDEN, TOPK, experts, seed)
    hint = dualcomm.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, world, experts)
    return run_loopback(
        num_nodes,
        rpn,
        lambda buf: checks.run_rank(buf, inputs, experts, MAX_TOKENS),
        num_rdma_bytes=hint,
        low_latency_mode=True,
    )


@pytest.mark.parametrize("topology", [(1, 4), (2, 2), (1, 1)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_low_latency_matches_deep_ep_semantics(topology):
    results = _run(*topology, seed=1)
    assert [r["variants"] for r in results] == [VARIANTS] * (topology[0] * topology[1])


def test_low_latency_is_bitwise_deterministic():
    first, second = _run(2, 2, seed=5), _run(2, 2, seed=5)
    for a, b in zip(first, second):
        assert all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a["hashes"], b["hashes"]))


def test_low_latency_across_processes():
    results = run_world(client_workers.low_latency_semantics, 4, 2, 3, timeout=240)
    assert [r["variants"] for r in results] == [VARIANTS] * 4
    # Every rank linked to every other, through shared memory on one host.
    assert {r["transport"] for r in results} == {"shm"}
    assert all(r["ll_rdma_connections"] == 3 for r in results)


def test_fp8_dispatch_to_a_rank_that_receives_nothing():
    def body(buf):
        x = torch.randn(3, 256).bfloat16()
        idx = torch.tensor([[0, 1]] * 3)  # rank 0's experts only: rank 1 receives nothing
        (data, scales), count, handle, _, _ = buf.low_latency_dispatch(x, idx, 4, 4, use_fp8=True)
        out, _, _ = buf.low_latency_combine(torch.zeros(2, 8, 256, dtype=torch.bfloat16), idx, torch.ones(3, 2), handle)
        return count.tolist(), out.shape

    assert run_loopback(1, 2, body, low_latency_mode=True) == [([6, 6], (3, 256)), ([0, 0], (3, 256))]


def test_async_and_hook_together_are_refused():
    def body(buf):
        with pytest.raises(dualcomm.InvalidArgumentError, match="^async_finish: expected False with return_recv_hook"):
            buf.low_latency_dispatch(
                torch.ones(1, 128, dtype=torch.bfloat16),
                torch.zeros(1, 1, dtype=torch.int64),
                1,
                2,
                async_finish=True,
                return_recv_hook=True,
            )
        return True

    assert all(run_loopback(1, 2, body, low_latency_mode=True, timeout=30))


def test_normal_mode_still_works_on_a_low_latency_buffer():
    def body(buf):
        x = torch.arange(8 * 4, dtype=torch.float32).view(8, 4) + buf.rank
        idx = torch.tensor([[r % 4, (r + 1) % 4] for r in range(8)])
        per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 4)
        recv, *_, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
        )
        combined, _, _ = buf.combine(recv, handle)
        return torch.equal(combined, x * in_rank.sum(1, keepdim=True))

    assert all(run_loopback(2, 2, body, low_latency_mode=True))


def test_low_latency_errors_name_the_argument():
    def body(buf):
        x = torch.ones(4, 256, dtype=torch.bfloat16)
        idx = torch.zeros(4, 2, dtype=torch.int64)
        msgs = []
        for kwargs in (
            dict(num_max_dispatch_tokens_per_rank=3),
            dict(num_max_dispatch_tokens_per_rank=8, num_experts=3),
            dict(num_max_dispatch_tokens_per_rank=8, use_ue8m0=True),
        ):
            args = {"num_experts": 4, **kwargs}
            with pytest.raises(dualcomm.DualcommError) as e:
                buf.low_latency_dispatch(x, idx, **args)
            msgs.append(str(e.value))
        # The buffer is still usable after every rank's rejected calls.
        _, count, handle, _, _ = buf.low_latency_dispatch(x, idx, 8, 4, use_fp8=False)
        with pytest.raises(dualcomm.InvalidArgumentError, match="^topk_weights: expected shape"):
            buf.low_latency_combine(torch.zeros(2, 16, 256, dtype=torch.bfloat16), idx, torch.ones(4, 3), handle)
        return msgs, count.tolist()

    out = run_loopback(1, 2, body, low_latency_mode=True, timeout=30)
    msgs, count = out[0]
    assert msgs[0].startswith("x: expected at most num_max_dispatch_tokens_per_rank=3 tokens, got 4")
    assert msgs[1].startswith("num_experts: expected a positive multiple of the world size 2")
    assert msgs[2].startswith("use_ue8m0: expected False unless round_scale=True")
    assert count == [8, 0] and out[1][1] == [0, 0]

    def plain(buf):
        with pytest.raises(dualcomm.InvalidArgumentError, match="^low_latency_mode: expected True"):
            buf.low_latency_dispatch(
                torch.ones(1, 128, dtype=torch.bfloat16), torch.zeros(1, 1, dtype=torch.int64), 1, 2
            )
        return True

    assert all(run_loopback(1, 2, plain))
