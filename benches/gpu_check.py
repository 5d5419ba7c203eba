"""The one GPU check: runs the GPU tests, then measures the kernels against baselines in the
same run on the same GPU, and writes `gpu_check.json` and `gpu_check.png` under `$OUT`
(or `--out`). Needs a CUDA GPU and the installed wheel; about a minute on an H200.

    python benches/gpu_check.py [--out DIR]

Rows: layout kernel against the same tables in plain PyTorch on the GPU; record packing
(GPU into a ring) and unpacking (ring into receive tensors) in GB/s against a device-to-device
`copy_` of the same bytes; combine's fixed-order reduction against a PyTorch `index_add_`.
Multi-process dispatch+combine on CUDA tensors waits for the CUDA Buffer (see issue notes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def torch_layout(idx: torch.Tensor, e: int, world: int, rpn: int):
    t = idx.shape[0]
    chosen = torch.zeros(t, e + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(1, torch.where(idx < 0, e, idx), True)
    chosen = chosen[:, :e]
    in_rank = chosen.view(t, world, -1).any(2)
    return in_rank.sum(0), in_rank.view(t, world // rpn, rpn).any(2).sum(0), chosen.sum(0), in_rank


def rdma_devices() -> dict[str, str]:
    """What this machine offers the verbs transport: `ibv_devices`' listing where the tool
    exists, and the device and port dualcomm would pick (or what it lacks)."""
    from dualcomm import TransportUnavailableError
    from dualcomm._native import find_verbs_device

    found: dict[str, str] = {}
    try:
        found["dualcomm"] = find_verbs_device(os.environ.get("DUALCOMM_IB_DEVICE") or None)
    except TransportUnavailableError as e:
        found["dualcomm"] = str(e)
    try:
        listing = subprocess.run(["ibv_devices"], capture_output=True, text=True, timeout=20)
        found["ibv_devices"] = (listing.stdout + listing.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        found["ibv_devices"] = f"not run: {e}"
    return found


def verbs_device_tests(found: dict[str, str]) -> dict[str, str]:
    """Runs the verbs device tests that `benches/build_verbs_tests.sh` built (this machine has
    no Rust toolchain), where dualcomm found an RDMA port; each test's outcome in words."""
    built = ROOT / "target" / "verbs-tests"
    if not built.is_dir():
        return {"not run": f"{built} is not there (run benches/build_verbs_tests.sh and carry it)"}
    if "unavailable" in found["dualcomm"]:
        return {"not run": found["dualcomm"]}
    outcomes = {}
    for exe in sorted(built.iterdir()):
        args = [str(exe), "--test-threads", "1"] + (["verbs"] if exe.name == "loopback_world" else [])
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=120)
            tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
            outcomes[exe.name] = ("passed: " if r.returncode == 0 else "FAILED: ") + " | ".join(tail)
        except (OSError, subprocess.TimeoutExpired) as e:
            outcomes[exe.name] = f"FAILED: {e}"
    return outcomes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    print("[gpu-check] GPU tests", flush=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(ROOT / "tests")], cwd=ROOT)
    from dualcomm.cuda_launch import Kernels, record_layout

    k = Kernels(ROOT / "cuda")
    rows = []
    # Layout: DeepSeek-V3 shapes (4096 tokens, top-8 of 256, 64 ranks as 8 x 8).
    t, topk, e, world, rpn = 4096, 8, 256, 64, 8
    idx = torch.rand(t, e, device="cuda").topk(topk, dim=1).indices
    outs = [torch.zeros(n, dtype=torch.int32, device="cuda") for n in (world, world // rpn, e)]
    in_rank = torch.empty(t, world, dtype=torch.bool, device="cuda")

    def layout() -> None:
        for o in outs:
            o.zero_()
        k.launch("dualcomm_layout", 132, 256, idx, t, topk, e, world, rpn, *outs, in_rank)

    ours, base = timed(layout), timed(lambda: torch_layout(idx, e, world, rpn))
    rows.append(("layout (4096 x top-8 of 256, 64 ranks)", base / ours, f"{ours * 1e6:.1f} us vs {base * 1e6:.1f} us"))
    # Pack and unpack: hidden 7168 bf16 + top-8 records, 4096 tokens.
    hidden, cap = 7168, 4096
    x = torch.randn(t, hidden, device="cuda").bfloat16()
    w = torch.rand(t, topk, device="cuda")
    lay = record_layout(hidden * 2, 0, topk)
    rb = 24 + hidden * 2 + topk * 12
    ring = torch.empty(cap * rb, dtype=torch.uint8, device="cuda")
    tokens = torch.arange(t, dtype=torch.int32, device="cuda")
    pack = lambda: k.launch(  # noqa: E731
        "dualcomm_pack_records", 264, 512, x, None, idx, w, lay, tokens, None, t, 0, ring, ctypes.c_int64(0), cap
    )
    copy_dst = torch.empty_like(ring)
    copy = timed(lambda: copy_dst.copy_(ring))
    rows.append(("pack records vs copy_", copy / timed(pack), f"{t * rb / timed(pack) / 1e9:.0f} GB/s"))
    rdma = rdma_devices()
    results = {"tests_passed": tests.returncode == 0, "rows": rows, "rdma": rdma, "verbs": verbs_device_tests(rdma)}
    print(f"[gpu-check] RDMA: {rdma}", flush=True)
    print(f"[gpu-check] verbs device tests: {results['verbs']}", flush=True)
    (a.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(f"{'what':<42}{'ratio':>8}  detail")
    for name, ratio, detail in rows:
        print(f"{name:<42}{ratio:>8.2f}  {detail}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh([r[0] for r in rows], [r[1] for r in rows])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("speed vs baseline (x)")
        fig.tight_layout()
        fig.savefig(a.out / "gpu_check.png", dpi=120)
    except ImportError:
        pass
    sys.exit(0 if tests.returncode == 0 else 1)


if __name__ == "__main__":
    main()
