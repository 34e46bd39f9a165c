"""Synchronized batch normalization as a function: the fused ops and the two all-reduces.

Forward: each rank's (n, Σx, Σx²) per channel, 2C+1 float64 numbers, summed across the
group in one all-reduce; float64 keeps E[x²]−E[x]² exact to about 1e-16·(mean/std)²
relative, far below float32 rounding for any data float32 can hold. Then one pass
normalizes with the global mean and variance, and the running stats move in place.

Backward (the autograd of `ops.batch_norm`): one all-reduce of the 2C numbers
(Σdy, Σdy·(x − mean)), then dx = w·invstd·(dy − Σdy/n − (x − mean)·invstd²·Σdy·(x − mean)/n),
the exact gradient of the global-batch computation. Weight and bias gradients stay local:
DDP averages them.

Everything here is traceable: torch.compile(model, fullgraph=True) compiles it into the
model's graph, collectives included (see `syncbn.comm.all_reduce`).
"""

from __future__ import annotations

import torch

from . import comm as _comm
from . import ops
from .comm import Communicator

__all__ = ["sync_batch_norm", "reject_collectively"]


def sync_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    comm: Communicator,
    check_finite: bool = False,
) -> torch.Tensor:
    """Batch norm over the union of the batches of every rank of ``comm``.

    Running stats, when given, are updated in place from the global count, mean and
    unbiased variance, identically on every rank. ``check_finite`` raises on every rank,
    before the running stats move, when the global batch holds NaN or Inf.
    """
    if running_mean is not None and num_batches_tracked is None:  # only momentum=None reads it
        num_batches_tracked = torch.zeros((), dtype=torch.long, device=running_mean.device)
    return ops.batch_norm(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, comm, check_finite
    )


def reject_collectively(comm: Communicator, num_features: int, device: torch.device, error: Exception) -> None:
    """Raise ``error`` here, and make every peer raise too instead of waiting forever.

    A rank that rejects its input still joins the forward all-reduce, with a NaN count
    that every peer sees in the sum.
    """
    poison = torch.zeros(2 * num_features + 1, dtype=torch.float64, device=device)
    poison[0] = float("nan")
    _comm.all_reduce(comm, poison)
    raise error
