"""DeepEP's low-latency test semantics (tests/legacy/test_low_latency.py), written out for CPU
tensors: rank-valued rows whose last 128 channels hold the token index, random top-k with
masked (-1) choices, every dispatch variant (bf16, FP8, rounded scales, UE8M0 scales; with
and without the receive hook), then combine with and without zero copy, each checked as
DeepEP checks it, plus the exact per-expert layout (source rank, then token index) from a
plain-PyTorch reference. Shared by the loopback and multi-process tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from deep_ep_checks import calc_diff

#: DeepEP's offset keeps rank values exact in bf16 and away from zero.
RANK_OFFSET = 128


def cast_back(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """FP8 rows and their scales (float32, or int32 of packed UE8M0 exponent bytes) to bf16."""
    if scales.dtype == torch.int32:
        b = torch.stack([(scales >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).flatten(-2)
        scales = torch.pow(2.0, b.float() - 127)
    t, h = data.shape
    return (data.float().view(t, h // 128, 128) * scales.float().unsqueeze(-1)).view(t, h).bfloat16()


@dataclass
class RankData:
    x: torch.Tensor
    x_rand: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


def make_inputs(num_ranks: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int, seed: int):
    out = []
    for rank in range(num_ranks):
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        x = torch.ones(num_tokens, hidden, dtype=torch.bfloat16) * (rank - RANK_OFFSET)
        x[:, -128:] = torch.arange(num_tokens).to(torch.bfloat16).view(-1, 1)
        scores = torch.randn(num_tokens, num_experts, generator=g).abs() + 1
        topk_idx = torch.topk(scores, num_topk, dim=-1, sorted=True).indices
        for _ in range(3):
            i = int(torch.randint(num_tokens, (1,), generator=g))
            j = int(torch.randint(num_topk, (1,), generator=g))
            topk_idx[i, j] = -1
        out.append(
            RankData(
                x=x,
                x_rand=torch.randn(num_tokens, hidden, generator=g).bfloat16() * 0.5,
                topk_idx=topk_idx,
                topk_weights=torch.randn(num_tokens, num_topk, generator=g).abs(),
            )
        )
    return out


def reference_layout(inputs: list[RankData], rank: int, local: int):
    """Per local expert of `rank`: (source rank, source token index) of each row, in order."""
    rows = []
    for e in range(local):
        expert = rank * local + e
        rows.append(
            [(s, int(t)) for s, inp in enumerate(inputs) for t in (inp.topk_idx == expert).any(1).nonzero().flatten()]
        )
    return rows


def run_rank(
    buffer: Any, inputs: list[RankData], num_experts: int, max_tokens: int, device: Any = None
) -> dict[str, Any]:
    rank, num_ranks = buffer.rank, buffer.group_size
    me = inputs[rank]
    if device is not None:
        me = RankData(*(getattr(me, f).to(device) for f in ("x", "x_rand", "topk_idx", "topk_weights")))
    num_tokens, hidden = me.x.shape
    local = num_experts // num_ranks
    all_topk_idx = torch.stack([i.topk_idx for i in inputs])
    expected_rows = reference_layout(inputs, rank, local)
    mask32 = (1 << 32) - 1
    hashes: list[torch.Tensor] = []
    variants = 0
    for current_x in (me.x, me.x_rand):
        for return_recv_hook in (False, True):
            for use_fp8 in (False, True):
                for round_scale in (False, True) if use_fp8 else (False,):
                    for use_ue8m0 in (False, True) if round_scale else (False,):
                        stats = torch.zeros(local, dtype=torch.int32, device=me.x.device)
                        recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
                            current_x,
                            me.topk_idx,
                            max_tokens,
                            num_experts,
                            use_fp8=use_fp8,
                            round_scale=round_scale,
                            use_ue8m0=use_ue8m0,
                            cumulative_local_expert_recv_stats=stats,
                            async_finish=not return_recv_hook,
                            return_recv_hook=return_recv_hook,
                        )
                        assert (hook is not None) == return_recv_hook
                        hook() if return_recv_hook else event.current_stream_wait()
                        cap = num_ranks * max_tokens
                        if use_fp8:
                            data, scales = recv_x
                            assert data.shape == (local, cap, hidden) and data.dtype == torch.float8_e4m3fn
                            cols = hidden // 512 if use_ue8m0 else hidden // 128
                            assert scales.shape == (local, cap, cols)
                            assert scales.dtype == (torch.int32 if use_ue8m0 else torch.float32)
                            # Column-major in the last two dimensions, as DeepEP returns them.
                            assert scales.stride()[1:] == (1, cap)
                            scales = scales.contiguous()
                            simulated = torch.stack([cast_back(data[e], scales[e]) for e in range(local)])
                        else:
                            assert recv_x.shape == (local, cap, hidden) and recv_x.dtype == torch.bfloat16
                            simulated = recv_x.clone()
                        src_info, layout_range = handle[0], handle[1]  # on the device of x, as DeepEP's
                        assert handle[2] == max_tokens and handle[3] == hidden and handle[4] == num_experts
                        for e in range(local):
                            expert = rank * local + e
                            n = int(recv_count[e])
                            assert int(stats[e]) == n
                            assert n == int((layout_range[e] & mask32).sum())
                            assert n == int((all_topk_idx == expert).sum())
                            want = expected_rows[e]
                            assert n == len(want)
                            assert src_info[e, :n].tolist() == [t for _, t in want]
                            if n == 0 or current_x is not me.x:
                                continue
                            got = simulated[e, :n]
                            assert torch.equal(got[:, :-128].amin(-1), got[:, :-128].amax(-1))
                            if not round_scale:
                                assert int((got[:, -128:] - src_info[e, :n].view(-1, 1) % num_tokens).abs().sum()) == 0
                            for j in range(num_ranks):
                                begin, count = int(layout_range[e, j]) >> 32, int(layout_range[e, j]) & mask32
                                assert count == int((all_topk_idx[j] == expert).sum())
                                if not round_scale:
                                    assert int((got[begin : begin + count, :-128] - j + RANK_OFFSET).abs().sum()) == 0
                        for zero_copy in (False, True):
                            if zero_copy:
                                buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = simulated
                            out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=me.x.device)
                            combined, event, hook = buffer.low_latency_combine(
                                simulated,
                                me.topk_idx,
                                me.topk_weights,
                                handle,
                                zero_copy=zero_copy,
                                async_finish=not return_recv_hook,
                                return_recv_hook=return_recv_hook,
                                out=out,
                            )
                            hook() if return_recv_hook else event.current_stream_wait()
                            assert combined is out
                            # Identity experts: each token comes back as x times its valid weights' sum.
                            valid_w = me.topk_weights.masked_fill(me.topk_idx == -1, 0).sum(1, keepdim=True)
                            ref = current_x.float() * valid_w
                            assert not bool(torch.isnan(combined).any())
                            if not round_scale:
                                diff = calc_diff(ref, combined.float())
                                assert diff < (9e-4 if use_fp8 else 1e-5), f"{diff=} {use_fp8=} {zero_copy=}"
                            hashes.append(combined.clone())
                        variants += 1
    return dict(variants=variants, hashes=hashes)
