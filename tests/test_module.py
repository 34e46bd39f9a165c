"""Single-process behaviour: the Function's math, numerics, errors, conversion, compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncbn
from syncbn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from syncbn.comm import LocalComm
from syncbn.functional import sync_batch_norm


def _apply(x, weight=None, bias=None, running=None, momentum=0.1, eps=1e-5):
    running = running or (None, None, None)
    return sync_batch_norm(x, weight, bias, *running, momentum, eps, LocalComm())


def test_gradcheck_fp64(kernel_path):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _apply(x, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: _apply(x), (x,))


@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4, 1e5])
def test_fp32_error_at_large_mean_over_std_within_2x_of_native(ratio, kernel_path):
    """E[x²]−E[x]² in fp32 would be off by ~1 at ratio 1e3; float64 sums stay at native's error."""
    torch.manual_seed(0)
    x = torch.randn(16, 8, 12, 12) * torch.rand(1, 8, 1, 1).add(0.5) + ratio
    reference = F.batch_norm(x.double(), None, None, training=True)
    dy = torch.randn_like(x)

    native_x = x.clone().requires_grad_()
    native = F.batch_norm(native_x, None, None, training=True)
    native.backward(dy)
    ours_x = x.clone().requires_grad_()
    ours = _apply(ours_x)
    ours.backward(dy)
    x64 = x.double().requires_grad_()
    F.batch_norm(x64, None, None, training=True).backward(dy.double())

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(ours, reference) <= 2 * err(native, reference)
    assert err(ours_x.grad, x64.grad) <= 2 * err(native_x.grad, x64.grad)


def test_constant_channel_has_zero_variance_not_nan():
    x = torch.full((4, 2, 3), 7.0)
    y = _apply(x)
    assert torch.equal(y, torch.zeros_like(x))


def test_fp16_and_bf16_keep_dtype_and_match_fp64(kernel_path):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6) * 2 + 50
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    reference = F.batch_norm(x.double(), None, None, w.double(), b.double(), training=True)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        xh = x.to(dtype).requires_grad_()
        y = _apply(xh, w, b)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), reference, atol=tol * 4, rtol=tol)
        y.float().sum().backward()
        assert xh.grad.dtype == dtype


def test_running_stats_and_momentum_none_match_native():
    ours, ref = SyncBatchNorm(3, momentum=None).double(), nn.BatchNorm1d(3, momentum=None).double()
    for step in range(3):
        x = torch.randn(6 + step, 3, 4, dtype=torch.float64) * 3 + step
        running = (ours.running_mean, ours.running_var, ours.num_batches_tracked)
        _apply(x, running=running, momentum=None)
        ref(x)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=1e-12, rtol=1e-12)


def test_empty_batch_gives_empty_output_and_keeps_running_stats():
    running = (torch.zeros(3), torch.ones(3), torch.tensor(0))
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = _apply(x, running=running)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(running[0], torch.zeros(3)) and torch.equal(running[1], torch.ones(3))
    assert running[2].item() == 1


def test_single_value_per_channel_raises_and_leaves_stats():
    bn = SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel"):
        bn(torch.randn(1, 3))
    running = (torch.zeros(3), torch.ones(3), torch.tensor(0))
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel in the global batch"):
        _apply(torch.randn(1, 3, 1), running=running)
    assert bn.num_batches_tracked.item() == 0 and running[2].item() == 0
    assert torch.equal(running[0], torch.zeros(3))


@pytest.mark.parametrize(
    "x,error,message",
    [
        (torch.randn(4), ValueError, r"^expected at least 2D input \(got 1D input\)$"),
        (torch.randn(4, 3, 2), ValueError, r"^expected input with 5 channels \(got 3\)$"),
        (torch.ones(4, 5, dtype=torch.int64), TypeError, r"^expected a floating-point input \(got torch.int64\)$"),
    ],
)
def test_bad_input_errors(x, error, message):
    bn = SyncBatchNorm(5)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(error, match=message):
        bn(x)
    torch.testing.assert_close(bn.state_dict(), before, atol=0, rtol=0)


