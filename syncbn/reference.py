"""The stock-op implementation of syncbn's ops: the fallback, CUDA, and the tests' oracle.

Each function keeps the contract of the op of the same name in `syncbn.ops`, with stock
PyTorch ops only. It runs where the C++ kernels do not: on CUDA (through torch's fused CUDA
batch-norm kernels where they exist), and on the CPU when the kernels cannot be built or
``SYNCBN_CPU_KERNELS=0``. The tests compare the C++ kernels against it. The step itself
calls `mean_var` once and then `normalize` and `update_running_averages`, the two halves of
forward_apply and update_running_stats, so that the float64 per-channel math runs once.

Per-rank statistics come from torch's own kernels as float32 (or float64) mean and biased
variance and are packed as float64 (n, n·mean, n·(var + mean²)); summed across ranks, that
is the parallel-variance formula carried out in float64.
"""

from __future__ import annotations

import torch

__all__ = [
    "acc_dtype",
    "per_channel",
    "mean_var",
    "moments",
    "forward_apply",
    "normalize",
    "update_running_stats",
    "update_running_averages",
    "backward_reduce",
    "backward_apply",
]

_HALF = (torch.float16, torch.bfloat16)


def acc_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype per-channel values are applied in: at least float32."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def per_channel(t: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast over ``input``."""
    return t.view((1, -1) + (1,) * (input.dim() - 2))


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


def mean_var(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and biased variance (clamped at 0) from float64 (n, Σx, Σx²)."""
    count, sums = stats.split([1, stats.numel() - 1])
    mean, square = (sums.view(2, -1) / count.clamp(min=1)).unbind()
    return count, mean, torch.addcmul(square, mean, mean, value=-1).clamp_(min=0)


def moments(input: torch.Tensor) -> torch.Tensor:
    channels = input.size(1)
    n = input.numel() // channels
    if n == 0:
        return torch.zeros(2 * channels + 1, dtype=torch.float64, device=input.device)
    if input.dtype in _HALF:
        # With float32 buffers the kernel accumulates and returns float32 statistics.
        dummy = torch.zeros(2, channels, dtype=torch.float32, device=input.device)
        mean, var = torch.batch_norm_update_stats(input, dummy[0], dummy[1], 0.0)
    else:
        mean, var = torch.batch_norm_update_stats(input, None, None, 0.0)
    mean = mean.double()
    # E[x²] = var + mean², formed in float64 (addcmul and cat promote var).
    return torch.cat([mean.new_ones(1), mean, torch.addcmul(var, mean, mean)]).mul_(n)


def forward_apply(input, stats, weight, bias, eps):
    _, mean, var = mean_var(stats)
    return normalize(input, mean, var, weight, bias, eps)


def normalize(input, mean, var, weight, bias, eps):
    """forward_apply from `mean_var`'s float64 mean and variance, which the step shares with
    the running-stat update: on CUDA every small op is a launch."""
    acc = acc_dtype(input)
    invstd = torch.rsqrt(var + eps).to(acc)
    mean = mean.to(acc)
    if input.numel() == 0:
        return torch.empty_like(input), mean, invstd
    if input.is_cuda:  # torch's SyncBatchNorm kernel: one launch, the affine in it
        return torch.batch_norm_elemt(input, weight, bias, mean, invstd, eps), mean, invstd
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
    return _affine(input, scale.to(acc), shift.to(acc)), mean, invstd


def update_running_stats(running_mean, running_var, num_batches_tracked, stats, momentum):
    update_running_averages(running_mean, running_var, num_batches_tracked, *mean_var(stats), momentum)


def update_running_averages(running_mean, running_var, num_batches_tracked, count, mean, var, momentum):
    """update_running_stats from `mean_var`'s count, mean and variance.

    Branch-free, so that a CUDA step never waits for the count: an empty global batch
    counts as a batch but moves the averages by a factor of 0.
    """
    num_batches_tracked.add_(1)
    dtype = running_mean.dtype
    factor = count.gt(0).to(dtype)
    factor = factor.div_(num_batches_tracked) if momentum is None else factor.mul_(momentum)
    running_mean.lerp_(mean.to(dtype), factor)
    running_var.lerp_(var.mul(count / (count - 1).clamp(min=1)).to(dtype), factor)


def backward_reduce(grad_output, input, mean, invstd):
    channels = input.size(1)
    if input.numel() == 0:
        zero = torch.zeros(channels, dtype=mean.dtype, device=input.device)
        return torch.zeros(2 * channels, dtype=torch.float64, device=input.device), zero, zero.clone()
    if input.is_cuda:
        if not grad_output.is_contiguous(memory_format=torch.channels_last):
            grad_output = grad_output.contiguous()
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
            grad_output, input, mean, invstd, None, True, False, False
        )
        grad_weight = sum_dy_xmu * invstd
    else:
        if input.dtype in _HALF:  # torch's CPU kernel would round the sums to fp16/bf16
            grad_output, input = grad_output.float(), input.float()
        _, grad_weight, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_output, input, None, None, None, mean, invstd, True, 0.0, [False, True, True]
        )
        sum_dy_xmu = grad_weight / invstd
    return torch.cat([sum_dy, sum_dy_xmu]).double(), grad_weight, sum_dy


def backward_apply(grad_output, input, mean, invstd, weight, stats, grad_sums):
    if input.numel() == 0:
        return torch.empty_like(input)
    sum_dy, sum_dy_xmu = grad_sums.to(mean.dtype).view(2, -1)
    if input.is_cuda:
        if not grad_output.is_contiguous(memory_format=torch.channels_last):
            grad_output = grad_output.contiguous()
        weight = None if weight is None else weight.to(mean.dtype)
        count = stats[:1].to(torch.int32)
        return torch.batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    # dx = s·dy − s·mean(dy) − s·invstd²·(x − mean)·mean(dy·(x − mean)), s = weight·invstd:
    # one affine pass over x, then an addcmul pass over dy.
    count = stats[:1].to(mean.dtype)
    scale = invstd if weight is None else invstd * weight.to(mean.dtype)
    alpha = -scale * invstd * invstd * sum_dy_xmu / count
    shift = -scale * sum_dy / count
    grad_input = _affine(input, alpha, torch.addcmul(shift, mean, alpha, value=-1))
    return grad_input.addcmul_(grad_output, per_channel(scale, input))
