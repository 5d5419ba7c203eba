#!/usr/bin/env bash
# Builds the verbs device tests (tests/verbs_device.rs and the verbs cases of
# tests/loopback_world.rs) into target/verbs-tests/, for a machine with an RDMA device but no
# Rust toolchain: carry that folder there and `python benches/gpu_check.py` runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/verbs-tests
rm -rf "$out" && mkdir -p "$out"
cargo test --release -p dualcomm-core --test verbs_device --test loopback_world --no-run \
    --message-format=json \
  | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
        print("built", m["target"]["name"], file=sys.stderr)
' "$out"
ls -la "$out"
