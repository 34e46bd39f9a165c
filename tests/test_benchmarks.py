"""The benchmark scripts still run: a --quick smoke run of each, writing into tmp_path."""

from __future__ import annotations

import json
import sys

import pytest
from processes import run_command


@pytest.mark.distributed
def test_layer_benchmark_quick(tmp_path):
    run_command([sys.executable, "benchmarks/layer.py", "--quick", "--results", str(tmp_path)])
    payload = json.loads((tmp_path / "layer.json").read_text())
    assert payload["machine"]["torch"]
    for row in payload["compute_path"] + payload["gloo_w2"]:
        assert all(ms > 0 for ms in row["median_ms"].values())
    assert "syncbn Gloo" in payload["gloo_w2"][0]["median_ms"]
