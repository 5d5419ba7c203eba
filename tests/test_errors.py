"""Every bad input gets a clear error naming the argument, what was expected and what was
given; nothing crashes or hangs, and the buffer still works afterwards."""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch

import dualcomm
from dualcomm import (
    Buffer,
    BufferDestroyedError,
    ConfigMismatchError,
    DualcommError,
    InvalidArgumentError,
    PeerAbortedError,
    PeerLostError,
    ProtocolError,
    TransportUnavailableError,
)
from dualcomm._native import LoopbackWorld
from dualcomm.testing import run_loopback

E = 8
T, H, K = 6, 16, 2


def _inputs(rank: int):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=g).bfloat16()
    idx = torch.randint(-1, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g)
    return x, idx, w


def _good_round(buf: Buffer) -> torch.Tensor:
    """A correct dispatch + combine: proves the buffer survived the error before it."""
    x, idx, w = _inputs(buf.rank)
    pr, pn, pe, itr, _ = buf.get_dispatch_layout(idx, E)
    recv_x, _, _, _, handle, _ = buf.dispatch(
        x, is_token_in_rank=itr, num_tokens_per_expert=pe, topk_idx=idx, topk_weights=w
    )
    combined, _, _ = buf.combine(recv_x, handle)
    assert torch.equal(combined.float(), x.float() * itr.sum(1, keepdim=True))
    return combined


def _expect_error_then_recover(bad, exc=InvalidArgumentError, match: str | None = None, topology=(2, 2), **kw):
    """Runs `bad(buf)` on every rank; each must raise `exc` matching `match`; then a good round."""

    def body(buf: Buffer):
        with pytest.raises(exc, match=match) as info:
            bad(buf)
        _good_round(buf)
        return str(info.value)

    return run_loopback(*topology, body, **kw)


def _layout(buf: Buffer, idx=None):
    x, i, w = _inputs(buf.rank)
    return buf.get_dispatch_layout(i if idx is None else idx, E)


def test_wrong_dtype():
    def bad(buf):
        x, idx, w = _inputs(buf.rank)
        itr = _layout(buf)[3]
        buf.dispatch(x.to(torch.complex64), is_token_in_rank=itr)

    # Dispatch moves any real dtype as bytes (as DeepEP's); a complex one it does not know.
    msgs = _expect_error_then_recover(
        bad, match=r"^x: expected dtype torch.bfloat16 or torch.float32 or .*, got torch.complex64"
    )
    assert all("x" in m for m in msgs)


def test_wrong_topk_dtype():
    def bad(buf):
        buf.get_dispatch_layout(torch.zeros(T, K, dtype=torch.int32), E)

    _expect_error_then_recover(bad, match=r"^topk_idx: expected dtype torch.int64, got torch.int32")


def test_wrong_rank_of_tensor():
    def bad(buf):
        itr = _layout(buf)[3]
        buf.dispatch(torch.zeros(T, dtype=torch.bfloat16), is_token_in_rank=itr)

    _expect_error_then_recover(bad, match=r"^x: expected a 2-D tensor, got 1-D shape \[6\]")


def test_mismatched_token_counts():
    def bad_idx(buf):
        x, idx, w = _inputs(buf.rank)
        pr, pn, pe, itr, _ = _layout(buf)
        buf.dispatch(x[:4], is_token_in_rank=itr[:4], num_tokens_per_expert=pe, topk_idx=idx, topk_weights=w)

    _expect_error_then_recover(bad_idx, match=r"^topk_idx: expected 4 rows \(one per token of x\), got 6 rows")

    def bad_w(buf):
        x, idx, w = _inputs(buf.rank)
        pr, pn, pe, itr, _ = _layout(buf)
        buf.dispatch(x, is_token_in_rank=itr, num_tokens_per_expert=pe, topk_idx=idx, topk_weights=w[:5])

    _expect_error_then_recover(bad_w, match=r"^topk_weights: expected shape \[6, 2\], got shape \[5, 2\]")

    def bad_itr(buf):
        x, idx, w = _inputs(buf.rank)
        buf.dispatch(x, is_token_in_rank=_layout(buf)[3][:3])

    _expect_error_then_recover(bad_itr, match=r"^is_token_in_rank: expected shape \[6, 4\], got shape \[3, 4\]")


