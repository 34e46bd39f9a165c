"""The launch layer: launcher discovery, and the demo through torchrun and mpiexec."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from processes import PATH, run_command

from syncbn.placement import Placement, discover


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


@pytest.mark.distributed
def test_demo_through_torchrun_with_checkpoint_resume(tmp_path):
    checkpoint = tmp_path / "digits.pt"
    first = run_command(["bash", "launch/torchrun.sh", "2", "--epochs", "1", "--checkpoint", str(checkpoint)])
    assert "epoch  1" in first and checkpoint.exists()
    second = run_command(
        ["bash", "launch/torchrun.sh", "2", "--epochs", "2", "--checkpoint", str(checkpoint), "--resume"]
    )
    assert "resumed from" in second and "epoch  2" in second and "epoch  1 " not in second
    assert second.rstrip().endswith("running stats differ across ranks by 0")


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec", path=PATH) is None, reason="no mpiexec on PATH (pip install .[mpi])")
def test_demo_through_mpirun():
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    out = run_command(["bash", "launch/mpirun.sh", "2", "--epochs", "2"])
    assert "via MPIComm" in out and out.rstrip().endswith("running stats differ across ranks by 0")


def test_import_does_not_need_mpi4py():
    code = "import sys, syncbn; assert 'mpi4py' not in sys.modules, 'syncbn imported mpi4py'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
