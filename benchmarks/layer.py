"""Layer benchmark: forward+backward of one BatchNorm layer, every variant side by side.

* compute: the SyncBatchNorm layer synchronized over a world of 2 whose all-reduce does
  nothing, against local ``nn.BatchNorm`` on the same tensor, so the ratio is the layer's
  own cost, Python included, without the network's, at 1 and 2 intra-op threads (and all
  cores where there are more), in float32, bfloat16 and float16, NCHW and channels_last;
  once with the fused CPU kernels and once with stock ops only (what runs without a
  compiler). Alongside: the layer with no group and in eval mode (both plain BatchNorm
  underneath), and the memory floor: the 8 passes over the tensor that a training step
  must make (3 forward, 5 backward), timed as 4 copies of it;
* W=2 Gloo ranks, 1 thread each: syncbn against local BatchNorm plus the two bare
  all-reduces of its messages (2C+1 and 2C float64 numbers), timed apart and as one step
  (local BatchNorm making those all-reduces where syncbn makes them, so that it waits on
  the slower rank as syncbn does), and a textbook SyncBN (a differentiable all-reduce of
  [mean, E[x²]]·n through generic autograd ops, as detectron2's NaiveSyncBatchNorm does);
* a sweep over channel count and batch size on W=2 and W=4 ranks, Gloo and MPI, NCHW and
  channels_last, plotted as the ratio to local BatchNorm (W=4 oversubscribes 2 cores).

glibc's heap trimming is turned off (the script re-executes itself with
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ set), so that no variant pays page faults
for memory another one has just returned; minor faults per call are recorded anyway.

    python benchmarks/layer.py            # full run, writes benchmarks/results/layer.json
    python benchmarks/layer.py --quick    # small shapes, a few seconds
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import matplotlib
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    NoOpComm,
    available_backends,
    make_parser,
    median_ms,
    on_ranks,
    save_figure,
    time_interleaved,
    write_json,
)

from syncbn import SyncBatchNorm, kernels  # noqa: E402
from syncbn.comm import resolve  # noqa: E402

FULL = {
    "shapes": [(32, 64, 56, 56), (32, 256, 14, 14), (8, 64, 32, 32), (256, 1024)],
    "half_shapes": [(32, 64, 56, 56), (8, 64, 32, 32)],
    "reps": 21,
}
QUICK = {"shapes": [(8, 16, 16, 16), (64, 128)], "half_shapes": [(8, 16, 16, 16)], "reps": 5}
THREADS = sorted({1, 2, os.cpu_count() or 1})
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
# The sweep: per-layer cost against channel count and against batch size, on W=2 and W=4 ranks.
SWEEP = {
    "channels": [(16, c, 16, 16) for c in (16, 64, 256, 1024)],
    "batch": [(n, 64, 16, 16) for n in (2, 8, 32)],
    "worlds": [2, 4],
    "reps": 11,
}
QUICK_SWEEP = {
    "channels": [(4, c, 8, 8) for c in (8, 32)],
    "batch": [(n, 16, 8, 8) for n in (2, 8)],
    "worlds": [2],
    "reps": 3,
}


class _AllReduce(torch.autograd.Function):
    """Differentiable sum over ranks, as in detectron2's layers/batch_norm.py."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class TextbookSyncBN(nn.Module):
    """The usual home-made SyncBN: E[x] and E[x²] all-reduced with autograd, all in fp32."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        channels = x.size(1)
        n = x.numel() // channels
        mean = x.mean(dims)
        meansqr = (x * x).mean(dims)
        vec = _AllReduce.apply(torch.cat([mean, meansqr]) * n)
        total = n * dist.get_world_size()
        mean, meansqr = (vec / total).split(channels)
        var = meansqr - mean * mean
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * total / (total - 1), self.momentum)
        scale = self.weight * (var + self.eps).rsqrt()
        shift = self.bias - mean * scale
        view = (1, channels) + (1,) * (x.dim() - 2)
        return x * scale.view(view) + shift.view(view)


class _WithAllReduces(torch.autograd.Function):
    """Passes a tensor through, making one all-reduce of 2C+1 float64 numbers on the way
    forward and one of 2C on the way back, as syncbn's step does."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, comm, channels: int) -> torch.Tensor:
        comm.all_reduce_(torch.zeros(2 * channels + 1, dtype=torch.float64))
        ctx.comm, ctx.channels = comm, channels
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.comm.all_reduce_(torch.zeros(2 * ctx.channels, dtype=torch.float64))
        return grad, None, None


