"""Helpers shared by the benchmarks: running on W ranks, interleaved timing, JSON output.

``on_ranks`` runs a measurement on W Gloo processes or under ``mpiexec``; for the
latter, ``mpiexec`` starts this file, which imports the measurement by name.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).parent / "results"


class NoOpComm:
    """A world of 2 whose all-reduce does nothing: the synchronized code path without latency."""

    world_size = 2
    rank = 0

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        pass


def time_interleaved(
    variants: dict[str, Callable[[], None]], reps: int, warmup: int = 2, before: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each variant, taken in round-robin so drift hits all alike.

    Each round takes the variants in a new random order (a fixed seed), so that no variant
    always runs after the same one: what a call leaves in the caches and the heap would
    otherwise favour the variant after it. Every rank draws the same orders, so that with
    a barrier in ``before`` the ranks still time the same variant together.
    ``before`` runs untimed ahead of every call; on several ranks, a barrier there makes
    each sample start together, so it holds the call's own cost and not a peer's lag.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names, order = list(variants), random.Random(0)
    for _ in range(reps):
        order.shuffle(names)
        for name in names:
            fn = variants[name]
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def training_step(model, parameters, optimizer, x, y, comm, world: int) -> torch.Tensor:
    """Forward, cross-entropy, backward, the gradients averaged with one flat all-reduce (as
    DDP would), SGD; returns the loss averaged over the ranks, which rides in the same
    all-reduce. ``parameters`` is the module whose gradients are averaged (the model itself,
    or the module a compiled wrapper runs)."""
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in parameters.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)]).div_(world)
    comm.all_reduce_(flat)
    torch.nn.utils.vector_to_parameters(flat[:-1], grads)
    optimizer.step()
    return flat[-1]


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


def _gloo_rank(rank: int, world: int, store: str, measure: Callable, args: tuple, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    result = measure(rank, world, None, *args)
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def make_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick (a smoke run) and --results (the output folder)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder (default: %(default)s)")
    return parser


def available_backends() -> list[str]:
    """Gloo always; MPI where the mpi extra is installed."""
    return ["Gloo"] + (["MPI"] if mpiexec_path() else [])


def save_figure(fig, path: Path) -> None:
    """Lay out, write and close a matplotlib figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def mpiexec_path() -> str | None:
    """The mpiexec beside this Python or on PATH, if the mpi extra is installed."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    return shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def on_ranks(measure: Callable, world: int, backend: str, *args: Any) -> Any:
    """Rank 0's result of ``measure(rank, world, process_group, *args)`` on W ranks, 1 thread each.

    ``backend`` is "Gloo" (spawned processes, the default group) or "MPI" (``mpiexec``,
    ``MPI.COMM_WORLD``). ``measure`` must be a module-level function of a benchmark script.
    """
    if backend == "Gloo":
        queue = mp.get_context("spawn").SimpleQueue()
        with tempfile.TemporaryDirectory() as tmp:
            store = os.path.join(tmp, "store")
            mp.start_processes(
                _gloo_rank, args=(world, store, measure, args, queue), nprocs=world, start_method="spawn"
            )
        return queue.get()
    mpiexec = mpiexec_path()
    if mpiexec is None:
        raise RuntimeError("no mpiexec or mpi4py (pip install .[mpi])")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        module = measure.__module__
        if module == "__main__":  # a script run directly: import it by its file's name
            module = Path(sys.modules["__main__"].__file__).stem
        spec = json.dumps([module, measure.__name__, str(out), list(args)])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([mpiexec, "-n", str(world), sys.executable, __file__, spec], check=True, env=env)
        return json.loads(out.read_text())


def _mpi_main(spec: str) -> None:
    from mpi4py import MPI

    module, function, out, args = json.loads(spec)
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    result = getattr(importlib.import_module(module), function)(comm.rank, comm.size, comm, *args)
    if comm.rank == 0:
        Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _mpi_main(sys.argv[1])
