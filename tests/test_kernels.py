"""The fused ops: registrations checked by opcheck, the C++ kernels equal to the stock-op
oracle (`syncbn.reference`) for every dtype and layout, results independent of the thread
count, and the build built in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension
from torch.utils.cpp_extension import _get_build_directory

from syncbn import comm, kernels, ops, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = {
    "2d": lambda: torch.randn(6, 5),
    "3d": lambda: torch.randn(4, 5, 7),
    "nchw": lambda: torch.randn(2, 5, 4, 6),
    "channels_last": lambda: torch.randn(2, 5, 4, 6).contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda: torch.randn(2, 5, 3, 4, 6).contiguous(memory_format=torch.channels_last_3d),
    "nchw 1x1": lambda: torch.randn(3, 5, 1, 1),
    # Planes of 300 values: the backward's float32 runs of 128 values, a short run and a tail.
    "nchw, long planes": lambda: torch.randn(2, 3, 20, 15),
    "strided": lambda: torch.randn(4, 6, 5).transpose(1, 2),  # made dense first
    "wide rows": lambda: torch.randn(3, 300),  # rows longer than one tile
    # Narrow rows are summed many to a tile: whole groups of tiles, and rows left over.
    "narrow rows": lambda: torch.randn(431, 5),
    "channels_last, narrow rows": lambda: torch.randn(5, 16, 7, 11).contiguous(memory_format=torch.channels_last),
}


def _tolerance(dtype: torch.dtype) -> dict:
    return {
        # One rounding of the output apart: the stock path rounds twice (two passes).
        torch.float16: dict(rtol=2e-3, atol=4e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float64: dict(rtol=1e-12, atol=1e-12),
    }[dtype]


def _requires_kernels() -> None:
    if not kernels.available():
        pytest.skip("CPU kernels unavailable")


def _inputs(layout: str, dtype: torch.dtype, mean: float = 1.0):
    torch.manual_seed(0)
    make = LAYOUTS[layout]
    x = (make() * 3 + mean).to(dtype)
    dy = make().to(dtype)
    return x, dy


def _step(impl, x, dy, weight, bias):
    """A full synchronized step, with W=1, through one implementation's ops."""
    stats = impl.moments(x)
    y, mean, invstd = impl.forward_apply(x, stats, weight, bias, 1e-5)
    sums, grad_weight, grad_bias = impl.backward_reduce(dy, x, mean, invstd)
    dx = impl.backward_apply(dy, x, mean, invstd, weight, stats, sums)
    return stats, y, mean, invstd, sums, grad_weight, grad_bias, dx


