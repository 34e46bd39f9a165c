"""Processes that use SyncBatchNorm over Gloo exit cleanly, and the suite would notice if not.

A tensor that Python drops while Gloo's worker thread still holds it is freed by that
thread, which then needs the GIL; during interpreter shutdown that aborts the process
(SIGABRT). `TorchComm` therefore hands the backend only buffers it owns. Gloo groups
still open at interpreter shutdown abort the same way, so syncbn destroys them at exit.
The first test checks the buffer rule directly, for every collective the layer issues; the
second runs a user's script many times, with and without destroy_process_group, and
checks every exit code; the last shows that the suite's spawn helper sees such a crash.
"""

from __future__ import annotations

import os
import signal
import sys
import weakref
from multiprocessing import util

import pytest
import torch
import torch.distributed as dist
from cases import CHANNELS
from distributed import run_distributed
from processes import run_command
from torch.multiprocessing import ProcessExitedException

from syncbn import SyncBatchNorm, debug

pytestmark = pytest.mark.distributed


def collective_tensors_outlive_calls(rank, world, group=None):
    handed = []
    all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        handed.append(weakref.ref(tensor))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording_all_reduce
    bn = SyncBatchNorm(CHANNELS, process_group=group)
    try:
        os.environ["SYNCBN_DEBUG"] = "1"  # the debug check is a collective too
        debug.refresh()
        bn(torch.randn(3, CHANNELS, 4, requires_grad=True)).sum().backward()
        del os.environ["SYNCBN_DEBUG"]
        debug.refresh()
        bad = torch.randn(3) if rank == 0 else torch.randn(3, CHANNELS, 4)
        with pytest.raises(ValueError if rank == 0 else RuntimeError):  # the reject path
            bn(bad)
    finally:
        dist.all_reduce = all_reduce
        os.environ.pop("SYNCBN_DEBUG", None)
        debug.refresh()
    assert len(handed) == 4  # debug check, forward, backward, reject
    dead = [i for i, ref in enumerate(handed) if ref() is None]
    assert not dead, f"collectives {dead} of {len(handed)} got tensors that Python has since freed"


def test_collective_tensors_outlive_the_call(tmp_path):
    run_distributed(collective_tensors_outlive_calls, 2, tmp_path)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ending", ["destroy", "keep"])
def test_scripts_exit_cleanly(tmp_path, ending):
    """20 runs of a 2-rank script: every process exits 0, with or without destroy_process_group."""
    run_command([sys.executable, "tests/exit_script.py", "--runs", "20", str(tmp_path), ending], timeout=280)


def abort_at_exit(rank, world, group=None):
    if rank == 1:
        # Runs as the worker process exits, after this function has returned.
        util.Finalize(None, os.kill, args=(os.getpid(), signal.SIGABRT), exitpriority=0)


def test_run_distributed_reports_a_crash_at_exit(tmp_path):
    with pytest.raises(ProcessExitedException, match="SIGABRT"):
        run_distributed(abort_at_exit, 2, tmp_path)
