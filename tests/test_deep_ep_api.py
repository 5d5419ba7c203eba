"""The DeepEP calls a drop-in must serve beyond dispatch and combine themselves: Config and
its size hints, buffers sized the way DeepEP's callers size them, padding to a worst-case
row count, events, handles, the raw buffer view, and the small class-level helpers."""

from __future__ import annotations

import threading

import pytest
import torch

import dualcomm
from dualcomm import Buffer, Config, EventOverlap, InvalidArgumentError
from dualcomm.config import DEFAULT_MAX_BUFFER_BYTES
from dualcomm.event import EventHandle
from dualcomm.testing import run_loopback


def _route(buf: Buffer, tokens: int = 6, hidden: int = 16):
    g = torch.Generator().manual_seed(buf.rank)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    idx = torch.randint(0, 2 * buf.group_size, (tokens, 2), generator=g)
    w = torch.rand(tokens, 2, generator=g)
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 2 * buf.group_size)
    args = dict(
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
        topk_weights=w,
    )
    return x, args


def test_config_takes_deep_ep_positional_forms_and_checks_them():
    fields = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens")
    assert [getattr(Config(), f) for f in fields] == [20, 6, 256]
    # A C++ object in DeepEP: equal to itself only, and usable as a dict key.
    a, b = Config(24, 8, 256), Config(24, 8, 256)
    assert a == a and a != b and {a: 1, b: 2}[a] == 1
    c = Config(24, 8, 256)  # DeepEP's intranode tests pass three
    # DeepEP's default rdma receive chunk is 256, rounded up to a multiple of the send chunk: 258.
    assert (c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (6, 258)
    assert Config(24, 8, 512, 16, 120).num_max_rdma_chunked_recv_tokens == 128  # rounded up as DeepEP does
    with pytest.raises(InvalidArgumentError, match="^num_max_nvl_chunked_send_tokens: expected less than"):
        Config(20, 256, 256)
    with pytest.raises(InvalidArgumentError, match="^num_max_rdma_chunked_send_tokens: expected at most half"):
        Config(20, 6, 256, 100, 100)
    with pytest.raises(InvalidArgumentError, match="^num_sms: expected a non-negative int"):
        Config(-1)
    for n in (2, 4, 8, 16, 24, 160, 5):
        assert isinstance(Buffer.get_dispatch_config(n), Config)
        assert isinstance(Buffer.get_combine_config(n), Config)
    with pytest.raises(InvalidArgumentError, match="^num_ranks: expected a positive int"):
        Buffer.get_dispatch_config(0)


def test_size_hints_size_buffers_that_work(monkeypatch):
    """Megatron-Core sizes its Buffer with the hints; on one node the rdma hint is 0, and with
    emulated nodes it is what the rdma rings need."""
    hidden = 16
    monkeypatch.delenv("DUALCOMM_RANKS_PER_NODE", raising=False)
    cfg = Buffer.get_dispatch_config(4)
    assert cfg.get_rdma_buffer_size_hint(hidden * 2, 4) == 0
    nvl_one_node = cfg.get_nvl_buffer_size_hint(hidden * 2, 4)
    assert nvl_one_node > 0
    monkeypatch.setenv("DUALCOMM_RANKS_PER_NODE", "2")
    nvl, rdma = cfg.get_nvl_buffer_size_hint(hidden * 2, 4), cfg.get_rdma_buffer_size_hint(hidden * 2, 4)
    assert rdma > 0 and nvl < nvl_one_node

    def body(buf):
        x, args = _route(buf, hidden=hidden)
        recv, *_, handle, _ = buf.dispatch(x, **args)
        out, _, _ = buf.combine(recv, handle)
        return out.shape

    assert run_loopback(2, 2, body, num_nvl_bytes=nvl, num_rdma_bytes=rdma) == [torch.Size([6, hidden])] * 4
    with pytest.raises(InvalidArgumentError, match="^num_ranks: expected a multiple of DUALCOMM_RANKS_PER_NODE=2"):
        cfg.get_nvl_buffer_size_hint(32, 3)


def test_hints_for_more_than_eight_ranks_size_nodes_of_eight_as_in_deep_ep(monkeypatch):
    """DeepEP's hints for 16 ranks are those of 2 nodes of 8 (an rdma ring per other node,
    nvl rings for 8 peers); 8 ranks are one node; 12 (not a multiple of 8) stay one node."""
    monkeypatch.delenv("DUALCOMM_RANKS_PER_NODE", raising=False)
    cfg, row = Buffer.get_dispatch_config(16), 7168 * 2
    assert cfg.get_rdma_buffer_size_hint(row, 8) == 0
    assert cfg.get_rdma_buffer_size_hint(row, 16) > 0
    assert cfg.get_nvl_buffer_size_hint(row, 16) == cfg.get_nvl_buffer_size_hint(row, 8)
    assert cfg.get_rdma_buffer_size_hint(row, 12) == 0
    monkeypatch.setenv("DUALCOMM_RANKS_PER_NODE", "16")
    assert cfg.get_rdma_buffer_size_hint(row, 16) == 0


def test_hints_take_what_deep_eps_take(monkeypatch):
    """DeepEP's hints are C++ methods over size_t and int: NumPy integers pass, a hidden size
    of 0 is a size, and a node of one rank still gets nvl rings (DeepEP sizes one)."""
    import numpy as np

    monkeypatch.setenv("DUALCOMM_RANKS_PER_NODE", "1")
    cfg = Buffer.get_dispatch_config(2)
    assert cfg.get_nvl_buffer_size_hint(np.int64(256), np.int32(2)) == cfg.get_nvl_buffer_size_hint(256, 2) > 0
    assert 0 < cfg.get_rdma_buffer_size_hint(0, 2) < cfg.get_rdma_buffer_size_hint(256, 2)
    for bad in (1.0, True, "8"):
        with pytest.raises(InvalidArgumentError, match="^hidden_bytes: expected a non-negative int"):
            cfg.get_nvl_buffer_size_hint(bad, 2)
    with pytest.raises(InvalidArgumentError, match="^hidden_bytes: expected a non-negative int"):
        cfg.get_rdma_buffer_size_hint(-1, 2)


@pytest.mark.parametrize(
    ("hosts", "want"),
    [
        (["a"] * 4, 4),
        (["a"] * 8, 8),
        (["a"] * 16, 8),
        (["a"] * 24, 8),
        (["a"] * 12, 12),
        (["a"] * 16 + ["b"] * 16, 8),
        (["a"] * 4 + ["b"] * 4, 4),
    ],
    ids=lambda v: str(v) if isinstance(v, int) else f"{len(set(v))}x{v.count(v[0])}",
)
def test_a_host_of_more_than_eight_ranks_is_nodes_of_eight(hosts, want):
    """The layout a process group gets without `ranks_per_node`: the ranks of a host, in
    nodes of at most 8 where 8 divides them (DeepEP's `rank / 8`); an explicit value wins."""
    from dualcomm._bootstrap import _ranks_per_node

    infos = [{"host": h} for h in hosts]
    assert _ranks_per_node(infos, None) == want
    assert _ranks_per_node(infos, 2) == 2


def test_zero_bytes_means_choose_and_huge_requests_are_trimmed():
    def body(buf):
        x, args = _route(buf)
        recv, *_, handle, _ = buf.dispatch(x, **args)
        buf.combine(recv, handle)
        # A tier with no rings (the rdma tier of one node) is an empty tensor of any dtype.
        wide = buf.get_local_buffer_tensor(torch.bfloat16, use_rdma_buffer=True)
        assert wide.dtype == torch.bfloat16
        return (
            buf.get_local_buffer_tensor(torch.uint8).numel(),
            buf.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True).numel(),
        )

    # A 2x2 world with num_rdma_bytes=0 (what Megatron passes up to 8 ranks) dispatches.
    sizes = run_loopback(2, 2, body, num_nvl_bytes=0, num_rdma_bytes=0)
    assert all(nvl > 0 and rdma > 0 for nvl, rdma in sizes)
    # DeepEP's tests ask for 2 GB: the rings get what the CPU path can use.
    sizes = run_loopback(1, 2, body, num_nvl_bytes=int(2e9), num_rdma_bytes=int(1e9))
    assert sizes == [(DEFAULT_MAX_BUFFER_BYTES, 0)] * 2


