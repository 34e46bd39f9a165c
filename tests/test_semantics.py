"""Multi-process semantics: empty and tiny global batches, bad input, eval, groups, dtypes, compile."""

from __future__ import annotations

import copy
import pickle
import sys

import pytest
import torch
import torch.distributed as dist
from cases import CHANNELS, global_batch, rank_slice
from distributed import run_distributed
from processes import run_command
from torch import nn
from torch.testing import assert_close

from syncbn import SyncBatchNorm, convert_sync_batchnorm, new_groups
from syncbn.comm import resolve

pytestmark = pytest.mark.distributed


def _snapshot(module):
    return copy.deepcopy(module.state_dict())


def empty_global_batch(rank, world, group=None):
    bn = SyncBatchNorm(CHANNELS, process_group=group).double()
    before = _snapshot(bn)
    x = torch.randn(0, CHANNELS, 3, dtype=torch.float64, requires_grad=True)
    y = bn(x)
    assert y.shape == x.shape and not torch.isnan(y).any()
    y.sum().backward()
    assert bn.weight.grad.eq(0).all()
    assert_close(bn.running_mean, before["running_mean"], atol=0, rtol=0)
    assert_close(bn.running_var, before["running_var"], atol=0, rtol=0)
    assert bn.num_batches_tracked.item() == 1


def test_empty_global_batch(tmp_path):
    run_distributed(empty_global_batch, 3, tmp_path)


def one_value_per_channel(rank, world, group=None):
    bn = SyncBatchNorm(CHANNELS, process_group=group)
    before = _snapshot(bn)
    x = torch.randn(1 if rank == 1 else 0, CHANNELS)
    with pytest.raises(ValueError, match="expected more than 1 value per channel in the global batch"):
        bn(x)
    assert_close(bn.state_dict(), before, atol=0, rtol=0)
    # The group is still usable: the error left no rank inside a collective.
    bn(torch.randn(2, CHANNELS))


def test_one_value_per_channel_raises_on_every_rank(tmp_path):
    run_distributed(one_value_per_channel, 3, tmp_path)


BAD = {
    "channels": (torch.randn(4, CHANNELS + 1, 2), ValueError, "expected input with 5 channels"),
    "dims": (torch.randn(CHANNELS), ValueError, "expected at least 2D input"),
    "dtype": (torch.ones(4, CHANNELS, dtype=torch.int32), TypeError, "expected a floating-point input"),
}


def bad_input_on_one_rank(rank, world, kind, group=None):
    bn = SyncBatchNorm(CHANNELS, process_group=group)
    before = _snapshot(bn)
    bad, error, message = BAD[kind]
    if rank == world - 1:
        with pytest.raises(error, match=message):
            bn(bad)
    else:
        with pytest.raises(RuntimeError, match="another rank of the group rejected its input"):
            bn(torch.randn(4, CHANNELS, 2))
    assert_close(bn.state_dict(), before, atol=0, rtol=0)
    bn(torch.randn(3, CHANNELS, 2)).sum().backward()


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_on_one_rank_raises_everywhere(tmp_path, kind):
    run_distributed(bad_input_on_one_rank, 3, tmp_path, kind, timeout=60)


def eval_does_not_communicate(rank, world, group=None):
    bn = SyncBatchNorm(CHANNELS, process_group=group).eval()
    if rank == 0:
        for _ in range(5):
            bn(torch.randn(4, CHANNELS))
    # Had rank 0 issued any collective above, this one would pair with it and not sum to 1.
    probe = torch.tensor([float(rank)], dtype=torch.float64)
    resolve(group).all_reduce_(probe)
    assert probe.item() == world * (world - 1) / 2


def test_eval_with_running_stats_does_not_communicate(tmp_path):
    run_distributed(eval_does_not_communicate, 2, tmp_path)


def untracked_eval_syncs(rank, world, group=None):
    sizes = [3, 5, 0][:world]
    x, _ = global_batch(0, sum(sizes), 3)
    ref = nn.BatchNorm1d(CHANNELS, track_running_stats=False).double().eval()
    bn = SyncBatchNorm(CHANNELS, track_running_stats=False, process_group=group).double().eval()
    with torch.no_grad():
        assert_close(bn(x[rank_slice(sizes, rank)]), ref(x)[rank_slice(sizes, rank)], atol=1e-9, rtol=1e-9)


def test_untracked_stats_are_synced_in_eval(tmp_path):
    run_distributed(untracked_eval_syncs, 2, tmp_path)


