"""`dualcomm-train` end to end: real processes, gloo pipelines, dualcomm all-to-alls over TCP
between emulated nodes. The loss must go down, and every copy of a weight (DualPipe's mirrored
stages, the data-parallel replicas of dense weights) must stay bitwise identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualcomm.train.cli import make_args, parser, run


@pytest.mark.parametrize("schedule", ["dualpipe", "1f1b"])
def test_training_learns_and_keeps_copies_identical(schedule: str) -> None:
    argv = ["--schedule", schedule, "--pp", "2", "--ep", "2", "--ranks-per-node", "1"]
    a = make_args(parser().parse_args([*argv, "--steps", "6", "--hidden", "32", "--layers", "2", "--quiet"]))
    results, m = run(a, timeout=240)
    assert m["loss_last"] < m["loss_first"] - 0.05, m["losses"]
    assert m["bytes"]["rdma_payload_bytes"] > 0

    copies: dict[tuple[str, int | None], list[torch.Tensor]] = {}
    for r in results:
        for key, w in r["weights"].items():
            copies.setdefault(key, []).append(w)
    dense = [k for k in copies if k[1] is None]
    # Each dense weight: (2 mirrored copies under DualPipe) x 2 data-parallel replicas;
    # each slice of routed experts: the mirrored copies only.
    mirrors = 2 if schedule == "dualpipe" else 1
    assert dense and all(len(copies[k]) == 2 * mirrors for k in dense)
    assert all(len(v) == mirrors for k, v in copies.items() if k[1] is not None)
    for key, ws in copies.items():
        for w in ws[1:]:
            assert torch.equal(w, ws[0]), f"copies of {key} diverged"

    t = m["timeline"]
    assert t["comm_s_per_rank_step"] > 0 and 0.0 <= t["comm_hidden_fraction"] <= 1.0
    assert 0.0 <= t["bubble_fraction"] < 1.0 and t["chunk_s"]["F"] > 0 and t["chunk_s"]["B"] > 0


def test_cli_writes_metrics_and_pictures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--schedule", "dualpipev", "--pp", "1", "--ep", "4", "--ranks-per-node", "2", "--steps", "5"]
    proc = subprocess.run(
        [sys.executable, "-m", "dualcomm.train", *argv, "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step 5/5" in proc.stderr  # the progress line
    assert "(went down)" in proc.stdout and "hidden comm" in proc.stdout and "pipeline bubble" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 4 and m["emulated_nodes"] == 2 and len(m["losses"]) == 5
    # Two ranks per node: tokens cross between nodes once, then are forwarded inside the node.
    assert m["bytes"]["rdma_payload_bytes"] > 0 and m["bytes"]["nvl_payload_bytes"] > 0
    for picture in ("timeline.png", "loss.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cuda_device_is_refused_clearly_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU (test_training_on_cuda runs instead)")
    with pytest.raises(ValueError, match="^--device: expected cpu on this machine"):
        make_args(parser().parse_args(["--device", "cuda"]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_training_on_cuda_learns_and_matches_the_cpu_run() -> None:
    """`--device cuda`: stages, activations and all-to-all tensors on the GPU (ranks sharing
    it), pipeline messages through host memory over gloo. The loss goes down, and the first
    steps' losses match the same job on CPU closely (the arithmetic differs, not the data)."""
    argv = ["--schedule", "dualpipev", "--pp", "2", "--ep", "2", "--ranks-per-node", "1", "--steps", "6"]
    argv += ["--hidden", "32", "--layers", "4", "--quiet"]
    _, on_gpu = run(make_args(parser().parse_args([*argv, "--device", "cuda"])), timeout=300)
    _, on_cpu = run(make_args(parser().parse_args(argv)), timeout=300)
    assert on_gpu["loss_last"] < on_gpu["loss_first"] - 0.05, on_gpu["losses"]
    torch.testing.assert_close(
        torch.tensor(on_gpu["losses"][:2]), torch.tensor(on_cpu["losses"][:2]), rtol=1e-3, atol=1e-3
    )
