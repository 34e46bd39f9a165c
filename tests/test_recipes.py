"""The README's framework recipes that are cheap to install, run for real on 2 Gloo ranks."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from cases import rank_slice, small_cnn, small_cnn_input
from distributed import run_distributed
from torch.testing import assert_close

import syncbn

pytestmark = pytest.mark.distributed

SIZES = [4, 4]


def accelerate_step(rank, world, group=None):
    """Convert before prepare(): Accelerate wraps in DDP and the layers stay synchronized."""
    accelerate = pytest.importorskip("accelerate")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "0")  # the group exists already; Accelerate only reads these
    accelerator = accelerate.Accelerator(cpu=True)
    assert accelerator.num_processes == world
    ref = small_cnn()
    model = syncbn.convert_sync_batchnorm(copy.deepcopy(ref))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(accelerator.unwrap_model(model)[1], syncbn.SyncBatchNorm)
    x = small_cnn_input(sum(SIZES), torch.Generator().manual_seed(1))
    model(x[rank_slice(SIZES, rank)]).square().mean().backward()
    optimizer.step()
    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref(x).square().mean().backward()
    ref_optimizer.step()
    assert_close(accelerator.unwrap_model(model).state_dict(), ref.state_dict(), atol=1e-9, rtol=1e-9)


def test_accelerate_convert_before_prepare(tmp_path):
    run_distributed(accelerate_step, 2, tmp_path)