class BatchNormWithAllReduces(nn.Module):
    """Local BatchNorm plus the two all-reduces of syncbn's messages, in one step: the
    budget as a step, so that it waits on the slower rank as a synchronized layer does."""

    def __init__(self, shape: tuple[int, ...], comm) -> None:
        super().__init__()
        self.bn, self.comm = _local_bn(shape), comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WithAllReduces.apply(self.bn(x), self.comm, x.size(1))


def _synced(num_features: int) -> nn.Module:
    """The layer as users run it, synchronized over a world of 2 whose all-reduce does nothing:
    syncbn's code path, Python included, without latency."""
    return SyncBatchNorm(num_features, process_group=NoOpComm())


def _stock_ops(step):
    """The same step with syncbn's fused CPU kernels switched off."""

    def run() -> None:
        kernels.available = lambda: False
        try:
            step()
        finally:
            kernels.available = available

    available = kernels.available
    return run


def _local_bn(shape: tuple[int, ...]) -> nn.Module:
    return nn.BatchNorm1d(shape[1]) if len(shape) <= 3 else nn.BatchNorm2d(shape[1])


def _inputs(shape, channels_last, dtype=torch.float32):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    return x, dy


def _step(layer, x, dy):
    def run() -> None:
        x.grad = None
        layer(x).backward(dy)

    return run


def _eval(layer, x):
    layer.eval()

    def run() -> None:
        with torch.no_grad():
            layer(x)

    return run


def _cases(shapes):
    return [(shape, cl) for shape in shapes for cl in ((False, True) if len(shape) == 4 else (False,))]


def _label(shape, channels_last, dtype=None):
    name = "x".join(map(str, shape)) + (" channels_last" if channels_last else "")
    return name if dtype in (None, "float32") else f"{name} {dtype}"


def _row(shape, channels_last, samples, base, extra=None):
    medians = {name: median_ms(times) for name, times in samples.items()}
    return {
        "shape": list(shape),
        "channels_last": channels_last,
        **(extra or {}),
        "median_ms": medians,
        "ratio_to_" + base: {name: medians[name] / medians[base] for name in medians},
        "samples_s": samples,
    }


def _faults(step):
    """The step, counting this process's minor page faults into ``step.faults``."""

    def run() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        run.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    run.faults = []
    return run