@pytest.mark.parametrize("value", [E, -2, 1 << 40])
def test_expert_index_out_of_range(value):
    def bad(buf):
        idx = torch.zeros(T, K, dtype=torch.int64)
        idx[3, 1] = value
        buf.get_dispatch_layout(idx, E)

    _expect_error_then_recover(
        bad, match=rf"^topk_idx\[3, 1\]: expected -1 or an expert index in \[0, 8\), got {value}"
    )


def test_expert_index_out_of_range_in_dispatch_itself():
    def bad(buf):
        x, idx, w = _inputs(buf.rank)
        pr, pn, pe, itr, _ = _layout(buf)
        idx = idx.clone()
        idx[0, 0] = 99
        buf.dispatch(x, is_token_in_rank=itr, num_tokens_per_expert=pe, topk_idx=idx, topk_weights=w)

    _expect_error_then_recover(bad, match=r"topk_idx\[0, 0\]: expected -1 or an expert index in \[0, 8\), got 99")


def test_num_experts_not_divisible_by_world_size():
    def bad(buf):
        buf.get_dispatch_layout(torch.zeros(T, K, dtype=torch.int64), 6)

    _expect_error_then_recover(bad, match=r"^num_experts: expected a positive multiple of the world size 4, got 6")


def test_fp8_scales_must_pair_with_their_tokens():
    def bad(buf):
        itr = _layout(buf)[3]
        x = torch.zeros(T, 100).to(torch.float8_e4m3fn)
        buf.dispatch((x, torch.ones(T - 1, 1)), is_token_in_rank=itr)

    _expect_error_then_recover(
        bad, match=r"^x\[1\]: expected 6 rows \(one row of scales per token of x\[0\]\), got 5 rows"
    )

    def bad_scales(buf):
        itr = _layout(buf)[3]
        x = torch.zeros(T, 256).to(torch.float8_e4m3fn)
        buf.dispatch((x, torch.ones(T, 2, dtype=torch.float64)), is_token_in_rank=itr)

    _expect_error_then_recover(
        bad_scales, match=r"^x\[1\]: expected dtype torch.float32 or torch.int32, got torch.float64"
    )


def test_non_contiguous_input_is_accepted_correctly():
    def body(buf: Buffer):
        x, idx, w = _inputs(buf.rank)
        itr = _layout(buf)[3]
        strided = torch.zeros(H, T, dtype=torch.bfloat16).t()  # [T, H] view, not contiguous
        strided.copy_(x)
        assert not strided.is_contiguous()
        a, *_ = buf.dispatch(x, is_token_in_rank=itr)
        b, *_ = buf.dispatch(strided, is_token_in_rank=itr.t().contiguous().t())
        return torch.equal(a, b)

    assert all(run_loopback(2, 2, body))


def test_handle_from_another_buffer():
    handles: dict[int, object] = {}
    ready = threading.Barrier(4)

    def body(buf: Buffer):
        x, idx, w = _inputs(buf.rank)
        itr = _layout(buf)[3]
        recv_x, _, _, _, handles[buf.rank], _ = buf.dispatch(x, is_token_in_rank=itr)
        ready.wait(timeout=30)
        other = handles[(buf.rank + 1) % 4]
        with pytest.raises(InvalidArgumentError, match=r"^handle: expected a handle made by this buffer"):
            buf.combine(recv_x, other)
        with pytest.raises(InvalidArgumentError, match=r"^handle: expected a handle made by this buffer"):
            buf.dispatch(x, handle=other)
        _good_round(buf)

    run_loopback(2, 2, body)


def test_handle_with_different_token_count():
    def bad(buf):
        x, idx, w = _inputs(buf.rank)
        _, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=_layout(buf)[3])
        buf.dispatch(torch.cat([x, x[:1]]), handle=handle)

    _expect_error_then_recover(
        bad,
        match=r"^handle: expected the handle of a dispatch of 7 tokens \(as many as x has\), got one of 6",
    )


