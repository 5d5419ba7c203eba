"""Rank programs that are real, unmodified clients of DeepEP's API, run in their own
processes (gloo process group, dualcomm's shm+tcp transports) by tests/test_deep_ep_clients.py.

`deep_ep` resolves to dualcomm through the documented opt-in (`dualcomm.deep_ep.install()`);
the emulated node size comes from `DUALCOMM_RANKS_PER_NODE`, since these callers cannot pass it.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist


def _opt_in(ranks_per_node: int) -> Any:
    os.environ["DUALCOMM_RANKS_PER_NODE"] = str(ranks_per_node)
    import dualcomm.deep_ep

    assert dualcomm.deep_ep.install()
    import deep_ep

    return deep_ep


def deep_ep_semantics(rank: int, world: int, num_nodes: int, seed: int) -> dict[str, Any]:
    """DeepEP's intranode/internode test body, on a `deep_ep.Buffer` built as its tests build it."""
    import deep_ep_checks as checks

    deep_ep = _opt_in(world // num_nodes)
    num_tokens, hidden, num_topk, num_experts = 24, 256, 4, 4 * world
    inputs = checks.make_inputs(world, num_tokens, hidden, num_topk, num_experts, seed)
    # DeepEP's tests ask for 2 GB and 1 GB: dualcomm trims what a CPU ring cannot use.
    buffer = deep_ep.Buffer(dist.group.WORLD, int(2e9), int(1e9), explicitly_destroy=True)
    passed = checks.run_rank(deep_ep, buffer, inputs, num_experts, num_nodes)
    transport, stats = buffer.transport, buffer.stats()
    buffer.destroy()
    return dict(passed=passed, transport=transport, stats=stats)


def megatron_flex_dispatcher(rank: int, world: int, num_nodes: int, seed: int) -> dict[str, Any]:
    """Megatron-Core's DeepEP path (`_DeepepManager` over `fused_dispatch`/`fused_combine`),
    unmodified: routing, dispatch, experts, combine, and the backward of all of it."""
    _opt_in(world // num_nodes)
    warnings.filterwarnings("ignore")  # Megatron warns that Transformer Engine and Apex are absent
    from megatron.core.transformer.moe import fused_a2a
    from megatron.core.transformer.moe.token_dispatcher import _DeepepManager
    from megatron.core.transformer.transformer_config import TransformerConfig

    assert fused_a2a.HAVE_DEEP_EP, "megatron did not find deep_ep"
    num_experts, topk, tokens, hidden = 2 * world, 3, 16, 32
    local = num_experts // world
    config = TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=1,
        num_moe_experts=num_experts,
        moe_router_topk=topk,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="flex",
        moe_flex_dispatcher_backend="deepep",
        moe_deepep_num_sms=20,
    )
    manager = _DeepepManager(dist.group.WORLD, local, topk, num_experts, config)

    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(tokens, hidden, generator=g).requires_grad_()
    logits = torch.randn(tokens, num_experts, generator=g).requires_grad_()
    probs = torch.softmax(logits, dim=-1)
    routing_map = torch.zeros(tokens, num_experts, dtype=torch.bool)
    routing_map.scatter_(1, probs.topk(topk, dim=-1).indices, True)
    manager.setup_metadata(routing_map, probs)
    recv = manager.dispatch(x)
    # The experts: expert e scales its tokens by (e + 1), weighted by the token's prob.
    idx, p = manager.dispatched_indices, manager.dispatched_probs
    scale = torch.where(idx >= 0, (idx + 1 + rank * local).float(), torch.zeros_like(p)) * p
    out = manager.combine(recv * scale.sum(1, keepdim=True))
    upstream = torch.randn(tokens, hidden, generator=g)
    (out * upstream).sum().backward()
    return dict(
        x=x.detach(),
        logits=logits.detach(),
        upstream=upstream,
        out=out.detach(),
        grad_x=x.grad,
        grad_logits=logits.grad,
        tokens_per_expert=manager.get_number_of_tokens_per_expert().tolist(),
        buffer_transport=fused_a2a._buffer.transport,
        rdma_bytes=fused_a2a._buffer.stats()["rdma_payload_bytes"],
    )


def low_latency_semantics(rank: int, world: int, num_nodes: int, seed: int) -> dict[str, Any]:
    """DeepEP's low-latency test body on a `deep_ep.Buffer(low_latency_mode=True)`."""
    import low_latency_checks as checks

    deep_ep = _opt_in(world // num_nodes)
    hidden, tokens, topk, max_tokens, experts = 512, 12, 3, 16, 4 * world
    inputs = checks.make_inputs(world, tokens, hidden, topk, experts, seed)
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, world, experts)
    buffer = deep_ep.Buffer(
        dist.group.WORLD, 0, hint, low_latency_mode=True, num_qps_per_rank=experts // world, explicitly_destroy=True
    )
    out = checks.run_rank(buffer, inputs, experts, max_tokens)
    stats = buffer.stats()
    transport = buffer.low_latency_transport
    buffer.destroy()
    return dict(
        variants=out["variants"], transport=transport, ll_rdma_connections=stats["low_latency_rdma_connections"]
    )


def low_latency_shrink(rank: int, world: int, num_nodes: int, seed: int) -> dict[str, Any]:
    """The shrink test of DeepEP's `test_low_latency.py` (`--shrink-test`), its checks kept and
    its sizes shrunk: ranks 1, 3 and 5 fail (stop calling, then leave, as DeepEP's failed
    ranks go straight to `destroy`) at their first dispatch, combine and clean; the others
    must mask exactly the failed ranks after each call, receive only from ranks not masked,
    and combine over the experts of those ranks."""
    return _shrink_test(rank, world, num_nodes, seed, linger=False)


def low_latency_shrink_lingering(rank: int, world: int, num_nodes: int, seed: int) -> dict[str, Any]:
    """As `low_latency_shrink`, but the failed ranks stay in the world, silent, until the
    others are done: the survivors mask them at the timeout (3 s here), not on departure."""
    return _shrink_test(rank, world, num_nodes, seed, linger=True)


def _shrink_test(rank: int, world: int, num_nodes: int, seed: int, linger: bool) -> dict[str, Any]:
    import random

    deep_ep = _opt_in(world // num_nodes)
    from deep_ep.utils.math import calc_diff, per_token_cast_back

    failing = {"dispatch": 1, "combine": 3, "clean": 5}
    num_tokens, hidden, num_topk, num_experts = 16, 256, 4, 2 * world
    num_local_experts = num_experts // world
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_tokens, hidden, world, num_experts)
    buffer = deep_ep.Buffer(
        dist.group.WORLD,
        num_rdma_bytes=hint,
        low_latency_mode=True,
        num_qps_per_rank=num_local_experts,
        explicitly_destroy=True,
        enable_shrink=True,
        **({"timeout": 3.0} if linger else {}),
    )
    rank_offset = 128
    x = torch.ones((num_tokens, hidden), dtype=torch.bfloat16) * (rank - rank_offset)
    x[:, -128:] = torch.arange(num_tokens).to(torch.bfloat16).view(-1, 1)
    scores = torch.randn((num_tokens, num_experts), dtype=torch.float32).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=True)[1]
    topk_weights = torch.randn((num_tokens, num_topk), dtype=torch.float32).abs()
    for _ in range(3):
        topk_idx[random.randint(0, num_tokens - 1), random.randint(0, num_topk - 1)] = -1
    # DeepEP gathers into one tensor (NCCL); gloo gathers into a list.
    gathered = [torch.empty_like(topk_idx) for _ in range(world)]
    dist.all_gather(gathered, topk_idx)
    all_topk_idx = torch.stack(gathered)
    mask_status = torch.zeros((world,), dtype=torch.int)
    expected: set[int] = set()
    seen: dict[str, list[int]] = {}

    def fails(api: str) -> bool:
        if rank in expected:
            return True
        expected.add(failing[api])
        return failing[api] == rank

    def query(api: str) -> None:
        buffer.low_latency_query_mask_buffer(mask_status)
        got = set(mask_status.nonzero().squeeze(-1).tolist())
        assert got == expected, f"after {api}: masked {got}, expected {expected}"
        seen.setdefault(api, sorted(got))

    calls = 0
    for return_recv_hook in (False, True):
        for use_fp8 in (False, True):
            if fails("dispatch"):
                break
            cumulative = torch.zeros((num_local_experts,), dtype=torch.int)
            packed_recv_x, packed_recv_count, handle, event, hook = buffer.low_latency_dispatch(
                x,
                topk_idx,
                num_tokens,
                num_experts,
                use_fp8=use_fp8,
                cumulative_local_expert_recv_stats=cumulative,
                async_finish=not return_recv_hook,
                return_recv_hook=return_recv_hook,
            )
            hook() if return_recv_hook else event.current_stream_wait()
            calls += 1
            query("dispatch")
            if use_fp8:
                packed_recv_x = (packed_recv_x[0], packed_recv_x[1].contiguous())
                simulated_gemm_x = per_token_cast_back(
                    packed_recv_x[0].view(-1, hidden), packed_recv_x[1].view(-1, hidden // 128)
                ).view(packed_recv_x[0].shape)
            else:
                simulated_gemm_x = packed_recv_x.clone()
            for i in range(num_local_experts):
                expert_id = rank * num_local_experts + i
                recv_x = per_token_cast_back(packed_recv_x[0][i], packed_recv_x[1][i]) if use_fp8 else packed_recv_x[i]
                recv_count, recv_src_info, recv_layout_range = packed_recv_count[i], handle[0][i], handle[1][i]
                int_mask = (2**32) - 1
                n = recv_count.item()
                assert cumulative[i].item() == n
                assert n == (recv_layout_range & int_mask).sum().item()
                want = (all_topk_idx == expert_id).sum(dim=[1, 2])[mask_status == 0].sum().item()
                assert n == want, f"expert {expert_id}: {n} tokens, {want} from ranks not masked"
                if n == 0:
                    continue
                recv_x = recv_x[:n]
                recv_x_amin = recv_x[:, :-128].amin(dim=-1)
                assert torch.equal(recv_x_amin, recv_x[:, :-128].amax(dim=-1))
                assert (recv_x[:, -128:] - recv_src_info[:n].view(-1, 1) % num_tokens).sum().item() == 0
                for j in range(world):
                    if mask_status[j]:
                        continue
                    begin, count = (recv_layout_range[j] >> 32).item(), (recv_layout_range[j] & int_mask).item()
                    assert (recv_x_amin == j - rank_offset).sum().item() == (all_topk_idx[j] == expert_id).sum().item()
                    assert (recv_x[begin : begin + count, :-128] - j + rank_offset).sum().item() == 0
            if fails("combine"):
                break
            combined_x, event, hook = buffer.low_latency_combine(
                simulated_gemm_x,
                topk_idx,
                topk_weights,
                handle,
                async_finish=not return_recv_hook,
                return_recv_hook=return_recv_hook,
            )
            hook() if return_recv_hook else event.current_stream_wait()
            calls += 1
            query("combine")
            owner = torch.arange(num_experts) // num_local_experts
            failed_owner = (mask_status == 1).index_select(0, owner)
            valid = topk_idx >= 0
            failed = torch.zeros_like(topk_idx, dtype=torch.bool)
            failed[valid] = failed_owner.index_select(0, topk_idx[valid])
            topk_idx[failed] = -1
            ref = x * topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1).view(-1, 1)
            assert torch.isnan(combined_x).sum().item() == 0
            diff = calc_diff(ref, combined_x)
            assert diff < (9e-4 if use_fp8 else 1e-5), f"combine differs: {diff=}, {use_fp8=}"
            if fails("clean"):
                break
            buffer.clean_low_latency_buffer(num_tokens, hidden, num_experts)
            calls += 1
            query("clean")
    if linger and rank in failing.values():
        dist.barrier()  # silent until the survivors are done
        buffer.destroy()
    else:
        buffer.destroy()
        dist.barrier()
    return dict(calls=calls, seen=seen)


