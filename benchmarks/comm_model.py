"""Communication model: what SyncBatchNorm sends per training step, and what that costs.

For ResNet-50's 53 BatchNorm layers, per training step and rank:

* syncbn: per layer one all-reduce of 2C+1 float64 numbers forward and one of 2C backward;
* torch.nn.SyncBatchNorm: per layer an all_gather of 2C+1 float32 numbers from every rank
  forward, and an all-reduce of 2C float32 backward.

Bytes sent per rank follow the ring algorithms (all-reduce 2(W−1)/W·n, all-gather (W−1)·m
for n- and m-byte messages), and time the alpha-beta model, in two variants:

* ring: all-reduce 2(W−1)·α + 2(W−1)/W·n·β, all-gather (W−1)·α + (W−1)·m·β;
* recursive doubling, the latency-optimal choice that MPICH makes for short messages:
  all-reduce log₂W·(α + n·β), all-gather log₂W·α + (W−1)·m·β.

α and β are fitted by least squares to all-reduce times measured on this machine at W=2,
over Gloo and over MPI, for messages of 8 B to 8 MB (at W=2 both variants give
T = 2α + n·β up to how β is counted). Read the curves as the shape of the cost, not a
forecast: real jobs add hierarchy, contention and overlap.

    python benchmarks/comm_model.py            # writes results/comm_model.json and .png
    python benchmarks/comm_model.py --quick    # fewer sizes and repetitions
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import available_backends, make_parser, on_ranks, save_figure, write_json  # noqa: E402

from syncbn.comm import resolve  # noqa: E402

# BatchNorm widths of torchvision's resnet50, in order: stem, then (bn1, bn2, bn3) per bottleneck
# with one downsample BatchNorm in the first block of each stage.
RESNET50 = [64]
for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
    RESNET50 += [width, width, 4 * width, 4 * width] + [width, width, 4 * width] * (blocks - 1)

WORLDS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def allreduce_times(rank: int, world: int, group, sizes: list[int], reps: int) -> list[list[float]]:
    """Seconds of each all-reduce of each size (float64 count), each start aligned by a barrier."""
    comm = resolve(group)
    token = torch.zeros(1, dtype=torch.float64)
    times = []
    for size in tqdm(sizes, desc=f"W={world} all-reduce sizes", file=sys.stderr, disable=rank != 0):
        buffer = torch.zeros(size, dtype=torch.float64)
        samples = []
        for _ in range(reps + 2):
            comm.all_reduce_(token)
            start = time.perf_counter()
            comm.all_reduce_(buffer)
            samples.append(time.perf_counter() - start)
        times.append(samples[2:])
    return times


def fit_alpha_beta(nbytes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares α (s) and β (s/byte) of T = 2α + n·β, both kept non-negative."""
    design = np.column_stack([np.full(len(nbytes), 2.0), np.asarray(nbytes, dtype=float)])
    (alpha, beta), *_ = np.linalg.lstsq(design, np.asarray(seconds), rcond=None)
    return max(alpha, 0.0), max(beta, 0.0)


def per_step(widths: list[int], world: int, alpha: float, beta: float, algorithm: str) -> dict[str, dict]:
    """Collectives, bytes sent per rank and modelled seconds per training step, for both schemes."""
    ring = (world - 1) / world
    steps = np.log2(world)

    def all_reduce(n: float) -> tuple[float, float]:
        if algorithm == "ring":
            return 2 * ring * n, 2 * (world - 1) * alpha + 2 * ring * n * beta
        return 2 * ring * n, steps * (alpha + n * beta)

    def all_gather(m: float) -> tuple[float, float]:
        latency = (world - 1) * alpha if algorithm == "ring" else steps * alpha
        return (world - 1) * m, latency + (world - 1) * m * beta

    schemes = {
        "syncbn": [all_reduce((2 * c + 1) * 8) for c in widths] + [all_reduce(2 * c * 8) for c in widths],
        "torch.nn.SyncBatchNorm": [all_gather((2 * c + 1) * 4) for c in widths]
        + [all_reduce(2 * c * 4) for c in widths],
    }
    return {
        name: {
            "collectives": len(costs),
            "bytes_per_rank": sum(b for b, _ in costs),
            "seconds": sum(t for _, t in costs),
        }
        for name, costs in schemes.items()
    }


