"""Real clients of DeepEP's API on dualcomm, unmodified except for the documented opt-in:

- DeepEP's own test semantics (its intranode and internode test bodies' call sequences and
  checks) on loopback worlds and on processes over shared memory and TCP;
- Megatron-Core's flex token dispatcher (`from deep_ep import Buffer`), forward and backward,
  against the same MoE written in plain PyTorch.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import client_workers
import deep_ep_checks as checks
import pytest
import torch

from dualcomm.launch import run_world
from dualcomm.testing import run_loopback

CONFIGS = 2 * 2 * 4 * 2  # previous x async x (bf16, FP8) x (random, rank-valued) x top-k


def _alias():
    import dualcomm.deep_ep

    assert dualcomm.deep_ep.install()
    import deep_ep

    return deep_ep


@pytest.mark.parametrize("topology", [(1, 4), (2, 2), (2, 1)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_deep_ep_test_semantics_on_loopback(topology):
    num_nodes, rpn = topology
    world = num_nodes * rpn
    deep_ep = _alias()
    inputs = checks.make_inputs(world, 24, 256, 4, 4 * world, seed=world)
    passed = run_loopback(num_nodes, rpn, lambda buf: checks.run_rank(deep_ep, buf, inputs, 4 * world, num_nodes))
    assert passed == [CONFIGS] * world


@pytest.mark.parametrize("num_nodes", [1, 2], ids=["1x4-shm", "2x2-shm+tcp"])
def test_deep_ep_test_semantics_across_processes(num_nodes):
    results = run_world(client_workers.deep_ep_semantics, 4, num_nodes, 7, timeout=240)
    assert [r["passed"] for r in results] == [CONFIGS] * 4
    assert {r["transport"] for r in results} == {"shm" if num_nodes == 1 else "shm+tcp"}
    if num_nodes == 2:
        assert all(r["stats"]["rdma_payload_bytes"] > 0 for r in results)


def _megatron_reference(results, world):
    """The same MoE in plain PyTorch on one process: every token's output is the sum over its
    top-k experts of prob * (expert + 1) * x; gradients by autograd."""
    outs, grads_x, grads_logits, per_expert = [], [], [], torch.zeros(2 * world, dtype=torch.int64)
    for r in results:
        x = r["x"].clone().requires_grad_()
        logits = r["logits"].clone().requires_grad_()
        probs = torch.softmax(logits, dim=-1)
        top_p, top_e = probs.topk(3, dim=-1)
        out = x * (top_p * (top_e + 1).float()).sum(1, keepdim=True)
        (out * r["upstream"]).sum().backward()
        outs.append(out.detach())
        grads_x.append(x.grad)
        grads_logits.append(logits.grad)
        per_expert += torch.bincount(top_e.flatten(), minlength=2 * world)
    return outs, grads_x, grads_logits, per_expert.view(world, -1)


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_megatron_flex_dispatcher_runs_unmodified():
    world = 4
    results = run_world(client_workers.megatron_flex_dispatcher, world, 2, 3, timeout=240)
    outs, grads_x, grads_logits, per_expert = _megatron_reference(results, world)
    for r, res in enumerate(results):
        assert res["buffer_transport"] == "shm+tcp" and res["rdma_bytes"] > 0
        assert res["tokens_per_expert"] == per_expert[r].tolist()
        torch.testing.assert_close(res["out"], outs[r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["grad_x"], grads_x[r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["grad_logits"], grads_logits[r], rtol=1e-5, atol=1e-6)


def test_install_never_shadows_a_real_deep_ep(tmp_path):
    """A real `deep_ep` on the path wins over the alias, and install() says so."""
    fake = tmp_path / "deep_ep"
    fake.mkdir()
    (fake / "__init__.py").write_text("REAL = True\n")
    code = textwrap.dedent(
        """
        import dualcomm.deep_ep
        assert dualcomm.deep_ep.install() is False
        import deep_ep
        assert deep_ep.REAL
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_launcher_runs_an_unmodified_script(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from deep_ep import Buffer, Config, EventOverlap, topk_idx_t
            from deep_ep.utils import EventHandle
            assert Buffer.__module__ == "dualcomm.buffer" and topk_idx_t.is_floating_point is not None
            cfg = Buffer.get_dispatch_config(8)
            print(sys.argv[1:], cfg.get_nvl_buffer_size_hint(7168 * 2, 8) > 0, Buffer.capture().event.done)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "dualcomm.deep_ep", str(script), "a", "b"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['a', 'b'] True True"


@pytest.mark.parametrize("linger", [False, True], ids=["failed-ranks-leave", "failed-ranks-stay-silent"])
def test_deep_ep_shrink_test_masks_the_failed_ranks(linger):
    """DeepEP's `--shrink-test`: 6 processes, ranks 1, 3, 5 fail at their first dispatch,
    combine and clean; the survivors go on without them and check every result."""
    world = 6
    worker = client_workers.low_latency_shrink_lingering if linger else client_workers.low_latency_shrink
    results = run_world(worker, world, world, 5, timeout=240)
    for rank in (1, 3, 5):
        assert results[rank]["calls"] == {1: 0, 3: 1, 5: 2}[rank]
    for rank in (0, 2, 4):
        # Every variant ran: 4 dispatches, 4 combines, 4 cleans.
        assert results[rank]["calls"] == 12
        assert results[rank]["seen"] == {"dispatch": [1], "combine": [1, 3], "clean": [1, 3, 5]}
