"""Tensors on a device other than the CPU go through the CPU path staged (dualcomm.staging).
No GPU here, so the device check is pointed at marked CPU tensors: the adapter's copies,
its deferred fills after an async event or a receive hook, and an in-place `out` all run,
and the results must equal the unstaged calls'. (On a GPU, test_cuda_kernels.py and the
`cuda` tests below run the real thing.)"""

from __future__ import annotations

import deep_ep_checks
import pytest
import torch

import dualcomm.staging as staging
from dualcomm.testing import run_loopback

DEVICE = torch.device("cpu")


class Marked(torch.Tensor):
    """A CPU tensor the patched device check reports as on "the device"."""


@pytest.fixture
def pretend_device(monkeypatch):
    def device_of(values):
        stack = [values]
        while stack:
            v = stack.pop()
            if isinstance(v, Marked):
                return DEVICE
            if isinstance(v, (tuple, list)):
                stack.extend(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
        return None

    monkeypatch.setattr(staging, "device_of", device_of)
    # What the adapter allocates "on the device" is marked too, so a test can tell a result
    # that was moved from one left behind on the host.
    monkeypatch.setattr(staging, "device_empty", lambda like, device: torch.empty_like(like).as_subclass(Marked))


def _mark(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(Marked)


def test_staged_calls_equal_direct_ones_and_fill_after_the_event(pretend_device):
    def body(buf):
        g = torch.Generator().manual_seed(buf.rank)
        x = torch.randn(10, 32, generator=g).bfloat16()
        idx = torch.randint(-1, 8, (10, 2), generator=g)
        w = torch.rand(10, 2, generator=g)
        layout = buf.get_dispatch_layout(idx, 8)
        args = dict(
            num_tokens_per_rank=layout[0],
            num_tokens_per_rdma_rank=layout[1],
            is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2],
            topk_idx=idx,
            topk_weights=w,
        )
        direct = buf.dispatch(x, **args)
        staged_layout = buf.get_dispatch_layout(_mark(idx), 8)
        assert all(torch.equal(a, b) for a, b in zip(staged_layout[:4:2], layout[:4:2]))
        rx, ridx, rw, counts, handle, event = buf.dispatch(_mark(x), async_finish=True, **args)
        assert counts == direct[3]  # known at return
        event.current_stream_wait()  # the device copies are filled here
        ok = torch.equal(rx, direct[0]) and torch.equal(ridx, direct[1]) and torch.equal(rw, direct[2])
        ok &= rx.data_ptr() != direct[0].data_ptr()
        out, out_w, _ = buf.combine(_mark(rx), handle, topk_weights=rw)
        ref, ref_w, _ = buf.combine(direct[0], direct[4], topk_weights=direct[2])
        return ok and torch.equal(out, ref) and torch.equal(out_w, ref_w)

    assert all(run_loopback(2, 2, body))


def test_staged_async_layout_is_complete_when_it_returns(pretend_device):
    """Megatron asks for the layout with async_finish=True and feeds it to dispatch at once:
    the layout's event has nothing to wait for, so the copies are made before it returns;
    arguments passed positionally count too."""

    def body(buf):
        idx = torch.randint(-1, 8, (10, 2), generator=torch.Generator().manual_seed(buf.rank))
        want = buf.get_dispatch_layout(idx, 8)
        got = buf.get_dispatch_layout(_mark(idx), 8, None, True)  # async_finish, positionally
        return all(torch.equal(a, b) for a, b in zip(got[:4:2], want[:4:2])) and torch.equal(got[3], want[3])

    assert all(run_loopback(2, 2, body))


def test_staged_low_latency_hook_and_out(pretend_device):
    def body(buf):
        g = torch.Generator().manual_seed(buf.rank)
        x = torch.randn(6, 128, generator=g).bfloat16()
        idx = torch.randint(0, 8, (6, 2), generator=g)
        w = torch.rand(6, 2, generator=g)
        stats = _mark(torch.zeros(4, dtype=torch.int32))
        rx, count, handle, _, hook = buf.low_latency_dispatch(
            _mark(x), idx, 8, 8, use_fp8=False, return_recv_hook=True, cumulative_local_expert_recv_stats=stats
        )
        hook()
        # Updated in place on the host copy, and copied back to the caller's tensor.
        assert torch.equal(stats.as_subclass(torch.Tensor), count)
        direct, dcount, dhandle, _, _ = buf.low_latency_dispatch(x, idx, 8, 8, use_fp8=False)
        ok = torch.equal(count, dcount)
        for e in range(2):
            n = int(count[e])
            ok &= torch.equal(rx[e, :n], direct[e, :n])
        out = _mark(torch.zeros(6, 128, dtype=torch.bfloat16))
        combined, _, _ = buf.low_latency_combine(rx, idx, w, handle, out=out)
        ref, _, _ = buf.low_latency_combine(direct, idx, w, dhandle)
        return ok and combined is out and torch.equal(out.as_subclass(torch.Tensor), ref)

    assert all(run_loopback(1, 2, body, low_latency_mode=True))


def _on_device(t: object) -> bool:
    return isinstance(t, Marked)


@pytest.mark.parametrize("nodes", [1, 2])
def test_staged_dispatch_handle_entries_are_on_the_device(pretend_device, nodes):
    """DeepEP's callers read `handle[0]` (one node: the rank prefix matrix) or `handle[-4]`
    (several: the global rank prefix sum) next to their device tensors; the handle still
    works for combine and a cached dispatch."""

    def body(buf):
        g = torch.Generator().manual_seed(buf.rank)
        x = torch.randn(9, 16, generator=g).bfloat16()
        in_rank = torch.rand(9, 4, generator=g) < 0.5
        direct = buf.dispatch(x, is_token_in_rank=in_rank)
        recv, _, _, _, handle, _ = buf.dispatch(_mark(x), is_token_in_rank=_mark(in_rank))
        entry = 0 if nodes == 1 else -4
        ok = _on_device(handle[entry]) and torch.equal(handle[entry], direct[4][entry])
        ok &= all(_on_device(t) for t in handle if isinstance(t, torch.Tensor))
        cached = buf.dispatch(_mark(x), handle=handle)[0]
        ok &= _on_device(cached) and torch.equal(cached, direct[0])
        combined = buf.combine(recv, handle)[0]
        return ok and _on_device(combined) and torch.equal(combined, buf.combine(direct[0], direct[4])[0])

    assert all(run_loopback(nodes, 4 // nodes, body))


def test_staged_low_latency_handle_and_zero_copy_buffer_are_on_the_device(pretend_device):
    """DeepEP's test_low_latency checks `handle[0]` (source indices) and `handle[1]` (layout
    ranges) against device tensors, and fills `get_next_low_latency_combine_buffer(handle)`
    on the device for a zero-copy combine."""

    def body(buf):
        g = torch.Generator().manual_seed(buf.rank)
        x = torch.randn(5, 128, generator=g).bfloat16()
        idx = torch.randint(0, 8, (5, 2), generator=g)
        w = torch.rand(5, 2, generator=g)
        direct, _, dhandle, _, _ = buf.low_latency_dispatch(x, idx, 8, 8, use_fp8=False)
        ref, _, _ = buf.low_latency_combine(direct, idx, w, dhandle)
        rx, _, handle, event, _ = buf.low_latency_dispatch(_mark(x), _mark(idx), 8, 8, use_fp8=False, async_finish=True)
        event.current_stream_wait()  # the handle's device entries are filled here, too
        ok = all(_on_device(handle[i]) and torch.equal(handle[i], dhandle[i]) for i in (0, 1))
        ok &= tuple(handle[2:]) == tuple(dhandle[2:])
        zc = buf.get_next_low_latency_combine_buffer(handle)
        ok &= zc.device == DEVICE and zc.data_ptr() != buf.get_next_low_latency_combine_buffer(dhandle).data_ptr()
        zc = buf.get_next_low_latency_combine_buffer(handle)
        zc.copy_(rx)
        combined, _, _ = buf.low_latency_combine(_mark(torch.empty(0)), _mark(idx), _mark(w), handle, zero_copy=True)
        return ok and _on_device(combined) and torch.equal(combined, ref)

    assert all(run_loopback(1, 2, body, low_latency_mode=True))


def test_staged_elastic_buffer_handle_fields_are_on_the_device(pretend_device):
    """DeepEP 2's tests read `handle.recv_src_metadata` and the prefix sums next to their
    device tensors; the device handle still combines and caches."""
    from dualcomm.elastic import ElasticBuffer

    def body(buf):
        eb = ElasticBuffer(buf.group, num_max_tokens_per_rank=8, hidden=128, over=buf)
        g = torch.Generator().manual_seed(buf.rank)
        x = torch.randn(8, 128, generator=g).bfloat16()
        idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(8)])
        direct, _, _, dhandle, _ = eb.dispatch(x, idx, num_experts=8)
        rx, _, _, handle, _ = eb.dispatch(_mark(x), _mark(idx), num_experts=8)
        ok = _on_device(rx) and torch.equal(rx, direct)
        for name in ("recv_src_metadata", "psum_num_recv_tokens_per_scaleup_rank", "topk_idx"):
            ok &= _on_device(getattr(handle, name)) and torch.equal(getattr(handle, name), getattr(dhandle, name))
        cached = eb.dispatch(_mark(x), handle=handle)[0]
        out = eb.combine(rx, handle)[0]
        ok &= _on_device(cached) and torch.equal(cached, direct)
        return ok and _on_device(out) and torch.equal(out, eb.combine(direct, dhandle)[0])

    assert all(run_loopback(1, 2, body))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_deep_ep_semantics_on_cuda_tensors():
    import dualcomm.deep_ep

    dualcomm.deep_ep.install()
    import deep_ep

    inputs = deep_ep_checks.make_inputs(4, 24, 256, 4, 16, seed=4)
    passed = run_loopback(
        2, 2, lambda buf: deep_ep_checks.run_rank(deep_ep, buf, inputs, 16, 2, device=torch.device("cuda"))
    )
    assert passed == [32] * 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_low_latency_semantics_on_cuda_tensors():
    import low_latency_checks

    import dualcomm

    inputs = low_latency_checks.make_inputs(4, 12, 512, 3, 16, seed=2)
    hint = dualcomm.Buffer.get_low_latency_rdma_size_hint(16, 512, 4, 16)
    results = run_loopback(
        2,
        2,
        lambda buf: low_latency_checks.run_rank(buf, inputs, 16, 16, device=torch.device("cuda")),
        num_rdma_bytes=hint,
        low_latency_mode=True,
    )
    assert [r["variants"] for r in results] == [16] * 4
