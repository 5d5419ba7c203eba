"""Dispatch and combine on loopback worlds against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import dualcomm
import reference as ref
from dualcomm import Buffer
from dualcomm.testing import run_loopback

TOPOLOGIES = [(1, 1), (1, 4), (2, 2), (4, 2), (3, 3)]
DTYPES = [torch.bfloat16, torch.float32, torch.float8_e4m3fn]


def _x_of(inp: ref.RankInput):
    return (inp.x, inp.scales) if inp.scales is not None else inp.x


def _layout_args(buf: Buffer, inp: ref.RankInput, num_experts: int) -> dict:
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, num_experts)
    return dict(
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
    )


def _rows_for_combine(recv_x: torch.Tensor, rank: int) -> torch.Tensor:
    """What a rank's "experts" return: a rank-dependent multiple, exact in bf16."""
    return recv_x.float().mul(rank % 3 + 1).to(torch.float32 if recv_x.dtype == torch.float32 else torch.bfloat16)


def _run_case(num_nodes, rpn, tokens, hidden, num_topk, num_experts, dtype, use_topk, alignment, seed, channels=1):
    world = num_nodes * rpn
    inputs = ref.random_inputs(world, tokens, hidden, num_topk, num_experts, dtype, seed)

    def body(buf: Buffer):
        inp = inputs[buf.rank]
        args = _layout_args(buf, inp, num_experts)
        before = buf.stats()
        if use_topk:
            args.update(topk_idx=inp.topk_idx, topk_weights=inp.topk_weights)
        recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(_x_of(inp), expert_alignment=alignment, **args)
        event.current_stream_wait()
        mid = buf.stats()
        data = recv_x[0] if isinstance(recv_x, tuple) else recv_x
        if dtype == torch.float8_e4m3fn:
            data = data.float().round().clamp(-8, 8).bfloat16()
        rows = _rows_for_combine(data, buf.rank)
        combined, combined_w, _ = buf.combine(rows, handle, topk_weights=recv_w)
        after = buf.stats()
        assert buf.num_channels == channels
        # A cached dispatch over the same handle delivers the same rows.
        again, *_ = buf.dispatch(_x_of(inp), handle=handle)
        first, second = (r[0] if isinstance(r, tuple) else r for r in (recv_x, again))
        assert torch.equal(first.view(torch.uint8), second.view(torch.uint8)), f"cached dispatch of rank {buf.rank}"
        return recv_x, recv_idx, recv_w, counts, rows, combined, combined_w, before, mid, after

    out = run_loopback(num_nodes, rpn, body, num_channels=channels)
    origins = []
    for d in range(world):
        want_x, want_scales, want_idx, want_w, want_counts, origin = ref.dispatch(
            inputs, num_experts, world, d, alignment
        )
        origins.append(origin)
        recv_x, recv_idx, recv_w, counts, *_ = out[d]
        got_x = recv_x[0] if isinstance(recv_x, tuple) else recv_x
        assert got_x.dtype == dtype
        assert torch.equal(got_x.view(torch.uint8), want_x.view(torch.uint8)), f"recv_x of rank {d}"
        if want_scales is not None:
            assert torch.equal(recv_x[1], want_scales), f"recv scales of rank {d}"
        # DeepEP fills the list from num_tokens_per_expert, with or without top-k.
        assert counts == want_counts, f"num_recv_tokens_per_expert_list of rank {d}"
        if use_topk:
            assert torch.equal(recv_idx, want_idx), f"recv_topk_idx of rank {d}"
            assert torch.equal(recv_w, want_w), f"recv_topk_weights of rank {d}"
        else:
            assert recv_idx is None and recv_w is None
    rows_per_rank = [o[4] for o in out]
    for s in range(world):
        combined, combined_w = out[s][5], out[s][6]
        want = ref.combine(rows_per_rank, origins, s, tokens[s])
        assert combined.dtype == rows_per_rank[0].dtype
        assert torch.equal(combined.float(), want), f"combined_x of rank {s}"
        if use_topk:
            # Every (token, k) weight lives on exactly one rank: the expert's owner.
            inp = inputs[s]
            want_w = torch.where(inp.topk_idx >= 0, inp.topk_weights, torch.zeros_like(inp.topk_weights))
            assert torch.equal(combined_w, want_w), f"combined_topk_weights of rank {s}"
        else:
            assert combined_w is None

    # Byte accounting: one network crossing per (token, remote node), each way.
    _, _, _, in_ranks = zip(*[ref.layout(i.topk_idx, num_experts, num_nodes, rpn) for i in inputs])
    pairs = 0
    for s, in_rank in enumerate(in_ranks):
        nodes = in_rank.view(-1, num_nodes, rpn).any(2)
        nodes[:, s // rpn] = False
        pairs += int(nodes.sum())
    x_row = hidden * inputs[0].x.element_size() + (hidden // 128 * 4 if dtype == torch.float8_e4m3fn else 0)
    combine_row = hidden * rows_per_rank[0].element_size()
    sent = lambda i, j, key: sum(o[j][key] - o[i][key] for o in out)  # noqa: E731
    assert sent(7, 8, "rdma_payload_bytes") == pairs * x_row
    assert sent(8, 9, "rdma_payload_bytes") == pairs * combine_row
    if num_nodes == 1:
        assert sent(7, 9, "rdma_payload_bytes") == 0


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_dispatch_combine_match_reference(topology, dtype):
    num_nodes, rpn = topology
    world = num_nodes * rpn
    tokens = [(7 * r + 3) % 23 for r in range(world)]
    if world > 1:
        tokens[1] = 0  # a rank with nothing to send
    hidden = 256 if dtype == torch.float8_e4m3fn else 24
    _run_case(num_nodes, rpn, tokens, hidden, 4, 4 * world, dtype, True, 1, seed=world)


@pytest.mark.parametrize("topology", [(2, 2), (1, 3)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_without_topk_and_with_alignment(topology):
    num_nodes, rpn = topology
    world = num_nodes * rpn
    _run_case(num_nodes, rpn, [9] * world, 16, 3, 2 * world, torch.bfloat16, False, 1, seed=5)
    _run_case(num_nodes, rpn, [9] * world, 16, 3, 2 * world, torch.float32, True, 4, seed=6)


def test_zero_tokens_everywhere():
    _run_case(2, 2, [0, 0, 0, 0], 8, 2, 8, torch.float32, True, 1, seed=1)


def test_every_token_masked():
    world = 4
    inputs = ref.random_inputs(world, [5] * world, 8, 2, 8, torch.float32, seed=2)

    def body(buf: Buffer):
        idx = torch.full_like(inputs[buf.rank].topk_idx, -1)
        pr, pn, pe, itr, _ = buf.get_dispatch_layout(idx, 8)
        recv_x, _, _, counts, handle, _ = buf.dispatch(
            inputs[buf.rank].x,
            is_token_in_rank=itr,
            num_tokens_per_expert=pe,
            topk_idx=idx,
            topk_weights=inputs[buf.rank].topk_weights,
        )
        combined, _, _ = buf.combine(recv_x, handle)
        return recv_x.shape[0], counts, combined

    for n, counts, combined in run_loopback(2, 2, body):
        assert n == 0 and counts == [0, 0]
        assert torch.equal(combined, torch.zeros(5, 8))


def test_dispatch_then_combine_is_x_times_fanout():
    """combined_x of a dispatch followed directly by a combine equals x * is_token_in_rank.sum(1)."""
    world = 8
    inputs = ref.random_inputs(world, [31] * world, 64, 6, 32, torch.bfloat16, seed=9)

    def body(buf: Buffer):
        inp = inputs[buf.rank]
        args = _layout_args(buf, inp, 32)
        recv_x, _, _, _, handle, _ = buf.dispatch(inp.x, **args)
        combined, _, _ = buf.combine(recv_x, handle)
        return combined, args["is_token_in_rank"]

    for r, (combined, in_rank) in enumerate(run_loopback(4, 2, body)):
        want = inputs[r].x.float() * in_rank.sum(1, keepdim=True)
        assert torch.equal(combined.float(), want)


def test_cached_dispatch_repeats_layout():
    world = 4
    inputs = ref.random_inputs(world, [13] * world, 32, 3, 8, torch.float32, seed=4)

    def body(buf: Buffer):
        inp = inputs[buf.rank]
        args = _layout_args(buf, inp, 8)
        first, _, _, _, handle, _ = buf.dispatch(inp.x, **args)
        again, idx, w, counts, handle2, _ = buf.dispatch(inp.x * 2, handle=handle)
        return first, again, idx, w, counts, handle2

    for first, again, idx, w, counts, handle2 in run_loopback(2, 2, body):
        assert torch.equal(again, first * 2)
        # As DeepEP's cached dispatch: no top-k, no counts and no handle (the caller has it).
        assert idx is None and w is None and counts is None and handle2 is None


@pytest.mark.parametrize("topology", [(2, 2), (1, 3)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("channels", [2, 3])
def test_channels_match_reference(topology, channels):
    """Each channel carries a contiguous range of every rank's tokens (fewer tokens than
    channels, and none, included); receive order, counts, combine and bytes are unchanged."""
    num_nodes, rpn = topology
    world = num_nodes * rpn
    tokens = [(11 * r + 2) % 19 for r in range(world)]
    tokens[1], tokens[-1] = 0, 1
    _run_case(num_nodes, rpn, tokens, 24, 4, 4 * world, torch.bfloat16, True, 4, seed=9, channels=channels)
    _run_case(num_nodes, rpn, tokens, 256, 4, 4 * world, torch.float8_e4m3fn, True, 1, seed=8, channels=channels)
    _run_case(num_nodes, rpn, tokens, 16, 3, 2 * world, torch.float32, False, 1, seed=7, channels=channels)


def test_channels_are_bitwise_one_channel():
    """Combine sums of values whose fp32 sum depends on its order: two and three channels
    give the bits one channel gives, on every run."""
    world = 4
    g = torch.Generator().manual_seed(1)
    inputs = ref.random_inputs(world, [37, 0, 5, 64], 48, 4, 12, torch.bfloat16, seed=4)
    noise = [torch.randn(400, 48, generator=g).bfloat16() for _ in range(world)]

    def body(buf: Buffer):
        inp = inputs[buf.rank]
        args = _layout_args(buf, inp, 12)
        runs = []
        for _ in range(3):
            recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
                inp.x, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights, **args
            )
            rows = noise[buf.rank][: recv_x.shape[0]] * recv_x
            combined, combined_w, _ = buf.combine(rows, handle, topk_weights=recv_w)
            src = handle.native.recv_src_idx()
            runs.append((recv_x.view(torch.int16), recv_idx, combined.view(torch.int16), combined_w, src))
        return runs

    one = run_loopback(2, 2, body, num_channels=1)
    for channels in (2, 3):
        many = run_loopback(2, 2, body, num_channels=channels)
        for r in range(world):
            for run in many[r]:
                for got, want in zip(run, one[r][0]):
                    assert torch.equal(torch.as_tensor(got), torch.as_tensor(want)), f"rank {r}, {channels} channels"


def test_num_channels_is_checked():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(dualcomm.InvalidArgumentError, match="num_channels"):
            run_loopback(1, 2, lambda buf: None, num_channels=bad)
    assert run_loopback(1, 2, lambda buf: buf.num_channels, num_channels=3) == [3, 3]


def test_streams_through_buffers_20x_smaller_than_payload():
    world, hidden, k = 4, 64, 4
    inputs = ref.random_inputs(world, [120] * world, hidden, k, 16, torch.float32, seed=12)
    record = 24 + hidden * 4 + k * 12  # header + row + top-k: one record per ring is enough
    nvl, rdma = 2 * record, 2 * record

    def body(buf: Buffer):
        inp = inputs[buf.rank]
        args = _layout_args(buf, inp, 16)
        recv_x, _, _, _, handle, _ = buf.dispatch(inp.x, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights, **args)
        combined, _, _ = buf.combine(recv_x, handle)
        return recv_x, combined, buf.stats(), args["is_token_in_rank"]

    out = run_loopback(2, 2, body, num_nvl_bytes=nvl, num_rdma_bytes=rdma)
    payload = sum(o[2]["nvl_payload_bytes"] + o[2]["rdma_payload_bytes"] for o in out) / world
    assert payload >= 20 * (nvl + rdma), "the test must move far more than the rings hold"
    for d, (recv_x, combined, _, in_rank) in enumerate(out):
        assert torch.equal(recv_x, ref.dispatch(inputs, 16, world, d)[0])
        assert torch.equal(combined, inputs[d].x * in_rank.sum(1, keepdim=True))


def test_bitwise_deterministic_over_20_runs():
    world = 6
    g = torch.Generator().manual_seed(0)
    inputs = ref.random_inputs(world, [40] * world, 48, 4, 12, torch.bfloat16, seed=3)
    # Non-integer rows so that summation order would show in the bits.
    noise = [torch.randn(400, 48, generator=g).bfloat16() for _ in range(world)]

    def body(buf: Buffer):
        inp = inputs[buf.rank]
        args = _layout_args(buf, inp, 12)
        runs = []
        for _ in range(20):
            recv_x, _, _, _, handle, _ = buf.dispatch(inp.x, **args)
            rows = noise[buf.rank][: recv_x.shape[0]] * recv_x
            combined, _, _ = buf.combine(rows, handle)
            runs.append((recv_x.view(torch.int16).clone(), combined.view(torch.int16).clone()))
        return runs

    for runs in run_loopback(3, 2, body):
        for recv, comb in runs[1:]:
            assert torch.equal(recv, runs[0][0]) and torch.equal(comb, runs[0][1])


def test_bf16_combine_of_real_values_is_close_to_fp32_sum():
    world = 4
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(50, 128, generator=g).bfloat16() for _ in range(world)]
    idx = [torch.randint(0, 8, (50, 4), generator=g) for _ in range(world)]

    def body(buf: Buffer):
        pr, pn, pe, itr, _ = buf.get_dispatch_layout(idx[buf.rank], 8)
        recv_x, _, _, _, handle, _ = buf.dispatch(xs[buf.rank], is_token_in_rank=itr)
        rows = (recv_x.float() * 1.37).bfloat16()
        combined, _, _ = buf.combine(rows, handle)
        return combined, itr

    for r, (combined, itr) in enumerate(run_loopback(2, 2, body)):
        want = (xs[r].float() * 1.37).bfloat16().float() * itr.sum(1, keepdim=True)
        torch.testing.assert_close(combined.float(), want, rtol=1.6e-2, atol=1e-2)


def test_bias_is_added_in_fp32():
    def body(buf: Buffer):
        x = torch.ones(3, 8, dtype=torch.bfloat16) * (buf.rank + 1)
        idx = torch.tensor([[0], [1], [-1]])
        _, _, pe, itr, _ = buf.get_dispatch_layout(idx, 2)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=itr)
        b0 = torch.full((3, 8), 0.5, dtype=torch.bfloat16)
        b1 = torch.full((3, 8), 0.25, dtype=torch.bfloat16)
        combined, _, _ = buf.combine(recv_x, handle, bias=(b0, b1))
        return combined

    for r, combined in enumerate(run_loopback(1, 2, body)):
        want = torch.tensor([r + 1 + 0.75, r + 1 + 0.75, 0.75]).unsqueeze(1).expand(3, 8)
        assert torch.equal(combined.float(), want)


def _dispatch_input(dtype: torch.dtype, t: int, hidden: int, g: torch.Generator):
    """Rows of `dtype` (any bit pattern but NaN-free, so equality is bitwise), and for the
    scaled forms their scales: float32 `[t, 3]` column-major, or int32 UE8M0 words `[t, 2]`."""
    raw = torch.randint(0, 100, (t, hidden), generator=g, dtype=torch.int64)
    if dtype.is_floating_point:
        x = (raw.float() - 50).to(dtype)
    elif dtype == torch.bool:
        x = raw % 2 == 1
    else:
        x = (raw - 50).to(dtype)
    if dtype == torch.float8_e4m3fn:
        float_scales = torch.rand(3, t, generator=g).t()  # column-major, as DeepEP's tests make them
        return (x, float_scales)
    if dtype == torch.float8_e5m2:
        return (x, torch.randint(0, 2**31 - 1, (t, 2), generator=g, dtype=torch.int32))
    return x


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        torch.float64,
        torch.int8,
        torch.int32,
        torch.bool,
        torch.uint8,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    ],
)
def test_dispatch_moves_any_dtype_and_scale_format_as_bytes(dtype):
    """Dispatch only moves rows (combine does the arithmetic): every dtype DeepEP's accepts,
    FP8 with float32 scales of any count and strides or with int32 UE8M0 words, arrives bit
    for bit in receive order (source rank, then token index), its scales beside it."""
    world, t, hidden, experts = 4, 9, 32, 8
    g = torch.Generator().manual_seed(3)
    inputs = [_dispatch_input(dtype, t, hidden, g) for _ in range(world)]
    idx = [torch.randint(0, experts, (t, 2), generator=g) for _ in range(world)]

    def body(buf: Buffer):
        in_rank = buf.get_dispatch_layout(idx[buf.rank], experts)[3]
        recv, *_, handle, _ = buf.dispatch(inputs[buf.rank], is_token_in_rank=in_rank)
        return recv, in_rank

    out = run_loopback(2, 2, body)
    for dest, (recv, _) in enumerate(out):
        goes = [o[1][:, dest] for o in out]
        pairs = [(inp if isinstance(inp, tuple) else (inp, None)) for inp in inputs]
        want_x = torch.cat([x[m] for (x, _), m in zip(pairs, goes)])
        got_x, got_s = recv if isinstance(recv, tuple) else (recv, None)
        assert got_x.dtype == dtype and torch.equal(got_x.view(torch.uint8), want_x.view(torch.uint8))
        if pairs[0][1] is None:
            assert not isinstance(recv, tuple)
            continue
        want_s = torch.cat([s[m] for (_, s), m in zip(pairs, goes)])
        assert got_s.dtype == want_s.dtype and torch.equal(got_s, want_s)


def test_dispatch_refuses_scales_it_cannot_pair():
    def body(buf: Buffer):
        x = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
        in_rank = torch.ones(4, 1, dtype=torch.bool)
        errors = []
        for bad in [
            (x, torch.zeros(3, 1)),  # a row of scales short
            (x, torch.zeros(4, 1, dtype=torch.float64)),  # not float32 or int32
            (x.view(torch.uint8).view(torch.bfloat16), torch.zeros(4, 1)),  # 2-byte data with scales
        ]:
            with pytest.raises(dualcomm.InvalidArgumentError) as e:
                buf.dispatch(bad, is_token_in_rank=in_rank)
            errors.append(str(e.value))
        return errors

    rows, dtype, width = run_loopback(1, 1, body)[0]
    assert rows.startswith("x[1]: expected 4 rows (one row of scales per token of x[0])")
    assert dtype.startswith("x[1]: expected dtype torch.float32 or torch.int32")
    assert width.startswith("x[0]: expected 1-byte elements (FP8 data) with scales")
