"""DeepEP 2's test utilities (`deep_ep.utils.refs`, `gate`, the `envs` probes) against
plain-PyTorch references written here, and DeepEP 2's `test_ep.py` check sequence run on
`ElasticBuffer` with them, in real processes."""

from __future__ import annotations

import client_workers
import pytest
import refs_workers
import torch

from dualcomm.deep_ep.utils import envs, gate, refs
from dualcomm.deep_ep.utils.math import per_token_cast_to_fp8
from dualcomm.launch import run_world


def _cancelling(n: int, k: int, hidden: int, seed: int) -> torch.Tensor:
    """bf16 `[n, k, hidden]` of small lanes, except that lane 0 is large (2^20 times) and lane 2
    cancels it exactly: an fp32 sum that meets the large lane after a small one loses that
    small one's low bits, so any other summation order rounds differently."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, k, hidden, generator=g)
    data[:, 0] *= 2.0**20
    if k > 2:
        data[:, 2] = -data[:, 0]
    return data.to(torch.bfloat16)


def test_ordered_accumulate_adds_lanes_in_order_in_fp32():
    data = _cancelling(6, 8, 64, seed=1)
    init = torch.randn(6, 64)
    want = init.clone()
    for j in range(8):
        want = want + data[:, j].float()
    reverse = init.clone()
    for j in reversed(range(8)):
        reverse = reverse + data[:, j].float()
    assert not torch.equal(want.to(torch.bfloat16), reverse.to(torch.bfloat16)), "the data cannot tell orders apart"
    assert torch.equal(refs.ordered_accumulate(data, init), want.to(torch.bfloat16))
    zero_start = torch.zeros(6, 64)
    for j in range(8):
        zero_start = zero_start + data[:, j].float()
    assert torch.equal(refs.ordered_accumulate(data), zero_start.to(torch.bfloat16))


def _combine_by_hand(y, idx, per_group_levels, bias):
    """Per token: for each grouping in turn, each group's lanes summed in lane order in fp32,
    rounded to bf16 and kept at the group's largest lane (its other lanes zero); then the bias
    and every lane, in order, in fp32, rounded once."""
    y = y.clone()
    n, k, _ = y.shape
    for size in per_group_levels:
        out = torch.zeros_like(y)
        for t in range(n):
            groups: dict[int, list[int]] = {}
            for j in range(k):
                groups.setdefault(int(idx[t, j]) // size, []).append(j)
            for lanes in groups.values():
                acc = torch.zeros(y.shape[2])
                for j in lanes:
                    acc = acc + y[t, j].float()
                out[t, lanes[-1]] = acc.to(torch.bfloat16)
        y = out
    acc = bias.float().clone() if bias is not None else torch.zeros(n, y.shape[2])
    for j in range(k):
        acc = acc + y[:, j].float()
    return acc.to(torch.bfloat16)


@pytest.mark.parametrize("recipe", [(True, False), (False, False), (True, True)], ids=str)
def test_combine_reduces_ranks_then_domains_in_deep_eps_order(recipe):
    scaleout, scaleup, per_rank, k = 2, 2, 2, 6
    num_experts = scaleout * scaleup * per_rank
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(7)])
    idx[0, 2] = -1
    y = _cancelling(7, k, 32, seed=4)
    y[idx == -1] = 0
    b0, b1 = torch.randn(7, 32).to(torch.bfloat16), torch.randn(7, 32).to(torch.bfloat16)
    got = refs.combine(y, idx, scaleout, scaleup, num_experts, (b0, b1), *recipe)
    levels = {(True, False): [per_rank], (False, False): [], (True, True): [per_rank, per_rank * scaleup]}[recipe]
    want = _combine_by_hand(y, idx, levels, b0.float() + b1.float())
    assert torch.equal(got, want)
    if recipe != (False, False):
        flat = _combine_by_hand(y, idx, [], b0.float() + b1.float())
        assert not torch.equal(got, flat), "the data cannot tell the recipes apart"
    with pytest.raises(ValueError, match="reduce_in_scaleup"):
        refs.combine(y, idx, scaleout, scaleup, num_experts, None, False, True)


def _rank_traffic(scores: torch.Tensor, num_ranks: int, num_topk: int) -> torch.Tensor:
    per_rank = scores.shape[1] // num_ranks
    owners = scores.topk(num_topk, dim=1).indices // per_rank
    return torch.stack([(owners == r).any(dim=1).sum() for r in range(num_ranks)])


@pytest.mark.parametrize(
    "num_experts,num_ranks,num_topk,ratio",
    [(64, 8, 8, 1.0), (64, 8, 8, 2.0), (128, 16, 6, 4.0), (576, 72, 9, 2.0), (16, 4, 4, 1.0), (4, 2, 1, 1.0)],
)
def test_precise_scores_give_the_hot_rank_its_ratio(num_experts, num_ranks, num_topk, ratio):
    torch.manual_seed(5)
    total = torch.zeros(num_ranks, dtype=torch.int64)
    for _ in range(num_ranks):
        scores = gate.get_unbalanced_scores(4096, num_experts, num_ranks, num_topk, ratio, True)
        assert scores.shape == (4096, num_experts) and scores.dtype == torch.float32
        top = scores.topk(num_topk, dim=1).indices
        assert all(len(set(row)) == num_topk for row in top.tolist())
        total += _rank_traffic(scores, num_ranks, num_topk)
    others = total[1:].float()
    # DeepEP's tests/utils/test_gate.py criteria.
    assert abs(total[0].item() / others.min().item() - ratio) / ratio < 0.1
    assert others.max() / others.min() < 1.02


def test_random_scores_skew_the_hot_rank_about_the_ratio():
    torch.manual_seed(6)
    even = _rank_traffic(gate.get_unbalanced_scores(4096, 64, 8, 8, 1.0, False), 8, 8).float()
    skewed = _rank_traffic(gate.get_unbalanced_scores(4096, 64, 8, 8, 2.0, False), 8, 8).float()
    assert abs(even[0] / even[1:].mean() - 1.0) < 0.1
    assert abs(skewed[0] / skewed[1:].mean() - 2.0) < 0.25


def test_gate_refuses_what_it_cannot_make():
    with pytest.raises(ValueError, match="ratio"):
        gate.get_unbalanced_scores(16, 64, 8, 8, 0.5, True)
    with pytest.raises(ValueError, match="num_experts"):
        gate.get_unbalanced_scores(16, 63, 8, 8, 1.0, True)
    # Top-8 of one expert per rank spans 8 ranks, more than a ratio of 4 allows among 8.
    with pytest.raises(ValueError, match="ratio: 4.0 needs tokens on at most 2 ranks"):
        gate.get_unbalanced_scores(16, 8, 8, 8, 4.0, True)


def test_refs_dispatch_is_a_plain_all_to_all_by_source_then_token():
    world, max_tokens, hidden, k, experts = 3, 7, 128, 3, 6
    got = run_world(refs_workers.refs_dispatch, world, max_tokens, hidden, k, experts, timeout=120)
    inputs = [refs_workers.rank_inputs(r, max_tokens, hidden, k, experts) for r in range(world)]
    per_rank = experts // world
    for rank, res in enumerate(got):
        rows, idx, weights, src, counts = [], [], [], [], []
        for s, inp in enumerate(inputs):
            owners = torch.where(inp["topk_idx"] >= 0, inp["topk_idx"] // per_rank, -1)
            mine = (owners == rank).any(dim=1).nonzero().squeeze(1)
            rows.append(inp["x"][mine])
            local = inp["topk_idx"][mine] - rank * per_rank
            idx.append(torch.where((local >= 0) & (local < per_rank), local, -1))
            weights.append(inp["topk_weights"][mine])
            src.append((mine + s * max_tokens).int())
            counts.append(len(mine))
        recv_x, recv_idx, recv_w, recv_src, recv_counts = res["plain"]
        assert torch.equal(recv_x, torch.cat(rows))
        assert torch.equal(recv_idx, torch.cat(idx))
        assert torch.equal(recv_w, torch.cat(weights))
        assert recv_src.dtype == torch.int32 and torch.equal(recv_src, torch.cat(src))
        assert recv_counts.tolist() == counts and recv_counts.dtype == torch.int32
        (fp8_x, fp8_sf), fp8_idx, fp8_w, _, _ = res["fp8"]
        want_x, want_sf = per_token_cast_to_fp8(torch.cat(rows))
        assert torch.equal(fp8_x, want_x.view(torch.uint8)) and torch.equal(fp8_sf, want_sf)
        assert fp8_w is None and torch.equal(fp8_idx, recv_idx)


@pytest.mark.parametrize("num_nodes", [1, 2], ids=["1x4", "2x2"])
def test_elastic_buffer_passes_deep_ep2_test_ep_checks(num_nodes):
    results = run_world(client_workers.elastic_test_ep, 4, num_nodes, 11, timeout=240)
    assert [r["checked"] for r in results] == [[True, True]] * 4
    assert {r["domains"] for r in results} == {(1, 4)}


def test_hardware_probes_answer_zero_without_the_hardware(monkeypatch, tmp_path, capsys):
    for probe in (envs.get_nvlink_gbs, envs.get_rdma_gbs, envs.check_fast_rdma_atomic_support):
        probe.cache_clear()
    monkeypatch.setattr(envs, "_IB_SYSFS", tmp_path / "none")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert envs.get_nvlink_gbs() == 0
    assert envs.get_rdma_gbs("mlx5_0") == 0
    assert envs.check_fast_rdma_atomic_support("mlx5_0") is False
    assert "Failed to get NVLink connection speed" in capsys.readouterr().out


def test_rdma_probes_read_the_nics_sysfs(monkeypatch, tmp_path):
    for probe in (envs.get_rdma_gbs, envs.check_fast_rdma_atomic_support):
        probe.cache_clear()
    nic = tmp_path / "mlx5_3"
    (nic / "ports" / "1").mkdir(parents=True)
    (nic / "ports" / "1" / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (nic / "hca_type").write_text("MT4131\n")
    monkeypatch.setattr(envs, "_IB_SYSFS", tmp_path)
    assert envs.get_rdma_gbs("mlx5_3") == 50.0
    assert envs.check_fast_rdma_atomic_support("mlx5_3") is True
    (nic / "hca_type").write_text("MT4129\n")
    envs.check_fast_rdma_atomic_support.cache_clear()
    assert envs.check_fast_rdma_atomic_support("mlx5_3") is False


def test_nvlink_probe_sums_the_first_gpus_links(monkeypatch, tmp_path):
    envs.get_nvlink_gbs.cache_clear()
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\ncat <<'EOF'\nGPU 0: NVIDIA H200 (UUID: x)\n\t Link 0: 26.562 GB/s\n\t Link 1: 26.562 GB/s\n"
        "GPU 1: NVIDIA H200 (UUID: y)\n\t Link 0: 26.562 GB/s\nEOF\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")  # this one first
    assert envs.get_nvlink_gbs(1.0) == pytest.approx(53.124)
    assert envs.get_nvlink_gbs() == pytest.approx(53.124 * 0.9)


def test_deterministic_check_refuses_filling_uninitialized_memory():
    import torch.utils.deterministic as deterministic

    was, fill = torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True)
        deterministic.fill_uninitialized_memory = True
        with pytest.raises(AssertionError, match="fill_uninitialized_memory"):
            envs.check_torch_deterministic()
        deterministic.fill_uninitialized_memory = False
        envs.check_torch_deterministic()
    finally:
        torch.use_deterministic_algorithms(was)
        deterministic.fill_uninitialized_memory = fill
