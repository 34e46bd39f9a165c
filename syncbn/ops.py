"""syncbn's fused ops: the layer's differentiable step, and the ops torch.compile traces.

A synchronized training step is five fused kernels and two all-reduces, one memory pass
per kernel:

* ``moments(x)``: one read of x, giving this rank's float64 (n, Σx, Σx²) per channel;
  all-reduced into the global ``stats``;
* ``forward_apply``: the global mean and invstd, and y = (x − mean)·weight·invstd + bias
  in one read of x and one write of y;
* ``update_running_stats(...)``: the running averages from ``stats``, in place;
* ``backward_reduce(dy, x, mean, invstd)``: one read of dy and x, giving float64
  (Σdy, Σdy·(x − mean)), all-reduced, and the local weight and bias gradients;
* ``backward_apply``: one read of dy and x, one write of dx.

`batch_norm` is the step, forward and backward. Eagerly on the CPU it is one C++ call,
the extension's ``step``, whose autograd is C++ too (csrc/cpu_kernels.cpp): its two
all-reduces call `syncbn.comm.all_reduce_by_key_` with the communicator's key. A Python
autograd.Function over the same kernels cost 0.12–0.15 ms more a step, in ``apply`` and in
the engine's Python node: 15–17% of nn.BatchNorm1d's fwd+bwd on a (256, 1024) tensor.
Calling the step through pybind11 rather than as a torch.ops op, and the all-reduce as a
Python function rather than as the ``syncbn::all_reduce`` op, took another 24–30 µs off a
step (a world of 2 whose all-reduce does nothing, interleaved: 0.85× at (2, 4), 0.93× at
(256, 1024)), and summing its messages in place rather than in a copy another 0.91× and
0.96×. Elsewhere (CUDA, or no compiler) the step is `_Step`: one
autograd.Function over stock ops (`syncbn.reference`), which the tests also hold the C++
step against.

While torch.compile traces, the reductions and the running-stat update are registered
ops (``syncbn::moments``, ``syncbn::backward_reduce``, ``syncbn::update_running_stats``,
with fake kernels), and so are the count checks and per-channel math of the global stats
(``syncbn::statistics``) and, when asked, ``syncbn::check_finite``. On the CPU their
kernels are the C++ ones, registered for the CPU dispatch key by the extension itself, so
that a compiled graph reaches them without a Python kernel (which cost 0.3–0.5 ms a layer
per step in a ResNet-18 profile); the Python kernels here serve every other case. The two
elementwise passes are traced as stock ops instead, so that Inductor fuses them with
their neighbours (a ReLU, a residual add, a pooling) and lays them out as it lays out the
convolutions around them; an opaque op there cost an extra pass each, and a copy wherever
the layouts met. AOTAutograd traces the autograd Function of forward_apply, whose
backward all-reduces over its communicator by name (`syncbn.comm.traced_all_reduce`), so
the backward all-reduce lands in the backward graph.

The global count is checked where it is read, identically on every rank, so that every rank
raises together: a NaN count (a rank rejected its input), a count of 1, and, when asked,
non-finite sums. On CUDA the count checks are device-side asserts, so that a step never
waits for the GPU.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import comm as _comm
from . import kernels, reference

__all__ = ["batch_norm"]

_lib = torch.library.Library("syncbn", "DEF")
# The kernels take any strides and give outputs the strides of empty_like(input), as the
# fake kernels do, so Inductor may hand them whichever layout it chose for the input: with
# exact strides it had to copy every convolution's channels_last output back and forth.
for _schema in [
    "moments(Tensor input) -> Tensor",
    "check_finite(Tensor stats) -> Tensor",
    "statistics(Tensor stats, float eps) -> (Tensor, Tensor)",
    "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
    "Tensor stats, float? momentum) -> ()",
    "backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd) -> (Tensor, Tensor, Tensor)",
]:
    _lib.define(_schema, tags=(torch.Tag.flexible_layout,))

_REJECTED = "SyncBatchNorm: another rank of the group rejected its input (see its error)"
_ONE_VALUE = "expected more than 1 value per channel in the global batch when training (got 1"


def _impl(t: Tensor):
    """The kernels for tensors like ``t``: the C++ ones, or stock ops."""
    return torch.ops.syncbn_cpu if t.is_cpu and kernels.available() else reference


def _check_stats(stats: Tensor, input_shape: list[int] | None, check_finite: bool) -> None:
    if stats.is_cuda:
        count = stats[0]
        torch._assert_async(count == count, _REJECTED)
        torch._assert_async(count != 1, _ONE_VALUE + ")")
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


# The registered ops' Python kernels: every device but the CPU once the extension is loaded,
# which registers its C++ kernels for the CPU key (check_finite has only this one).


def _moments(input):
    return _impl(input).moments(input)


def _check_finite(stats):
    # The traced step's check_finite: a copy of the stats, so that what reads them (the
    # statistics and the running-stat update) comes after the check in any compiled order.
    _check_stats(stats, None, True)
    return stats.clone()


def _statistics(stats, eps):
    # The traced step's checks of the global count, and its float64 mean and invstd.
    _check_stats(stats, None, False)
    _, mean, var = reference.mean_var(stats)
    return mean, torch.rsqrt(var + eps)


def _update_running_stats(running_mean, running_var, num_batches_tracked, stats, momentum):
    impl = _impl(running_mean)
    if impl is reference:
        _check_stats(stats, None, False)
    impl.update_running_stats(running_mean, running_var, num_batches_tracked, stats, momentum)


def _backward_reduce(grad_output, input, mean, invstd):
    return _impl(input).backward_reduce(grad_output, input, mean, invstd)


for _name, _kernel in [
    ("moments", _moments),
    ("check_finite", _check_finite),
    ("statistics", _statistics),
    ("update_running_stats", _update_running_stats),
    ("backward_reduce", _backward_reduce),
]:
    _lib.impl(_name, _kernel, "CompositeExplicitAutograd")


# Fake kernels: shapes, dtypes and strides only.


@torch.library.register_fake("syncbn::moments", lib=_lib)
def _(input):
    return input.new_empty(2 * input.size(1) + 1, dtype=torch.float64)


@torch.library.register_fake("syncbn::check_finite", lib=_lib)
def _(stats):
    return torch.empty_like(stats)


@torch.library.register_fake("syncbn::statistics", lib=_lib)
def _(stats, eps):
    channels = (stats.size(0) - 1) // 2
    return stats.new_empty(channels), stats.new_empty(channels)


@torch.library.register_fake("syncbn::update_running_stats", lib=_lib)
def _(running_mean, running_var, num_batches_tracked, stats, momentum):
    return None


@torch.library.register_fake("syncbn::backward_reduce", lib=_lib)
def _(grad_output, input, mean, invstd):
    return input.new_empty(2 * input.size(1), dtype=torch.float64), torch.empty_like(mean), torch.empty_like(mean)


# The synchronized step with its backward, eagerly (the fused kernels) and while tracing.


def _weight_grads(ctx, weight, grad_weight, grad_bias):
    # Both Functions take (input, weight, bias, ...).
    if weight is not None and weight.dtype != grad_weight.dtype:
        grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    return (grad_weight if ctx.needs_input_grad[1] else None), (grad_bias if ctx.needs_input_grad[2] else None)


class _Step(torch.autograd.Function):
    """The whole step eagerly on stock ops (`syncbn.reference`), in one Function: the
    fallback, CUDA, and the oracle of the C++ step (`_cpu_step`)."""

    @staticmethod
    def forward(
        ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, comm, check_finite
    ):
        stats = _comm.all_reduce(comm, reference.moments(input))
        _check_stats(stats, input.shape, check_finite)
        count, global_mean, global_var = reference.mean_var(stats)
        output, mean, invstd = reference.normalize(input, global_mean, global_var, weight, bias, eps)
        if running_mean is not None:
            reference.update_running_averages(
                running_mean, running_var, num_batches_tracked, count, global_mean, global_var, momentum
            )
        ctx.save_for_backward(input, weight, stats, mean, invstd)
        ctx.comm = comm
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, stats, mean, invstd = ctx.saved_tensors
        sums, grad_weight, grad_bias = reference.backward_reduce(grad_output, input, mean, invstd)
        grad_input = None
        if ctx.needs_input_grad[0]:
            global_sums = _comm.all_reduce(ctx.comm, sums)
            grad_input = reference.backward_apply(grad_output, input, mean, invstd, weight, stats, global_sums)
        return grad_input, *_weight_grads(ctx, weight, grad_weight, grad_bias), *[None] * 7


class _TracedForwardApply(torch.autograd.Function):
    """forward_apply and its backward as torch.compile traces them: the C++ kernels' math,
    per-channel coefficients in float64 included, with the elementwise passes as stock ops
    (see the module's docstring)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stats, eps, group):
        acc = reference.acc_dtype(input)
        mean, invstd = torch.ops.syncbn.statistics(stats, eps)
        scale = invstd if weight is None else invstd * weight.double()
        output = (input.to(acc) - reference.per_channel(mean.to(acc), input)) * reference.per_channel(
            scale.to(acc), input
        )
        if bias is not None:
            output = output + reference.per_channel(bias.to(acc), input)
        mean, invstd = mean.to(acc), invstd.to(acc)
        ctx.save_for_backward(input, weight, stats, mean, invstd)
        ctx.group = group
        # Cast only when the dtypes differ: torch 2.11's Dynamo zeroes every gradient of a
        # Function that returns the no-op .to() alias of its result.
        return output if output.dtype == input.dtype else output.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, stats, mean, invstd = ctx.saved_tensors
        sums, grad_weight, grad_bias = torch.ops.syncbn.backward_reduce(grad_output, input, mean, invstd)
        grad_input = None
        if ctx.needs_input_grad[0]:
            global_sums = _comm.traced_all_reduce(ctx.group, sums)
            # dx = p·(x − mean) + q·dy + r, as in the C++ backward_apply: q = w·invstd,
            # p = −q·invstd²·Σdy·(x − mean)/n and r = −q·Σdy/n, in float64.
            s = invstd.double()
            q = s if weight is None else s * weight.double()
            sum_dy, sum_dy_xmu = global_sums.view(2, -1) / stats[:1].clamp(min=1)
            p, r = -q * s * s * sum_dy_xmu, -q * sum_dy
            acc = mean.dtype
            grad_input = (
                reference.per_channel(p.to(acc), input) * (input.to(acc) - reference.per_channel(mean, input))
                + reference.per_channel(q.to(acc), input) * grad_output.to(acc)
                + reference.per_channel(r.to(acc), input)
            ).to(input.dtype)
        return grad_input, *_weight_grads(ctx, weight, grad_weight, grad_bias), *[None] * 3


@functools.cache
def _cpu_step():
    """The extension's eager step, its collective wired to `syncbn.comm`."""
    extension = kernels.extension()
    extension.set_all_reduce(_comm.all_reduce_by_key_)
    return extension.step


def batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    comm: _comm.Communicator,
    check_finite: bool,
) -> Tensor:
    """The synchronized training step over ``comm``; differentiable (see `syncbn.functional`).

    Running stats move in place when ``running_mean`` is given (with ``running_var`` and
    ``num_batches_tracked``).
    """
    if not _comm.tracing():
        if input.is_cpu and kernels.available():
            return _cpu_step()(
                input,
                weight,
                bias,
                running_mean,
                running_var,
                num_batches_tracked,
                momentum,
                eps,
                _comm.key(comm),
                check_finite,
            )
        return _Step.apply(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, comm, check_finite
        )
    stats = _comm.all_reduce(comm, torch.ops.syncbn.moments(input.detach()))
    if check_finite:
        stats = torch.ops.syncbn.check_finite(stats)
    output = _TracedForwardApply.apply(input, weight, bias, stats, eps, _comm.key(comm))
    if running_mean is not None:
        torch.ops.syncbn.update_running_stats(running_mean, running_var, num_batches_tracked, stats, momentum)
    return output