def test_num_worst_tokens_pads_and_refuses_too_few_rows():
    def body(buf):
        x, args = _route(buf)
        recv, idx, w, counts, handle, _ = buf.dispatch(x, **args)
        wx, widx, ww, empty, _, _ = buf.dispatch(x, num_worst_tokens=40, **args)
        n = recv.shape[0]
        ok = (
            empty == []
            and wx.shape == (40, 16)
            and torch.equal(wx[:n], recv)
            and bool((wx[n:] == 0).all())
            and torch.equal(widx[:n], idx)
            and bool((widx[n:] == -1).all())
            and bool((ww[n:] == 0).all())
        )
        assert n >= 2
        with pytest.raises(InvalidArgumentError, match="^num_worst_tokens: expected at least the"):
            buf.dispatch(x, num_worst_tokens=1, **args)
        return ok

    assert all(run_loopback(1, 2, body, timeout=30))


def test_a_padded_dispatch_handle_combines_and_caches_padded_rows():
    """After `num_worst_tokens`, DeepEP's callers combine the padded rows, and a cached
    dispatch with that handle is padded the same way."""

    def body(buf):
        x, args = _route(buf)
        ref_x, _, _, _, ref_handle, _ = buf.dispatch(x, **args)
        wx, _, ww, _, handle, _ = buf.dispatch(x, num_worst_tokens=40, **args)
        combined, combined_w, _ = buf.combine(wx, handle, topk_weights=ww)
        want, _, _ = buf.combine(ref_x, ref_handle)
        again, *_ = buf.dispatch(x, handle=handle)
        return torch.equal(combined, want) and again.shape[0] == 40 and torch.equal(again[: ref_x.shape[0]], ref_x)

    assert all(run_loopback(1, 2, body))