def test_cached_dispatch_with_handles_of_different_dispatches():
    def body(buf):
        x, idx, w = _inputs(buf.rank)
        _, _, _, _, first, _ = buf.dispatch(x, is_token_in_rank=_layout(buf)[3])
        to_self = torch.zeros_like(_layout(buf)[3])
        to_self[:, buf.rank] = True
        _, _, _, _, second, _ = buf.dispatch(x, is_token_in_rank=to_self)
        buf.dispatch(x, handle=first if buf.rank == 0 else second)

    with pytest.raises(ProtocolError, match="not from the same dispatch on every rank"):
        run_loopback(2, 2, body, timeout=30)


def test_combine_rows_differ_from_handle():
    def bad(buf):
        x, idx, w = _inputs(buf.rank)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=_layout(buf)[3])
        buf.combine(torch.cat([recv_x, recv_x[:1]]), handle)

    msgs = _expect_error_then_recover(bad, match=r"^x: expected \d+ rows \(as many as the handle's dispatch")
    assert all(re.search(r"got \d+ rows$", m) for m in msgs)


def test_buffer_too_small_for_one_token():
    def bad(buf):
        x, idx, w = _inputs(buf.rank)
        big = torch.zeros(T, 4096, dtype=torch.float32)  # 16 KiB rows
        buf.dispatch(big, is_token_in_rank=_layout(buf)[3])

    # 2 rings of 10000 bytes each: room for the small test rows, not for a 16 KiB one.
    msgs = _expect_error_then_recover(bad, num_nvl_bytes=20000, num_rdma_bytes=20000)
    assert all(m.startswith("num_nvl_bytes: expected at least 32816 bytes") for m in msgs), msgs[0]
    assert all(m.endswith("got 20000") for m in msgs)


def test_use_after_destroy():
    def body(buf: Buffer):
        _good_round(buf)
        with pytest.raises(InvalidArgumentError, match="^explicitly_destroy: expected True"):
            buf.destroy()  # DeepEP's rule: only a buffer made with explicitly_destroy=True
        buf.explicitly_destroy = True
        buf.destroy()
        assert buf.destroyed
        x, idx, w = _inputs(buf.rank)
        with pytest.raises(BufferDestroyedError, match="destroyed"):
            buf.get_dispatch_layout(idx, E)
        with pytest.raises(BufferDestroyedError):
            buf.dispatch(x, is_token_in_rank=torch.zeros(T, 4, dtype=torch.bool))
        return True

    assert all(run_loopback(2, 2, body))


def test_errors_share_one_root():
    for cls in (
        InvalidArgumentError,
        BufferDestroyedError,
        PeerLostError,
        ProtocolError,
        ConfigMismatchError,
        TransportUnavailableError,
        dualcomm.CommTimeoutError,
        dualcomm.PeerAbortedError,
        dualcomm.BufferBrokenError,
        dualcomm.SystemResourceError,
        dualcomm.InternalError,
    ):
        assert issubclass(cls, DualcommError)
    # A broken buffer is not a lost peer, and a peer's abort is not this rank's bad argument.
    assert not issubclass(dualcomm.BufferBrokenError, PeerLostError)
    assert not issubclass(dualcomm.PeerAbortedError, InvalidArgumentError)


def test_a_buffer_that_stopped_says_so():
    def body(buf: Buffer):
        x, idx, w = _inputs(buf.rank)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=_layout(buf)[3])
        with pytest.raises((ProtocolError, PeerLostError)):
            if buf.rank == 0:
                buf.dispatch(x, is_token_in_rank=_layout(buf)[3])
            else:
                buf.combine(recv_x, handle)
        with pytest.raises(dualcomm.BufferBrokenError, match="stopped at an earlier failure"):
            buf.dispatch(x, is_token_in_rank=_layout(buf)[3])
        return True

    assert all(run_loopback(2, 2, body, timeout=30))


