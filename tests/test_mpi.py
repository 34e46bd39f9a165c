"""The Gloo test bodies again, under a real ``mpiexec`` with an mpi4py communicator."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from processes import PATH, run_command

mpi4py = pytest.importorskip("mpi4py", reason="the mpi extra is not installed (pip install .[mpi])")
MPIEXEC = shutil.which("mpiexec", path=PATH)
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install .[mpi] provides one)"),
]
MAIN = Path(__file__).with_name("mpi_main.py")

SPEC = [["test_equivalence", "spec_worker", [dims]] for dims in (2, 3, 4, 5)]
SEMANTICS = [
    ["test_semantics", "empty_global_batch", []],
    ["test_semantics", "one_value_per_channel", []],
    ["test_semantics", "bad_input_on_one_rank", ["channels"]],
    ["test_semantics", "bad_input_on_one_rank", ["dtype"]],
    ["test_semantics", "eval_does_not_communicate", []],
    ["test_semantics", "untracked_eval_syncs", []],
    ["test_semantics", "low_precision", []],
    ["test_semantics", "deep_copy_shares_the_group", []],
    ["test_mpi", "not_a_member", []],
]
RELIABILITY = [
    ["test_reliability", "non_finite_input", []],
    ["test_reliability", "debug_channel_mismatch", []],
    ["test_reliability", "debug_skipped_layer", []],
    ["test_reliability", "debug_mode_passes_matching_calls", []],
]


def mpiexec(world: int, cases: list) -> None:
    """Run ``cases`` on ``world`` MPI ranks; every case must report ok from rank 0."""
    out = run_command([MPIEXEC, "-n", str(world), sys.executable, str(MAIN), json.dumps(cases)], timeout=120)
    finished = [line for line in out.splitlines() if line.startswith("ok ")]
    assert len(finished) == len(cases), out


def not_a_member(rank, world, group):
    import torch
    from mpi4py import MPI

    from syncbn import SyncBatchNorm

    sub = group.Split(MPI.UNDEFINED if rank == 1 else 0)
    if rank == 1:
        with pytest.raises(ValueError, match="expected this process to be a member of process_group"):
            SyncBatchNorm(3, process_group=sub)(torch.randn(4, 3))


@pytest.mark.parametrize("world", [2, 3])
def test_spec_under_mpiexec(world):
    mpiexec(world, SPEC)


@pytest.mark.parametrize("world", [2, 3])
def test_semantics_under_mpiexec(world):
    mpiexec(world, SEMANTICS)


def test_sub_communicators_under_mpiexec():
    mpiexec(4, [["test_semantics", "sub_groups", []]])


def test_reliability_under_mpiexec(tmp_path):
    cases = RELIABILITY + [["test_reliability", "checkpoint_resume", [str(tmp_path)]]]
    mpiexec(2, cases)
