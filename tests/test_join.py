"""Uneven iteration counts under Join: every step is BatchNorm over the active ranks' batches.

Each rank trains a DDP model with its own number of batches inside
``Join([syncbn.joinable(ddp), ddp])``. The reference is one process that, at step t, runs
nn.BatchNorm over the concatenation of the batches of the ranks still active at t, with the
loss as DDP averages it: the sum of the active ranks' losses divided by the initial world
size (or by the number of active ranks with ``divide_by_initial_world_size=False``). Every
rank's final parameters, running stats and num_batches_tracked must equal the reference's.
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_distributed
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

import syncbn

LR = 0.1


class Net(nn.Module):
    """Two conv-BN-ReLU blocks and a linear head, in float64; ``skip`` leaves out block b."""

    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3), norm(4), nn.ReLU())
        self.head = nn.Linear(4, 1)
        self.skip = False
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if not self.skip:
            x = self.b(x)
        return self.head(x.mean((2, 3)))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: 2 to 4 images of 3×6×6 and their targets."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    n = 2 + (rank + step) % 3
    x = torch.randn(n, 3, 6, 6, generator=generator, dtype=torch.float64) * 2 + 1
    return x, torch.randn(n, 1, generator=generator, dtype=torch.float64)


def skipped(step: int, varied: bool) -> bool:
    return varied and step % 3 == 1


def reference(counts: list[int], divide_by_initial: bool, varied: bool) -> dict[str, torch.Tensor]:
    model = Net(nn.BatchNorm2d)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(max(counts)):
        batches = [batch(rank, step) for rank, count in enumerate(counts) if step < count]
        model.skip = skipped(step, varied)
        outputs = model(torch.cat([x for x, _ in batches])).split([len(x) for x, _ in batches])
        losses = [nn.functional.mse_loss(out, y) for out, (_, y) in zip(outputs, batches, strict=True)]
        optimizer.zero_grad()
        (sum(losses) / (len(counts) if divide_by_initial else len(batches))).backward()
        optimizer.step()
    return model.state_dict()


def train_under_join(rank, world, counts, divide_by_initial, broadcast_buffers, varied, debug):
    if debug:
        os.environ["SYNCBN_DEBUG"] = "1"
        syncbn.debug.refresh()
    model = Net(syncbn.SyncBatchNorm)
    ddp = DDP(model, broadcast_buffers=broadcast_buffers, find_unused_parameters=varied)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    with Join([syncbn.joinable(ddp), ddp], divide_by_initial_world_size=divide_by_initial):
        for step in range(counts[rank]):
            x, y = batch(rank, step)
            model.skip = skipped(step, varied)
            optimizer.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            optimizer.step()
            if varied and step % 3 == 2:
                # An eval iteration: no SyncBN message, yet the joined ranks run their hooks.
                ddp.eval()
                with torch.no_grad(), ddp.no_sync():
                    ddp(x)
                ddp.train()
    expected = reference(counts, divide_by_initial, varied)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-9, msg=f"rank {rank}: {name}")


@pytest.mark.distributed
@pytest.mark.parametrize(
    "counts, divide_by_initial, broadcast_buffers, varied, debug",
    [
        pytest.param([3, 5], True, True, False, False, id="3/5"),
        pytest.param([3, 5], False, False, True, False, id="3/5 by active ranks, eval and skipped steps"),
        pytest.param([3, 5, 4], True, True, False, True, id="3/5/4 in debug mode"),
        pytest.param([0, 3, 2], False, True, True, False, id="0/3/2 by active ranks, eval and skipped steps"),
    ],
)
def test_join_trains_as_one_process_on_the_active_ranks_batches(
    tmp_path, counts, divide_by_initial, broadcast_buffers, varied, debug
):
    run_distributed(
        train_under_join, len(counts), tmp_path, counts, divide_by_initial, broadcast_buffers, varied, debug
    )


def throw_at_first_exhausted_rank(rank, world, counts):
    alone = syncbn.convert_sync_batchnorm(Net(nn.BatchNorm2d), syncbn.new_groups(1))
    with pytest.raises(ValueError, match="on a group of all 2 ranks"):
        syncbn.joinable(alone)
    model = Net(syncbn.SyncBatchNorm)
    ddp = DDP(model)
    joinable = syncbn.joinable(ddp)
    with pytest.raises(ValueError, match="DDP model in Join"):
        Join([joinable])
    with pytest.raises(ValueError, match="first in Join"):
        Join([ddp, joinable])
    steps = 0
    with pytest.raises(RuntimeError, match="exhausted"):
        with Join([joinable, ddp], throw_on_early_termination=True):
            for step in range(counts[rank]):
                x, y = batch(rank, step)
                nn.functional.mse_loss(ddp(x), y).backward()
                steps += 1
    assert steps == min(counts), f"rank {rank} raised after {steps} steps"


@pytest.mark.distributed
def test_join_throws_on_every_rank_when_asked(tmp_path):
    run_distributed(throw_at_first_exhausted_rank, 2, tmp_path, [3, 5])


def disagree_after_a_rank_joined(rank, world, debug):
    if debug:
        os.environ["SYNCBN_DEBUG"] = "1"
        syncbn.debug.refresh()
    model = Net(syncbn.SyncBatchNorm)
    ddp = DDP(model, find_unused_parameters=True)
    with pytest.raises(RuntimeError) as raised:
        with Join([syncbn.joinable(ddp), ddp]):
            for step in range(0 if rank == 0 else 3):
                model.skip = rank == 1 and step == 2  # rank 1 alone skips block b
                ddp(batch(rank, step)[0]).sum().backward()
    if rank == 0:
        return  # joined: its peers left the job, and Gloo says so
    assert "not all in the same layer" in str(raised.value)
    if debug:
        assert "rank 0: joined\n  rank 1: backward of 'module.a.1'\n  rank 2: debug check in 'module.b.1'" in str(
            raised.value
        )


@pytest.mark.distributed
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug mode"])
def test_join_raises_when_the_active_ranks_disagree(tmp_path, debug):
    run_distributed(disagree_after_a_rank_joined, 3, tmp_path, debug)


def test_joinable_needs_syncbatchnorm_layers():
    with pytest.raises(ValueError, match="expected a model with SyncBatchNorm layers"):
        syncbn.joinable(nn.Linear(2, 2))
