"""Debug mode: before each synchronized forward, check that every rank is in the same layer.

A rank that calls a different SyncBatchNorm layer (a skipped branch, a different
architecture) would otherwise pair its all-reduce with the wrong layer's: silently wrong
statistics when the channel counts agree, a hang or a garbled message when they do not.
Set ``SYNCBN_DEBUG=1`` (or ``TORCH_DISTRIBUTED_DEBUG=DETAIL``) in the launch environment,
or set it later and call `refresh`, to spend one extra small all-reduce per layer on a
signature of each rank's call, and raise on every rank when they disagree. Debug mode also
turns on the non-finite check (``check_finite=True``).
"""

from __future__ import annotations

import os
import zlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # comm imports this module
    from .comm import Communicator

__all__ = ["enabled", "refresh", "check_peers"]

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_MAX_DIMS = 5


def _from_environment() -> bool:
    return os.environ.get("SYNCBN_DEBUG", "0") not in ("", "0") or (
        os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL"
    )


_enabled = _from_environment()


def enabled() -> bool:
    """Whether debug mode is on: what the environment said when syncbn was imported, or when
    `refresh` last read it."""
    return _enabled


def refresh() -> bool:
    """Read ``SYNCBN_DEBUG`` and ``TORCH_DISTRIBUTED_DEBUG`` again, for a process that sets
    them after importing syncbn, and say whether debug mode is now on.

    Like torch's ``set_debug_level_from_env``: reading the environment at every layer call
    cost 0.04–0.07 ms a call (os.environ.get raises and catches a KeyError for an unset
    name), 3–6% of a small layer's step.
    """
    global _enabled
    _enabled = _from_environment()
    return _enabled


def _signature(name: str, input: torch.Tensor) -> list[float]:
    dims = list(input.shape)[:_MAX_DIMS] + [0] * (_MAX_DIMS - min(input.dim(), _MAX_DIMS))
    dtype = _DTYPES.index(input.dtype) if input.dtype in _DTYPES else -1
    channels = input.size(1) if input.dim() >= 2 else -1
    return [zlib.crc32(name.encode()), channels, dtype, input.dim(), *dims]


def _describe(row: list[float]) -> str:
    ndim = int(row[3])
    shape = tuple(int(d) for d in row[4 : 4 + min(ndim, _MAX_DIMS)])
    dtype = _DTYPES[int(row[2])] if row[2] >= 0 else "non-float"
    return f"input {shape} {dtype}"


def check_peers(comm: Communicator, name: str, input: torch.Tensor) -> None:
    """Raise on every rank unless all ranks are in layer ``name`` with the same C and dtype."""
    mine = _signature(name, input)
    table = torch.zeros(comm.world_size, len(mine), dtype=torch.float64, device=input.device)
    table[comm.rank] = torch.tensor(mine, dtype=torch.float64)
    comm.all_reduce_(table)
    rows = table.cpu().tolist()
    # A rank that has joined (syncbn.join) contributes a row of zeros and takes no part.
    if all(row[:3] == mine[:3] for row in rows if any(row)):
        return
    lines = [
        f"  rank {rank}: "
        + (f"{'this layer' if row[0] == mine[0] else 'another layer'}, {_describe(row)}" if any(row) else "joined")
        for rank, row in enumerate(rows)
    ]
    raise RuntimeError(
        f"SyncBatchNorm debug check failed in layer {name!r} on rank {comm.rank}: the ranks of the group "
        "are not all in the same layer with the same channel count and dtype:\n" + "\n".join(lines)
    )
