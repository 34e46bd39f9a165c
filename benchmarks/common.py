"""Helpers shared by the benchmarks: interleaved timing, machine facts, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def time_interleaved(
    variants: dict[str, Callable[[], None]], reps: int, warmup: int = 2, before: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each variant, taken in round-robin so drift hits all alike.

    ``before`` runs untimed ahead of every call; on several ranks, a barrier there makes
    each sample start together, so it holds the call's own cost and not a peer's lag.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpus": torch.multiprocessing.cpu_count(),
        "threads_per_rank": 1,
    }
    try:
        from mpi4py import MPI

        info["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    except ImportError:
        info["mpi"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` with the machine's facts; the benchmarks' only output format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
