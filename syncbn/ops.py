"""syncbn's fused ops, registered with torch.library: schemas, fake kernels and autograd.

A synchronized training step is five ops and two all-reduces, one memory pass per op:

* ``moments(x)``: one read of x, giving this rank's float64 (n, Σx, Σx²) per channel;
  all-reduced into the global ``stats``;
* ``forward_apply(x, stats, weight, bias, eps, ...)``: the global mean and invstd, and
  y = (x − mean)·weight·invstd + bias in one read of x and one write of y;
* ``update_running_stats(...)``: the running averages from ``stats``, in place;
* ``backward_reduce(dy, x, mean, invstd)``: one read of dy and x, giving float64
  (Σdy, Σdy·(x − mean)), all-reduced, and the local weight and bias gradients;
* ``backward_apply(...)``: one read of dy and x, one write of dx.

``forward_apply`` carries the autograd: its backward is backward_reduce, an all-reduce over
the group its ``group`` argument names (a `syncbn.comm.key`), and backward_apply, so that
torch.compile's AOTAutograd puts that all-reduce in the backward graph. The fake kernels
give torch.compile shapes, dtypes and strides without running anything. On the CPU the ops
run the C++ kernels (`syncbn.kernels`); on CUDA, or without the kernels, the stock-op
implementation in `syncbn.reference`.

The Python functions below are what the layer calls. While torch.compile traces they emit
the registered ops; in eager mode they call the same kernels directly, with the same
backward in a plain autograd.Function, because the dispatcher's Python autograd wrapper
costs about 0.1 ms per call, as much as the whole layer on a small tensor.

The global count is checked where it is read, identically on every rank, so that every rank
raises together: a NaN count (a rank rejected its input), a count of 1, and, when asked,
non-finite sums. On CUDA the count checks are device-side asserts, so that a step never
waits for the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import comm as _comm
from . import kernels, reference

__all__ = ["moments", "forward_apply", "update_running_stats", "backward_reduce", "backward_apply"]

_lib = torch.library.Library("syncbn", "DEF")
# The kernels take any strides and give outputs the strides of empty_like(input), as the
# fake kernels do, so Inductor may hand them whichever layout it chose for the input: with
# exact strides it had to copy every convolution's channels_last output back and forth.
for _schema in [
    "moments(Tensor input) -> Tensor",
    "forward_apply(Tensor input, Tensor stats, Tensor? weight, Tensor? bias, float eps, bool check_finite, "
    "str group) -> (Tensor, Tensor, Tensor)",
    "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
    "Tensor stats, float? momentum) -> ()",
    "backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd) -> (Tensor, Tensor, Tensor)",
    "backward_apply(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor stats, "
    "Tensor grad_sums) -> Tensor",
]:
    _lib.define(_schema, tags=(torch.Tag.flexible_layout,))

_REJECTED = "SyncBatchNorm: another rank of the group rejected its input (see its error)"
_ONE_VALUE = "expected more than 1 value per channel in the global batch when training (got 1"


def _impl(t: Tensor):
    """The kernels for tensors like ``t``: the C++ ones, or stock ops."""
    return torch.ops.syncbn_cpu if t.is_cpu and kernels.available() else reference


def _check_stats(stats: Tensor, input_shape: list[int] | None, check_finite: bool) -> None:
    if stats.is_cuda:
        torch._assert_async(stats[0] == stats[0], _REJECTED)
        torch._assert_async(stats[0] != 1, _ONE_VALUE + ")")
    else:
        count = stats[0].item()
        if count != count:
            raise RuntimeError(_REJECTED)
        if count == 1:
            where = "" if input_shape is None else f"; this rank's input size {list(input_shape)}"
            raise ValueError(f"{_ONE_VALUE}{where})")
    if check_finite and not torch.isfinite(stats).all():
        bad = (~torch.isfinite(stats[1:].view(2, -1))).any(0).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"expected finite values in the global batch (got NaN or Inf in channels {bad}); "
            "running stats left unchanged"
        )


# The kernels behind each op, for every device.


def _moments(input):
    return _impl(input).moments(input)


def _forward_apply(input, stats, weight, bias, eps, check_finite, group):
    return _forward_apply_on(_impl(input), input, stats, weight, bias, eps, check_finite)


def _forward_apply_on(impl, input, stats, weight, bias, eps, check_finite):
    # The C++ kernels check the count themselves, where they read it (check_count).
    if impl is reference or check_finite:
        _check_stats(stats, input.shape, check_finite)
    return impl.forward_apply(input, stats, weight, bias, eps)


def _update_running_stats(running_mean, running_var, num_batches_tracked, stats, momentum):
    impl = _impl(running_mean)
    if impl is reference:
        _check_stats(stats, None, False)
    impl.update_running_stats(running_mean, running_var, num_batches_tracked, stats, momentum)


def _backward_reduce(grad_output, input, mean, invstd):
    return _impl(input).backward_reduce(grad_output, input, mean, invstd)


def _backward_apply(grad_output, input, mean, invstd, weight, stats, grad_sums):
    return _impl(input).backward_apply(grad_output, input, mean, invstd, weight, stats, grad_sums)


for _name, _kernel in [
    ("moments", _moments),
    ("forward_apply", _forward_apply),
    ("update_running_stats", _update_running_stats),
    ("backward_reduce", _backward_reduce),
    ("backward_apply", _backward_apply),
]:
    _lib.impl(_name, _kernel, "CompositeExplicitAutograd")


# Fake kernels: shapes, dtypes and strides only.


@torch.library.register_fake("syncbn::moments", lib=_lib)
def _(input):
    return input.new_empty(2 * input.size(1) + 1, dtype=torch.float64)


@torch.library.register_fake("syncbn::forward_apply", lib=_lib)
def _(input, stats, weight, bias, eps, check_finite, group):
    channel = input.new_empty(input.size(1), dtype=reference.acc_dtype(input))
    return torch.empty_like(input), channel, torch.empty_like(channel)


@torch.library.register_fake("syncbn::update_running_stats", lib=_lib)
def _(running_mean, running_var, num_batches_tracked, stats, momentum):
    return None


@torch.library.register_fake("syncbn::backward_reduce", lib=_lib)
def _(grad_output, input, mean, invstd):
    return input.new_empty(2 * input.size(1), dtype=torch.float64), torch.empty_like(mean), torch.empty_like(mean)


@torch.library.register_fake("syncbn::backward_apply", lib=_lib)
def _(grad_output, input, mean, invstd, weight, stats, grad_sums):
    return torch.empty_like(input)


# Autograd of forward_apply: registered for tracing, and the same backward eagerly.


def _backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    input, weight, stats, mean, invstd = ctx.saved_tensors
    # The eager Function chose its kernels in the forward; a traced backward emits the ops.
    kernels = getattr(ctx, "kernels", torch.ops.syncbn)
    sums, grad_weight, grad_bias = kernels.backward_reduce(grad_output, input, mean, invstd)
    grad_input = None
    if ctx.needs_input_grad[0]:
        global_sums = _comm.all_reduce(_comm.lookup(ctx.group), sums)
        grad_input = kernels.backward_apply(grad_output, input, mean, invstd, weight, stats, global_sums)
    if weight is not None and weight.dtype != grad_weight.dtype:
        grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    grad_weight = grad_weight if ctx.needs_input_grad[2] else None
    grad_bias = grad_bias if ctx.needs_input_grad[3] else None
    return grad_input, None, grad_weight, grad_bias, None, None, None


def _setup_context(ctx, inputs, output) -> None:
    input, stats, weight, _, _, _, group = inputs
    _, mean, invstd = output
    ctx.save_for_backward(input, weight, stats, mean, invstd)
    ctx.group = group
    ctx.mark_non_differentiable(mean, invstd)


torch.library.register_autograd(
    "syncbn::forward_apply",
    lambda ctx, grad_output, _mean, _invstd: _backward(ctx, grad_output),
    setup_context=_setup_context,
    lib=_lib,
)


class _ForwardApply(torch.autograd.Function):
    """forward_apply with its registered backward, as a plain autograd.Function (eager)."""

    @staticmethod
    def forward(ctx, input, stats, weight, bias, eps, check_finite, group):
        ctx.kernels = _impl(input)  # the backward's too
        output = _forward_apply_on(ctx.kernels, input, stats, weight, bias, eps, check_finite)
        _setup_context(ctx, (input, stats, weight, bias, eps, check_finite, group), output)
        return output

    @staticmethod
    def backward(ctx, grad_output, _mean, _invstd):
        return _backward(ctx, grad_output)


# What the layer calls: the registered ops while tracing, the kernels directly otherwise.


def moments(input: Tensor) -> Tensor:
    """This rank's (n, Σx, Σx²) per channel, packed as 2C+1 float64 numbers."""
    return torch.ops.syncbn.moments(input) if _comm.tracing() else _moments(input)


