"""Shared inputs and the reference: nn.BatchNorm on one process with the global batch."""

from __future__ import annotations

import torch
from torch import nn

SHAPES = {2: (), 3: (7,), 4: (4, 3), 5: (2, 3, 2)}
CHANNELS = 5


def local_bn_class(dims: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dims]


def memory_format(dims: int, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if dims == 4 else torch.channels_last_3d


def global_batch(step: int, total: int, dims: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (x, dy) on every rank: per-channel offsets and scales, so means matter."""
    g = torch.Generator().manual_seed(1000 + step)
    shape = (total, CHANNELS, *SHAPES[dims])
    scale = torch.rand(CHANNELS, generator=g, dtype=dtype).add_(0.5).view(1, -1, *[1] * (dims - 2))
    shift = torch.randn(CHANNELS, generator=g, dtype=dtype).mul_(3).view(1, -1, *[1] * (dims - 2))
    x = torch.randn(shape, generator=g, dtype=dtype) * scale + shift
    dy = torch.randn(shape, generator=g, dtype=dtype)
    return x, dy


def rank_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def small_cnn() -> nn.Module:
    """Conv, BatchNorm2d, ReLU, Linear in float64, seeded: the model the framework tests train."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 1)).double()


def small_cnn_input(n: int, generator: torch.Generator) -> torch.Tensor:
    """n float64 images of 3×6×6 with mean 1 and std 2, for `small_cnn`."""
    return torch.randn(n, 3, 6, 6, generator=generator, dtype=torch.float64) * 2 + 1
