"""Two hosts without containers: two network namespaces joined by a veth pair.

Each namespace runs ``torchrun --nnodes 2`` with one rank, rendezvous on the first host's
address; both must end with identical running stats equal to a one-process replay. A
second run adds ``tc netem`` delay on the link and reports what it does to a step of
SyncBatchNorm (two collectives). Needs root and iproute2; the namespaces are removed
whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from netns_worker import CHANNELS, global_batch
from processes import ROOT
from torch import nn
from torch.testing import assert_close

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None, reason="needs iproute2 (ip, tc)"),
]
STEPS = 30
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    """Two namespaces, 10.77.0.1 and 10.77.0.2 on a veth pair; yields their (namespace, device)."""
    tag = f"sbn{os.getpid() % 100000}"
    spaces, devices = (f"{tag}a", f"{tag}b"), (f"{tag}va", f"{tag}vb")
    try:
        for space in spaces:
            _ip("netns", "add", space)
    except subprocess.CalledProcessError as error:
        for space in spaces:
            subprocess.run(["ip", "netns", "del", space], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {error.stderr.decode().strip()}")
    try:
        _ip("link", "add", devices[0], "type", "veth", "peer", "name", devices[1])
        for index, (space, device) in enumerate(zip(spaces, devices, strict=True)):
            _ip("link", "set", device, "netns", space)
            _ip("-n", space, "addr", "add", f"10.77.0.{index + 1}/24", "dev", device)
            _ip("-n", space, "link", "set", device, "up")
            _ip("-n", space, "link", "set", "lo", "up")
        yield list(zip(spaces, devices, strict=True))
    finally:
        for space in spaces:
            subprocess.run(["ip", "netns", "del", space], capture_output=True, timeout=30)


def _train(hosts, out: Path, port: int) -> list[dict]:
    out.mkdir()
    processes = []
    for node, (space, device) in enumerate(hosts):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": device, "OMP_NUM_THREADS": "1"}
        command = ["ip", "netns", "exec", space, str(TORCHRUN), "--nnodes", "2", "--node-rank", str(node)]
        command += ["--nproc-per-node", "1", "--master-addr", "10.77.0.1", "--master-port", str(port)]
        command += [str(ROOT / "tests" / "netns_worker.py"), str(out), str(STEPS)]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("a host did not finish within 180 s")
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_hosts_match_one_process(hosts, tmp_path):
    ranks = _train(hosts, tmp_path / "run", 29531)
    reference = nn.BatchNorm2d(CHANNELS).double()
    for step in range(STEPS):
        reference(global_batch(step, 2))
    for result in ranks:
        assert result["running_mean"] == ranks[0]["running_mean"] and result["running_var"] == ranks[0]["running_var"]
        assert_close(torch.tensor(result["running_var"], dtype=torch.float64), reference.running_var)
        assert_close(torch.tensor(result["running_mean"], dtype=torch.float64), reference.running_mean)
    print(f"\nSyncBatchNorm step over two hosts: {statistics.median(ranks[0]['step_s'][5:]) * 1e3:.2f} ms")


def test_link_delay_slows_each_step(hosts, tmp_path):
    plain = _train(hosts, tmp_path / "plain", 29533)
    space, device = hosts[0]
    netem = ["ip", "netns", "exec", space, "tc", "qdisc", "add", "dev", device, "root", "netem", "delay", "1ms"]
    added = subprocess.run(netem, capture_output=True, text=True)
    if added.returncode != 0:
        pytest.skip(f"tc netem is not available on this kernel: {added.stderr.strip()}")
    delayed = _train(hosts, tmp_path / "delayed", 29534)
    plain_ms = statistics.median(plain[0]["step_s"][5:]) * 1e3
    delayed_ms = statistics.median(delayed[0]["step_s"][5:]) * 1e3
    print(f"\nSyncBatchNorm step over two hosts: {plain_ms:.2f} ms; with 1 ms netem delay: {delayed_ms:.2f} ms")
    assert delayed_ms > plain_ms + 1.0, "a 1 ms delay on the link should slow each step by at least 1 ms"
