"""`deep_ep.utils` helpers that DeepEP's tests import, against plain definitions written here,
and DeepEP's test boilerplate (`init_dist`, then a `deep_ep.Buffer` on its group) end to end."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from dualcomm.deep_ep.utils import math as dmath
from dualcomm.deep_ep.utils.testing import bench, bench_kineto
from dualcomm.launch import free_port
from dualcomm.testing import run_loopback


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

    # Every name DeepEP's own tests (tests/legacy) import from its utils.
    from deep_ep.utils.envs import dist_print, get_logical_domain_size, get_physical_domain_size, init_dist
    from deep_ep.utils.math import (  # noqa: F401
        calc_diff,
        create_grouped_scores,
        hash_tensor,
        inplace_unique,
        per_token_cast_back,
        per_token_cast_to_fp8,
    )
    from deep_ep.utils.testing import bench, bench_kineto  # noqa: F401

    rank, num_ranks, group = init_dist(local_rank, 2)
    domains = [get_physical_domain_size(group), get_logical_domain_size(group, False)]
    os.environ["DUALCOMM_RANKS_PER_NODE"] = "1"  # two emulated nodes of one rank
    domains += [get_physical_domain_size(group), get_logical_domain_size(group), get_logical_domain_size(group, False)]
    os.environ["DUALCOMM_RANKS_PER_NODE"] = "2"
    # Seeded with the seed plus the rank, as DeepEP's: each rank draws its own data.
    draw = torch.rand(1).item()
    dist_print(f"rank {rank} up", once_in_node=True)
    buffer = deep_ep.Buffer(group, int(1e8), 0, explicitly_destroy=True)
    x = torch.ones(4, 128, dtype=torch.bfloat16) * rank
    topk_idx = torch.tensor([[0, 3], [1, 2], [2, -1], [3, 0]])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 4)
    recv, *_, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
    )
    combined, _, _ = buffer.combine(recv, handle)
    # DeepEP 2's buffer on the same group: its combine is an unweighted sum of the rows sent back.
    elastic = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=4, hidden=128, explicitly_destroy=True)
    erecv, _, _, ehandle, _ = elastic.dispatch(x, topk_idx, num_experts=4)
    ecombined, _, _ = elastic.combine(erecv, ehandle)
    elastic_ok = torch.equal(ecombined.float(), x.float() * in_rank.sum(1, keepdim=True))
    elastic.destroy()
    torch.manual_seed(rank)
    out.put(
        (
            rank,
            num_ranks,
            buffer.group_size,
            torch.equal(combined.float(), x.float() * in_rank.sum(1, keepdim=True)),
            draw == torch.rand(1).item(),
            torch.get_default_dtype() == torch.bfloat16,  # DeepEP's default, which its tests rely on
            domains == [(1, 2), (1, 2), (2, 1), (2, 1), (1, 2)],
            elastic_ok,
        )
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
    assert got == [(0, 2, 2, True, True, True, True, True), (1, 2, 2, True, True, True, True, True)]


def test_grouped_scores_keep_only_each_tokens_groups():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(7, 12, generator=g) + 1
    group_idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(7)])
    got = dmath.create_grouped_scores(scores, group_idx, 4)
    want = torch.zeros_like(scores)
    for t in range(7):
        for grp in group_idx[t].tolist():
            want[t, grp * 3 : (grp + 1) * 3] = scores[t, grp * 3 : (grp + 1) * 3]
    assert torch.equal(got, want)


def test_safe_div_and_hashes_of_any_dtype():
    assert dmath.safe_div(6, 3) == 2 and dmath.safe_div(0, 0) == 0
    with pytest.raises(ZeroDivisionError):
        dmath.safe_div(1, 0)
    # Two-byte elements and strided views hash by their bytes.
    x = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    assert dmath.hash_tensor(x.t()) == sum(x.t().contiguous().numpy().tobytes())
    assert dmath.hash_tensor(torch.ones(3, dtype=torch.bfloat16)) == 3 * (0x80 + 0x3F)


def _kineto_run(buf):
    """bench_kineto over one rank's operations: two dispatch+combine rounds per call (and a
    layout, whose span must not count as a dispatch), then a low-latency dispatch whose
    receive hook is a span of its own."""
    x = torch.randn(16, 256).bfloat16()
    idx = torch.randint(0, 8, (16, 2))

    def two_rounds():
        in_rank = buf.get_dispatch_layout(idx, 8)[3]
        for _ in range(2):
            recv, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=in_rank)
            buf.combine(recv, handle)

    times = bench_kineto(two_rounds, ("dispatch", "combine", "notify"), num_tests=3, num_kernels_per_period=2)
    single = bench_kineto(two_rounds, "combine", num_tests=2, suppress_kineto_output=True)

    def with_hook():
        _, _, _, _, hook = buf.low_latency_dispatch(x, idx, 16, 8, use_fp8=False, return_recv_hook=True)
        hook()

    ll = bench_kineto(with_hook, ("dispatch",), num_tests=3, num_kernels_per_period=2)
    return times, single, ll


def test_bench_kineto_times_dualcomms_named_spans(tmp_path):
    (times, single, ll) = run_loopback(1, 1, _kineto_run, low_latency_mode=True)[0]
    (d_first, d_second), (c_first, c_second), notify = times
    assert min(d_first, d_second, c_first, c_second) > 0 and notify == [0.0, 0.0]
    assert isinstance(single, float) and single > 0
    issue, receive = ll[0]
    assert issue > 0 and receive > 0


def test_bench_kineto_refuses_spans_that_do_not_fill_periods():
    def one_round(buf):
        x = torch.randn(4, 128).bfloat16()
        in_rank = torch.ones(4, 1, dtype=torch.bool)
        recv, _, _, _, handle, _ = buf.dispatch(x, is_token_in_rank=in_rank)
        return bench_kineto(lambda: buf.dispatch(x, is_token_in_rank=in_rank), "dispatch", 3, num_kernels_per_period=2)

    with pytest.raises(RuntimeError, match="3 'dispatch' spans are not periods of 2"):
        run_loopback(1, 1, one_round)


def test_dist_print_needs_init_dist():
    from dualcomm.deep_ep.utils import envs

    with pytest.raises(RuntimeError, match="call init_dist first"):
        envs.dist_print("hello")