class _Mirror:
    """A world of two identical ranks, in one process: every sum doubles."""

    world_size, rank = 2, 0

    def all_reduce_(self, tensor):
        tensor.mul_(2)


def test_a_communicator_object_is_a_process_group():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    ours = SyncBatchNorm(4, process_group=_Mirror()).double()
    ref = nn.BatchNorm1d(4).double()
    both = torch.cat([x, x]).detach().requires_grad_()
    ours(x).sum().backward()
    ref(both).sum().backward()
    torch.testing.assert_close(ours.running_var, ref.running_var)
    torch.testing.assert_close(x.grad, both.grad[:3])


def test_bad_process_group_type():
    with pytest.raises(TypeError, match=r"expected process_group to be None, .* \(got str\)"):
        SyncBatchNorm(3, process_group="world")(torch.randn(4, 3))


def test_without_group_it_is_nn_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    ours = SyncBatchNorm(4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=0, rtol=0)


def test_state_dict_interchangeable_with_batchnorm2d():
    ref = nn.BatchNorm2d(4)
    ref.running_mean.uniform_()
    ref.num_batches_tracked.fill_(5)
    ours = SyncBatchNorm(4)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=0, rtol=0)
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())


def _model():
    return nn.Sequential(
        nn.BatchNorm1d(3),
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False, momentum=None)),
        nn.BatchNorm3d(4, track_running_stats=False, bias=False),
    )


def test_convert_and_revert_round_trip_loses_nothing():
    model = _model().double()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_()
    model[0].weight.requires_grad_(False)
    model[1].eval()
    before = copy.deepcopy(model.state_dict())

    converted = convert_sync_batchnorm(model)
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [SyncBatchNorm] * 3
    assert converted[0].weight.dtype == torch.float64 and not converted[0].weight.requires_grad
    assert not converted[1].training and not converted[1][1].training and converted[2].training
    assert converted[2].bias is None and converted[1][1].momentum is None

    reverted = revert_sync_batchnorm(converted)
    kinds = [type(m) for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]
    torch.testing.assert_close(reverted.state_dict(), before, atol=0, rtol=0)
    assert not reverted[0].weight.requires_grad and not reverted[1][1].training


def test_convert_root_and_revert_direct_layer():
    root = convert_sync_batchnorm(nn.BatchNorm2d(3))
    assert isinstance(root, SyncBatchNorm)
    local = revert_sync_batchnorm(SyncBatchNorm(3))
    assert not isinstance(local, SyncBatchNorm)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(local(x), nn.BatchNorm2d(3)(x))
    assert local.state_dict().keys() == nn.BatchNorm2d(3).state_dict().keys()


def test_torch_compile_matches_eager_without_group():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), SyncBatchNorm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = torch.randn(6, 3, 8, 8)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(compiled_model.state_dict(), eager.state_dict())


def test_public_api():
    assert set(syncbn.__all__) == {
        "SyncBatchNorm",
        "convert_sync_batchnorm",
        "revert_sync_batchnorm",
        "new_groups",
        "joinable",
    }


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, False),
        ({"SYNCBN_DEBUG": "1"}, True),
        ({"SYNCBN_DEBUG": "0"}, False),
        ({"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}, True),
        ({"TORCH_DISTRIBUTED_DEBUG": "INFO"}, False),
    ],
)
def test_debug_mode_switches(monkeypatch, env, expected):
    """Read from the environment at import and by refresh(), not at every call."""
    before = syncbn.debug.enabled()
    monkeypatch.delenv("SYNCBN_DEBUG", raising=False)
    monkeypatch.delenv("TORCH_DISTRIBUTED_DEBUG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        assert syncbn.debug.enabled() is before
        assert syncbn.debug.refresh() is expected and syncbn.debug.enabled() is expected
    finally:
        monkeypatch.undo()
        syncbn.debug.refresh()
