"""The benchmark scripts still run: a --quick smoke run of each, writing into tmp_path."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from processes import ROOT, run_command


@pytest.mark.distributed
def test_layer_benchmark_quick(tmp_path):
    run_command([sys.executable, "benchmarks/layer.py", "--quick", "--results", str(tmp_path)])
    payload = json.loads((tmp_path / "layer.json").read_text())
    assert payload["machine"]["torch"]
    for row in payload["compute_path"] + payload["gloo_w2"]:
        assert all(ms > 0 for ms in row["median_ms"].values())
    threads = {row["threads"] for row in payload["compute_path"]}
    assert {1, 2} <= threads and {row["dtype"] for row in payload["compute_path"]} == {"float32", "bfloat16", "float16"}
    assert all(row["ratio_to_budget"] > 0 and row["ratio_to_budget_step"] > 0 for row in payload["gloo_w2"])
    assert "syncbn Gloo" in payload["gloo_w2"][0]["median_ms"]
    assert len(payload["sweep"]["Gloo"]["2"]) == 8  # 4 sweep shapes, NCHW and channels_last
    assert (tmp_path / "layer_sweep.png").stat().st_size > 0


@pytest.mark.distributed
def test_compile_benchmark_quick(tmp_path):
    run_command([sys.executable, "benchmarks/compile.py", "--quick", "--results", str(tmp_path)], timeout=300)
    run = json.loads((tmp_path / "compile.json").read_text())["runs"]["demo CNN"]
    assert run["first_compiled_step_s"] > 0 and all(s > 0 for s in run["median_s"].values())


@pytest.mark.distributed
def test_join_benchmark_quick(tmp_path):
    run_command([sys.executable, "benchmarks/join.py", "--quick", "--results", str(tmp_path)])
    run = json.loads((tmp_path / "join.json").read_text())["run"]
    assert len(run["median_s"]) == 4 and all(s > 0 for s in run["median_s"].values())
    assert run["syncbn_layers"] == 3 and run["header_all_reduce_s"] > 0


@pytest.mark.distributed
def test_comm_model_quick(tmp_path):
    run_command([sys.executable, "benchmarks/comm_model.py", "--quick", "--results", str(tmp_path)])
    model = json.loads((tmp_path / "comm_model.json").read_text())
    assert (tmp_path / "comm_model.png").stat().st_size > 0
    assert model["layers"] == 53 and model["channels"] == 26560
    for backend, fit in model["calibration"].items():
        assert fit["alpha_s"] > 0, backend
        steps = model["steps"][backend]["ring"]
        # The all-gather's bytes grow with W; the all-reduce's stay near 4·(2C+1)·8 per layer.
        assert (
            steps["1024"]["torch.nn.SyncBatchNorm"]["bytes_per_rank"] > 100 * steps["1024"]["syncbn"]["bytes_per_rank"]
        )


@pytest.mark.distributed
def test_scaling_quick(tmp_path):
    run_command([sys.executable, "benchmarks/scaling.py", "--quick", "--batch", "4", "--results", str(tmp_path)])
    runs = json.loads((tmp_path / "scaling.json").read_text())["runs"]
    for backend, by_world in runs.items():
        assert by_world["1"]["efficiency"] == 1.0 and by_world["1"]["syncbn_comm_s"] == 0.0, backend
        assert by_world["2"]["syncbn_comm_s"] > 0 and by_world["2"]["bn_layers"] == 13, backend
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_convergence_quick(tmp_path):
    run_command([sys.executable, "benchmarks/convergence.py", "--quick", "--results", str(tmp_path)], timeout=300)
    payload = json.loads((tmp_path / "convergence.json").read_text())
    runs = payload["runs"]
    assert {r["study"] for r in runs} == {"tiny batch", "non-iid", "claims"}
    fields = {"study", "norm", "ranks", "batch_per_rank", "setting", "lr", "seed", "history"}
    assert all(fields <= set(r) for r in runs)
    assert all(0 <= h["test_acc"] <= 1 for r in runs for h in r["history"])
    # syncbn on W thread-ranks trains as one process on the same global batches.
    for study, cell in [("tiny batch", "W=4, 2 per rank"), ("non-iid", "W=5, 4 per rank")]:
        methods = payload["summary"][study][cell]
        assert abs(methods["SyncBatchNorm"]["mean"] - methods["1 process, same global batch"]["mean"]) <= 0.02
    head = payload["summary"]["tiny batch"]["W=4, 1 per rank"]
    assert "Expected more than 1 value per channel" in head["local BatchNorm, BatchNorm1d head"]["error"]
    assert "mean" in head["SyncBatchNorm, BatchNorm1d head"]
    assert {"BatchNorm", "no norm"} <= set(payload["summary"]["claims"])
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    out = run_command(
        [sys.executable, "benchmarks/gpu_check.py", "--results", str(tmp_path)], timeout=120, CUDA_VISIBLE_DEVICES=""
    )
    assert out.strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check"
    ]
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_check_helpers_on_cpu(monkeypatch):
    """The equivalence cases the GPU run makes pass on the CPU, and fail when the sync is broken."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    rows = gpu_check.equivalence(0, 1, gpu_check.NoOpComm(), device="cpu")
    assert len(rows) == 6 and all(row["ok"] for row in rows), rows
    assert {row["params"] for row in rows} == {"affine", "no affine", "no bias"}

    class HalfComm(gpu_check.NoOpComm):
        def all_reduce_(self, tensor):
            tensor.mul_(0.5)

    for params in ("affine", "no affine", "no bias"):
        assert not gpu_check.equivalence_case(0, 1, HalfComm(), torch.float64, False, "cpu", params)["ok"]
    assert sum(c * s * s for c, s in gpu_check.RESNET50_BN) > 0 and len(gpu_check.RESNET50_BN) == 12


def test_gpu_check_compiled_case_on_cpu(monkeypatch):
    """The GPU run's torch.compile check passes on the CPU, and fails when compiled and eager
    synchronize differently."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    row = gpu_check.compiled_case(gpu_check.NoOpComm(), torch.float64, device="cpu", backend="aot_eager")
    assert row["ok"] and row["graph breaks"] == 0, row

    class DriftingComm(gpu_check.NoOpComm):
        calls = 0

        def all_reduce_(self, tensor):
            self.calls += 1
            tensor[1:].add_(self.calls)

    row = gpu_check.compiled_case(DriftingComm(), torch.float64, device="cpu", backend="aot_eager")
    assert not row["ok"], row
