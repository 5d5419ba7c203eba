"""DeepEP's own test semantics (tests/legacy/test_intranode.py and test_internode.py), written
out for CPU tensors and driven through the `deep_ep` names: the same call sequences, the same
properties checked, against plain PyTorch. Shared by the loopback and multi-process tests.

Each rank's tokens are all-`rank` rows (so where a row came from can be read off it) or
random rows; top-k is random; every check below is one DeepEP makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, per 128 channels: scale so the block's largest magnitude is 448 (e4m3's max)."""
    t, h = x.shape
    blocks = x.float().view(t, h // 128, 128)
    amax = blocks.abs().amax(dim=2).clamp(min=1e-4)
    data = (blocks * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(t, h)
    return data, amax / 448.0


def per_token_cast_back(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    t, h = data.shape
    return (data.float().view(t, h // 128, 128) * scales.unsqueeze(2)).view(t, h).bfloat16()


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine similarity in the form DeepEP's tests use (0 for equal tensors)."""
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator)


@dataclass
class RankData:
    x: torch.Tensor  # all-rank rows
    x_pure_rand: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor  # all-rank weights
    topk_weights_pure_rand: torch.Tensor


def make_inputs(num_ranks: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int, seed: int):
    out = []
    for rank in range(num_ranks):
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        scores = torch.randn(num_tokens, num_experts, generator=g).abs() + 1
        topk_idx = torch.topk(scores, num_topk, dim=-1, sorted=False).indices.to(torch.int64)
        # A few "dropped" choices, as capacity-limited callers send.
        drop = torch.rand(num_tokens, num_topk, generator=g) < 0.1
        topk_idx = topk_idx.masked_fill(drop, -1)
        out.append(
            RankData(
                x=torch.ones(num_tokens, hidden, dtype=torch.bfloat16) * rank,
                x_pure_rand=torch.randn(num_tokens, hidden, generator=g).bfloat16(),
                topk_idx=topk_idx,
                topk_weights=torch.ones(num_tokens, num_topk) * rank,
                topk_weights_pure_rand=torch.randn(num_tokens, num_topk, generator=g),
            )
        )
    return out


def reference_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_nodes: int):
    """What `get_dispatch_layout` must return, computed as DeepEP's test computes it."""
    t = topk_idx.shape[0]
    per_expert = torch.tensor([int((topk_idx == e).sum()) for e in range(num_experts)], dtype=torch.int32)
    rank_idx = topk_idx // (num_experts // num_ranks)
    rank_idx = rank_idx.masked_fill(topk_idx == -1, -1)
    is_token_in_rank = torch.zeros(t, num_ranks, dtype=torch.bool)
    for r in range(num_ranks):
        is_token_in_rank[:, r] = (rank_idx == r).any(1)
    per_rank = is_token_in_rank.sum(0).to(torch.int32)
    rpn = num_ranks // num_nodes
    per_node = is_token_in_rank.view(t, num_nodes, rpn).any(2).sum(0).to(torch.int32)
    return per_rank, per_node, per_expert, is_token_in_rank


def run_rank(
    deep_ep: Any, buffer: Any, inputs: list[RankData], num_experts: int, num_nodes: int, device: Any = None
) -> int:
    """DeepEP's test body on one rank (its tensors on `device`, CPU by default); returns how
    many configurations passed."""
    rank, num_ranks = buffer.rank, buffer.group_size
    me = inputs[rank]
    if device is not None:
        me = RankData(
            *(
                getattr(me, f).to(device)
                for f in ("x", "x_pure_rand", "topk_idx", "topk_weights", "topk_weights_pure_rand")
            )
        )
    num_tokens, hidden = me.x.shape
    local = num_experts // num_ranks
    layouts = [reference_layout(i.topk_idx, num_experts, num_ranks, num_nodes) for i in inputs]
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank = (
        t.to(me.x.device) for t in layouts[rank]
    )
    gbl_num_tokens_per_rank = sum(lay[0] for lay in layouts).to(me.x.device)
    gbl_num_tokens_per_expert = sum(lay[2] for lay in layouts).to(me.x.device)

    got = buffer.get_dispatch_layout(me.topk_idx, num_experts)
    assert got[0].device == me.topk_idx.device
    assert torch.equal(got[0], num_tokens_per_rank)
    assert (got[1] is None) == (num_nodes == 1)
    if num_nodes > 1:
        assert torch.equal(got[1], num_tokens_per_rdma_rank)
    assert torch.equal(got[2], num_tokens_per_expert)
    assert torch.equal(got[3], is_token_in_rank)

    config = deep_ep.Config(24, 8, 256, 16, 128) if num_nodes > 1 else deep_ep.Config(24, 8, 256)
    x_e4m3 = per_token_cast_to_fp8(me.x)
    x_pure_rand_e4m3 = per_token_cast_to_fp8(me.x_pure_rand)
    # DeepEP's tests pass column-major scales.
    x_e4m3 = (x_e4m3[0], x_e4m3[1].T.contiguous().T)

    def check_data(check_x: torch.Tensor, prefix: torch.Tensor) -> None:
        """Rows from rank i sit between prefix[i-1] and prefix[i], and are all i."""
        assert torch.equal(check_x.amin(dim=1), check_x.amax(dim=1))
        start = 0
        for i in range(num_ranks):
            end = int(prefix[i])
            assert int((check_x[start:end].int() - i).abs().sum()) == 0, f"rows from rank {i}"
            start = end

    def prefix_of(handle: Any) -> torch.Tensor:
        # One node: column `rank` of the rank prefix matrix; several: the global prefix sum.
        return handle[0][:, rank] if num_nodes == 1 else handle[-4]

    passed = 0
    for previous_mode in (False, True):
        for async_mode in (False, True):
            for current_x in (me.x_pure_rand, me.x, x_pure_rand_e4m3, x_e4m3):
                is_rand = current_x is me.x_pure_rand or current_x is x_pure_rand_e4m3
                for with_topk in (False, True):
                    args: dict[str, Any] = dict(
                        x=current_x,
                        num_tokens_per_rank=num_tokens_per_rank,
                        is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=num_tokens_per_expert,
                        config=config,
                        async_finish=async_mode,
                    )
                    if num_nodes > 1:
                        args["num_tokens_per_rdma_rank"] = num_tokens_per_rdma_rank
                    if with_topk:
                        args.update(
                            topk_idx=me.topk_idx,
                            topk_weights=me.topk_weights_pure_rand if is_rand else me.topk_weights,
                        )
                    if previous_mode:
                        args["previous_event"] = buffer.capture()
                    recv_x, recv_topk_idx, recv_topk_weights, recv_list, handle, event = buffer.dispatch(**args)
                    # Known at return, as DeepEP's (it synchronises on the counts).
                    assert recv_list == gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist()
                    if async_mode:
                        event.current_stream_wait()
                    recv_x = per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
                    assert recv_x.size(0) == int(gbl_num_tokens_per_rank[rank])
                    if num_nodes == 1:
                        assert handle[0].shape == (num_ranks, num_ranks) and handle[0].dtype == torch.int32
                    if not is_rand:
                        check_data(recv_x, prefix_of(handle))
                    recv_topk_weights_clone = None
                    if with_topk:
                        valid = recv_topk_idx.eq(-1) | ((recv_topk_idx >= 0) & (recv_topk_idx < local))
                        assert bool(valid.all())
                        for i, count in enumerate(recv_list):
                            assert int(recv_topk_idx.eq(i).sum()) == count
                        recv_topk_weights_clone = recv_topk_weights.clone()
                        if not is_rand:
                            fill = recv_topk_weights.amax(dim=1, keepdim=True).expand_as(recv_topk_weights)
                            recv_topk_weights[recv_topk_idx.eq(-1)] = fill[recv_topk_idx.eq(-1)]
                            check_data(recv_topk_weights, prefix_of(handle))

                        worst = num_tokens * num_ranks
                        w_x, w_idx, w_w, empty, _, event = buffer.dispatch(**args, num_worst_tokens=worst)
                        if async_mode:
                            event.current_stream_wait()
                        w_x = per_token_cast_back(*w_x) if isinstance(w_x, tuple) else w_x
                        assert len(empty) == 0
                        assert w_x.size(0) == worst and w_idx.size(0) == worst and w_w.size(0) == worst
                        n = recv_x.size(0)
                        assert torch.equal(recv_x, w_x[:n])
                        assert torch.equal(recv_topk_idx, w_idx[:n])
                        assert torch.equal(recv_topk_weights_clone, w_w[:n])
                        assert bool((w_idx[n:] == -1).all())
                    else:
                        cached = dict(x=current_x, handle=handle, config=config, async_finish=async_mode)
                        if previous_mode:
                            cached["previous_event"] = buffer.capture()
                        again, _, _, _, _, event = buffer.dispatch(**cached)
                        if async_mode:
                            event.current_stream_wait()
                        again = per_token_cast_back(*again) if isinstance(again, tuple) else again
                        if not is_rand:
                            check_data(again, prefix_of(handle))

                    comb: dict[str, Any] = dict(x=recv_x, handle=handle, config=config, async_finish=async_mode)
                    bias_0 = bias_1 = None
                    if num_nodes > 1:
                        g = torch.Generator().manual_seed(rank)
                        bias_0 = torch.ones(num_tokens, hidden, dtype=torch.bfloat16).to(me.x.device)
                        bias_1 = torch.randn(num_tokens, hidden, generator=g).bfloat16().to(me.x.device)
                        comb["bias"] = (bias_0, bias_1)
                    if with_topk:
                        comb["topk_weights"] = recv_topk_weights
                    if previous_mode:
                        comb["previous_event"] = buffer.capture()
                    combined_x, combined_topk_weights, event = buffer.combine(**comb)
                    if async_mode:
                        event.current_stream_wait()
                    check_x = combined_x.float()
                    if bias_0 is not None and bias_1 is not None:
                        check_x = check_x - bias_0.float() - bias_1.float()
                    check_x = check_x / is_token_in_rank.sum(dim=1).unsqueeze(1)
                    ref_x = me.x_pure_rand if is_rand else me.x
                    limit = 5e-4 if current_x is x_pure_rand_e4m3 else 5e-6
                    # Tokens that went nowhere come back as zeros (DeepEP's reference divides 0/0).
                    sent = is_token_in_rank.any(1)
                    assert calc_diff(check_x[sent], ref_x[sent]) < limit, "combined_x"
                    if with_topk:
                        if is_rand:
                            check_w = combined_topk_weights
                        else:
                            check_w = combined_topk_weights / is_token_in_rank.sum(dim=1).unsqueeze(1)
                        ref_w = me.topk_weights
                        if is_rand:
                            # A dropped choice (-1) is no rank's, so no weight comes back for it.
                            w = me.topk_weights_pure_rand
                            ref_w = torch.where(me.topk_idx >= 0, w, torch.zeros_like(w))
                        assert calc_diff(check_w[sent], ref_w[sent]) < 1e-9, "combined_topk_weights"
                    passed += 1
    return passed
