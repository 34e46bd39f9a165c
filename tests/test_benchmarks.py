"""The benchmark scripts still run: a --quick smoke run of each, writing into tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.distributed
def test_layer_benchmark_quick(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "benchmarks/layer.py", "--quick", "--results", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "layer.json").read_text())
    assert payload["machine"]["torch"]
    for row in payload["compute_path"] + payload["gloo_w2"]:
        assert all(ms > 0 for ms in row["median_ms"].values())
    assert "syncbn Gloo" in payload["gloo_w2"][0]["median_ms"]