def test_counts_list_is_filled_when_an_async_dispatch_returns():
    def body(buf):
        x, args = _route(buf)
        _, _, _, sync_counts, _, _ = buf.dispatch(x, **args)
        _, _, _, counts, _, event = buf.dispatch(x, async_finish=True, **args)
        filled_at_return = list(counts)
        event.current_stream_wait()
        return filled_at_return == sync_counts and len(counts) == 2

    assert all(run_loopback(2, 2, body))


def test_events_follow_deep_ep():
    captured = Buffer.capture()
    assert isinstance(captured.event, EventHandle) and captured.done
    captured.current_stream_wait()
    assert Buffer.is_sm90_compiled() is True

    def body(buf):
        # One stream per buffer, of the kind callers wait on (CUDA's where it is present).
        stream = buf.get_comm_stream()
        assert stream is buf.get_comm_stream()
        device = torch.cuda if torch.cuda.is_available() else torch.cpu
        assert isinstance(stream, device.Stream)
        stream.wait_stream(device.current_stream())
        x, args = _route(buf)
        recv, *_, handle, event = buf.dispatch(x, previous_event=buf.capture(), async_finish=True, **args)
        calls = []
        event.register_hook_after_wait(lambda: calls.append("hook"))
        with pytest.raises(InvalidArgumentError, match="^hook_after_wait"):
            event.register_hook_after_wait(lambda: None)
        with event(release_handle=True):
            pass
        assert calls == ["hook"] and event.event is None
        # A combine with bias is done only once the bias is in: `done` never reports early.
        t = handle.num_tokens
        bias = torch.full((t, 16), 1000.0, dtype=torch.bfloat16)
        out, _, ev = buf.combine(recv, handle, bias=bias, async_finish=True)
        while not ev.done:
            pass
        plain, _, _ = buf.combine(recv, handle)
        return torch.equal(out.float(), (plain.float() + 1000.0).bfloat16().float()) or torch.allclose(
            out.float(), plain.float() + 1000.0, atol=8
        )

    assert all(run_loopback(1, 2, body))


