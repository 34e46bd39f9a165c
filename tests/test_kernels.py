"""The fused CPU kernels: built in CI, equal to the stock-op path, layouts and dtypes kept."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.utils.cpp_extension

from syncbn import kernels
from syncbn.functional import _affine, _local_moments

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _reference_moments(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    dims = [0, *range(2, x.dim())]
    count = torch.tensor([x.numel() / x.size(1)], dtype=torch.float64)
    return torch.cat([count, x.sum(dims), (x * x).sum(dims)])


def test_kernels_build_here():
    """CI has a compiler and ninja: a silent fall back to stock ops would hide a slow path."""
    if os.environ.get("SYNCBN_CPU_KERNELS") == "0":
        pytest.skip("SYNCBN_CPU_KERNELS=0")
    assert kernels.available()


MOMENT_SHAPES = [(4, 3, 7), (2, 5, 4, 6), (2, 3, 2, 4, 5), (3, 2, 1, 5), (1, 1, 9), (6, 4), (5, 3, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MOMENT_SHAPES)
def test_moments_equal_float64_sums(shape, dtype):
    if not kernels.available():
        pytest.skip("kernels unavailable")
    x = (torch.randn(shape) * 3 + 1e3).to(dtype)
    torch.testing.assert_close(torch.ops.syncbn.moments(x), _reference_moments(x), rtol=1e-14, atol=0)


def test_moments_left_to_torch_where_its_kernel_is_faster():
    if not kernels.available():
        pytest.skip("kernels unavailable")
    channels_last = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    for x in (channels_last, torch.randn(4, 3), torch.randn(4, 3, 1)):
        assert not kernels.moments_usable(x)
    assert kernels.moments_usable(torch.randn(4, 3, 2))
    with pytest.raises(RuntimeError, match="expected a contiguous input of at least 2 dimensions"):
        torch.ops.syncbn.moments(channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 5),
        lambda: torch.randn(4, 5, 7),
        lambda: torch.randn(2, 5, 4, 6),
        lambda: torch.randn(2, 5, 4, 6).contiguous(memory_format=torch.channels_last),
        lambda: torch.randn(2, 5, 3, 4, 6).contiguous(memory_format=torch.channels_last_3d),
        lambda: torch.randn(4, 6, 5).transpose(1, 2),  # strided: made dense first
        lambda: torch.randn(0, 5, 3),
    ],
    ids=["2d", "3d", "nchw", "channels_last", "channels_last_3d", "strided", "empty"],
)
def test_backward_elemt_equals_stock_two_passes(make, dtype):
    if not kernels.available():
        pytest.skip("kernels unavailable")
    torch.manual_seed(0)
    x, dy = make().to(dtype), make().to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    m, a, b, k = torch.randn(4, x.size(1), dtype=acc)
    view = (1, -1) + (1,) * (x.dim() - 2)
    expected = (a.view(view) * dy.to(acc) + b.view(view) * (x.to(acc) - m.view(view)) + k.view(view)).to(dtype)
    got = torch.ops.syncbn.backward_elemt(dy, x, m, a, b, k)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    fmt = torch.channels_last if x.dim() == 4 and not x.is_contiguous() else None
    if fmt is not None:
        assert got.is_contiguous(memory_format=fmt)
    stock = _affine(x, b, torch.addcmul(k, m, b, value=-1)).addcmul_(dy, a.view(view))
    torch.testing.assert_close(got, stock, rtol=tol, atol=tol)


def test_backward_elemt_rejects_mismatched_coefficients():
    if not kernels.available():
        pytest.skip("kernels unavailable")
    x = torch.randn(4, 3, 5)
    good, bad = torch.randn(3), torch.randn(4)
    with pytest.raises(RuntimeError, match="expected contiguous per-channel coefficients of size 3"):
        torch.ops.syncbn.backward_elemt(x, x, good, good, bad, good)
    with pytest.raises(RuntimeError, match="expected contiguous per-channel coefficients"):
        torch.ops.syncbn.backward_elemt(x, x, good, good, good.double(), good)


def test_local_moments_same_on_both_paths(monkeypatch):
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64) * 10 + 1e4
    fused = _local_moments(x)
    monkeypatch.setattr(kernels, "available", lambda: False)
    torch.testing.assert_close(_local_moments(x), fused, rtol=1e-12, atol=0)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.delenv("SYNCBN_CPU_KERNELS", raising=False)
    kernels.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="CPU kernels unavailable, using stock ops.*no C\\+\\+ compiler"):
            assert not kernels.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not kernels.available()
            assert not kernels.usable(torch.randn(2, 3))
    finally:
        kernels.available.cache_clear()


def test_results_do_not_depend_on_the_thread_count():
    """Each channel's sums are taken by one thread in a fixed order, and dx is elementwise,
    so 1 and 2 intra-op threads give bit-identical results."""
    if not kernels.available():
        pytest.skip("kernels unavailable")
    x = torch.randn(8, 64, 32, 32) * 3 + 5
    dy, c = torch.randn_like(x), torch.rand(64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(
                (torch.ops.syncbn.moments(x), torch.ops.syncbn.backward_elemt(dy, x, c, c, c, c), _local_moments(x))
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_a_build_says_when_it_starts_and_ends(tmp_path):
    """A cold cache builds with one line to stderr before and one after; a warm one is silent."""
    if os.environ.get("SYNCBN_CPU_KERNELS") == "0":
        pytest.skip("SYNCBN_CPU_KERNELS=0")
    code = "import syncbn.kernels as k; assert k.available()"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)]
    runs.append(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240))
    assert [run.returncode for run in runs] == [0, 0], runs
    lines = [line for line in runs[0].stderr.splitlines() if line.startswith("syncbn:")]
    assert len(lines) == 2 and "building the CPU kernels once" in lines[0] and "built in" in lines[1], runs[0].stderr
    assert "syncbn:" not in runs[1].stderr
