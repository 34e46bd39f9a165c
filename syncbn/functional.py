"""Synchronized batch normalization as one autograd Function: the math and nothing else.

Forward: each rank computes its local count, mean and biased variance with torch's own
two-pass kernel, packs (n, Σx, Σx²) as 2C+1 float64 numbers and sums them across the
group in one all-reduce. Float64 keeps E[x²]−E[x]² exact to about 1e-16·(mean/std)²
relative, far below float32 rounding for any data float32 can hold. The output is one
fused eval-mode batch-norm pass with the global mean and variance.

Backward: one all-reduce of the 2C numbers (Σdy, Σdy·x̂), then
dx = w·invstd·(dy − Σdy/n − x̂·Σdy·x̂/n), the exact gradient of the global-batch
computation. Weight and bias gradients stay local: DDP averages them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .comm import Communicator

__all__ = ["sync_batch_norm", "reject_collectively"]

_HALF = (torch.float16, torch.bfloat16)


def _acc_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype the per-channel statistics and parameters are applied in: at least float32."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _broadcast_shape(input: torch.Tensor) -> tuple[int, ...]:
    return (1, input.size(1)) + (1,) * (input.dim() - 2)


def _local_moments(input: torch.Tensor) -> torch.Tensor:
    """This rank's (n, Σx, Σx²) per channel, packed as 2C+1 float64 numbers."""
    channels = input.size(1)
    n = input.numel() // channels if channels else 0
    if n == 0:
        # An empty rank still joins the collective, so that its peers are not left waiting.
        return torch.zeros(2 * channels + 1, dtype=torch.float64, device=input.device)
    if input.dtype in _HALF:
        # With float32 buffers the kernel accumulates and returns float32 statistics.
        dummy = torch.zeros(2, channels, dtype=torch.float32, device=input.device)
        mean, var = torch.batch_norm_update_stats(input, dummy[0], dummy[1], 0.0)
    else:
        mean, var = torch.batch_norm_update_stats(input, None, None, 0.0)
    mean, var = mean.double(), var.double()
    count = mean.new_full((1,), n)
    return torch.cat([count, mean * n, (var + mean * mean) * n])


def _update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    count: int,
    mean: torch.Tensor | None,
    var: torch.Tensor | None,
) -> None:
    """Exponential (or, with momentum=None, cumulative) average with the unbiased variance.

    An empty global batch counts as a batch, as in nn.BatchNorm, but moves no average.
    """
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if count == 0:
        return
    factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    unbiased = var * (count / (count - 1))
    running_mean.copy_(mean * factor + running_mean.double() * (1 - factor))
    running_var.copy_(unbiased * factor + running_var.double() * (1 - factor))


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, comm):
        channels = input.size(1)
        moments = _local_moments(input)
        comm.all_reduce_(moments)
        count = moments[0].item()
        if count != count:
            raise RuntimeError("SyncBatchNorm: another rank of the group rejected its input (see its error)")
        count = int(count)
        if count == 1:
            raise ValueError(
                "expected more than 1 value per channel in the global batch when training "
                f"(got 1; this rank's input size {list(input.shape)})"
            )
        mean = var = None
        if count:
            mean = moments[1 : channels + 1] / count
            var = (moments[channels + 1 :] / count - mean * mean).clamp_(min=0)
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, count, mean, var)
        ctx.comm, ctx.eps, ctx.count = comm, eps, count
        if count == 0:
            ctx.save_for_backward(input, None, None, None)
            return torch.empty_like(input)
        acc = _acc_dtype(input)
        mean, var = mean.to(acc), var.to(acc)
        weight = weight.to(acc) if weight is not None else None
        bias = bias.to(acc) if bias is not None else None
        ctx.save_for_backward(input, weight, mean, var)
        return F.batch_norm(input, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, var = ctx.saved_tensors
        channels = input.size(1)
        if input.numel():
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_output, input, weight, mean, var, None, None, False, ctx.eps, [False, True, True]
            )
        else:
            sum_dy_xhat = sum_dy = torch.zeros(channels, dtype=_acc_dtype(input), device=input.device)

        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat]).double()
            ctx.comm.all_reduce_(sums)
            if input.numel():
                grad_input = _grad_input(input, grad_output, weight, mean, var, ctx.eps, sums / ctx.count)
            else:
                grad_input = torch.empty_like(input)
        grad_weight = sum_dy_xhat if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _grad_input(input, grad_output, weight, mean, var, eps, means):
    """dx = a·dy − k·(x − mean) − a·mean(dy), in two fused passes over the data."""
    channels = input.size(1)
    mean_dy, mean_dy_xhat = means[:channels], means[channels:]
    invstd = (var.double() + eps).rsqrt()
    a = invstd if weight is None else invstd * weight.double()
    k = a * invstd * mean_dy_xhat
    acc = mean.dtype
    # Eval-mode batch norm with unit variance and eps=0 is exactly the affine map −k·(x−mean)+c.
    out = F.batch_norm(input, mean, torch.ones_like(mean), (-k).to(acc), (-a * mean_dy).to(acc), False, 0.0, 0.0)
    return out.addcmul_(grad_output, a.to(acc).view(_broadcast_shape(input)))


@torch.compiler.disable
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
) -> torch.Tensor:
    """Batch norm over the union of the batches of every rank of ``comm``.

    Running stats, when given, are updated in place from the global count, mean and
    unbiased variance, identically on every rank. Runs eagerly under torch.compile: the
    collective is a graph break.
    """
    return _SyncBatchNorm.apply(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, comm
    )


def reject_collectively(comm: Communicator, num_features: int, device: torch.device, error: Exception) -> None:
    """Raise ``error`` here, and make every peer raise too instead of waiting forever.

    A rank that rejects its input still joins the forward all-reduce, with a NaN count
    that every peer sees in the sum.
    """
    poison = torch.zeros(2 * num_features + 1, dtype=torch.float64, device=device)
    poison[0] = float("nan")
    comm.all_reduce_(poison)
    raise error
