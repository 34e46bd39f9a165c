"""Shared fixtures: the fused CPU kernels built once per test process, and a switch to
run a test on the stock-op path instead."""

from __future__ import annotations

import pytest

from syncbn import kernels


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built() -> bool:
    """Build (or load) the kernels before any test, so spawned ranks only load the cache."""
    return kernels.available()


@pytest.fixture(params=["cpu kernels", "stock ops"])
def kernel_path(request, monkeypatch) -> str:
    """Run the test once with the fused CPU kernels and once with stock ops only."""
    if request.param == "stock ops":
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param
