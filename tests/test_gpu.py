"""The CUDA path against nn.BatchNorm on the global batch; every test skips without CUDA.

The cases are those of benchmarks/gpu_check.py, which a lent GPU runs in one go.
"""

from __future__ import annotations

import sys

import pytest
import torch
from distributed import run_distributed
from processes import ROOT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def _all_ok(rows):
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]


def test_synchronized_path_on_one_gpu():
    _all_ok(gpu_check.equivalence(0, 1, gpu_check.NoOpComm()))


def _gloo_cuda(rank, world, group=None):
    _all_ok(gpu_check.equivalence(rank, world, group))


@pytest.mark.distributed
def test_two_gloo_ranks_with_cuda_tensors(tmp_path):
    run_distributed(_gloo_cuda, 2, tmp_path)
