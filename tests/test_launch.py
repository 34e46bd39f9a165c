"""The launch layer: launcher discovery, and the demo through torchrun and mpiexec."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from syncbn.placement import Placement, discover

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}, Placement(3, 1, 8, "torchrun")),
        (
            {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "6"},
            Placement(5, 1, 6, "openmpi"),
        ),
        ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, Placement(2, 0, 4, "mpich")),
        ({"PMI_RANK": "2", "PMI_SIZE": "4"}, Placement(2, 2, 4, "mpich")),
        ({"SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16"}, Placement(7, 3, 16, "slurm")),
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "9", "SLURM_NTASKS": "16"}, Placement(1, 1, 2, "torchrun")),
        ({}, Placement(0, 0, 1, "none")),
    ],
)
def test_discover(env, expected):
    assert discover(env) == expected


def _run(command, timeout=240, **env):
    environ = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environ)
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.distributed
def test_demo_through_torchrun_with_checkpoint_resume(tmp_path):
    checkpoint = tmp_path / "digits.pt"
    first = _run(["bash", "launch/torchrun.sh", "2", "--epochs", "1", "--checkpoint", str(checkpoint)])
    assert "epoch  1" in first and checkpoint.exists()
    second = _run(["bash", "launch/torchrun.sh", "2", "--epochs", "2", "--checkpoint", str(checkpoint), "--resume"])
    assert "resumed from" in second and "epoch  2" in second and "epoch  1 " not in second
    assert second.rstrip().endswith("running stats differ across ranks by 0")


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec", path=f"{BIN}{os.pathsep}{os.environ['PATH']}") is None, reason="no mpiexec")
def test_demo_through_mpirun():
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    out = _run(["bash", "launch/mpirun.sh", "2", "--epochs", "2"])
    assert "via MPIComm" in out and out.rstrip().endswith("running stats differ across ranks by 0")