def test_kernels_build_here():
    """CI has a compiler and ninja: a silent fall back to stock ops would hide a slow path."""
    if os.environ.get("SYNCBN_CPU_KERNELS") == "0":
        pytest.skip("SYNCBN_CPU_KERNELS=0")
    assert kernels.available()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_equal_the_stock_op_oracle(layout, dtype):
    _requires_kernels()
    x, dy = _inputs(layout, dtype)
    weight, bias = torch.rand(x.size(1)) + 0.5, torch.randn(x.size(1))
    fused = _step(torch.ops.syncbn_cpu, x, dy, weight, bias)
    stock = _step(reference, x, dy, weight, bias)
    names = ["stats", "y", "mean", "invstd", "sums", "grad_weight", "grad_bias", "dx"]
    for name, got, expected in zip(names, fused, stock, strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        # Half inputs: the stock statistics are float32, so compare at float32 precision.
        tol = _tolerance(dtype if name in ("y", "dx") else torch.float32 if dtype != torch.float64 else dtype)
        torch.testing.assert_close(got, expected, **tol, msg=lambda m, name=name: f"{name}: {m}")
    y, dx = fused[1], fused[7]
    assert y.stride() == x.stride() == dx.stride() or not x.is_contiguous(memory_format=x.suggest_memory_format())


class _SilentWorld:
    """A world of 2 whose all-reduce does nothing: the synchronized step in one process, its
    all-reduces through `syncbn.comm`. ``fail_at`` makes that call raise."""

    world_size, rank = 2, 0

    def __init__(self, fail_at: int = 0) -> None:
        self.calls, self.fail_at = 0, fail_at

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise TimeoutError("a peer is gone")


def _training_step(cpp: bool, x, dy, weight, bias, buffers, momentum, world, check_finite=False):
    """Forward and backward of the whole eager step: the C++ step or the stock-op Function."""
    x = x.clone().requires_grad_()
    weight, bias = (None if p is None else p.clone().requires_grad_() for p in (weight, bias))
    buffers = [None] * 3 if buffers is None else [b.clone() for b in buffers]
    args = (x, weight, bias, *buffers, momentum, 1e-5)
    if cpp:
        y = ops._cpu_step()(*args, comm.key(world), check_finite)
    else:
        y = ops._Step.apply(*args, world, check_finite)
    y.backward(dy)
    return [y, x.grad, *(None if p is None else p.grad for p in (weight, bias)), *buffers]


VARIANTS = ["affine", "no affine", "no bias", "momentum=None", "no running stats"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["2d", "nchw", "channels_last", "channels_last_3d"])
def test_cpp_step_equals_the_stock_step(layout, dtype, variant):
    """The eager CPU step with its C++ autograd (`ops._cpu_step`) against `ops._Step` on
    stock ops: output, every gradient, the running stats, and both all-reduces made."""
    _requires_kernels()
    x, dy = _inputs(layout, dtype)
    channels = x.size(1)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    weight = None if variant == "no affine" else torch.rand(channels, dtype=wide) + 0.5
    bias = None if variant in ("no affine", "no bias") else torch.randn(channels, dtype=wide)
    buffers = None
    if variant != "no running stats":
        buffers = (torch.rand(channels, dtype=wide), torch.rand(channels, dtype=wide) + 1, torch.tensor(3))
    momentum = None if variant == "momentum=None" else 0.1
    worlds = _SilentWorld(), _SilentWorld()
    got, expected = (
        _training_step(cpp, x, dy, weight, bias, buffers, momentum, w)
        for cpp, w in [(True, worlds[0]), (False, worlds[1])]
    )
    names = ["y", "dx", "grad_weight", "grad_bias", "running_mean", "running_var", "num_batches_tracked"]
    for name, a, b in zip(names, got, expected, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.stride() == b.stride(), name
            tol = _tolerance(dtype if name in ("y", "dx") else wide)
            torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert worlds[0].calls == worlds[1].calls == 2


def test_cpp_step_errors_keep_their_type():
    """Errors raised in Python under the C++ step (the count checks, check_finite, a
    communicator that fails in the backward) reach the caller as they were raised, and a
    rejected step leaves the running stats as they were."""
    _requires_kernels()
    x, dy = torch.randn(4, 3), torch.randn(4, 3)
    buffers = (torch.zeros(3), torch.ones(3), torch.tensor(0))
    with pytest.raises(TimeoutError, match="a peer is gone"):
        _training_step(True, x, dy, None, None, None, 0.1, _SilentWorld(fail_at=2))
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="channels \\[2\\]"):
        _training_step(True, x, dy, None, None, buffers, 0.1, _SilentWorld(), check_finite=True)
    assert not buffers[0].any() and buffers[2].item() == 0
    world = _SilentWorld()
    with pytest.raises(RuntimeError, match="expected running_var and num_batches_tracked with running_mean"):
        ops._cpu_step()(x, None, None, buffers[0], None, None, 0.1, 1e-5, comm.key(world), False)
    assert world.calls == 0  # raised before any collective
    for check_finite in (False, True):
        with pytest.raises(ValueError, match="got 1; this rank's input size \\[1, 3\\]"):
            ops._cpu_step()(
                torch.randn(1, 3), None, None, None, None, None, 0.1, 1e-5, comm.key(comm.LocalComm()), check_finite
            )


@pytest.mark.timeout(60)
def test_cpp_step_on_several_threads():
    """Steps on four Python threads at once (the C++ step releases the GIL while it runs
    and takes it back for its all-reduces) neither crash, deadlock nor mix their results;
    without taking the GIL back the process aborts here."""
    _requires_kernels()
    torch.manual_seed(0)
    cases = [(torch.randn(64, 32, 8, 8), torch.randn(64, 32, 8, 8)) for _ in range(4)]

    def run(case):
        x, dy = case
        return _training_step(True, x, dy, None, None, None, 0.1, _SilentWorld())[:2]

    expected = [run(case) for case in cases]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, cases))
    for one, other in zip(got, expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(one, other, strict=True))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_moments_exact_in_float64_far_from_zero(layout):
    """The sums are float64 sums of the float32 values, whatever the layout."""
    _requires_kernels()
    x, _ = _inputs(layout, torch.float32, mean=1e4)
    wide = x.double()
    dims = [0, *range(2, x.dim())]
    expected = torch.cat([wide.new_tensor([x.numel() / x.size(1)]), wide.sum(dims), (wide * wide).sum(dims)])
    torch.testing.assert_close(torch.ops.syncbn.moments(x), expected, rtol=1e-14, atol=0)