def test_an_event_is_there_only_when_asked_for_as_in_deep_ep():
    """DeepEP returns an event only for `async_finish=True`; a synchronous call's, and a call
    with a receive hook, is `EventOverlap(None)`. dualcomm's spent event still has its times."""

    def body(buf):
        x, args = _route(buf)
        idx = args["topk_idx"]
        events = {}
        events["layout"] = buf.get_dispatch_layout(idx, 4)[-1]
        events["layout async"] = buf.get_dispatch_layout(idx, 4, async_finish=True)[-1]
        recv, _, _, _, handle, events["dispatch"] = buf.dispatch(x, **args)
        *_, events["dispatch async"] = buf.dispatch(x, async_finish=True, **args)
        events["dispatch async"].current_stream_wait()
        events["combine"] = buf.combine(recv, handle)[-1]
        x128 = torch.randn(6, 128).bfloat16()
        rx, _, ll, events["ll dispatch"], _ = buf.low_latency_dispatch(x128, idx, 8, 4, use_fp8=False)
        *_, events["ll dispatch hook"], hook = buf.low_latency_dispatch(
            x128, idx, 8, 4, use_fp8=False, return_recv_hook=True
        )
        hook()
        w = torch.rand(6, 2)
        *_, events["ll combine async"], _ = buf.low_latency_combine(rx, idx, w, ll, async_finish=True)
        events["ll combine async"].current_stream_wait()
        spans = events["dispatch"].timestamps()
        return {k: e.event is None for k, e in events.items()}, spans is not None and spans[0] <= spans[1]

    for present, timed in run_loopback(1, 2, body, low_latency_mode=True):
        assert present == {
            "layout": True,
            "layout async": False,
            "dispatch": True,
            "dispatch async": False,
            "combine": True,
            "ll dispatch": True,
            "ll dispatch hook": True,
            "ll combine async": False,
        }
        assert timed


def test_handles_index_like_deep_ep_and_stay_opaque_elsewhere():
    def body(buf):
        x, args = _route(buf)
        recv, _, _, _, handle, _ = buf.dispatch(x, **args)
        n = recv.shape[0]
        if buf.num_nodes == 1:
            prefix = handle[0]
            assert len(handle) == 6 and prefix.shape == (buf.group_size, buf.group_size)
            assert int(prefix[-1, buf.rank]) == n  # the column sums to what this rank received
            assert handle[4] is args["is_token_in_rank"]
        else:
            assert len(handle) == 10 and int(handle[-4][-1]) == n
        assert handle == handle and handle != tuple(handle)
        return True

    assert all(run_loopback(1, 3, body)) and all(run_loopback(3, 1, body))


def test_set_num_sms_must_be_even():
    before = Buffer.num_sms
    try:
        Buffer.set_num_sms(24)
        assert Buffer.get_dispatch_config(8).num_sms == 24
        with pytest.raises(InvalidArgumentError, match="^new_num_sms: expected a positive even int"):
            Buffer.set_num_sms(7)
    finally:
        Buffer.set_num_sms(before)


def test_local_buffer_tensor_shows_what_peers_wrote():
    """The view aliases the registered rings: a peer's rows land in it."""
    marker = 0x5A

    def body(buf):
        x = torch.full((1, 64), marker, dtype=torch.uint8).view(torch.bfloat16).reshape(1, 32)
        in_rank = torch.tensor([[True, True]])
        view = buf.get_local_buffer_tensor(torch.uint8)
        before = int((view == marker).sum())
        recv, *_ = buf.dispatch(x, is_token_in_rank=in_rank)
        with pytest.raises(InvalidArgumentError, match="^size: expected at most"):
            buf.get_local_buffer_tensor(torch.int32, torch.Size([view.numel()]))
        return before, int((view == marker).sum())

    for before, after in run_loopback(1, 2, body, num_nvl_bytes=1 << 12):
        assert before == 0 and after >= 64  # the other rank's 64 marker bytes are in the ring


