"""End-to-end weak scaling: a ResNet-style CNN's training step at a fixed per-rank batch.

W ∈ {1, 2, 4} processes over Gloo and over MPI, one thread each; per rank the step time,
the throughput (samples/s over all ranks), the weak-scaling efficiency
throughput(W) / (W · throughput(1)) and the share of the step spent in SyncBatchNorm's
own all-reduces (timed by wrapping the Communicator). Gradients are averaged with one
flat all-reduce per step, as DDP would. This machine has 2 cores: W=4 runs 4 processes
on them, so its points measure oversubscription, not scaling, and are marked so.

    python benchmarks/scaling.py            # writes results/scaling.json and .png
    python benchmarks/scaling.py --quick    # W ∈ {1, 2}, a few steps
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import available_backends, make_parser, on_ranks, save_figure, training_step, write_json  # noqa: E402

import syncbn  # noqa: E402
from syncbn.comm import resolve  # noqa: E402

CORES = torch.multiprocessing.cpu_count()


class TimedComm:
    """A Communicator that adds the seconds spent in each all-reduce to ``seconds``."""

    def __init__(self, inner) -> None:
        self.inner, self.world_size, self.rank, self.seconds = inner, inner.world_size, inner.rank, 0.0

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        start = time.perf_counter()
        self.inner.all_reduce_(tensor)
        self.seconds += time.perf_counter() - start


def resnet(width: int = 16) -> nn.Sequential:
    """A CIFAR-sized ResNet body: a stem and 3 stages of 4 conv-BN-ReLU units, 13 BatchNorm layers.

    Skip connections are left out: they change neither the BatchNorm work nor its messages.
    """

    def unit(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = unit(3, width)
    for stage, channels in enumerate((width, 2 * width, 4 * width)):
        cin = width if stage == 0 else channels // 2
        layers += unit(cin, channels, 1 if stage == 0 else 2) + unit(channels, channels)
        layers += unit(channels, channels) + unit(channels, channels)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def measure(rank: int, world: int, group, batch: int, steps: int) -> dict:
    """Rank 0's step times and SyncBatchNorm all-reduce times (samples and medians), in seconds."""
    comm = resolve(group)
    timed = TimedComm(comm)
    torch.manual_seed(0)
    model = syncbn.convert_sync_batchnorm(resnet(), timed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    token = torch.zeros(1, dtype=torch.float64)
    step_s, comm_s = [], []
    for step in range(steps + 3):
        comm.all_reduce_(token)
        timed.seconds = 0.0
        start = time.perf_counter()
        training_step(model, model, optimizer, x, y, comm, world)
        if step >= 3:
            step_s.append(time.perf_counter() - start)
            comm_s.append(timed.seconds)
    layers = sum(isinstance(m, syncbn.SyncBatchNorm) for m in model.modules())
    return {
        "step_s": statistics.median(step_s),
        "syncbn_comm_s": statistics.median(comm_s),
        "samples": {"step_s": step_s, "syncbn_comm_s": comm_s},
        "bn_layers": layers,
    }


def main() -> None:
    parser = make_parser(__doc__, "W ∈ {1, 2} and a few steps")
    parser.add_argument("--batch", type=int, default=16, help="samples per rank (default: %(default)s)")
    args = parser.parse_args()
    worlds, steps = ((1, 2), 3) if args.quick else ((1, 2, 4), 15)
    backends = available_backends()
    runs: dict[str, dict[str, dict]] = {backend: {} for backend in backends}
    for backend, world in tqdm([(b, w) for b in backends for w in worlds], desc="runs", file=sys.stderr):
        result = on_ranks(measure, world, backend, args.batch, steps)
        result["throughput"] = world * args.batch / result["step_s"]
        result["oversubscribed"] = world > CORES
        runs[backend][str(world)] = result
    for backend in backends:
        base = runs[backend]["1"]["throughput"]
        for world in worlds:
            run = runs[backend][str(world)]
            run["efficiency"] = run["throughput"] / (world * base)
            run["comm_share"] = run["syncbn_comm_s"] / run["step_s"]
    layers = runs[backends[0]]["1"]["bn_layers"]
    print(f"\nResNet-style CNN, {layers} SyncBatchNorm layers, {args.batch} samples per rank, 1 thread per rank:")
    print("| backend | W | step ms | samples/s | efficiency | SyncBN all-reduce share |")
    print("|---|---:|---:|---:|---:|---:|")
    for backend, by_world in runs.items():
        for world, run in by_world.items():
            mark = f" ({CORES} cores: oversubscribed)" if run["oversubscribed"] else ""
            print(
                f"| {backend} | {world}{mark} | {run['step_s'] * 1e3:.1f} | {run['throughput']:.0f} | "
                f"{run['efficiency']:.2f} | {run['comm_share']:.0%} |"
            )
    plot(runs, worlds, args.results / "scaling.png")
    config = {"batch_per_rank": args.batch, "steps": steps, "worlds": list(worlds), "cores": CORES}
    path = write_json(args.results / "scaling.json", {"config": config, "runs": runs})
    print(f"\nwrote {path} and scaling.png")


def plot(runs: dict, worlds: tuple[int, ...], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for backend, by_world in runs.items():
        throughput = [by_world[str(w)]["throughput"] for w in worlds]
        share = [by_world[str(w)]["comm_share"] * 100 for w in worlds]
        left.plot(worlds, throughput, "o-", label=backend)
        right.plot(worlds, share, "o-", label=backend)
    ideal = [w * runs[next(iter(runs))]["1"]["throughput"] for w in worlds]
    left.plot(worlds, ideal, ":", color="gray", label="ideal (Gloo W=1 × W)")
    for axis in (left, right):
        axis.axvspan(CORES + 0.5, max(worlds) + 0.5, color="red", alpha=0.08, label=f"> {CORES} cores")
        axis.set_xticks(worlds)
        axis.set_xlabel("ranks W (one thread each)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set(ylabel="samples/s, all ranks", title="Weak scaling, fixed per-rank batch")
    right.set(ylabel="% of step in SyncBatchNorm all-reduces", title="Communication share")
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
