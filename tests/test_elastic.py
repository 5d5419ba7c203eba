"""DeepEP 2's ElasticBuffer: dispatch (flat and expanded, FP8, cached, worst-case sized) and
combine (flat, expanded with and without reduction at the expert rank, with bias) against a
plain-PyTorch reference of DeepEP 2's layouts and summation order, written here."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from dualcomm import InvalidArgumentError
from dualcomm.elastic import ElasticBuffer, EPHandle
from dualcomm.testing import run_loopback

M, HIDDEN, K, EXPERTS = 12, 128, 4, 16


@dataclass
class RankInputs:
    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor


def make_inputs(world: int, seed: int = 0) -> list[RankInputs]:
    """Rank r has M - r tokens; each picks K distinct experts, some choices masked (-1)."""
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(seed * 100 + r)
        t = M - r
        x = torch.randn(t, HIDDEN, generator=g).bfloat16()
        idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(t)])
        idx[torch.rand(t, K, generator=g) < 0.2] = -1
        # Three experts of rank 0 whose outputs cancel (see SCALES): a sum at the expert rank
        # in another order than lane order rounds differently.
        idx[0] = torch.tensor([0, 1, 2, EXPERTS // world])
        w = torch.rand(t, K, generator=g)
        out.append(RankInputs(x, idx, w))
    return out


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def expected_flat(inputs: list[RankInputs], me: int) -> dict[str, torch.Tensor]:
    """What rank `me` receives, flat: by source rank, then token, each token once."""
    world = len(inputs)
    local = EXPERTS // world
    xs, idxs, ws, meta, per_src = [], [], [], [], []
    for s, inp in enumerate(inputs):
        n_from = 0
        for t in range(inp.x.shape[0]):
            lanes = [j for j in range(K) if inp.idx[t, j] >= 0 and int(inp.idx[t, j]) // local == me]
            if not lanes:
                continue
            n_from += 1
            xs.append(inp.x[t])
            idxs.append(torch.tensor([int(e) - me * local if j in lanes else -1 for j, e in enumerate(inp.idx[t])]))
            ws.append(inp.w[t])
            meta.append([s * M + t, s * K + max(lanes)])
        per_src.append(n_from)
    return {
        "x": torch.stack(xs),
        "idx": torch.stack(idxs),
        "w": torch.stack(ws),
        "meta": torch.tensor(meta, dtype=torch.int32),
        "psum_rank": torch.tensor(per_src).cumsum(0).to(torch.int32),
    }


def expected_counts(inputs: list[RankInputs], me: int) -> torch.Tensor:
    local = EXPERTS // len(inputs)
    counts = torch.zeros(local, dtype=torch.int64)
    for inp in inputs:
        for e in inp.idx[inp.idx >= 0].tolist():
            if e // local == me:
                counts[e - me * local] += 1
    return counts


def expected_expanded(inputs: list[RankInputs], me: int, align: int) -> dict[str, object]:
    """Per local expert, a block starting at a multiple of `align`, in (source rank, token) order."""
    local = EXPERTS // len(inputs)
    counts = expected_counts(inputs, me)
    starts = [sum(_align(int(c), align) for c in counts[:e]) for e in range(local)]
    total = sum(_align(int(c), align) for c in counts)
    x = torch.zeros(total, HIDDEN, dtype=torch.bfloat16)
    w = torch.zeros(total)
    slot_of: dict[tuple[int, int, int], int] = {}  # (source, token, lane) -> row
    for e in range(local):
        row = starts[e]
        for s, inp in enumerate(inputs):
            for t in range(inp.x.shape[0]):
                for j in range(K):
                    if int(inp.idx[t, j]) == me * local + e:
                        x[row], w[row] = inp.x[t], inp.w[t, j]
                        slot_of[(s, t, j)] = row
                        row += 1
    return {"x": x, "w": w, "slot_of": slot_of, "counts": counts, "starts": starts, "total": total}


def _elastic(buf, **kwargs) -> ElasticBuffer:
    return ElasticBuffer(buf.group, num_max_tokens_per_rank=M, hidden=HIDDEN, over=buf, **kwargs)


WORLDS = [(1, 4), (2, 2)]


@pytest.mark.parametrize(("nodes", "rpn"), WORLDS)
def test_flat_dispatch_matches_the_reference_and_a_cached_one_repeats_it(nodes, rpn):
    world = nodes * rpn
    inputs = make_inputs(world, seed=1)

    def body(buf):
        eb = _elastic(buf)
        me = inputs[buf.rank]
        stats = torch.zeros(EXPERTS // world, dtype=torch.int32)
        rx, ridx, rw, handle, event = eb.dispatch(
            me.x, me.idx, me.w, cumulative_local_expert_recv_stats=stats, num_experts=EXPERTS, expert_alignment=4
        )
        want = expected_flat(inputs, buf.rank)
        counts = expected_counts(inputs, buf.rank)
        assert isinstance(handle, EPHandle) and event.event is None
        assert torch.equal(rx, want["x"]) and torch.equal(ridx, want["idx"]) and torch.equal(rw, want["w"])
        assert torch.equal(handle.recv_src_metadata[:, :2], want["meta"])
        assert torch.equal(handle.psum_num_recv_tokens_per_scaleup_rank, want["psum_rank"])
        assert torch.equal(stats, counts.to(torch.int32))
        aligned = [_align(int(c), 4) for c in counts]
        assert handle.num_recv_tokens_per_expert_list == aligned
        assert handle.psum_num_recv_tokens_per_expert.tolist() == torch.tensor(aligned).cumsum(0).tolist()
        assert handle.num_unaligned_recv_tokens_per_expert.tolist() == counts.tolist()
        assert handle.topk_idx.data_ptr() != me.idx.data_ptr() and torch.equal(handle.topk_idx, me.idx)
        cx, cidx, cw, same, _ = eb.dispatch(me.x, topk_weights=me.w, handle=handle)
        assert same is handle and torch.equal(cx, rx) and torch.equal(cidx, ridx) and torch.equal(cw, rw)
        # Without the CPU sync: worst-case rows, the valid ones first.
        wx, _, _, wh, _ = eb.dispatch(me.x, me.idx, num_experts=EXPERTS, do_cpu_sync=False, do_handle_copy=False)
        n = int(wh.psum_num_recv_tokens_per_scaleup_rank[-1])
        assert wx.shape == (M * world, HIDDEN) and torch.equal(wx[:n], want["x"])
        assert wh.num_recv_tokens_per_expert_list == [] and wh.topk_idx is me.idx
        return True

    assert all(run_loopback(nodes, rpn, body))


def test_dst_buffer_slots_name_each_destinations_highest_lane():
    inputs = make_inputs(2, seed=5)

    def body(buf):
        me = inputs[buf.rank]
        _, _, _, handle, _ = _elastic(buf).dispatch(me.x, me.idx, num_experts=EXPERTS)
        want = torch.full((me.x.shape[0], K), -1, dtype=torch.int32)
        local = EXPERTS // 2
        for d in range(2):
            place = 0
            for t in range(me.x.shape[0]):
                lanes = [j for j in range(K) if me.idx[t, j] >= 0 and int(me.idx[t, j]) // local == d]
                if lanes:
                    want[t, max(lanes)] = buf.rank * M + place
                    place += 1
        return torch.equal(handle.dst_buffer_slot_idx, want)

    assert all(run_loopback(1, 2, body))


def test_fp8_dispatch_moves_data_and_scales_with_column_major_scales_when_asked():
    inputs = make_inputs(2, seed=2)

    def body(buf):
        me = inputs[buf.rank]
        data = me.x.float().clamp(-400, 400).to(torch.float8_e4m3fn)
        scales = torch.rand(me.x.shape[0], HIDDEN // 128, generator=torch.Generator().manual_seed(buf.rank))
        eb = _elastic(buf)
        (rd, rs), *_ = eb.dispatch((data, scales), me.idx, num_experts=EXPERTS)
        (ed, es), *_ = eb.dispatch(
            (data, scales), me.idx, num_experts=EXPERTS, do_expand=True, use_tma_aligned_col_major_sf=True
        )
        want = expected_flat(inputs, buf.rank)
        # The scales travel with their tokens: find each received row's source.
        all_scales = [
            torch.rand(inp.x.shape[0], HIDDEN // 128, generator=torch.Generator().manual_seed(r))
            for r, inp in enumerate(inputs)
        ]
        src = want["meta"][:, 0].long()
        want_scales = torch.stack([all_scales[int(g) // M][int(g) % M] for g in src])
        want_data = want["x"].float().clamp(-400, 400).to(torch.float8_e4m3fn)
        ok = torch.equal(rd.view(torch.uint8), want_data.view(torch.uint8)) and torch.equal(rs, want_scales)
        rows = es.shape[0]
        return ok and es.stride() == (1, _align(rows, 4)) and ed.shape == (rows, HIDDEN)

    assert all(run_loopback(1, 2, body))


@pytest.mark.parametrize(("nodes", "rpn"), WORLDS)
@pytest.mark.parametrize("align", [1, 4])
def test_expanded_dispatch_lays_out_per_expert_blocks(nodes, rpn, align):
    world = nodes * rpn
    inputs = make_inputs(world, seed=3)

    def body(buf):
        me = inputs[buf.rank]
        eb = _elastic(buf)
        rx, ridx, rw, handle, _ = eb.dispatch(
            me.x, me.idx, me.w, num_experts=EXPERTS, expert_alignment=align, do_expand=True, do_zero_padding=True
        )
        want = expected_expanded(inputs, buf.rank, align)
        assert ridx is None and torch.equal(rx, want["x"]) and torch.equal(rw, want["w"])
        assert handle.num_expanded_tokens == want["total"]
        starts, counts = want["starts"], want["counts"]
        psum = [starts[e] + int(counts[e]) for e in range(len(starts))]
        assert handle.psum_num_recv_tokens_per_expert.tolist() == psum
        meta = handle.recv_src_metadata
        for row in range(meta.shape[0]):
            g = int(meta[row, 0])
            for j in range(K):
                assert int(meta[row, 2 + j]) == want["slot_of"].get((g // M, g % M, j), -1)
        cx, _, cw, _, _ = eb.dispatch(me.x, topk_weights=me.w, handle=handle, do_expand=True)
        return torch.equal(cx, rx) and torch.equal(cw, rw)

    assert all(run_loopback(nodes, rpn, body))


#: Expert scales of very different sizes and signs: summed in another order than DeepEP's,
#: the fp32 sums round (and cancel) differently, so the order is checked, not only the terms.
SCALES = (2.0**20, -(2.0**20), 1.0, 3.0, 0.5, -7.0)


def _expert_out(x: torch.Tensor, key: int) -> torch.Tensor:
    """What expert (or rank) `key` "computes" in these tests, rounded to bfloat16."""
    return (x.float() * SCALES[key % len(SCALES)] + (x.float() * (key + 1)).sin()).bfloat16()


def _reference_combine(inputs, me, biases, world, mode):
    """Rank `me`'s combined tokens: the bias terms, then lane by lane (fp32) each rank's row
    at the highest lane it owns (flat / reduced) or each expert's row at its lane (unreduced),
    rounded to bfloat16 once."""
    inp = inputs[me]
    local = EXPERTS // world
    out = []
    for t in range(inp.x.shape[0]):
        acc = torch.zeros(HIDDEN)
        for b in biases:
            acc += b[t].float()
        for j in range(K):
            e = int(inp.idx[t, j])
            if e < 0:
                continue
            d = e // local
            owned = [jj for jj in range(K) if inp.idx[t, jj] >= 0 and int(inp.idx[t, jj]) // local == d]
            if mode == "unreduced":
                acc += _expert_out(inp.x[t], e).float()
            elif j == max(owned):
                if mode == "flat":
                    acc += _expert_out(inp.x[t], d).float()
                else:  # the expert rank summed its experts' rows in lane order, rounded once
                    part = torch.zeros(HIDDEN)
                    for jj in owned:
                        part += _expert_out(inp.x[t], int(inp.idx[t, jj])).float()
                    acc += part.bfloat16().float()
        out.append(acc.bfloat16())
    return torch.stack(out)


@pytest.mark.parametrize(("nodes", "rpn"), WORLDS)
@pytest.mark.parametrize("num_bias", [0, 2])
def test_flat_combine_sums_in_deep_eps_order(nodes, rpn, num_bias):
    world = nodes * rpn
    inputs = make_inputs(world, seed=4)
    g = torch.Generator().manual_seed(9)
    biases = [[torch.randn(M - r, HIDDEN, generator=g).bfloat16() for _ in range(num_bias)] for r in range(world)]

    def body(buf):
        me = inputs[buf.rank]
        eb = _elastic(buf)
        rx, _, rw, handle, _ = eb.dispatch(me.x, me.idx, me.w, num_experts=EXPERTS)
        y = _expert_out(rx, buf.rank)
        mine = biases[buf.rank]
        bias = None if not mine else tuple(mine)
        out, out_w, event = eb.combine(y, handle, topk_weights=rw, bias=bias)
        want = _reference_combine(inputs, buf.rank, mine, world, "flat")
        ok = torch.equal(out, want) and event.event is None
        return ok and torch.equal(out_w, torch.where(me.idx >= 0, me.w, torch.zeros_like(me.w)))

    assert all(run_loopback(nodes, rpn, body))


@pytest.mark.parametrize(("nodes", "rpn"), WORLDS)
@pytest.mark.parametrize("reduce", [True, False])
def test_expanded_combine_reduces_at_the_expert_rank_or_sends_each_slot(nodes, rpn, reduce):
    world = nodes * rpn
    inputs = make_inputs(world, seed=6)

    def body(buf):
        me = inputs[buf.rank]
        eb = _elastic(buf, allow_multiple_reduction=reduce)
        local = EXPERTS // world
        rx, _, rw, handle, _ = eb.dispatch(me.x, me.idx, me.w, num_experts=EXPERTS, expert_alignment=4, do_expand=True)
        # Each expert's rows scaled by its own factor (padding rows stay as they are).
        y = rx.clone()
        psum = handle.psum_num_recv_tokens_per_expert.tolist()
        for e in range(local):
            start = _align(psum[e - 1], 4) if e else 0
            y[start : psum[e]] = _expert_out(rx[start : psum[e]], buf.rank * local + e)
        out, out_w, _ = eb.combine(y, handle, topk_weights=rw if reduce else None)
        want = _reference_combine(inputs, buf.rank, [], world, "reduced" if reduce else "unreduced")
        ok = torch.equal(out, want)
        if reduce:
            ok &= torch.equal(out_w, torch.where(me.idx >= 0, me.w, torch.zeros_like(me.w)))
        else:
            ok &= out_w is None
        return ok

    assert all(run_loopback(nodes, rpn, body))


def test_bad_arguments_name_themselves():
    inputs = make_inputs(2)

    def body(buf):
        me = inputs[buf.rank]
        eb = _elastic(buf, explicitly_destroy=True)
        cases = [
            (lambda: eb.dispatch(me.x, me.idx), "^num_experts: expected an int"),
            (lambda: eb.dispatch(me.x, me.idx, num_experts=15), "^num_experts: expected a multiple"),
            (lambda: eb.dispatch(me.x, me.idx.int(), num_experts=EXPERTS), "^topk_idx: expected dtype"),
            (lambda: eb.dispatch(me.x, me.idx + 100, num_experts=EXPERTS), "^topk_idx: expected expert ids"),
            (lambda: eb.dispatch(me.x, me.idx, num_experts=EXPERTS, do_zero_padding=True), "^do_zero_padding"),
            (
                lambda: eb.dispatch(me.x, me.idx, num_experts=EXPERTS, previous_event=eb.capture()),
                "^allocate_on_comm_stream",
            ),
            (lambda: eb.combine(me.x, ("not", "a", "handle")), "^handle: expected an EPHandle"),
            (lambda: ElasticBuffer(buf.group, num_bytes=12345, over=buf), "^num_bytes: expected a multiple"),
            (lambda: ElasticBuffer(buf.group, num_cpu_bytes=1 << 21, over=buf), "^num_cpu_bytes"),
        ]
        twice = me.idx.clone()
        twice[0, :2] = torch.tensor([3, 3])
        cases.append((lambda: eb.dispatch(me.x, twice, num_experts=EXPERTS), "^topk_idx: expected no expert twice"))
        for call, pattern in cases:
            with pytest.raises(InvalidArgumentError, match=pattern):
                call()
        # Every rank refused the same calls locally: the buffer still works.
        _, _, _, handle, _ = eb.dispatch(me.x, me.idx, num_experts=EXPERTS)
        with pytest.raises(InvalidArgumentError, match="^x: expected at least"):
            eb.combine(me.x[:0], handle)
        with pytest.raises(NotImplementedError, match="engram_fetch"):
            eb.engram_fetch(torch.zeros(1, 1, dtype=torch.int32))
        eb.barrier()
        assert eb.get_logical_domain_size() == (1, 2) and eb.get_physical_domain_size() == (1, 2)
        assert ElasticBuffer.get_buffer_size_hint(buf.group, M, HIDDEN) % (2 << 20) == 0
        eb.destroy()
        return True

    assert all(run_loopback(1, 2, body))
