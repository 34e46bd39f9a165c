"""`SyncBatchNormPlugin`: syncbn's SyncBatchNorm in Lightning, on CPU and GPU.

``Trainer(sync_batchnorm=True)`` converts to ``torch.nn.SyncBatchNorm``, which DDP rejects
on the CPU ("SyncBatchNorm layers only work with GPU modules"). This plugin converts to
``syncbn.SyncBatchNorm`` instead and reverts when fitting ends:

    Trainer(accelerator="cpu", strategy="ddp", devices=2, plugins=[SyncBatchNormPlugin()])

It is a ``LayerSync`` of ``lightning.pytorch`` and of ``pytorch_lightning``, whichever are
installed, so either package's Trainer takes it. Lightning itself refuses it together with
``sync_batchnorm=True``: choose one.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .comm import new_groups
from .convert import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["SyncBatchNormPlugin"]


def _layer_sync_bases() -> tuple[type, ...]:
    bases = []
    for package in ("lightning.pytorch.plugins", "pytorch_lightning.plugins"):
        try:
            bases.append(importlib.import_module(package).LayerSync)
        except ImportError:
            continue
    if not bases:
        raise ImportError("syncbn.lightning needs Lightning: pip install 'syncbn[lightning]'")
    return tuple(bases)


class SyncBatchNormPlugin(*_layer_sync_bases()):
    """Convert every BatchNorm of the LightningModule to ``syncbn.SyncBatchNorm`` for fitting.

    Args:
        process_group: as for SyncBatchNorm; None is the default group Lightning sets up.
        group_size: synchronize within blocks of this many consecutive ranks
            (``syncbn.new_groups``), made when fitting starts, on every rank.
    """

    def __init__(self, process_group: Any = None, group_size: int | None = None) -> None:
        if process_group is not None and group_size is not None:
            raise ValueError("expected process_group or group_size, not both")
        self.process_group = process_group
        self.group_size = group_size

    def apply(self, model: nn.Module) -> nn.Module:
        group = self.process_group
        if self.group_size is not None:
            group = new_groups(self.group_size)
        return convert_sync_batchnorm(model, group)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync_batchnorm(model)
