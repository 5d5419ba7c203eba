"""`deep_ep.utils` helpers that DeepEP's tests import, against plain definitions written here,
and DeepEP's test boilerplate (`init_dist`, then a `deep_ep.Buffer` on its group) end to end."""

from __future__ import annotations

import multiprocessing as mp

import torch

from dualcomm.deep_ep.utils import math as dmath
from dualcomm.deep_ep.utils.testing import bench
from dualcomm.launch import free_port


def test_fp8_cast_round_trips_and_pads_the_last_block():
    g = torch.Generator().manual_seed(0)
    for hidden in (256, 200):
        x = (torch.randn(9, hidden, generator=g) * 5).bfloat16()
        data, scales = dmath.per_token_cast_to_fp8(x)
        assert data.shape == (9, hidden) and scales.shape == (9, -(-hidden // 128))
        # Each 128-channel block's largest magnitude maps to 448 (e4m3's largest finite).
        first = x[:, :128].float().abs().amax(1)
        assert torch.allclose(scales[:, 0], first / 448)
        back = dmath.per_token_cast_back(data, scales)
        assert back.dtype == torch.bfloat16 and dmath.calc_diff(back, x) < 1e-3
    assert dmath.calc_diff(x, x) == 0.0 and dmath.calc_diff(x, -x) > 0.5


def test_ue8m0_scales_cast_back():
    x = torch.randn(3, 512).bfloat16()
    data, scales = dmath.per_token_cast_to_fp8(x)
    exponent = torch.ceil(torch.log2(scales)).int() + 127  # powers of two at or above the scale
    packed = exponent[:, 0::4] | exponent[:, 1::4] << 8 | exponent[:, 2::4] << 16 | exponent[:, 3::4] << 24
    want = (data.float().view(3, 4, 128) * torch.pow(2.0, (exponent - 127).float()).unsqueeze(2)).view(3, 512)
    assert torch.equal(dmath.per_token_cast_back(data, packed.int()), want.bfloat16())


def test_inplace_unique_keeps_distinct_values_largest_first():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-1, 6, (50, 8), generator=g)
    want = []
    for row in x.tolist():
        distinct = sorted({v for v in row if v >= 0}, reverse=True)[:6]
        want.append(distinct + [-1] * (8 - len(distinct)))
    dmath.inplace_unique(x, 6)
    assert x.tolist() == want


def test_hashes_and_byte_counts():
    t = torch.arange(6, dtype=torch.int32)
    assert dmath.hash_tensor(t) == 15
    assert dmath.hash_tensors(t, [t * 2, None]) == 15 ^ 30
    assert dmath.count_bytes(t, (torch.zeros(2, dtype=torch.bfloat16),)) == 24 + 4
    assert dmath.align(130, 128) == 256 and dmath.ceil_div(129, 128) == 2


def test_bench_reports_average_minimum_maximum():
    avg, lo, hi = bench(lambda: sum(range(1000)), num_warmups=2, num_tests=5)
    assert 0 < lo <= avg <= hi


def _deep_ep_style_rank(local_rank: int, port: int, out) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0")
    import dualcomm.deep_ep

    dualcomm.deep_ep.install()
    import deep_ep
    from deep_ep.utils.envs import init_dist

    rank, num_ranks, group = init_dist(local_rank, 2)
    buffer = deep_ep.Buffer(group, int(1e8), 0, explicitly_destroy=True)
    x = torch.ones(4, 128, dtype=torch.bfloat16) * rank
    topk_idx = torch.tensor([[0, 3], [1, 2], [2, -1], [3, 0]])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 4)
    recv, *_, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
    )
    combined, _, _ = buffer.combine(recv, handle)
    out.put(
        (rank, num_ranks, buffer.group_size, torch.equal(combined.float(), x.float() * in_rank.sum(1, keepdim=True)))
    )
    buffer.destroy()


def test_deep_ep_test_boilerplate_runs():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_deep_ep_style_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert got == [(0, 2, 2, True), (1, 2, 2, True)]
