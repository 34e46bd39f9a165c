"""`SyncBatchNorm`: the nn.Module users put in their models.

It owns the state (weight, bias, running stats, the process group), checks arguments and
inputs, and decides whether this call needs the group at all. When it does not, it is
exactly torch's own BatchNorm; when it does, `functional.sync_batch_norm` does the rest.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from . import comm as _comm
from . import debug
from .functional import reject_collectively, sync_batch_norm

__all__ = ["SyncBatchNorm"]

_instances = itertools.count()
_LOCAL = _comm.LocalComm()


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization whose batch statistics span every rank of a process group.

    Training on W ranks with local batches B₀…B_{W−1} gives the same outputs, input
    gradients, summed weight/bias gradients and running stats as ``nn.BatchNorm`` on one
    process with the concatenated batch. One class serves (N, C), (N, C, L), (N, C, H, W)
    and (N, C, D, H, W) inputs, and its ``state_dict`` is that of ``nn.BatchNorm1d/2d/3d``.

    Semantics:

    * **Training.** Every rank contributes its count, Σx and Σx² through one all-reduce of
      2C+1 float64 numbers; every rank normalizes with the same global mean and biased
      variance. The backward all-reduces (Σdy, Σdy·x̂), 2C numbers, so the input gradient
      is exactly that of the global batch. Weight and bias gradients stay local, because
      DDP averages them. Messages are O(C), independent of the world size.
    * **Running stats** use the global count and the unbiased variance, honour
      ``momentum=None`` (cumulative average) and ``num_batches_tracked``, and are identical
      on every rank.
    * **Uneven and empty batches.** A rank with an empty batch still joins every
      collective. If the whole global batch is empty, the output is empty and running_mean
      and running_var do not move (``num_batches_tracked`` counts the call, as in
      ``nn.BatchNorm``). A global batch of one value per channel raises ``ValueError`` on
      every rank.
    * **Eval mode** with running stats never communicates. With
      ``track_running_stats=False`` batch statistics are synchronized in eval mode too, so
      that eval matches the global batch (``torch.nn.SyncBatchNorm`` uses local ones).
    * **Bad input** (fewer than 2 dims, wrong channel count, non-floating dtype) raises a
      clear error on the offending rank; its peers raise too rather than hang. NaN or Inf
      in any rank's batch makes every rank's output and running stats NaN, as it would in
      one process; ``check_finite=True`` raises on every rank instead, before the running
      stats are touched, at the cost of one check of 2C+1 numbers.
    * **Debug mode** (``SYNCBN_DEBUG=1`` or ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` when syncbn is
      imported, or ``syncbn.debug.refresh()`` after setting it) checks before each
      synchronized forward that all ranks are in the same layer with the same channel count
      and dtype, and raises on every rank otherwise; see ``syncbn.debug``.
    * **Layout and precision.** The output keeps the input's dtype and memory format
      (channels_last included). Statistics are reduced in float64 and applied in at least
      float32, whatever the input dtype; fp16/bf16 inputs and ``torch.autocast`` work.
    * ``torch.compile(model, fullgraph=True)`` compiles it, forward and backward, with no
      graph break over a process group (functional collectives) or an MPI
      communicator (a custom op); see ``syncbn.ops``.
    * **Uneven iteration counts** under torch's ``Join`` context manager: see
      ``syncbn.joinable``.
    * **Pickling** (``torch.save(model)``, ``pickle``) drops ``process_group``: a loaded
      layer has ``process_group=None``, the default group of the process that loads it.
      ``copy.deepcopy`` (an EMA model, say) shares the group instead.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability.
        momentum: factor of the running-stat update; ``None`` for a cumulative average.
        affine: learn a per-channel weight and bias.
        track_running_stats: keep running mean and variance for eval mode.
        process_group: ``None`` for the default process group (or no synchronization when
            none is initialized), a ProcessGroup (Gloo, NCCL, sub-groups), an MPI
            communicator (``MPI.Comm``), or any object with ``world_size``, ``rank`` and
            ``all_reduce_`` (``syncbn.comm.Communicator``).
        check_finite: raise on every rank when the global batch holds NaN or Inf.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        check_finite: bool = False,
    ) -> None:
        # _BatchNorm's own bias= keyword is recent (torch 2.11 lacks it): the same parameters,
        # built on every torch that syncbn supports.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if not bias:
            self.register_parameter("bias", None)
        self.process_group = process_group
        self.check_finite = check_finite
        # How debug mode names the layer; convert_sync_batchnorm gives the module's path.
        self.layer_name = f"SyncBatchNorm#{next(_instances)}"

    def _check_input_dim(self, input: torch.Tensor) -> None:
        # _BatchNorm's hook; forward has already checked the input, before any collective.
        pass

    def _input_error(self, input: torch.Tensor) -> Exception | None:
        if input.dim() < 2:
            return ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) != self.num_features:
            return ValueError(f"expected input with {self.num_features} channels (got {input.size(1)})")
        if not input.is_floating_point():
            return TypeError(f"expected a floating-point input (got {input.dtype})")
        return None

    @property
    def process_group(self) -> Any:
        return self._process_group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        # Resolved here, once, so that forward (and torch.compile's trace of it) only reads
        # it. None stays open: the default group may come and go between calls.
        self._process_group = group
        self._communicator = None
        if group is not None:
            with contextlib.suppress(ValueError):  # not a member: a training forward raises it
                self._communicator = _comm.resolve(group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        comm = _LOCAL
        if use_batch_stats:
            comm = _comm.resolve(self.process_group) if self._communicator is None else self._communicator
        sync = comm.world_size > 1
        debugging = sync and debug.enabled()
        if debugging:
            debug.check_peers(comm, self.layer_name, input)
        error = self._input_error(input)
        if error is not None:
            if sync:
                reject_collectively(comm, self.num_features, input.device, error)
            raise error
        track = self.training and self.track_running_stats
        # nn.BatchNorm reads num_batches_tracked on the host for momentum=None, which
        # torch.compile cannot trace; syncbn's ops read it inside the update instead.
        cumulative_compiled = track and self.momentum is None and torch.compiler.is_compiling()
        if not sync and not cumulative_compiled:
            if self.training and input.numel() == self.num_features:
                # Checked before torch counts the batch, so a rejected call leaves no trace.
                raise ValueError(
                    f"expected more than 1 value per channel when training (got input size {list(input.shape)})"
                )
            return super().forward(input)
        return sync_batch_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.num_batches_tracked if track else None,
            self.momentum,
            self.eps,
            comm,
            check_finite=self.check_finite or debugging,
        )

    def __getstate__(self) -> dict:
        # Pickling (torch.save(model), the pickle module) saves state, and a process group is a
        # handle on this job's processes: a loaded layer syncs over the default group.
        state = self.__dict__.copy()
        state["_process_group"] = state["_communicator"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        # Pickles made before process_group became a property hold it as a plain attribute.
        group = state.pop("process_group", None)
        super().__setstate__(state)
        if "_process_group" not in state:
            self.process_group = group

    def __deepcopy__(self, memo: dict) -> SyncBatchNorm:
        # A process group is a handle on other processes, not state: copies (an EMA model,
        # say) share it, where deep-copying a ProcessGroup would fail.
        memo[id(self.process_group)] = self.process_group
        memo[id(self._communicator)] = self._communicator
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def extra_repr(self) -> str:
        group = "" if self.process_group is None else f", process_group={type(self.process_group).__name__}"
        return super().extra_repr() + group