def sub_groups(rank, world, group=None):
    pair = new_groups(2, group)
    block = rank // 2
    sizes = [2, 5]
    x, dy = global_batch(block, sum(sizes), 4)
    ref = nn.BatchNorm2d(CHANNELS).double()
    xr = x.clone().requires_grad_()
    ref(xr).backward(dy)
    bn = SyncBatchNorm(CHANNELS, process_group=pair).double()
    mine = rank_slice(sizes, rank % 2)
    xs = x[mine].clone().requires_grad_()
    y = bn(xs)
    y.backward(dy[mine])
    assert_close(xs.grad, xr.grad[mine], atol=1e-9, rtol=1e-9)
    assert_close(bn.running_var, ref.running_var, atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="expected group_size to divide the group size 4"):
        new_groups(3, group)


def test_sub_groups_sync_within_their_block(tmp_path):
    run_distributed(sub_groups, 4, tmp_path)


def _not_a_member(rank, world):
    only_zero = dist.new_group([0])
    bn = SyncBatchNorm(CHANNELS, process_group=only_zero)
    if rank == 1:
        with pytest.raises(ValueError, match="expected this process to be a member of process_group"):
            bn(torch.randn(4, CHANNELS))
        bn.eval()(torch.randn(4, CHANNELS))
    dist.barrier()


def deep_copy_shares_the_group(rank, world, group=None):
    pair = new_groups(world, group)
    model = convert_sync_batchnorm(_model(), pair)
    ema = copy.deepcopy(model)
    assert ema[1].process_group is pair and ema[1].weight is not model[1].weight
    assert_close(ema.state_dict(), model.state_dict(), atol=0, rtol=0)
    ema(torch.randn(3, 3, 10, 10)).sum().backward()


def test_deep_copy_shares_the_group(tmp_path):
    run_distributed(deep_copy_shares_the_group, 2, tmp_path)


def save_with_a_group(rank, world, path, group=None):
    pair = new_groups(world, group)
    model = convert_sync_batchnorm(_model(), pair)
    model(torch.randn(3, 3, 10, 10)).sum().backward()
    copied = pickle.loads(pickle.dumps(model))
    assert copied[1].process_group is None and model[1].process_group is pair
    if rank == 0:
        torch.save(model, path)


def test_a_pickle_from_before_process_group_was_a_property_loads():
    state = SyncBatchNorm(3).__dict__.copy()
    del state["_process_group"], state["_communicator"]
    state["process_group"] = None
    layer = SyncBatchNorm.__new__(SyncBatchNorm)
    layer.__setstate__(state)
    assert layer.process_group is None
    assert layer(torch.randn(4, 3)).shape == (4, 3)


LOAD_AND_TRAIN = """
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)
assert model[1].process_group is None, model[1].process_group
steps = model[1].num_batches_tracked.item()
model(torch.randn(4, 3, 10, 10)).sum().backward()
assert model[1].num_batches_tracked.item() == steps + 1
print("trained", type(model[1]).__name__)
"""


def test_a_model_saved_with_a_group_loads_and_trains_without_one(tmp_path):
    """A group is a runtime handle: pickling drops it; a fresh process trains on its own."""
    path = tmp_path / "model.pt"
    run_distributed(save_with_a_group, 2, tmp_path, str(path))
    out = run_command([sys.executable, "-c", LOAD_AND_TRAIN, str(path)], timeout=120)
    assert "trained SyncBatchNorm" in out


def test_group_without_this_rank_is_an_error(tmp_path):
    run_distributed(_not_a_member, 2, tmp_path)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))


def low_precision(rank, world, group=None):
    sizes = [3, 5, 0][:world]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(sizes), 3, 10, 10, generator=g) * 4 + 20
    ref = _model().double()
    expected = ref(x.double())
    model = convert_sync_batchnorm(_model(), group)
    mine = rank_slice(sizes, rank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x[mine])
    assert y.dtype == torch.bfloat16
    assert_close(y.double(), expected[mine], atol=0.15, rtol=0.05)
    y.float().sum().backward()
    assert_close(model[1].running_mean.double(), ref[1].running_mean, atol=0.05, rtol=0.01)

    bn = SyncBatchNorm(3, process_group=group)
    for dtype in (torch.float16, torch.bfloat16):
        y = bn(x[mine].to(dtype))
        assert y.dtype == dtype


def test_autocast_and_half_inputs(tmp_path):
    run_distributed(low_precision, 2, tmp_path)


def _compiled(rank, world):
    sizes = [3, 5]
    x = torch.randn(sum(sizes), 3, 10, 10, generator=torch.Generator().manual_seed(0))
    mine = rank_slice(sizes, rank)
    eager = convert_sync_batchnorm(_model())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    for _ in range(2):
        y_eager, y_compiled = eager(x[mine]), compiled(x[mine])
        assert_close(y_compiled, y_eager)
        y_eager.sum().backward()
        y_compiled.sum().backward()
    assert_close(compiled_model.state_dict(), eager.state_dict())
    assert_close(compiled_model[0].weight.grad, eager[0].weight.grad)


def test_torch_compile_matches_eager(tmp_path):
    run_distributed(_compiled, 2, tmp_path, timeout=240)