def forward_apply(
    input: Tensor,
    stats: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    check_finite: bool,
    group: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The output, mean and invstd of batch norm with the global ``stats``; differentiable.

    ``group`` names the communicator of the backward all-reduce (`syncbn.comm.key`).
    """
    if _comm.tracing():
        return torch.ops.syncbn.forward_apply(input, stats, weight, bias, eps, check_finite, group)
    return _ForwardApply.apply(input, stats, weight, bias, eps, check_finite, group)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor, stats: Tensor, momentum: float | None
) -> None:
    """Move the running averages by the global mean and unbiased variance (momentum=None:
    a cumulative average); an empty global batch counts as a batch but moves nothing."""
    op = torch.ops.syncbn.update_running_stats if _comm.tracing() else _update_running_stats
    op(running_mean, running_var, num_batches_tracked, stats, momentum)


def backward_reduce(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Local float64 (Σdy, Σdy·(x − mean)) packed as 2C numbers, and the local weight and
    bias gradients Σdy·(x − mean)·invstd and Σdy."""
    op = torch.ops.syncbn.backward_reduce if _comm.tracing() else _backward_reduce
    return op(grad_output, input, mean, invstd)


def backward_apply(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    grad_sums: Tensor,
) -> Tensor:
    """dx of the global batch, from the global ``grad_sums`` and the count in ``stats[0]``."""
    op = torch.ops.syncbn.backward_apply if _comm.tracing() else _backward_apply
    return op(grad_output, input, mean, invstd, weight, stats, grad_sums)
