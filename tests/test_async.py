"""The progress engine: with async_finish=True the data moves on the engine's thread while
Python computes (shown with timestamps, not wall-clock thresholds), operations complete in
the order they were issued, and an idle buffer burns no CPU."""

from __future__ import annotations

import time

import torch

import reference as ref
from dualcomm import Buffer
from dualcomm.testing import run_loopback


def _compute_for(seconds: float) -> tuple[float, float]:
    """Python-side work (small torch ops in a loop); returns its (start, end) on time.time()."""
    start = time.time()
    a = torch.randn(64, 64)
    while time.time() - start < seconds:
        a = torch.tanh(a @ a.T / 64)
    return start, time.time()


def test_data_moves_while_python_computes():
    world, tokens, hidden = 2, 4096, 4096  # 64 MiB of fp32 per rank: long enough to observe
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(tokens, hidden, generator=g) for _ in range(world)]
    idx = [torch.randint(0, 4, (tokens, 2), generator=g) for _ in range(world)]

    def body(buf: Buffer):
        _, _, pe, itr, _ = buf.get_dispatch_layout(idx[buf.rank], 4)
        issued = time.time()
        recv_x, _, _, _, handle, event = buf.dispatch(xs[buf.rank], is_token_in_rank=itr, async_finish=True)
        returned = time.time()
        compute = _compute_for(1.0)
        event.current_stream_wait()
        waited = time.time()
        op = event.timestamps()
        combined, _, _ = buf.combine(recv_x, handle)
        ok = torch.equal(combined, xs[buf.rank] * itr.sum(1, keepdim=True))
        return issued, returned, compute, op, waited, ok

    for issued, returned, (c0, c1), (s, e), waited, ok in run_loopback(1, 2, body, num_nvl_bytes=32 << 20):
        assert ok
        assert issued <= s < returned, "the engine starts the dispatch before the call returns"
        assert e > c0, "the dispatch was still moving data when Python started computing"
        assert e <= c1, "and it finished while Python computed, not when Python waited"
        assert waited >= e


def test_queued_operations_complete_in_issue_order():
    world = 4
    inputs = ref.random_inputs(world, [50] * world, 32, 3, 8, torch.float32, seed=8)

    def body(buf: Buffer):
        inp = inputs[buf.rank]
        _, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, 8)
        recv_x, _, _, _, handle, ev_d = buf.dispatch(inp.x, is_token_in_rank=itr, async_finish=True)
        # Issued before the dispatch has finished: it runs after it, on the same engine.
        combined, _, ev_c = buf.combine(recv_x, handle, async_finish=True)
        again, _, _, _, _, ev_a = buf.dispatch(inp.x, handle=handle, async_finish=True)
        ev_a.current_stream_wait()
        ev_c.current_stream_wait()
        ev_d.current_stream_wait()
        order = [ev_d.timestamps(), ev_c.timestamps(), ev_a.timestamps()]
        return combined, again, recv_x, order, itr

    for r, (combined, again, recv_x, order, itr) in enumerate(run_loopback(2, 2, body)):
        assert torch.equal(combined, inputs[r].x * itr.sum(1, keepdim=True))
        assert torch.equal(again, recv_x)
        for (_, end_prev), (start_next, _) in zip(order, order[1:]):
            assert end_prev <= start_next


def test_async_counts_fill_in_at_wait():
    inputs = ref.random_inputs(2, [20, 20], 8, 2, 4, torch.float32, seed=1)

    def body(buf: Buffer):
        inp = inputs[buf.rank]
        _, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, 4)
        _, _, _, counts, _, event = buf.dispatch(
            inp.x,
            is_token_in_rank=itr,
            num_tokens_per_expert=pe,
            topk_idx=inp.topk_idx,
            topk_weights=inp.topk_weights,
            async_finish=True,
        )
        with event:
            pass
        return counts

    for d, counts in enumerate(run_loopback(1, 2, body)):
        assert counts == ref.dispatch(inputs, 4, 2, d)[4]


def test_idle_buffers_burn_no_cpu():
    def body(buf: Buffer):
        _, _, pe, itr, _ = buf.get_dispatch_layout(torch.zeros(4, 1, dtype=torch.int64), 8)
        buf.dispatch(torch.ones(4, 8), is_token_in_rank=itr)  # engines have run once
        time.sleep(0.1)
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(1.0)
        return time.process_time() - cpu0, time.monotonic() - wall0

    results = run_loopback(4, 2, body)
    # process_time counts every thread of this process: 8 engines idle for a second.
    cpu = max(r[0] for r in results)
    assert cpu < 0.25, f"8 idle buffers used {cpu:.2f}s of CPU in 1s"
