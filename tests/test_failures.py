"""A rank killed or stalled mid-training: its peers must fail with an error, never hang.

The victim SIGKILLs itself, between steps or inside a forward just before a layer's
collective, after writing the time; or it stalls (sleeps) there without dying. Each
survivor records the time and text of the error it gets. Gloo survivors must raise
within the process-group timeout plus 10 s; under mpiexec, the launcher must end the
whole job within 10 s of a kill.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from processes import PATH, ROOT
from torch import nn

from syncbn import convert_sync_batchnorm, kernels

PG_TIMEOUT_S = 10
VICTIM = 2


def _die(folder: str, stall: bool = False) -> None:
    Path(folder, "killed").write_text(repr(time.time()))
    if stall:
        time.sleep(PG_TIMEOUT_S + 15)
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)


def train_until_a_rank_dies(rank, world, folder, where, group=None):
    """Train a two-layer model; rank VICTIM dies (or stalls) at step 3, between steps or in a forward."""
    torch.set_num_threads(1)
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4)), group)
    if where in ("forward", "stall") and rank == VICTIM:

        def hook(*_):
            if model[1].num_batches_tracked == 3:
                _die(folder, stall=where == "stall")

        model[1].register_forward_pre_hook(hook)
    result = {"error": None}
    try:
        for step in range(8):
            if where == "between" and rank == VICTIM and step == 3:
                _die(folder)
            model(torch.randn(8, 4)).sum().backward()
    except Exception as error:  # noqa: BLE001 - recording whatever the backend raises is the point
        result = {"error": type(error).__name__, "message": str(error)[:500], "at": time.time()}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))


def _gloo_rank(rank, world, store, folder, where):
    kernels.available()  # loaded before joining: the short timeout is for the failure alone
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S)
    )
    train_until_a_rank_dies(rank, world, folder, where)
    # Leave without tearing the broken group down: only the recorded error is under test.
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.parametrize("where", ["between", "forward", "stall"])
def test_gloo_survivors_raise_promptly(tmp_path, where):
    world = 3
    context = mp.get_context("forkserver")
    args = (world, str(tmp_path / "filestore"), str(tmp_path), where)
    processes = [context.Process(target=_gloo_rank, args=(rank, *args)) for rank in range(world)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + PG_TIMEOUT_S + 60
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        process.kill()
    assert not hung, f"ranks {hung} still running {PG_TIMEOUT_S + 60} s after the start"
    killed_at = float((tmp_path / "killed").read_text())
    for rank in range(world):
        if rank == VICTIM:
            continue
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["error"], f"rank {rank} finished training although rank {VICTIM} died"
        waited = result["at"] - killed_at
        print(f"{where}: rank {rank} raised {result['error']} after {waited:.2f} s: {result['message'][:120]}")
        assert waited < PG_TIMEOUT_S + 10, f"rank {rank} took {waited:.1f} s to raise"


@pytest.mark.mpi
@pytest.mark.parametrize("where", ["between", "forward"])
def test_mpiexec_ends_the_job_promptly(tmp_path, where):
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if not mpiexec.exists():
        pytest.skip("no mpiexec beside this Python (pip install .[mpi])")
    case = [["test_failures", "train_until_a_rank_dies", [str(tmp_path), where]]]
    command = [str(mpiexec), "-n", "3", sys.executable, str(ROOT / "tests" / "mpi_main.py"), json.dumps(case)]
    env = {**os.environ, "PATH": PATH, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    ) as process:
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("mpiexec still running 120 s after the start: the job hangs")
    ended = time.time()
    waited = ended - float((tmp_path / "killed").read_text())
    print(f"{where}: mpiexec exited {process.returncode} {waited:.2f} s after the kill")
    assert process.returncode != 0, output
    assert waited < 10, f"mpiexec took {waited:.1f} s to end the job\n{output}"


def test_library_never_unpickles_peer_data():
    """Only tensors cross the wire: no *_object collectives, no pickling mpi4py calls."""
    pickling = re.compile(
        r"_object(_list)?\(|import pickle|pickle\.loads?\(|\.(allreduce|bcast|gather|allgather|scatter|send|recv)\("
    )
    for path in (ROOT / "syncbn").glob("*.py"):
        hits = [line for line in path.read_text().splitlines() if pickling.search(line)]
        assert not hits, f"{path.name}: {hits}"


def test_rendezvous_defaults_to_loopback():
    code = (
        "import os, syncbn.comm as c; c.init('gloo'); "
        "assert os.environ['MASTER_ADDR'] == '127.0.0.1', os.environ['MASTER_ADDR']; c.shutdown()"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR",)}
    env.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "0"})
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)
    assert "--standalone" in (ROOT / "launch" / "torchrun.sh").read_text()
