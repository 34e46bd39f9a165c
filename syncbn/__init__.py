"""syncbn: exact synchronized batch normalization for PyTorch on NCCL, Gloo, MPI or one process."""

from .comm import new_groups
from .convert import convert_sync_batchnorm, revert_sync_batchnorm
from .join import joinable
from .modules import SyncBatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "joinable", "new_groups", "revert_sync_batchnorm"]
__version__ = "0.1.0"