@pytest.mark.parametrize("channels", [1, 2])
def test_rank_failing_before_dispatch_fails_the_world_fast(channels):
    def body(buf: Buffer):
        if buf.rank == 2:
            raise RuntimeError("model code broke on rank 2")
        _good_round(buf)

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="model code broke on rank 2"):
        run_loopback(2, 2, body, timeout=60, num_channels=channels)
    assert time.monotonic() - start < 30, "peers must see the loss (on every channel), not wait for the timeout"


def test_ranks_calling_different_operations_get_a_protocol_error():
    def body(buf: Buffer):
        x, idx, w = _inputs(buf.rank)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=_layout(buf)[3])
        if buf.rank == 0:
            buf.dispatch(x, is_token_in_rank=_layout(buf)[3])
        else:
            buf.combine(recv_x, handle)

    with pytest.raises((ProtocolError, PeerLostError), match="runs|gone|stopped"):
        run_loopback(2, 2, body, timeout=30)


def test_mismatched_buffer_sizes_are_refused_at_construction():
    world = LoopbackWorld(2)
    errors: list[BaseException] = []

    def make(rank: int, nvl: int):
        try:
            Buffer(dualcomm.LoopbackGroup(world, rank, 1, 2), num_nvl_bytes=nvl, timeout=20)
        except DualcommError as e:
            errors.append(e)

    threads = [
        threading.Thread(target=make, args=(0, 1 << 16)),
        threading.Thread(target=make, args=(1, 1 << 17)),
    ]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert len(errors) == 2 and all(isinstance(e, ConfigMismatchError) for e in errors)
    assert "num_nvl_bytes=65536" in str(errors[0]) and "num_nvl_bytes=131072" in str(errors[0])


def test_bad_group_and_transport_choices():
    with pytest.raises(
        InvalidArgumentError, match=r"^group: expected a torch.distributed ProcessGroup or a dualcomm LoopbackGroup"
    ):
        Buffer(object())
    with pytest.raises(InvalidArgumentError, match=r"^num_nvl_bytes: expected a non-negative int, got int -1"):
        Buffer(object(), num_nvl_bytes=-1)
    expected = r"^transport: expected 'auto', 'shm\+tcp', 'tcp', 'shm', 'verbs' or 'loopback', got 'ib'"
    with pytest.raises(InvalidArgumentError, match=expected):
        Buffer(object(), transport="ib")
    group = dualcomm.LoopbackGroup(LoopbackWorld(1), 0, 1, 1)
    with pytest.raises(TransportUnavailableError, match="loopback world runs as threads of one process"):
        Buffer(group, transport="tcp")


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_one_rank_bad_token_fails_every_rank_and_every_channel_recovers(channels):
    """A bad index in the last channel's token range on rank 1: rank 1 is told, naming the
    index as the caller gave it; its peers hear that rank 1 aborted; then all go on."""

    def body(buf: Buffer):
        assert buf.num_channels == channels
        x, idx, w = _inputs(buf.rank)
        pr, pn, pe, itr, _ = _layout(buf)
        if buf.rank == 1:
            idx = idx.clone()
            idx[T - 1, 1] = 99
        want = (InvalidArgumentError, rf"topk_idx\[{T - 1}, 1\]") if buf.rank == 1 else (PeerAbortedError, "rank 1")
        with pytest.raises(want[0], match=want[1]):
            buf.dispatch(x, is_token_in_rank=itr, num_tokens_per_expert=pe, topk_idx=idx, topk_weights=w)
        # A combine whose rows do not match its handle, on rank 3 alone.
        recv_x, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=itr)
        rows = recv_x[:-1] if buf.rank == 3 and recv_x.shape[0] else recv_x
        if rows is recv_x:
            with pytest.raises(PeerAbortedError, match="rank 3"):
                buf.combine(rows, handle)
        else:
            with pytest.raises(InvalidArgumentError, match="x"):
                buf.combine(rows, handle)
        return _good_round(buf)

    run_loopback(2, 2, body, num_channels=channels, timeout=30)
