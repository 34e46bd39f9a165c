"""Fused CPU kernels (csrc/cpu_kernels.cpp), compiled on first use and cached.

Stock PyTorch ops leave two passes unfused on the CPU: the float64 moments of the input,
and dx = a·dy + b·(x − mean) + k in the backward. The kernels do each in one pass. They are
built by ``torch.utils.cpp_extension`` (a C++ compiler and ninja are needed) into its
cache, once per machine and torch version. When they cannot be built syncbn warns once and
uses stock ops: the same results, more slowly; ``SYNCBN_CPU_KERNELS=0`` chooses stock ops
without a warning. CUDA tensors always use stock ops.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

__all__ = ["available", "usable", "moments_usable"]

_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# AVX2 code only where torch itself runs AVX2 code, under its own cache name, so that a cache
# shared by machines of different CPUs never hands one a build it cannot run.
_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
_NAME = "syncbn_cpu_kernels" + ("_avx2" if _AVX2 else "")
_FLAGS = ["-O3", "-fopenmp-simd"] + (["-mavx2", "-mfma"] if _AVX2 else [])


@functools.cache
def available() -> bool:
    """Whether ``torch.ops.syncbn`` is loaded, building it first if it is not cached yet."""
    if os.environ.get("SYNCBN_CPU_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load

        load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=_FLAGS, is_python_module=False)
    except Exception as error:  # no compiler, no ninja, read-only cache: the stock path still works
        message = f"syncbn: CPU kernels unavailable, using stock ops (slower): {error}"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return False
    return True


def usable(input: torch.Tensor) -> bool:
    """Whether the backward pass over this tensor can run in the fused kernel."""
    return input.device.type == "cpu" and available()


def moments_usable(input: torch.Tensor) -> bool:
    """Whether this tensor's moments are faster in the kernel: (N, C, ...) contiguous input,
    where torch's statistics kernel is a scalar loop (with channels last it is vectorized)."""
    return input.dim() > 2 and input.numel() > input.size(0) * input.size(1) and input.is_contiguous() and usable(input)
