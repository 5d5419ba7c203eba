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


def test_masked_ranks_are_left_out_of_dispatch_and_combine():
    """Every rank but 3 masks rank 3 (which then stays out): the others' dispatch receives
    only from ranks 0-2 and their combine sums over the experts of ranks 0-2, as a plain
    PyTorch reference of the routing says; a query reads the masks back, a clean clears them."""
    world, experts, tokens, hidden, topk, masked = 4, 8, 6, 128, 2, 3
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(tokens, hidden, generator=g).to(torch.bfloat16) for _ in range(world)]
    idxs = [torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]) for _ in range(world)]
    ws = [torch.rand(tokens, topk, generator=g) for _ in range(world)]
    local = experts // world

    def body(buf):
        r = buf.rank
        status = torch.zeros(world, dtype=torch.int32)
        if r == masked:
            return None
        buf.low_latency_update_mask_buffer(masked, True)
        recv, count, handle, _, _ = buf.low_latency_dispatch(xs[r], idxs[r], tokens, experts, use_fp8=False)
        out, _, _ = buf.low_latency_combine(recv, idxs[r], ws[r], handle)
        buf.low_latency_query_mask_buffer(status)
        after = status.tolist()
        buf.low_latency_clean_mask_buffer()
        buf.low_latency_query_mask_buffer(status)
        return count.tolist(), recv[:, : int(count.max())].clone(), out, after, status.tolist()

    results = run_loopback(1, world, body, low_latency_mode=True, enable_shrink=True, timeout=60)
    for r, res in enumerate(results):
        if r == masked:
            continue
        count, recv, out, after, cleared = res
        assert after == [int(p == masked) for p in range(world)] and cleared == [0] * world
        # Reference: rows for each local expert, by source rank then token, from ranks not masked.
        for e in range(local):
            expert = r * local + e
            rows = [xs[s][t] for s in range(world) if s != masked for t in range(tokens) if expert in idxs[s][t]]
            assert count[e] == len(rows)
            if rows:
                assert torch.equal(recv[e, : len(rows)], torch.stack(rows))
        owner_live = (idxs[r] // local) != masked
        ref = (xs[r].float() * (ws[r] * owner_live).sum(1, keepdim=True)).to(torch.bfloat16)
        assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_shrink_mode_errors_name_the_argument():
    def body(buf):
        msgs = []
        for call in (
            lambda: buf.low_latency_update_mask_buffer(5, True),
            lambda: buf.low_latency_update_mask_buffer("1", True),
            lambda: buf.low_latency_query_mask_buffer(torch.zeros(2, dtype=torch.int64)),
            lambda: buf.low_latency_query_mask_buffer(torch.zeros(3, dtype=torch.int32)),
        ):
            with pytest.raises(dualcomm.InvalidArgumentError) as e:
                call()
            msgs.append(str(e.value))
        return msgs

    msgs = run_loopback(1, 2, body, low_latency_mode=True, enable_shrink=True, timeout=30)[0]
    assert msgs[0].startswith("rank_to_mask: expected a rank in [0, 2), got 5")
    assert msgs[1].startswith("rank_to_mask: expected an int rank in [0, 2)")
    assert all(m.startswith("mask_status: expected an int32 tensor of 2 elements") for m in msgs[2:])

    def unshrunk(buf):
        with pytest.raises(dualcomm.InvalidArgumentError, match="^enable_shrink: expected True at construction"):
            buf.low_latency_query_mask_buffer(torch.zeros(2, dtype=torch.int32))
        return True

    assert all(run_loopback(1, 2, unshrunk, low_latency_mode=True))

    def normal_mode(buf):
        # As in DeepEP, shrink mode changes nothing for normal operations; the mask calls
        # are low-latency calls.
        x = torch.ones(2, 8)
        recv, *_, handle, _ = buf.dispatch(x, is_token_in_rank=torch.ones(2, 2, dtype=torch.bool))
        combined, *_ = buf.combine(recv, handle)
        with pytest.raises(dualcomm.InvalidArgumentError, match="^low_latency_mode: expected True"):
            buf.low_latency_query_mask_buffer(torch.zeros(2, dtype=torch.int32))
        return torch.equal(combined, 2 * x)

    assert all(run_loopback(1, 2, normal_mode, enable_shrink=True))


def test_wait_recv_cost_stats_single_out_a_slow_rank():
    """DeepEP's `dispatch_wait_recv_cost_stats` / `combine_wait_recv_cost_stats`: per source
    rank, the time spent waiting to receive from it, added up over calls. Rank 2 starts each
    call 0.4 s late; the others' stats must put that wait on rank 2, not on each other."""
    world, experts, tokens, hidden, late = 3, 6, 4, 128, 0.4

    def body(buf):
        import time

        x = torch.ones(tokens, hidden, dtype=torch.bfloat16)
        idx = torch.stack([torch.arange(3) * 2 for _ in range(tokens)])  # one expert per rank
        w = torch.ones(tokens, 3)
        d_stats = torch.zeros(world, dtype=torch.int64)
        c_stats = torch.zeros(world, dtype=torch.int64)
        after_one = None
        for _ in range(2):
            if buf.rank == 2:
                time.sleep(late)
            recv, _, handle, _, _ = buf.low_latency_dispatch(
                x, idx, tokens, experts, use_fp8=False, dispatch_wait_recv_cost_stats=d_stats
            )
            if buf.rank == 2:
                time.sleep(late)
            buf.low_latency_combine(recv, idx, w, handle, combine_wait_recv_cost_stats=c_stats)
            after_one = after_one if after_one is not None else d_stats.clone()
        return after_one.tolist(), d_stats.tolist(), c_stats.tolist()

    results = run_loopback(1, world, body, low_latency_mode=True, timeout=60)
    for r in (0, 1):
        first, d, c = results[r]
        other = 1 - r
        for stats in (d, c):
            assert stats[2] >= 2 * late * 0.9e9, stats  # two calls, each 0.4 s behind
            assert stats[other] < stats[2] / 2, stats
            assert stats[r] == 0  # no wait on itself
        assert first[2] >= late * 0.9e9 and d[2] > first[2]  # cumulative


def test_wait_recv_cost_stats_must_be_int64_per_rank():
    def body(buf):
        x = torch.ones(2, 128, dtype=torch.bfloat16)
        idx = torch.zeros(2, 1, dtype=torch.int64)
        with pytest.raises(dualcomm.InvalidArgumentError) as e:
            buf.low_latency_dispatch(x, idx, 2, 2, use_fp8=False, dispatch_wait_recv_cost_stats=torch.zeros(2))
        return str(e.value)

    msg = run_loopback(1, 2, body, low_latency_mode=True, timeout=30)[0]
    assert msg.startswith("dispatch_wait_recv_cost_stats: expected a contiguous int64 tensor of shape [2]")
