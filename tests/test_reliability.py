"""No hang, no silent corruption: non-finite input, cross-rank mismatches, checkpoints."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from cases import CHANNELS, global_batch, rank_slice
from distributed import run_distributed
from torch import nn
from torch.testing import assert_close

from syncbn import SyncBatchNorm, convert_sync_batchnorm, debug, revert_sync_batchnorm
from syncbn.comm import resolve

pytestmark = pytest.mark.distributed


def non_finite_input(rank, world, group=None):
    x = torch.randn(4, CHANNELS, 3)
    if rank == world - 1:
        x[1, 2, 0] = float("nan")
    checked = SyncBatchNorm(CHANNELS, process_group=group, check_finite=True)
    before = copy.deepcopy(checked.state_dict())
    with pytest.raises(FloatingPointError, match=r"got NaN or Inf in channels \[2\]"):
        checked(x)
    assert_close(checked.state_dict(), before, atol=0, rtol=0)
    # Unchecked, a NaN on one rank spreads to that channel everywhere, as in one process.
    unchecked = SyncBatchNorm(CHANNELS, process_group=group)
    y = unchecked(x)
    assert y[:, 2].isnan().all() and not y[:, [0, 1, 3, 4]].isnan().any()
    assert unchecked.running_mean[2].isnan() and not unchecked.running_mean[[0, 1, 3, 4]].isnan().any()


def test_non_finite_input(tmp_path):
    run_distributed(non_finite_input, 3, tmp_path)


def _debug_on():
    os.environ["SYNCBN_DEBUG"] = "1"
    debug.refresh()


def debug_channel_mismatch(rank, world, group=None):
    _debug_on()
    channels = CHANNELS + (rank == 1)
    bn = SyncBatchNorm(channels, process_group=group)
    bn.layer_name = "features.bn"
    with pytest.raises(RuntimeError, match=r"debug check failed in layer 'features.bn'") as error:
        bn(torch.randn(4, channels, 2))
    assert f"rank 1: this layer, input (4, {CHANNELS + 1}, 2) torch.float32" in str(error.value)
    assert bn.num_batches_tracked.item() == 0


def test_debug_mode_catches_channel_mismatch(tmp_path):
    run_distributed(debug_channel_mismatch, 2, tmp_path)


def debug_skipped_layer(rank, world, group=None):
    _debug_on()
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(CHANNELS), nn.BatchNorm1d(CHANNELS)), group)
    x = torch.randn(4, CHANNELS)
    layers = model if rank == 0 else model[1:]
    with pytest.raises(RuntimeError, match=r"debug check failed in layer '(0|1)'") as error:
        layers(x)
    assert "another layer" in str(error.value)
    # Both ranks stopped at their first layer: the group is still in step.
    model(x)


def test_debug_mode_catches_a_skipped_layer(tmp_path):
    run_distributed(debug_skipped_layer, 2, tmp_path)


def debug_mode_passes_matching_calls(rank, world, group=None):
    _debug_on()
    sizes = [3, 0, 4][:world]
    x, dy = global_batch(0, sum(sizes), 4)
    ref = nn.BatchNorm2d(CHANNELS).double()
    xr = x.clone().requires_grad_()
    ref(xr).backward(dy)
    bn = SyncBatchNorm(CHANNELS, process_group=group).double()
    mine = rank_slice(sizes, rank)
    xs = x[mine].clone().requires_grad_()
    bn(xs).backward(dy[mine])
    assert_close(xs.grad, xr.grad[mine], atol=1e-9, rtol=1e-9)
    assert_close(bn.running_var, ref.running_var, atol=1e-9, rtol=1e-9)


def test_debug_mode_passes_matching_calls(tmp_path):
    run_distributed(debug_mode_passes_matching_calls, 3, tmp_path)


def _training(group):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(CHANNELS, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    model = convert_sync_batchnorm(body.double(), group)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _step(model, optimizer, step, rank, group):
    sizes = [3, 5, 0][: resolve(group).world_size]
    x, _ = global_batch(step, sum(sizes), 4)
    optimizer.zero_grad()
    model(x[rank_slice(sizes, rank)]).square().mean().backward()
    comm = resolve(group)
    for p in model.parameters():
        comm.all_reduce_(p.grad)
        p.grad /= comm.world_size
    optimizer.step()


def checkpoint_resume(rank, world, folder, group=None):
    straight, optimizer = _training(group)
    for step in range(6):
        _step(straight, optimizer, step, rank, group)

    first, optimizer = _training(group)
    for step in range(3):
        _step(first, optimizer, step, rank, group)
    path = os.path.join(folder, f"rank{rank}.pt")
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, path)
    resumed, optimizer = _training(group)
    state = torch.load(path)
    resumed.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for step in range(3, 6):
        _step(resumed, optimizer, step, rank, group)
    assert_close(resumed.state_dict(), straight.state_dict(), atol=0, rtol=0)

    plain = revert_sync_batchnorm(_training(None)[0])
    plain.load_state_dict(torch.load(path)["model"])
    first.eval()
    plain.eval()
    x, _ = global_batch(9, 4, 4)
    with torch.no_grad():
        assert_close(plain(x), first(x), atol=0, rtol=0)


def test_checkpoint_resume_and_revert(tmp_path):
    run_distributed(checkpoint_resume, 2, tmp_path, str(tmp_path))
