"""Where this process sits in a job, read from whichever launcher started it.

torchrun, Open MPI, MPICH/Hydra (and Intel MPI) and SLURM each export rank, local rank
and world size under their own names; `discover` reads them in that order, and a
process started by hand is rank 0 of a world of 1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["Placement", "discover"]

# (rank, local rank, world size) variables, one launcher per row, checked in order.
_LAUNCHERS = {
    "torchrun": ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    "mpich": ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    "slurm": ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
}


class Placement(NamedTuple):
    rank: int
    local_rank: int
    world_size: int
    launcher: str


def discover(environ: Mapping[str, str] | None = None) -> Placement:
    """Rank, local rank and world size of this process, and the launcher they came from."""
    env = os.environ if environ is None else environ
    for launcher, (rank, local_rank, size) in _LAUNCHERS.items():
        if rank in env and size in env:
            # Hydra exports MPI_LOCALRANKID only on some versions; fall back to the rank.
            return Placement(int(env[rank]), int(env.get(local_rank, env[rank])), int(env[size]), launcher)
    return Placement(0, 0, 1, "none")
