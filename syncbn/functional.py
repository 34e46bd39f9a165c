"""Synchronized batch normalization as one autograd Function: the math and nothing else.

Forward: each rank packs its local (n, Σx, Σx²) as 2C+1 float64 numbers (one float64
pass of the fused CPU kernel for (N, C, ...) contiguous input; torch's own statistics
kernel otherwise) and sums them across the group in one all-reduce. Float64 keeps
E[x²]−E[x]² exact to about 1e-16·(mean/std)² relative, far below float32 rounding for any
data float32 can hold. The output is one fused eval-mode batch-norm pass with the global
mean and variance.

Backward: one all-reduce of the 2C numbers (Σdy, Σdy·x̂), then
dx = w·invstd·(dy − Σdy/n − x̂·Σdy·x̂/n), the exact gradient of the global-batch
computation, in one fused pass on the CPU (`kernels`). Weight and bias gradients stay
local: DDP averages them.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import kernels
from .comm import Communicator

__all__ = ["sync_batch_norm", "reject_collectively"]

_HALF = (torch.float16, torch.bfloat16)


def _acc_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype the per-channel statistics and parameters are applied in: at least float32."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _local_moments(input: torch.Tensor) -> torch.Tensor:
    """This rank's (n, Σx, Σx²) per channel, packed as 2C+1 float64 numbers."""
    channels = input.size(1)
    n = input.numel() // channels
    if n == 0:
        # An empty rank still joins the collective, so that its peers are not left waiting.
        return torch.zeros(2 * channels + 1, dtype=torch.float64, device=input.device)
    if kernels.moments_usable(input):
        return torch.ops.syncbn.moments(input)
    if input.dtype in _HALF:
        # With float32 buffers the kernel accumulates and returns float32 statistics.
        dummy = torch.zeros(2, channels, dtype=torch.float32, device=input.device)
        mean, var = torch.batch_norm_update_stats(input, dummy[0], dummy[1], 0.0)
    else:
        mean, var = torch.batch_norm_update_stats(input, None, None, 0.0)
    mean = mean.double()
    # E[x²] = var + mean², formed in float64 (addcmul and cat promote var).
    return torch.cat([mean.new_ones(1), mean, torch.addcmul(var, mean, mean)]).mul_(n)


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
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), factor)


