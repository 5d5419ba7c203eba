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
