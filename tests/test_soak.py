"""Soak: thousands of steps with random per-rank batch sizes, replayed in one process."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from torch import nn
from torch.testing import assert_close

from syncbn import SyncBatchNorm
from syncbn.comm import resolve

STEPS = 2000
CHANNELS = 4


def _schedule(world: int):
    """Per-step per-rank batch sizes, 0 to 3: empty ranks and global batches of 0, 1 and 2 occur."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 4, (STEPS, world), generator=g).tolist()


def _data(step: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(total, CHANNELS, generator=g, dtype=torch.float64) * 2 + 5
    return x, torch.randn(total, CHANNELS, generator=g, dtype=torch.float64)


def soak(rank, world, group=None):
    comm = resolve(group)
    bn = SyncBatchNorm(CHANNELS, momentum=None, process_group=group).double()
    ref = nn.BatchNorm1d(CHANNELS, momentum=None).double()
    ones = rejected = twos = 0
    for step, sizes in enumerate(_schedule(world)):
        total = sum(sizes)
        x, dy = _data(step, total)
        start = sum(sizes[:rank])
        mine = x[start : start + sizes[rank]].clone().requires_grad_()
        if total == 1:
            ones += 1
            with pytest.raises(ValueError, match="expected more than 1 value per channel"):
                bn(mine)
            rejected += 1
            continue
        twos += total == 2
        y = bn(mine)
        y.backward(dy[start : start + sizes[rank]])
        assert torch.isfinite(y).all() and torch.isfinite(mine.grad).all(), f"step {step}"
        ref(x)
    assert ones == rejected > 0 and twos > 0
    assert_close(bn.state_dict(), ref.state_dict(), atol=1e-9, rtol=1e-9)
    # Identical, not merely close, on every rank: each rank's row of the table, summed.
    stats = torch.cat([bn.running_mean, bn.running_var, bn.num_batches_tracked.double().view(1)])
    table = torch.zeros(comm.world_size, stats.numel(), dtype=torch.float64)
    table[comm.rank] = stats
    comm.all_reduce_(table)
    assert (table == table[0]).all(), f"running stats differ across ranks:\n{table}"


@pytest.mark.soak
def test_soak_random_batch_sizes(tmp_path):
    run_distributed(soak, 3, tmp_path, timeout=600)
