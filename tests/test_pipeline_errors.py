"""Bad configurations and arguments of the pipeline schedules, the model and the trainer:
clear errors that name the argument, raised on every rank (no rank is left waiting)."""

from __future__ import annotations

import subprocess
import sys

import pipeline_workers as pw
import pytest

from dualcomm.launch import run_world
from dualcomm.model import ExpertParallel, MoEConfig


def test_schedule_errors_name_the_argument_on_every_rank() -> None:
    seen = run_world(pw.error_cases, 2, None, timeout=60)
    for cases in seen:
        assert cases["not configured"].startswith("RuntimeError: call set_p2p_tensor_shapes"), cases
        assert cases["three modules"].startswith("ValueError: modules: expected 2 stage modules"), cases
        assert "even number of pipeline ranks, got 1" in cases["odd pipeline"], cases
        assert cases["bad mapping"].startswith("ValueError: rank_mapping: expected a permutation"), cases
        assert "num_chunks: DualPipe needs an even number" in cases["odd chunks"] and "got 5" in cases["odd chunks"]
        assert "(>= 4 here), got 2" in cases["few chunks"], cases
        assert cases["no criterion"].startswith("ValueError: criterion:"), cases
        assert cases["no inputs"].startswith("ValueError: inputs:"), cases
        assert "inputs[0]: expected dimension 0 (batch_dim) to split into 2" in cases["uneven batch"], cases
        assert cases["one shape"].startswith("TypeError: shapes: expected a list of shapes"), cases
        assert "DualPipeV needs at least 2 x pipeline ranks" in cases["v few chunks"], cases
        assert cases["good"] == "no error", cases
        assert cases["stage raises"] == "ValueError: stage exploded", cases
        assert cases["after failure"].startswith("RuntimeError: step: an earlier step failed mid-way"), cases
    # DualPipeV: rank 0 lacks its inputs; rank 1's arguments are fine but it fails as well.
    assert seen[0]["v no inputs"].startswith("ValueError: inputs: pipeline rank 0"), seen[0]
    assert (
        seen[1]["v no inputs"]
        == "RuntimeError: step: pipeline rank(s) [0] rejected their arguments (see the error there)"
    )


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(hidden=30, heads=4), "hidden: expected a multiple of heads (4), got 30"),
        (dict(num_experts=6, expert_groups=4), "expert_groups: expected a divisor of num_experts (6), got 4"),
        (dict(max_groups=3, expert_groups=2), "max_groups: expected at most expert_groups (2), got 3"),
        (dict(top_k=5, num_experts=8, expert_groups=2, max_groups=1), "top_k: expected at most"),
        (dict(num_layers=0), "num_layers: expected a positive int, got 0"),
        (dict(route_scale=-1.0), "route_scale: expected a positive number"),
    ],
)
def test_model_config_errors(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        MoEConfig(**kwargs)
    assert needle in str(e.value)


def test_expert_parallel_needs_divisible_experts() -> None:
    class FakeBuffer:
        group_size, rank = 3, 0

    with pytest.raises(ValueError, match=r"num_experts: expected a multiple of the expert-parallel size \(3\), got 8"):
        ExpertParallel(FakeBuffer(), 8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--schedule", "dualpipe", "--pp", "3"], "--pp: DualPipe needs an even number of pipeline ranks, got 3"),
        (["--ep", "4", "--ranks-per-node", "3"], "--ranks-per-node: expected a divisor of --ep (4), got 3"),
        (["--experts", "6", "--ep", "4"], "--experts: expected a multiple of --ep (4), got 6"),
        (["--layers", "3"], "--layers: expected a multiple of the 4 pipeline stages of dualpipev, got 3"),
        (["--num-chunks", "2"], "--num-chunks: DualPipeV needs at least 2 x pp (4), got 2"),
        (["--steps", "0"], "expected a positive int, got 0"),
    ],
)
def test_train_cli_rejects_bad_flags(argv: list[str], needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dualcomm.train", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr, proc.stderr