def compute_path(config) -> list[dict]:
    cases = [(shape, cl, torch.float32) for shape, cl in _cases(config["shapes"])]
    cases += [
        (shape, cl, dtype) for dtype in (torch.bfloat16, torch.float16) for shape, cl in _cases(config["half_shapes"])
    ]
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for shape, cl, dtype in tqdm(cases, desc=f"compute path, {threads} thread(s)", file=sys.stderr):
            x, dy = _inputs(shape, cl, dtype)
            copy = torch.empty_like(x)
            steps = {
                "nn.BatchNorm": _step(_local_bn(shape), x, dy),
                "syncbn compute": _step(_synced(shape[1]), x, dy),
                "memory floor (4 copies)": lambda c=copy, x=x: [c.copy_(x) for _ in range(4)],
            }
            if dtype == torch.float32:
                steps["syncbn compute, stock ops"] = _stock_ops(_step(_synced(shape[1]), x, dy))
                steps["syncbn, no group"] = _step(SyncBatchNorm(shape[1]), x, dy)
                steps["nn.BatchNorm eval"] = _eval(_local_bn(shape), x)
                steps["syncbn eval"] = _eval(SyncBatchNorm(shape[1]), x)
            steps = {name: _faults(step) for name, step in steps.items()}
            # Smaller tensors get 2**22 / numel times the rounds (16 at most), so that every
            # case runs about as long: 21 calls of a 1 ms step were over in a blink, and a
            # moment's noise moved a median.
            samples = time_interleaved(steps, config["reps"] * min(16, max(1, 2**22 // x.numel())))
            faults = {name: sum(step.faults) / len(step.faults) for name, step in steps.items()}
            extra = {"dtype": str(dtype).removeprefix("torch."), "threads": threads, "minor_faults_per_call": faults}
            rows.append(_row(shape, cl, samples, base="nn.BatchNorm", extra=extra))
    return rows


def rank_rows(rank: int, world: int, group, config, backend: str) -> list[dict]:
    """This rank's timings of every variant, for every shape; ``group`` is syncbn's process_group."""
    torch.set_num_threads(1)
    comm = resolve(group)
    rows = []
    for shape, cl in tqdm(_cases(config["shapes"]), desc=f"W={world} {backend}", file=sys.stderr, disable=rank != 0):
        torch.manual_seed(rank)
        x, dy = _inputs(shape, cl)
        variants = {
            f"nn.BatchNorm (local, {backend} run)": _local_bn(shape),
            f"syncbn {backend}": SyncBatchNorm(shape[1], process_group=group),
        }
        variants[f"nn.BatchNorm with its all-reduces {backend}"] = BatchNormWithAllReduces(shape, comm)
        if backend == "Gloo":
            variants["textbook SyncBN Gloo"] = TextbookSyncBN(shape[1])
        steps = {name: _step(m, x, dy) for name, m in variants.items()}
        for size in (2 * shape[1] + 1, 2 * shape[1]):
            buffer = torch.zeros(size, dtype=torch.float64)
            steps[f"all-reduce {'2C+1' if size % 2 else '2C'} {backend}"] = lambda b=buffer: comm.all_reduce_(b)
        token = torch.zeros(1, dtype=torch.float64)
        samples = time_interleaved(steps, config["reps"], before=lambda t=token: comm.all_reduce_(t))
        rows.append(_row(shape, cl, samples, base=f"syncbn {backend}"))
    return rows


def _table(title, rows, columns, base):
    print(f"\n{title}")
    print("| shape | " + " | ".join(f"{c} (ms)" for c in columns) + f" | ratio to {base} |")
    print("|---" * (len(columns) + 2) + "|")
    for row in rows:
        ratios = ", ".join(f"{c}: {row['ratio_to_' + base][c]:.2f}" for c in columns if c != base)
        cells = " | ".join(f"{row['median_ms'][c]:.2f}" for c in columns)
        print(f"| {_label(row['shape'], row['channels_last'])} | {cells} | {ratios} |")


def _target(row) -> float:
    """The issue's bound on syncbn compute / nn.BatchNorm for this case."""
    if len(row["shape"]) == 2:
        return 1.1
    large_nchw = row["shape"] in ([32, 64, 56, 56], [32, 256, 14, 14]) and not row["channels_last"]
    return 0.75 if large_nchw and row["dtype"] == "float32" else 1.0


def _compute_table(rows) -> None:
    print("\nCompute path, 1 process (median fwd+bwd; ratios to nn.BatchNorm, floor = 8 passes)")
    print(
        "| threads | case | nn.BatchNorm (ms) | syncbn (ms) | syncbn / BN | target | syncbn / floor "
        "| stock ops / BN | no group / BN | eval / BN eval |"
    )
    print("|---" * 10 + "|")
    for row in rows:
        ms, ratio = row["median_ms"], row["ratio_to_nn.BatchNorm"]
        target = _target(row)
        mark = "ok" if ratio["syncbn compute"] <= target else "MISSED"
        floor = ms["syncbn compute"] / ms["memory floor (4 copies)"]
        extra = ["–"] * 3
        if "syncbn eval" in ms:
            extra = [
                f"{ratio['syncbn compute, stock ops']:.2f}",
                f"{ratio['syncbn, no group']:.2f}",
                f"{ms['syncbn eval'] / ms['nn.BatchNorm eval']:.2f}",
            ]
        print(
            f"| {row['threads']} | {_label(row['shape'], row['channels_last'], row['dtype'])} "
            f"| {ms['nn.BatchNorm']:.2f} | {ms['syncbn compute']:.2f} | {ratio['syncbn compute']:.2f} "
            f"| ≤{target} {mark} | {floor:.2f} | " + " | ".join(extra) + " |"
        )


def _budget_table(rows) -> None:
    print("\nW=2 Gloo, 1 thread each: syncbn against local BN + its two all-reduces (target ≤ 1.10)")
    print(
        "| case | syncbn (ms) | local BN (ms) | all-reduce 2C+1 + 2C (ms) | syncbn / budget "
        "| BN with its all-reduces, one step (ms) | syncbn / that step |"
    )
    print("|---" * 7 + "|")
    for row in rows:
        ms = row["median_ms"]
        reduces = ms["all-reduce 2C+1 Gloo"] + ms["all-reduce 2C Gloo"]
        budget = ms["nn.BatchNorm (local, Gloo run)"] + reduces
        row["ratio_to_budget"] = ms["syncbn Gloo"] / budget
        together = ms["nn.BatchNorm with its all-reduces Gloo"]
        row["ratio_to_budget_step"] = ms["syncbn Gloo"] / together
        print(
            f"| {_label(row['shape'], row['channels_last'])} | {ms['syncbn Gloo']:.2f} "
            f"| {ms['nn.BatchNorm (local, Gloo run)']:.2f} | {reduces:.2f} | {row['ratio_to_budget']:.2f} "
            f"| {together:.2f} | {row['ratio_to_budget_step']:.2f} |"
        )


def _merge(*runs: list[dict] | None) -> list[dict]:
    """One row per case with every backend's medians side by side."""
    merged: list[dict] = []
    for rows in filter(None, runs):
        for i, row in enumerate(rows):
            if i == len(merged):
                merged.append({"shape": row["shape"], "channels_last": row["channels_last"], "median_ms": {}})
            merged[i]["median_ms"].update(row["median_ms"])
    for row in merged:
        medians = row["median_ms"]
        row["ratio_to_syncbn Gloo"] = {name: ms / medians["syncbn Gloo"] for name, ms in medians.items()}
    return merged


def sweep(settings, backends: list[str]) -> dict:
    """Rows of the sweep per backend and world size (rank 0's medians)."""
    config = {"shapes": settings["channels"] + settings["batch"], "reps": settings["reps"]}
    return {
        backend: {str(w): on_ranks(rank_rows, w, backend, config, backend) for w in settings["worlds"]}
        for backend in backends
    }


def plot_sweep(results: dict, settings, path: Path) -> None:
    """Ratio of syncbn's fwd+bwd to local BatchNorm's, against C and against N."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend, by_world in results.items():
        for world, rows in by_world.items():
            for cl, style in ((False, "o-"), (True, "s--")):
                for axis, key, index in ((axes[0], "channels", 1), (axes[1], "batch", 0)):
                    shapes = [list(shape) for shape in settings[key]]
                    chosen = [r for r in rows if r["shape"] in shapes and r["channels_last"] == cl]
                    ms = [r["median_ms"] for r in chosen]
                    ratio = [m[f"syncbn {backend}"] / m[f"nn.BatchNorm (local, {backend} run)"] for m in ms]
                    label = f"{backend} W={world}{' CL' if cl else ''}"
                    axis.plot([r["shape"][index] for r in chosen], ratio, style, label=label)
    for axis, key, index, what in ((axes[0], "channels", 1, "channels C"), (axes[1], "batch", 0, "batch N per rank")):
        fixed = "×".join("·" if i == index else str(d) for i, d in enumerate(settings[key][0]))
        axis.set(xscale="log", xlabel=f"{what} (shape {fixed})", title="syncbn fwd+bwd / local BatchNorm")
        ticks = [shape[index] for shape in settings[key]]
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
    for axis in axes:
        axis.set(ylabel="ratio (1 = free)", yscale="log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    parser = make_parser(__doc__, "small shapes and few repetitions (smoke run)")
    args = parser.parse_args()
    if any(os.environ.get(name) != value for name, value in _MALLOC.items()):
        # glibc reads these at start-up only.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC})
    config, settings = (QUICK, QUICK_SWEEP) if args.quick else (FULL, SWEEP)
    backends = available_backends()
    compute = compute_path(config)
    gloo_rows = on_ranks(rank_rows, 2, "Gloo", config, "Gloo")
    mpi_rows = on_ranks(rank_rows, 2, "MPI", config, "MPI") if "MPI" in backends else None
    swept = sweep(settings, backends)
    _compute_table(compute)
    _budget_table(gloo_rows)
    merged = _merge(gloo_rows, mpi_rows)
    _table("W=2 ranks, 1 thread each (median fwd+bwd per rank)", merged, list(merged[0]["median_ms"]), "syncbn Gloo")
    for backend, by_world in swept.items():
        for world, rows in by_world.items():
            _table(f"Sweep, W={world} {backend}", rows, list(rows[0]["median_ms"]), f"syncbn {backend}")
    plot_sweep(swept, settings, args.results / "layer_sweep.png")
    payload = {
        "config": {
            **config,
            "threads": THREADS,
            "world": 2,
            "sweep": settings,
            "cpu_kernels": kernels.available(),
            "malloc": _MALLOC,
        },
        "compute_path": compute,
        "gloo_w2": gloo_rows,
        "mpi_w2": mpi_rows,
        "sweep": swept,
    }
    path = write_json(args.results / "layer.json", payload)
    print(f"\nwrote {path} and layer_sweep.png")


if __name__ == "__main__":
    main()
