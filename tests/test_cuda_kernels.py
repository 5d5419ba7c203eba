"""The CUDA kernels on a GPU against the CPU path and plain PyTorch: layout equals the Rust
routing tables, the FP8 cast equals `dualcomm.fp8`, records packed by the GPU are the CPU
protocol's records byte for byte and unpack to the right receive slots, and combine's
fixed-order reduction equals a sequential fp32 sum bit for bit, run after run. Skipped
without a GPU (the sources' compilation is checked everywhere: test_cuda_compile.py)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from dualcomm.fp8 import per_token_cast_to_fp8
from dualcomm.testing import run_loopback

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]

CUDA = Path(__file__).resolve().parent.parent / "cuda"


@pytest.fixture(scope="module")
def kernels():
    from dualcomm.cuda_launch import Kernels

    return Kernels(CUDA)


def _topk(t: int, k: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    return idx.masked_fill(torch.rand(t, k, generator=g) < 0.1, -1)


@pytest.mark.parametrize("nodes,rpn", [(1, 8), (2, 4), (4, 2)])
def test_layout_equals_the_rust_routing(kernels, nodes, rpn):
    world, t, k, e = nodes * rpn, 1000, 8, 64
    idx = _topk(t, k, e, seed=world)
    want = run_loopback(nodes, rpn, lambda b: b.get_dispatch_layout(idx, e) if b.rank == 0 else None)[0]
    dev = idx.cuda()
    per_rank = torch.zeros(world, dtype=torch.int32, device="cuda")
    per_node = torch.zeros(nodes, dtype=torch.int32, device="cuda")
    per_expert = torch.zeros(e, dtype=torch.int32, device="cuda")
    in_rank = torch.empty(t, world, dtype=torch.bool, device="cuda")
    kernels.launch("dualcomm_layout", 8, 128, dev, t, k, e, world, rpn, per_rank, per_node, per_expert, in_rank)
    torch.cuda.synchronize()
    assert torch.equal(per_rank.cpu(), want[0].int())
    if nodes > 1:
        assert torch.equal(per_node.cpu(), want[1].int())
    assert torch.equal(per_expert.cpu(), want[2].int())
    assert torch.equal(in_rank.cpu(), want[3])


@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_cast_equals_the_cpu_cast(kernels, round_scale):
    x = (torch.randn(77, 1024) * torch.logspace(-3, 3, 77).unsqueeze(1)).bfloat16()
    x[3] = 0  # an all-zero token takes the floor scale
    want_data, want_scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    data = torch.empty(77, 1024, dtype=torch.float8_e4m3fn, device="cuda")
    scales = torch.empty(77, 8, dtype=torch.float32, device="cuda")
    kernels.launch("dualcomm_per_token_cast_to_fp8", 16, 256, x.cuda(), 77, 1024, int(round_scale), data, scales)
    torch.cuda.synchronize()
    assert torch.equal(scales.cpu(), want_scales)
    assert torch.equal(data.cpu().view(torch.uint8), want_data.view(torch.uint8))


def _cpu_record(src: int, tok: int, mask: int, sections: list[bytes]) -> bytes:
    return src.to_bytes(4, "little") + tok.to_bytes(4, "little") + mask.to_bytes(16, "little") + b"".join(sections)


def test_records_pack_as_the_cpu_protocol_and_unpack_to_their_slots(kernels):
    from dualcomm.cuda_launch import record_layout

    t, hidden, k, capacity = 40, 96, 3, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t, hidden, generator=g).bfloat16()
    idx = torch.randint(0, 8, (t, k), generator=g)
    w = torch.rand(t, k, generator=g)
    tokens = torch.tensor([1, 4, 5, 9, 17, 22, 30, 39], dtype=torch.int32)
    masks = torch.tensor([[m * 3 + 1, m] for m in range(len(tokens))], dtype=torch.int64)
    xb, rb = hidden * 2, 24 + hidden * 2 + k * 12
    ring = torch.zeros(capacity * rb, dtype=torch.uint8, device="cuda")
    first = 13  # wraps around the ring's end
    layout = record_layout(xb, 0, k)
    kernels.launch(
        "dualcomm_pack_records", 2, 128,
        x.cuda(), None, idx.cuda(), w.cuda(), layout, tokens.cuda(), masks.cuda(), len(tokens), 5,
        ring, ctypes.c_int64(first), capacity,
    )  # fmt: skip
    torch.cuda.synchronize()
    got = ring.cpu().numpy().tobytes()
    for i, tok in enumerate(tokens.tolist()):
        slot = (first + i) % capacity
        lo, hi = masks[i].tolist()
        want = _cpu_record(
            5, tok, lo | hi << 64,
            [x[tok].view(torch.uint8).numpy().tobytes(), idx[tok].numpy().tobytes(), w[tok].numpy().tobytes()],
        )  # fmt: skip
        assert got[slot * rb : (slot + 1) * rb] == want, f"record {i}"

    # Unpack: source 5 owns receive slots from 3 on; its experts 2..5 are local here.
    world = 8
    allowed = torch.zeros(world, dtype=torch.uint8)
    allowed[5] = 1
    prefix = torch.full((world,), 3, dtype=torch.int64)
    count = torch.zeros(world, dtype=torch.int64)
    count[5] = len(tokens)
    src_tokens = torch.full((world,), t, dtype=torch.int64)
    state = torch.zeros(world, 2, dtype=torch.int64, device="cuda")
    n = 3 + len(tokens)
    recv_x = torch.zeros(n, hidden, dtype=torch.bfloat16, device="cuda")
    recv_idx = torch.zeros(n, k, dtype=torch.int64, device="cuda")
    recv_w = torch.zeros(n, k, dtype=torch.float32, device="cuda")
    recv_src = torch.zeros(n, dtype=torch.int32, device="cuda")
    recv_tok = torch.zeros(n, dtype=torch.int32, device="cuda")
    status = torch.zeros(1, dtype=torch.int32, device="cuda")
    kernels.launch(
        "dualcomm_unpack_records", 1, 256,
        ring, ctypes.c_int64(first), capacity, len(tokens), layout, world, allowed.cuda(), prefix.cuda(),
        count.cuda(), src_tokens.cuda(), state, ctypes.c_int64(2), ctypes.c_int64(6),
        recv_x, None, recv_idx, recv_w, recv_src, recv_tok, status,
    )  # fmt: skip
    torch.cuda.synchronize()
    assert int(status) == 0
    assert torch.equal(recv_x[3:].cpu(), x[tokens.long()])
    local = (idx[tokens.long()] >= 2) & (idx[tokens.long()] < 6)
    assert torch.equal(recv_idx[3:].cpu(), torch.where(local, idx[tokens.long()] - 2, -1))
    assert torch.equal(recv_w[3:].cpu(), torch.where(local, w[tokens.long()], 0.0))
    assert recv_src[3:].tolist() == [5] * len(tokens) and recv_tok[3:].tolist() == tokens.tolist()
    assert state[5].tolist() == [len(tokens), tokens[-1].item() + 1]

    # A record out of order is refused (the CPU protocol's SourceOrder), nothing written.
    status.zero_()
    kernels.launch(
        "dualcomm_unpack_records", 1, 256,
        ring, ctypes.c_int64(first), capacity, 1, layout, world, allowed.cuda(), prefix.cuda(),
        count.cuda(), src_tokens.cuda(), state, ctypes.c_int64(2), ctypes.c_int64(6),
        recv_x, None, recv_idx, recv_w, recv_src, recv_tok, status,
    )  # fmt: skip
    torch.cuda.synchronize()
    assert int(status) == 2


def test_combine_reduction_is_the_cpu_sum_bit_for_bit(kernels):
    g = torch.Generator().manual_seed(11)
    counts = torch.randint(0, 6, (300,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    rows = (torch.randn(int(offsets[-1]), 256, generator=g) * 10).bfloat16()
    want = torch.zeros(300, 256)
    for tok in range(300):
        acc = torch.zeros(256)
        for j in range(int(offsets[tok]), int(offsets[tok + 1])):
            acc = acc + rows[j].float()  # fp32, in the staged order
        want[tok] = acc
    out = torch.empty(300, 256, dtype=torch.bfloat16, device="cuda")
    dev_rows, dev_offsets = rows.cuda(), offsets.cuda()
    results = []
    for _ in range(20):
        kernels.launch("dualcomm_combine_reduce", 64, 256, dev_rows, 1, dev_offsets, 300, 256, out, 1)
        torch.cuda.synchronize()
        results.append(out.cpu().clone())
    assert torch.equal(results[0].view(torch.int16), want.bfloat16().view(torch.int16))
    assert all(torch.equal(r.view(torch.int16), results[0].view(torch.int16)) for r in results)
