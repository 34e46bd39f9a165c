"""`run_distributed`: run a function on W real Gloo processes and surface their failures.

Each worker joins a process group through a FileStore in the test's tmp_path, so parallel
tests never race for ports. A worker's exception is re-raised in the parent with its
traceback; a worker that dies (a non-zero exit code or a signal, even after its function
has returned) fails the test; a worker that hangs fails it after ``timeout`` seconds. Workers
leave through ``os._exit`` and so skip interpreter shutdown: crashes at a script's exit are
what ``exit_script.py`` and ``test_exit.py`` look for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from syncbn import kernels

PG_TIMEOUT = timedelta(seconds=60)


def _worker(rank: int, fn: Callable[..., Any], world_size: int, store: str, args: tuple) -> None:
    torch.set_num_threads(1)
    # Load the CPU kernels before joining, so that a slow load never runs out a peer's timeout.
    kernels.available()
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size, timeout=PG_TIMEOUT
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any, timeout: float = 90) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned Gloo ranks."""
    # Ranks fork from a server that has imported torch once, instead of importing it each.
    mp.set_forkserver_preload(["torch", "torch.distributed", "syncbn"])
    context = mp.start_processes(
        _worker,
        args=(fn, world_size, str(tmp_path / "filestore"), args),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"a distributed test did not finish within {timeout:.0f} s (a rank hangs)")
