"""Layer benchmark: forward+backward of one BatchNorm layer, per rank, 1 thread.

Two measurements, each taken side by side in one run:

* compute: syncbn's synchronized code path with the all-reduce made a no-op (LocalComm)
  against local ``nn.BatchNorm`` on the same tensor, so the ratio is pure compute; once
  with the fused CPU kernels and once with stock ops only (what runs without a compiler);
* W=2 Gloo ranks: syncbn against a textbook SyncBN (a differentiable all-reduce of
  [mean, E[x²]]·n through generic autograd ops, as detectron2's NaiveSyncBatchNorm does),
  with local BatchNorm and the bare all-reduce latency alongside;
* a sweep over channel count and batch size on W=2 and W=4 ranks, Gloo and MPI, NCHW and
  channels_last, plotted as the ratio to local BatchNorm (W=4 oversubscribes 2 cores).

    python benchmarks/layer.py            # full run, writes benchmarks/results/layer.json
    python benchmarks/layer.py --quick    # small shapes, a few seconds
"""

from __future__ import annotations

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
from common import available_backends, make_parser, median_ms, on_ranks, save_figure, time_interleaved, write_json  # noqa: E402

from syncbn import SyncBatchNorm, kernels  # noqa: E402
from syncbn.comm import LocalComm, resolve  # noqa: E402
from syncbn.functional import sync_batch_norm  # noqa: E402

FULL = {
    "shapes": [(32, 64, 56, 56), (32, 256, 14, 14), (8, 64, 32, 32), (256, 1024)],
    "reps": 21,
}
QUICK = {"shapes": [(8, 16, 16, 16), (64, 128)], "reps": 5}
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


class ComputePath(nn.Module):
    """syncbn's synchronized code path with a no-op all-reduce: compute without latency."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.bn = SyncBatchNorm(num_features)
        self.comm = LocalComm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.bn
        return sync_batch_norm(
            x, m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked, m.momentum, m.eps, self.comm
        )


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


def _inputs(shape, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    return x, dy


def _step(layer, x, dy):
    def run() -> None:
        x.grad = None
        layer(x).backward(dy)

    return run


def _cases(shapes):
    return [(shape, cl) for shape in shapes for cl in ((False, True) if len(shape) == 4 else (False,))]


def _label(shape, channels_last):
    return "x".join(map(str, shape)) + (" channels_last" if channels_last else "")


def _row(shape, channels_last, samples, base):
    medians = {name: median_ms(times) for name, times in samples.items()}
    return {
        "shape": list(shape),
        "channels_last": channels_last,
        "median_ms": medians,
        "ratio_to_" + base: {name: medians[name] / medians[base] for name in medians},
        "samples_s": samples,
    }


def compute_path(config) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for shape, cl in tqdm(_cases(config["shapes"]), desc="compute path (1 process)", file=sys.stderr):
        x, dy = _inputs(shape, cl)
        steps = {
            "nn.BatchNorm": _step(_local_bn(shape), x, dy),
            "syncbn compute": _step(ComputePath(shape[1]), x, dy),
            "syncbn compute, stock ops": _stock_ops(_step(ComputePath(shape[1]), x, dy)),
        }
        samples = time_interleaved(steps, config["reps"])
        rows.append(_row(shape, cl, samples, base="nn.BatchNorm"))
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
        if backend == "Gloo":
            variants["textbook SyncBN Gloo"] = TextbookSyncBN(shape[1])
        steps = {name: _step(m, x, dy) for name, m in variants.items()}
        buffer = torch.zeros(2 * shape[1] + 1, dtype=torch.float64)
        steps[f"all-reduce 2C+1 {backend}"] = lambda b=buffer: comm.all_reduce_(b)
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
    config, settings = (QUICK, QUICK_SWEEP) if args.quick else (FULL, SWEEP)
    backends = available_backends()
    compute = compute_path(config)
    gloo_rows = on_ranks(rank_rows, 2, "Gloo", config, "Gloo")
    mpi_rows = on_ranks(rank_rows, 2, "MPI", config, "MPI") if "MPI" in backends else None
    swept = sweep(settings, backends)
    _table("Compute path, 1 process, 1 thread (median fwd+bwd)", compute, list(compute[0]["median_ms"]), "nn.BatchNorm")
    merged = _merge(gloo_rows, mpi_rows)
    _table("W=2 ranks, 1 thread each (median fwd+bwd per rank)", merged, list(merged[0]["median_ms"]), "syncbn Gloo")
    for backend, by_world in swept.items():
        for world, rows in by_world.items():
            _table(f"Sweep, W={world} {backend}", rows, list(rows[0]["median_ms"]), f"syncbn {backend}")
    plot_sweep(swept, settings, args.results / "layer_sweep.png")
    payload = {
        "config": {**config, "world": 2, "sweep": settings, "cpu_kernels": kernels.available()},
        "compute_path": compute,
        "gloo_w2": gloo_rows,
        "mpi_w2": mpi_rows,
        "sweep": swept,
    }
    path = write_json(args.results / "layer.json", payload)
    print(f"\nwrote {path} and layer_sweep.png")


if __name__ == "__main__":
    main()
