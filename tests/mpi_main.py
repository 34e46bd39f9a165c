"""Entry point for tests under a real mpiexec: each rank runs the named test workers.

    mpiexec -n W python tests/mpi_main.py '[["module", "function", [args...]], ...]'

Every worker gets ``(rank, world, *args, group=MPI.COMM_WORLD)``: the same bodies the Gloo
tests run, bound to an MPI communicator. A failing rank prints its traceback and aborts
the job, so its peers never wait for it.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    for module, function, args in json.loads(sys.argv[1]):
        try:
            getattr(importlib.import_module(module), function)(comm.rank, comm.size, *args, group=comm)
        except BaseException:
            print(f"rank {comm.rank}: {module}.{function}{tuple(args)} failed", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
        comm.Barrier()
        if comm.rank == 0:
            print(f"ok {module}.{function}{tuple(args)} on {comm.size} ranks", flush=True)


if __name__ == "__main__":
    main()