def test_empty_input():
    _requires_kernels()
    x = torch.randn(0, 3, 4)
    stats = torch.ops.syncbn.moments(x)
    assert torch.equal(stats, torch.zeros(7, dtype=torch.float64))
    sums, grad_weight, grad_bias = torch.ops.syncbn_cpu.backward_reduce(x, x, torch.zeros(3), torch.ones(3))
    assert not sums.any() and not grad_weight.any() and not grad_bias.any()


def test_update_running_stats_equals_the_oracle():
    _requires_kernels()
    for momentum in (0.1, None):
        stats = reference.moments(torch.randn(8, 3, 5) * 2 + 1)
        start = (torch.rand(3), torch.rand(3) + 1, torch.tensor(4))
        buffers = [tuple(t.clone() for t in start) for _ in range(2)]
        torch.ops.syncbn_cpu.update_running_stats(*buffers[0], stats, momentum)
        reference.update_running_stats(*buffers[1], stats, momentum)
        for got, expected in zip(*buffers, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    mean, var, tracked = torch.rand(3), torch.rand(3), torch.tensor(2)
    before = mean.clone(), var.clone()
    torch.ops.syncbn_cpu.update_running_stats(mean, var, tracked, torch.zeros(7, dtype=torch.float64), 0.1)
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1]) and tracked.item() == 3


def test_statistics_equal_the_oracle():
    """syncbn::statistics on the CPU is the C++ kernel: the stock ops' mean and invstd, and
    their count errors."""
    _requires_kernels()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("syncbn::statistics", "CPU")
    stats = reference.moments(torch.randn(8, 3, 5) * 2 + 1)
    torch.testing.assert_close(
        torch.ops.syncbn.statistics(stats, 1e-5), ops._statistics(stats, 1e-5), rtol=1e-15, atol=0
    )
    for count, error, message in [(1.0, ValueError, "got 1\\)"), (float("nan"), RuntimeError, "another rank")]:
        bad = stats.clone()
        bad[0] = count
        for statistics in (torch.ops.syncbn.statistics, ops._statistics):
            with pytest.raises(error, match=message):
                statistics(bad, 1e-5)


