"""get_dispatch_layout against the plain-PyTorch reference, random and adversarial."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from dualcomm import Buffer
from dualcomm.testing import run_loopback


def _layout_on_rank0(num_nodes: int, rpn: int, topk_idx: torch.Tensor, num_experts: int):
    def body(buf: Buffer):
        return buf.get_dispatch_layout(topk_idx, num_experts)[:4] if buf.rank == 0 else None

    return run_loopback(num_nodes, rpn, body)[0]


def _check(num_nodes, rpn, topk_idx, num_experts):
    per_rank, per_node, per_expert, in_rank = _layout_on_rank0(num_nodes, rpn, topk_idx, num_experts)
    w_rank, w_node, w_expert, w_in = ref.layout(topk_idx, num_experts, num_nodes, rpn)
    assert per_rank.dtype == torch.int32 and per_expert.dtype == torch.int32
    assert in_rank.dtype == torch.bool and list(in_rank.shape) == [topk_idx.shape[0], num_nodes * rpn]
    assert torch.equal(per_rank, w_rank)
    assert torch.equal(per_expert, w_expert)
    assert torch.equal(in_rank, w_in)
    if num_nodes == 1:
        assert per_node is None  # DeepEP returns None inside one node
    else:
        assert per_node.dtype == torch.int32 and torch.equal(per_node, w_node)


@pytest.mark.parametrize("topology", [(1, 1), (1, 4), (2, 2), (4, 2), (3, 3), (8, 8)])
def test_random_routing(topology):
    num_nodes, rpn = topology
    world = num_nodes * rpn
    g = torch.Generator().manual_seed(world)
    idx = torch.randint(-1, 2 * world, (300, 6), generator=g)
    _check(num_nodes, rpn, idx, 2 * world)


def test_all_tokens_to_one_rank():
    idx = torch.tensor([[5, 4]] * 50)  # experts 4, 5 both on rank 2 of 4 (2 experts each)
    _check(2, 2, idx, 8)


def test_no_tokens():
    _check(2, 2, torch.empty(0, 4, dtype=torch.int64), 8)


def test_every_token_masked():
    _check(2, 2, torch.full((20, 3), -1, dtype=torch.int64), 8)


def test_duplicates_of_one_ranks_experts_count_the_rank_once():
    idx = torch.tensor([[0, 1, 1, -1], [2, 3, 0, 1], [7, 6, 7, 6]])
    per_rank, per_node, per_expert, in_rank = _layout_on_rank0(2, 2, idx, 8)
    assert per_rank.tolist() == [2, 1, 0, 1]
    assert per_node.tolist() == [2, 1]
    assert per_expert.tolist() == [2, 2, 1, 1, 0, 0, 1, 1]
    _check(2, 2, idx, 8)


def test_deepseek_v3_shape():
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(512, 256, generator=g).topk(8, dim=1).indices
    _check(8, 8, idx, 256)