def elastic_test_ep(rank: int, world: int, num_nodes: int, seed: int) -> dict[str, Any]:
    """DeepEP 2's `tests/elastic/test_ep.py` sequence on CPU: gate scores from
    `deep_ep.utils.gate`, an `ElasticBuffer` dispatch (bf16 and FP8, flat, expanded, cached)
    checked against `deep_ep.utils.refs.dispatch`, and its combine of
    `generate_pre_combine_data` rows against `refs.combine`, bitwise."""
    deep_ep = _opt_in(world // num_nodes)
    from deep_ep.utils.envs import init_seed
    from deep_ep.utils.gate import get_unbalanced_scores
    from deep_ep.utils.math import per_token_cast_back, per_token_cast_to_fp8
    from deep_ep.utils.refs import combine as ref_combine
    from deep_ep.utils.refs import dispatch as ref_dispatch
    from deep_ep.utils.refs import generate_pre_combine_data, ordered_accumulate

    init_seed(seed)
    max_tokens, hidden, num_topk, num_experts = 12, 256, 4, 4 * world
    num_tokens = max(1, max_tokens - rank)
    buffer = deep_ep.ElasticBuffer(
        dist.group.WORLD, num_max_tokens_per_rank=max_tokens, hidden=hidden, num_topk=num_topk, explicitly_destroy=True
    )
    scaleout, scaleup = buffer.get_logical_domain_size()
    scores = get_unbalanced_scores(num_tokens, num_experts, buffer.num_ranks, num_topk, 2.0, True)
    topk_weights, topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=False)
    topk_idx = topk_idx.to(deep_ep.topk_idx_t)
    topk_idx[0, -1] = -1  # a masked lane, as test_ep's `masked_ratio`
    topk_weights.masked_fill_(topk_idx < 0, 0)
    checked = []
    for use_fp8 in (False, True):
        x = torch.randn((num_tokens, hidden), dtype=torch.bfloat16)
        x_in = per_token_cast_to_fp8(x) if use_fp8 else x
        ref_recv_x, ref_recv_idx, ref_recv_w, ref_src, _ = ref_dispatch(
            x_in, topk_idx, topk_weights, max_tokens, num_experts
        )
        bias = torch.randn((num_tokens, hidden), dtype=torch.bfloat16)
        ref_y = generate_pre_combine_data(rank * max_tokens + torch.arange(num_tokens), max_tokens, num_topk, hidden)
        ref_y[topk_idx == -1] = 0
        ref_combined = ref_combine(ref_y, topk_idx, scaleout, scaleup, num_experts, bias, True, False)

        args = dict(
            x=x_in,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_max_tokens_per_rank=max_tokens,
            num_experts=num_experts,
            expert_alignment=1,
            do_cpu_sync=True,
        )
        recv_x, recv_idx, recv_w, handle, _ = buffer.dispatch(**args)
        n = handle.psum_num_recv_tokens_per_scaleup_rank[-1].item()
        src = handle.recv_src_metadata[:n, 0]
        # The rows arrive in a source order of their own: sort both by global token index.
        order = torch.sort(src).indices
        got_x = per_token_cast_back(*recv_x) if use_fp8 else recv_x
        ref_x = per_token_cast_back(*ref_recv_x) if use_fp8 else ref_recv_x
        ok = torch.equal(torch.sort(src).values, ref_src) and torch.equal(got_x[:n][order], ref_x)
        ok &= torch.equal(recv_idx[:n][order], ref_recv_idx) and torch.equal(recv_w[:n][order], ref_recv_w)

        cached_x, cached_idx, _, _, _ = buffer.dispatch(x=x_in, handle=handle)
        ok &= torch.equal(per_token_cast_back(*cached_x) if use_fp8 else cached_x, got_x)

        # Each expert rank sums its lanes of a token first (ordered_accumulate), then combine.
        local_y = generate_pre_combine_data(src, max_tokens, num_topk, hidden)
        local_y[recv_idx[:n] == -1] = 0
        combine_in = torch.zeros((recv_x[0] if use_fp8 else recv_x).shape[0], hidden, dtype=torch.bfloat16)
        combine_in[:n] = ordered_accumulate(local_y)
        combined, combined_w, _ = buffer.combine(combine_in, handle, topk_weights=recv_w, bias=bias)
        ok &= torch.equal(combined, ref_combined) and torch.equal(combined_w, topk_weights)

        # Expanded: one row per (token, local expert), combined after a per-rank reduction.
        ex_args = dict(args, do_expand=True, use_tma_aligned_col_major_sf=True)
        ex_x, _, _, ex_handle, _ = buffer.dispatch(**ex_args)
        slots = ex_handle.recv_src_metadata[:n, 2:]
        ex_src = ex_handle.recv_src_metadata[:n, 0]
        ex_y = generate_pre_combine_data(ex_src, max_tokens, num_topk, hidden)
        ex_in = torch.empty(((ex_x[0] if use_fp8 else ex_x).shape[0] + 1, hidden), dtype=torch.bfloat16)
        ex_in[slots.flatten()] = ex_y.view(-1, hidden)
        ex_combined, _, _ = buffer.combine(ex_in[:-1], ex_handle, bias=bias)
        ok &= torch.equal(ex_combined, ref_combined)
        checked.append(bool(ok))
    buffer.destroy()
    return dict(checked=checked, domains=(scaleout, scaleup))
