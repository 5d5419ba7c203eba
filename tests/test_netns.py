"""Two emulated hosts in separate Linux network namespaces joined by a veth pair: the rdma
tier crosses a real network stack between two addresses. Needs root and iproute2; skipped
with the reason otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mp_worker
import pytest
import torch

import reference as ref

HOSTS = ("10.231.7.1", "10.231.7.2")  # this test's own hosts, inside namespaces it makes


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    tag = f"dc{os.getpid() % 100000}"
    names = (f"{tag}a", f"{tag}b")
    try:
        for n in names:
            _ip("netns", "add", n)
    except (subprocess.CalledProcessError, OSError) as e:
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {e}")
    try:
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for n, dev, host in zip(names, (f"{tag}va", f"{tag}vb"), HOSTS):
            _ip("link", "set", dev, "netns", n)
            _ip("-n", n, "addr", "add", f"{host}/24", "dev", dev)
            _ip("-n", n, "link", "set", dev, "up")
            _ip("-n", n, "link", "set", "lo", "up")
        yield tag
    finally:
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_two_hosts_over_veth(two_hosts: str, tmp_path: Path):
    tag = two_hosts
    params = dict(nodes=2, rpn=1, tokens=[37, 29], hidden=48, k=2, experts=8, dtype=torch.bfloat16, seed=4)
    params_file = tmp_path / "params.pt"
    torch.save(params, params_file)
    worker = Path(mp_worker.__file__)
    port = "29611"
    procs = []
    for rank, (side, host) in enumerate(zip("ab", HOSTS)):
        ns = f"{tag}{side}"
        # gloo picks its interface from the host name, which is the same in both namespaces.
        env = dict(os.environ, DUALCOMM_ADDR=host, GLOO_SOCKET_IFNAME=f"{tag}v{side}", PYTHONPATH=str(worker.parent))
        cmd = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            str(worker),
            str(rank),
            "2",
            port,
            "match",
            str(params_file),
            str(tmp_path),
            HOSTS[0],
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            assert p.returncode == 0, out.decode()[-2000:]
    finally:
        for p in procs:
            p.kill()
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for g in got:
        assert "error" not in g, g
    assert [g["address"].split(":")[0] for g in got] == list(HOSTS)
    inputs = mp_worker._inputs(params)
    for d in range(2):
        assert torch.equal(got[d]["recv_x"], ref.dispatch(inputs, 8, 2, d)[0])
        want = inputs[d].x.float() * got[d]["in_rank"].sum(1, keepdim=True)
        assert torch.equal(got[d]["combined"].float(), want)
    # Every byte between the hosts went over the veth link as rdma traffic.
    assert all(g["stats"]["rdma_payload_bytes"] > 0 and g["stats"]["nvl_payload_bytes"] == 0 for g in got)