def _opcheck_cases():
    x = torch.randn(4, 3, 5, 2, requires_grad=True)
    stats = torch.ops.syncbn.moments(x.detach())
    op = torch.ops.syncbn
    mean, invstd = (t.float() for t in op.statistics(stats, 1e-5))
    dy = torch.randn(4, 3, 5, 2)
    buffers = (torch.zeros(3), torch.ones(3), torch.tensor(0))
    return [
        (op.moments.default, (x.detach(),)),
        (op.moments.default, (x.detach().contiguous(memory_format=torch.channels_last),)),
        (op.check_finite.default, (stats,)),
        (op.statistics.default, (stats, 1e-5)),
        (op.update_running_stats.default, (*buffers, stats, 0.1)),
        (op.backward_reduce.default, (dy, x.detach(), mean, invstd)),
        (op.backward_reduce.default, (dy.contiguous(memory_format=torch.channels_last), x.detach(), mean, invstd)),
        (op.all_reduce.default, (stats, comm.key(_SilentWorld()))),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    """Schema, fake kernel and dispatch of the registered ops, as torch.compile relies on them:
    on the CPU, the C++ kernels once the extension is loaded, else the Python ones."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.timeout(600)
def test_registered_ops_on_stock_ops_alone():
    """The registered ops' Python kernels (stock ops), which serve CUDA and machines without
    the extension: opcheck and a compiled step in a process where the extension never loads
    (in this one its C++ kernels back the ops on the CPU)."""
    tests = Path(__file__).parent
    selected = [
        f"{tests}/test_kernels.py::test_opcheck",
        f"{tests}/test_compile.py::test_compiled_equals_eager_in_one_process",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *selected],
        env={**os.environ, "SYNCBN_CPU_KERNELS": "0"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "9 passed" in result.stdout, result.stdout + result.stderr


@pytest.mark.timeout(600)
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_builds_equal_the_oracle(capability):
    """The builds for CPUs narrower than this one (torch's CPU capability picks the build):
    without vector code and with AVX2 only, each its own build, against the stock-op oracle
    in a process where torch runs at that capability (ATEN_CPU_CAPABILITY)."""
    _requires_kernels()
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2 here")
    tests = Path(__file__).parent / "test_kernels.py"
    selected = [
        f"{tests}::{name}"
        for name in (
            "test_kernels_build_here",
            "test_kernels_equal_the_stock_op_oracle",
            "test_cpp_step_equals_the_stock_step",
            "test_results_do_not_depend_on_the_thread_count",
        )
    ]
    check = f"import syncbn.kernels as k; assert k._CAPABILITY == {capability.upper()!r}, k._CAPABILITY"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    subprocess.run([sys.executable, "-c", check], env=env, check=True)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *selected],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout + result.stderr


def _step_on_1_and_2_threads(x, dy, weight, bias):
    """The C++ kernels' step on 1 and then 2 intra-op threads, checked bit for bit alike."""
    threads, results = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(_step(torch.ops.syncbn_cpu, x, dy, weight, bias))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two), list(x.shape)
    return results[0]


def test_results_do_not_depend_on_the_thread_count():
    """Sums are taken in an order fixed by the shape (see csrc/cpu_kernels.cpp), so 1 and 2
    intra-op threads give bit-identical results in every layout."""
    _requires_kernels()
    for layout in ("nchw", "channels_last", "2d"):
        big = {"nchw": (8, 64, 32, 32), "channels_last": (8, 64, 32, 32), "2d": (512, 256)}[layout]
        x = torch.randn(big) * 3 + 5
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        _step_on_1_and_2_threads(x, torch.randn_like(x), torch.rand(big[1]), None)


def _last_level_cache() -> int:
    """The largest CPU cache as Linux reports it for cpu0 (what the kernels read), 0 if unknown."""
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        sizes.append(int(text.rstrip("KM")) << {"K": 10, "M": 20}.get(text[-1], 0))
    return max(sizes)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_passes_past_the_cache_stream_their_output(layout):
    """A float32 pass larger than the last-level cache, with an output under 32 MB, writes it
    with streaming stores (csrc/cpu_kernels.cpp, `streams`): the same results as the oracle,
    and on 1 and 2 threads alike. Planes of 57x57 values and rows of 67 channels start off
    the 64-byte boundaries the stores need, so runs have a head and a tail."""
    _requires_kernels()
    cache, plane = _last_level_cache(), 67 * 57 * 57
    n = -(-int(0.55 * cache) // (4 * plane))  # the forward reads and writes 2 * 4 * n * plane bytes > cache
    if not 0 < cache < 8 * n * plane or 4 * n * plane >= 32 << 20:
        pytest.skip(f"no float32 pass streams with a last-level cache of {cache} bytes")
    torch.manual_seed(0)
    x = torch.randn(n, 67, 57, 57) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy, weight, bias = torch.randn_like(x), torch.rand(67) + 0.5, torch.randn(67)
    fused = _step_on_1_and_2_threads(x, dy, weight, bias)
    stock = _step(reference, x, dy, weight, bias)
    for name, got, expected in zip(["y", "dx"], fused[1::6], stock[1::6], strict=True):
        torch.testing.assert_close(got, expected, **_tolerance(torch.float32), msg=lambda m, name=name: f"{name}: {m}")


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.delenv("SYNCBN_CPU_KERNELS", raising=False)
    kernels.extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="CPU kernels unavailable, using stock ops.*no C\\+\\+ compiler"):
            assert not kernels.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not kernels.available()
            assert ops._impl(torch.randn(2, 3)) is reference
    finally:
        kernels.extension.cache_clear()


def test_a_build_says_when_it_starts_and_ends(tmp_path, monkeypatch):
    """A cache without the library builds, with one line to stderr before and one after; a
    warm one is silent. The compiled object comes from this session's cache, so the build
    here is a link (seconds); `make kernels` compiles from nothing on a fresh machine."""
    if os.environ.get("SYNCBN_CPU_KERNELS") == "0":
        pytest.skip("SYNCBN_CPU_KERNELS=0")
    built = Path(_get_build_directory(kernels._NAME, verbose=False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = Path(_get_build_directory(kernels._NAME, verbose=False))
    shutil.copytree(built, folder, dirs_exist_ok=True)
    (folder / f"{kernels._NAME}.so").unlink()
    code = "import syncbn.kernels as k; assert k.available()"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs
    lines = [line for line in runs[0].stderr.splitlines() if line.startswith("syncbn:")]
    assert len(lines) == 2 and "building the CPU kernels once" in lines[0] and "built in" in lines[1], runs[0].stderr
    assert (folder / f"{kernels._NAME}.so").exists()
    assert "syncbn:" not in runs[1].stderr
