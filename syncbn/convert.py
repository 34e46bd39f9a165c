"""Swap every BatchNorm in a model for SyncBatchNorm, and back.

Conversion reuses the very Parameter and buffer tensors, so weights, running stats,
``requires_grad``, device and dtype carry over and a round trip loses nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import SyncBatchNorm

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]

_LOCAL_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _BatchNormXd(_BatchNorm):
    """Local BatchNorm for any input of 2 or more dims.

    The revert target of a SyncBatchNorm that was built directly, so its input rank is
    unknown; its state_dict is that of nn.BatchNorm1d/2d/3d.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _swap(module: _BatchNorm, cls: type, **kwargs: Any) -> _BatchNorm:
    new = cls(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        device="meta",
        **kwargs,
    )
    new.weight, new.bias = module.weight, module.bias
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.training = module.training
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every ``_BatchNorm`` in ``module`` (the root included) by SyncBatchNorm.

    Works in place on children and returns the module, or the new root when the root
    itself is a BatchNorm. ``process_group`` is as for SyncBatchNorm. Each new layer is
    named after its path in the model, for debug mode's messages.
    """
    return _convert(module, process_group, "")


def _convert(module: nn.Module, process_group: Any, path: str) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm):
        out = _swap(module, SyncBatchNorm, process_group=process_group)
        out._reverts_to = type(module) if type(module) in _LOCAL_CLASSES else None
        out.layer_name = path or type(module).__name__
    for name, child in module.named_children():
        out.add_module(name, _convert(child, process_group, f"{path}.{name}" if path else name))
    return out


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm in ``module`` by a local BatchNorm, for export or inference.

    A layer made by ``convert_sync_batchnorm`` goes back to the class it came from
    (nn.BatchNorm1d/2d/3d); one built directly becomes a local BatchNorm that accepts
    any input of 2 or more dims.
    """
    out = module
    if isinstance(module, SyncBatchNorm):
        out = _swap(module, getattr(module, "_reverts_to", None) or _BatchNormXd)
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out
