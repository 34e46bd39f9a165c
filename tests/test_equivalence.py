"""The spec: W ranks with uneven batches (one empty) equal nn.BatchNorm on the global batch."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import CHANNELS, global_batch, local_bn_class, memory_format, rank_slice
from distributed import run_distributed
from torch.testing import assert_close

from syncbn import SyncBatchNorm
from syncbn.comm import resolve

SIZES = {1: [7], 2: [0, 7], 3: [3, 0, 4]}


def _close(actual, expected, label):
    """fp64 to 1e-9; on failure the message names the case and gives abs and rel error."""
    assert_close(actual, expected, atol=1e-9, rtol=1e-9, msg=lambda m: f"{label}\n{m}")


def _check(rank, world, dims, channels_last, affine, momentum, group=None, steps=2):
    sizes = SIZES[world]
    fmt = memory_format(dims, channels_last)
    torch.manual_seed(0)
    ref = local_bn_class(dims)(CHANNELS, affine=affine, momentum=momentum).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    sync = SyncBatchNorm(CHANNELS, affine=affine, momentum=momentum, process_group=group).double()
    sync.load_state_dict(ref.state_dict())
    case = f"dims={dims} channels_last={channels_last} affine={affine} momentum={momentum} rank={rank}"
    mine = rank_slice(sizes, rank)
    for step in range(steps):
        x, dy = global_batch(step, sum(sizes), dims)
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        xr = x.detach().clone().requires_grad_()
        ref.zero_grad()
        y_ref = ref(xr)
        y_ref.backward(dy)

        xs = x[mine].detach().clone().requires_grad_()
        sync.zero_grad()
        y = sync(xs)
        y.backward(dy[mine])

        assert y.is_contiguous(memory_format=fmt), case
        _close(y, y_ref[mine], f"{case}: y")
        _close(xs.grad, xr.grad[mine], f"{case}: dx")
        if affine:
            for name in ("weight", "bias"):
                grad = getattr(sync, name).grad.clone()
                resolve(group).all_reduce_(grad)
                _close(grad, getattr(ref, name).grad, f"{case}: d{name}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            _close(getattr(sync, name), getattr(ref, name), f"{case}: {name}")

    sync.eval()
    ref.eval()
    x, _ = global_batch(steps, sum(sizes), dims)
    with torch.no_grad():
        _close(sync(x[mine]), ref(x)[mine], f"{case}: eval")


def spec_worker(rank, world, dims, group=None):
    for channels_last in (False, True) if dims >= 4 else (False,):
        for affine in (True, False):
            for momentum in (0.1, None):
                _check(rank, world, dims, channels_last, affine, momentum, group)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dims", [2, 3, 4, 5])
def test_matches_batchnorm_on_global_batch(tmp_path, world, dims):
    """Every layout (channels_last too), affine on/off and momentum 0.1/None, in fp64 to 1e-9."""
    run_distributed(spec_worker, world, tmp_path, dims)


def ddp_uneven_loss_scaling(rank, world, group=None):
    """The README's recipe: scale each rank's mean loss by its share of the global batch."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from syncbn import convert_sync_batchnorm

    sizes = [3, 5]
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, CHANNELS), nn.BatchNorm1d(CHANNELS), nn.Linear(CHANNELS, 1)).double()
    model = DistributedDataParallel(convert_sync_batchnorm(copy.deepcopy(ref)))
    x, _ = global_batch(0, sum(sizes), 2)
    x = x[:, :4].contiguous()
    y = x.sum(1, keepdim=True).sin()
    ref_loss = nn.functional.mse_loss(ref(x), y)
    ref_loss.backward()
    mine = rank_slice(sizes, rank)
    loss = nn.functional.mse_loss(model(x[mine]), y[mine])
    (loss * (sizes[rank] * world / sum(sizes))).backward()
    for (name, p), q in zip(model.module.named_parameters(), ref.parameters(), strict=True):
        _close(p.grad, q.grad, f"rank {rank}: grad of {name}")


@pytest.mark.distributed
def test_ddp_with_uneven_batches_matches_one_process(tmp_path):
    run_distributed(ddp_uneven_loss_scaling, 2, tmp_path)
