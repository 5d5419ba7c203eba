"""The cost model (`python -m dualcomm.plan`): its per-link token counts equal a brute-force
count over every (source, token, destination) written here, two-hop never sends more over
the network than a flat all-to-all, the gate keeps to its node limit, and the command writes
its table, JSON and picture."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dualcomm.plan import Link, Scenario, gate, predict, traffic


@pytest.mark.parametrize("nodes,rpn", [(2, 2), (3, 2), (1, 4)])
def test_link_counts_equal_a_brute_force_count(nodes, rpn):
    s = Scenario(nodes, rpn, tokens=12, hidden=8, topk=3, experts=4 * nodes * rpn, node_limit=2)
    t = traffic(s, seed=5)
    w = s.world
    rdma_out, rdma_in, nvl_out, nvl_in = (np.zeros(w, dtype=np.int64) for _ in range(4))
    flat_net = np.zeros(w, dtype=np.int64)
    epr = s.experts // w
    for src in range(w):
        idx = gate(s, src, 5)
        for row in idx.tolist():
            dests = sorted({e // epr for e in row if e >= 0})
            for n in sorted({d // rpn for d in dests}):
                if n == src // rpn:
                    for d in dests:
                        if d // rpn == n and d != src:
                            nvl_out[src] += 1
                            nvl_in[d] += 1
                    continue
                fwd = n * rpn + src % rpn
                rdma_out[src] += 1
                rdma_in[fwd] += 1
                for d in dests:
                    if d // rpn == n:
                        flat_net[src] += 1
                        if d != fwd:
                            nvl_out[fwd] += 1
                            nvl_in[d] += 1
    assert np.array_equal(t.rdma_out, rdma_out) and np.array_equal(t.rdma_in, rdma_in)
    assert np.array_equal(t.nvl_out, nvl_out) and np.array_equal(t.nvl_in, nvl_in)
    assert np.array_equal(t.flat_net_out, flat_net)
    assert (t.rdma_out <= t.flat_net_out).all()


def test_gate_keeps_to_the_node_limit():
    s = Scenario(8, 2, tokens=64, topk=8, experts=64, node_limit=3)
    idx = gate(s, 0, 1)
    nodes_per_token = [len({e // 8 for e in row}) for row in idx.tolist()]
    assert max(nodes_per_token) <= 3 and idx.shape == (64, 8)


def test_prediction_is_the_busiest_link_plus_latency():
    s = Scenario(2, 2, tokens=16, hidden=100, topk=2, experts=8, node_limit=2)
    t = traffic(s)
    nic, nvl = Link(10.0, 5.0), Link(1e9, 0.0)  # NVLink free: the network decides
    p = predict(s, t, nic, nvl, 2.0)
    busiest = max(t.rdma_out.max(), t.rdma_in.max()) * 100 * 2
    assert p.time_us == pytest.approx(busiest / 10e9 * 1e6 + 5.0)
    assert predict(s, t, nic, nvl, 2.0, two_hop=False).time_us >= p.time_us


def test_the_command_writes_table_json_and_picture(tmp_path):
    out = tmp_path / "plan"
    done = subprocess.run(
        [sys.executable, "-m", "dualcomm.plan", "--configs", "1x4,2x4", "--tokens", "256", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "2x4" in done.stdout and "model/DeepEP" in done.stdout
    rows = json.loads((out / "plan.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"dispatch", "combine"} and len(rows) == 4
    assert (out / "plan.png").stat().st_size > 1000