def plot(model: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"syncbn": "-", "torch.nn.SyncBatchNorm": "--"}
    colors = {"Gloo": "tab:blue", "MPI": "tab:orange"}
    first = next(iter(model["steps"]))
    for name, style in styles.items():
        bytes_sent = [model["steps"][first]["ring"][str(w)][name]["bytes_per_rank"] for w in WORLDS]
        axes[0].plot(WORLDS, bytes_sent, style, color="black", label=name)
    for axis, algorithm in zip(axes[1:], ("ring", "doubling"), strict=True):
        for backend, by_algorithm in model["steps"].items():
            for name, style in styles.items():
                ms = [by_algorithm[algorithm][str(w)][name]["seconds"] * 1e3 for w in WORLDS]
                axis.plot(WORLDS, ms, style, color=colors[backend], label=f"{name}, {backend} α/β")
        axis.set(ylabel="modelled ms per step", title=f"communication per step, {algorithm} model")
    axes[0].set(ylabel="bytes sent per rank per step", title="ResNet-50's 53 BatchNorm layers")
    for axis in axes:
        axis.set(xscale="log", yscale="log", xlabel="ranks W")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    parser = make_parser(__doc__, "fewer message sizes and repetitions")
    args = parser.parse_args()
    sizes = [1, 64, 4096, 65536, 1 << 20] if not args.quick else [1, 4096, 65536]
    reps = 5 if args.quick else 31
    backends = available_backends()
    calibration, steps = {}, {}
    for backend in backends:
        samples = on_ranks(allreduce_times, 2, backend, sizes, reps)
        seconds = [statistics.median(times) for times in samples]
        alpha, beta = fit_alpha_beta([8 * s for s in sizes], seconds)
        calibration[backend] = {
            "bytes": [8 * s for s in sizes],
            "median_s": seconds,
            "samples_s": samples,
            "alpha_s": alpha,
            "beta_s_per_byte": beta,
        }
        steps[backend] = {
            algorithm: {str(w): per_step(RESNET50, w, alpha, beta, algorithm) for w in WORLDS}
            for algorithm in ("ring", "doubling")
        }
        print(
            f"{backend}: alpha {alpha * 1e6:.1f} us, beta {beta * 1e9:.3f} ns/byte "
            f"({1 / max(beta, 1e-30) / 1e9:.2f} GB/s)"
        )
    model = {"layers": len(RESNET50), "channels": sum(RESNET50), "calibration": calibration, "steps": steps}
    print(f"\nResNet-50: {len(RESNET50)} BatchNorm layers, {sum(RESNET50)} channels; per training step and rank")
    print("(modelled ms as syncbn / torch.nn.SyncBatchNorm):")
    columns = [(b, a) for b in backends for a in ("ring", "doubling")]
    print("| W | bytes syncbn | bytes torch | " + " | ".join(f"{b} {a} ms" for b, a in columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for w in (2, 8, 64, 1024):
        row = steps[backends[0]]["ring"][str(w)]
        cells = [f"{row[n]['bytes_per_rank'] / 1e3:,.0f} kB" for n in ("syncbn", "torch.nn.SyncBatchNorm")]
        for b, a in columns:
            ours, theirs = (steps[b][a][str(w)][n]["seconds"] * 1e3 for n in ("syncbn", "torch.nn.SyncBatchNorm"))
            cells.append(f"{ours:.1f} / {theirs:.1f}")
        print(f"| {w} | " + " | ".join(cells) + " |")
    plot(model, args.results / "comm_model.png")
    path = write_json(args.results / "comm_model.json", {"quick": args.quick, **model})
    print(f"\nwrote {path} and comm_model.png")


if __name__ == "__main__":
    main()
