"""Building and loading the C++ CPU kernels (csrc/cpu_kernels.cpp) behind `syncbn.ops`.

They are built on first use by ``torch.utils.cpp_extension`` (a C++ compiler and ninja are
needed) into its cache, once per machine and torch version, with OpenMP so that
``at::parallel_for`` uses torch's own thread pool; a build prints one line to stderr as it
starts and one as it ends. When they cannot be built syncbn warns once and the ops run on
stock PyTorch ops (`syncbn.reference`): the same results, more slowly.
``SYNCBN_CPU_KERNELS=0`` chooses stock ops without a warning. ``syncbn.kernels.available()``
builds them ahead of time.

The build is a Python module too (`extension`), whose ``step`` is the eager training step:
called through pybind11, not as an op, to spare it the dispatcher's boxed call from Python.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["available", "extension"]

_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# Vector code of the width torch itself runs (its CPU capability), under a cache name of its
# own, so that a cache shared by machines of different CPUs never hands one a build it
# cannot run. The CPU_CAPABILITY macros select ATen's `Vectorized` of that width, with its
# fp16/bf16 conversions. AVX512 builds leave the compiler's own loops at 256 bits: with
# 512-bit loops the channels_last backward sums took 1.05-1.2x as long, while with the
# explicit 512-bit `Vectorized` code a step's kernels took 0.79-0.96x of the AVX2 build's
# time in bfloat16, 0.89-1.03x in float16 and 0.95-0.99x in float32.
_CAPABILITY = torch.backends.cpu.get_cpu_capability()
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_VECTORS = {
    "AVX2": [*_AVX2, "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": [
        *_AVX2,
        *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=256"),
        *("-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"),
    ],
}
_VECTOR = _VECTORS.get(_CAPABILITY, ["-DCPU_CAPABILITY=DEFAULT"])
# -fopenmp links the libgomp that torch has already loaded (same soname), so the kernels
# share torch's OpenMP threads and follow torch.set_num_threads. -fno-math-errno lets the
# per-channel square roots vectorize (nothing reads errno).
_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", *_VECTOR]
# The cache name carries a digest of everything torch writes into the build file: the
# source (its text and its path), the flags and the torch installation. A changed build, or
# another checkout or environment sharing the cache, gets a folder of its own, so whether a
# build is needed is known before it starts and two checkouts never rebuild each other's.
_DIGEST = hashlib.sha256(
    "\0".join([_SOURCE.read_text(), str(_SOURCE), " ".join(_FLAGS), torch.__file__]).encode()
).hexdigest()[:12]
_NAME = f"syncbn_cpu_kernels_{_DIGEST}" + (f"_{_CAPABILITY.lower()}" if _CAPABILITY in _VECTORS else "")


@contextlib.contextmanager
def _own_ninja() -> Iterator[None]:
    """Put the ninja of syncbn's own dependency first on PATH while torch builds or loads.

    Ninja versions hash their build logs differently (1.11 and 1.13 disagree), so a cache
    built by one ninja is rebuilt by the other: a shell whose PATH finds the system's ninja
    and a launcher whose PATH finds the environment's would rebuild at every switch.
    """
    try:
        import ninja
    except ImportError:
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{path}"
    try:
        yield
    finally:
        os.environ["PATH"] = path


def available() -> bool:
    """Whether ``torch.ops.syncbn_cpu`` is loaded, building it first if it is not cached yet."""
    return extension() is not None


@functools.cache
def extension() -> ModuleType | None:
    """The loaded kernels' Python module (see the module's docstring), or None without them."""
    if os.environ.get("SYNCBN_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        # torch's own choice of folder (under TORCH_EXTENSIONS_DIR, per Python and CUDA tag).
        folder = Path(_get_build_directory(_NAME, verbose=False))
        building = not (folder / f"{_NAME}.so").exists()
        if building:
            print(f"syncbn: building the CPU kernels once, in {folder} (about a minute)", file=sys.stderr, flush=True)
        started = time.perf_counter()
        with _own_ninja():
            module = load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"])
        if building:
            print(f"syncbn: CPU kernels built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    except Exception as error:  # no compiler, no ninja, read-only cache: the stock path still works
        message = f"syncbn: CPU kernels unavailable, using stock ops (slower): {error}"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None
    return module