def _affine(input: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """alpha·x + beta per channel, in one pass, keeping the input's dtype and memory format.

    Eval-mode batch norm with zero mean and unit variance is exactly this map, and it
    applies float32 coefficients to fp16/bf16 input without a cast. For (N, C) input its
    per-element loop is slow, and a broadcast addcmul is the faster single pass.
    """
    if input.dim() == 2 and input.dtype not in _HALF:
        return torch.addcmul(beta, input, alpha)
    zero, one = alpha.new_zeros(alpha.shape), alpha.new_ones(alpha.shape)
    return torch.batch_norm(input, alpha, beta, zero, one, False, 0.0, 0.0, False)


def _input_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    alpha: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """scale·dy + alpha·(x − mean) + shift per channel: one fused pass on the CPU, else two stock ones."""
    if kernels.usable(input) and grad_output.dtype == input.dtype:
        acc = _acc_dtype(input)
        coefficients = (t.to(acc) for t in (mean, scale, alpha, shift))
        return torch.ops.syncbn.backward_elemt(grad_output, input, *coefficients)
    # alpha·x + (shift − alpha·mean) is one fused multiply-add per element in torch's kernel.
    grad_input = _affine(input, alpha, torch.addcmul(shift, mean, alpha, value=-1))
    return grad_input.addcmul_(grad_output, scale.view((1, -1) + (1,) * (input.dim() - 2)))


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, comm, check_finite
    ):
        channels = input.size(1)
        moments = _local_moments(input)
        comm.all_reduce_(moments)
        count = moments[0].item()
        if count != count:
            raise RuntimeError("SyncBatchNorm: another rank of the group rejected its input (see its error)")
        if check_finite and not torch.isfinite(moments).all():
            bad = (~torch.isfinite(moments[1:].view(2, -1))).any(0).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"expected finite values in the global batch (got NaN or Inf in channels {bad}); "
                "running stats left unchanged"
            )
        count = int(count)
        if count == 1:
            raise ValueError(
                "expected more than 1 value per channel in the global batch when training "
                f"(got 1; this rank's input size {list(input.shape)})"
            )
        ctx.comm, ctx.count = comm, count
        ctx.weight = weight
        if count == 0:
            if running_mean is not None:
                _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, 0, None, None)
            ctx.save_for_backward(input, None, None, None)
            return torch.empty_like(input)
        # var = E[x²] − E[x]², exact enough in float64; clamped, as rounding can dip below 0.
        stats = moments[1:].view(2, channels).div_(count)  # E[x], E[x²]
        mean, square = stats
        square.addcmul_(mean, mean, value=-1).clamp_(min=0)
        mean, var = stats.to(_acc_dtype(input))
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, count, mean, var)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        ctx.save_for_backward(input, mean, invstd, scale)
        return _affine(input, scale, shift)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, mean, invstd, scale = ctx.saved_tensors
        if input.is_cuda and input.numel():
            return _cuda_backward(ctx, grad_output, input, mean, invstd)
        if input.numel():
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_output, input, None, None, None, mean, invstd, True, 0.0, [False, True, True]
            )
        else:
            channels = input.size(1)
            sum_dy_xhat = sum_dy = torch.zeros(channels, dtype=_acc_dtype(input), device=input.device)

        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat]).double()
            ctx.comm.all_reduce_(sums)
            if input.numel():
                # dx = s·dy − s·mean(dy) − s·x̂·mean(dy·x̂) with s = weight·invstd and x̂ = (x−mean)·invstd.
                terms = sums.div_(-ctx.count).to(scale.dtype).view(2, -1).mul_(scale)  # −s·mean(dy), −s·mean(dy·x̂)
                grad_input = _input_grad(grad_output, input, mean, scale, terms[1] * invstd, terms[0])
            else:
                grad_input = torch.empty_like(input)
        grad_weight = sum_dy_xhat if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _cuda_backward(ctx, grad_output, input, mean, invstd):
    """The backward with torch's fused CUDA kernels, as torch.nn.SyncBatchNorm uses them.

    One read of dy and x gives (Σdy, Σdy·(x−mean)); one all-reduce of those 2C numbers in
    float64; one pass writes dx. The stock path's dx takes two passes.
    """
    if not grad_output.is_contiguous(memory_format=torch.channels_last):
        grad_output = grad_output.contiguous()
    weight = None if ctx.weight is None else ctx.weight.to(mean.dtype)
    sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
        grad_output, input, mean, invstd, weight, True, False, False
    )
    grad_input = None
    if ctx.needs_input_grad[0]:
        sums = torch.cat([sum_dy, sum_dy_xmu]).double()
        ctx.comm.all_reduce_(sums)
        global_dy, global_dy_xmu = sums.to(mean.dtype).view(2, -1)
        count = torch.full((1,), ctx.count, dtype=torch.int32, device=input.device)
        grad_input = torch.batch_norm_backward_elemt(
            grad_output, input, mean, invstd, weight, global_dy, global_dy_xmu, count
        )
    grad_weight = (sum_dy_xmu * invstd).to(ctx.weight.dtype) if ctx.needs_input_grad[1] else None
    grad_bias = sum_dy.to(ctx.weight.dtype) if ctx.needs_input_grad[2] else None
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


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
    check_finite: bool = False,
) -> torch.Tensor:
    """Batch norm over the union of the batches of every rank of ``comm``.

    Running stats, when given, are updated in place from the global count, mean and
    unbiased variance, identically on every rank. ``check_finite`` raises on every rank,
    before the running stats move, when the global batch holds NaN or Inf. Runs eagerly
    under torch.compile: the collective is a graph break.
    """
    return _SyncBatchNorm.apply(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, comm, check_finite
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