def test_deep_ep_alias_is_importable_and_typed():
    import dualcomm.deep_ep as dep

    assert dep.topk_idx_t is torch.int64
    assert dep.Buffer is Buffer and dep.Config is Config and dep.EventOverlap is EventOverlap
    from dualcomm.deep_ep.utils import EventHandle as EH

    assert EH is EventHandle
    assert isinstance(dualcomm.deep_ep.install(), bool)
    assert threading.current_thread() is threading.main_thread()


def test_the_use_fabric_keyword_of_earlier_deep_ep_releases_is_accepted():
    # DeepEP took `use_fabric` between allow_mnnvl and explicitly_destroy until its v2.
    def body(buf):
        x, args = _route(buf)
        recv, *_, handle, _ = buf.dispatch(x, **args)
        combined, *_ = buf.combine(recv, handle)
        return combined.shape == x.shape

    assert all(run_loopback(1, 2, body, use_fabric=True, explicitly_destroy=True))


def test_low_latency_rdma_buffer_is_where_low_latency_tokens_land():
    marker = 0x5A

    def body(buf):
        x = torch.full((1, 256), marker, dtype=torch.uint8).view(torch.bfloat16).reshape(1, 128)
        idx = torch.tensor([[0, 1]])  # one expert on each rank
        view = buf.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True)
        before = int((view == marker).sum())
        buf.low_latency_dispatch(x, idx, 1, 2, use_fp8=False)
        return before, int((view == marker).sum())

    for before, after in run_loopback(1, 2, body, low_latency_mode=True):
        assert before == 0 and after >= 256  # the other rank's row is in the low-latency rings


def _under_deep_ep_defaults(buf):
    """One rank's normal and low-latency rounds on CPU tensors while the thread's default
    device is one dualcomm cannot compute on (meta: as CUDA is after DeepEP's `init_dist`)."""
    torch.set_default_device("meta")
    try:
        g = torch.Generator().manual_seed(buf.rank)
        x = torch.randn(6, 128, generator=g, device="cpu").bfloat16()
        idx = torch.randint(0, 8, (6, 2), generator=g, device="cpu")
        w = torch.rand(6, 2, generator=g, device="cpu", dtype=torch.float32)
        in_rank = buf.get_dispatch_layout(idx, 8)[3]
        recv, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=in_rank)
        combined = buf.combine(recv, handle)[0]
        ok = combined.device.type == "cpu"
        ok &= torch.equal(combined.float(), x.float() * in_rank.sum(1, keepdim=True).float())
        rx, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, 8, 8, use_fp8=False)
        buf.get_next_low_latency_combine_buffer(ll_handle).copy_(rx)
        ll = buf.low_latency_combine(rx, idx, w, ll_handle, zero_copy=True)[0]
        # Every expert returns its input, so each token comes back weighted by its weights' sum.
        want = (x.float() * w.sum(1, keepdim=True)).bfloat16()
        ok &= ll.device.type == "cpu" and torch.allclose(ll.float(), want.float(), rtol=1e-2, atol=1e-2)
        return ok and torch.get_default_device().type == "meta"
    finally:
        torch.set_default_device(None)


def test_the_callers_default_device_and_dtype_do_not_reach_the_cpu_path():
    """DeepEP's `init_dist` makes bfloat16 the default dtype and CUDA the default device;
    the tensors dualcomm makes for itself stay float32-exact and on the host."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert all(run_loopback(1, 2, _under_deep_ep_defaults, low_latency_mode=True))
    finally:
        torch.set_default_dtype(before)
