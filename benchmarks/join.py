"""What uneven inputs cost under Join: step times before and after a rank has joined.

Two Gloo ranks train the demo's CNN (three SyncBatchNorm layers) with DDP, 1 thread each.
Each round runs a plain DDP loop (a model never in a Join), DDP's own Join on even inputs
(``Join([ddp])``, a third model: what Join costs before syncbn adds anything), then
``Join([syncbn.joinable(ddp), ddp])`` with twice as many batches on rank 0 as on rank 1.
Rank 0 times every step, in the last loop both while rank 1 is active and after it has
joined, when each SyncBN message is preceded by a 3-number header. The 3-number all-reduce
is timed too, to size that overhead.

    python benchmarks/join.py            # 6 rounds of 20 steps per phase
    python benchmarks/join.py --quick    # a smoke run
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))
from common import make_parser, on_ranks, write_json  # noqa: E402
from train import make_model  # noqa: E402

import syncbn  # noqa: E402
from syncbn.comm import resolve  # noqa: E402

PHASES = ["DDP, no Join", "Join([ddp]), even inputs", "Join, both ranks active", "Join, rank 1 joined"]


def measure(rank: int, world: int, group, rounds: int, steps: int, batch: int) -> dict:
    """Rank 0's seconds per step in each phase, and of one 3-number all-reduce."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    plain, ddp_only, joined = (DDP(make_model("syncbn", group)) for _ in range(3))
    joinable = syncbn.joinable(joined)
    optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (plain, ddp_only, joined)}

    def step(model: DDP) -> float:
        start = time.perf_counter()
        optimizers[id(model)].zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizers[id(model)].step()
        return time.perf_counter() - start

    comm, header = resolve(group), torch.zeros(3, dtype=torch.float64)
    latency = []
    for _ in range(100):
        start = time.perf_counter()
        comm.all_reduce_(header)
        latency.append(time.perf_counter() - start)
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for round in range(rounds + 1):  # round 0 warms up
        times = {phase: [] for phase in PHASES}
        times[PHASES[0]] = [step(plain) for _ in range(steps)]
        with Join([ddp_only]):
            times[PHASES[1]] = [step(ddp_only) for _ in range(steps)]
        with Join([joinable, joined]):
            for i in range(2 * steps if rank == 0 else steps):
                times[PHASES[2 if i < steps else 3]].append(step(joined))
        if round:
            for phase in PHASES:
                samples[phase] += times[phase]
    layers = sum(isinstance(m, syncbn.SyncBatchNorm) for m in joined.modules())
    return {
        "median_s": {phase: statistics.median(values) for phase, values in samples.items() if values},
        "header_all_reduce_s": statistics.median(latency),
        "syncbn_layers": layers,
        "samples_s": samples,
    }


def main() -> None:
    parser = make_parser(__doc__, "2 rounds of 3 steps (smoke run)")
    args = parser.parse_args()
    rounds, steps, batch = (2, 3, 16) if args.quick else (6, 20, 32)
    run = on_ranks(measure, 2, "Gloo", rounds, steps, batch)
    medians = run["median_s"]
    messages = 2 * run["syncbn_layers"]
    print(f"\nW=2 Gloo, demo CNN, {batch} images per rank, rank 0's median step (ms):")
    print("| phase | step (ms) | vs DDP, no Join |")
    print("|---|---:|---:|")
    for phase in PHASES:
        print(f"| {phase} | {medians[phase] * 1e3:.2f} | {medians[phase] / medians[PHASES[0]]:.2f} |")
    header = run["header_all_reduce_s"]
    print(
        f"\nheaders per joined step: {messages} ({run['syncbn_layers']} layers, forward and backward), "
        f"a 3-number all-reduce takes {header * 1e3:.3f} ms: {messages * header * 1e3:.2f} ms per step"
    )
    config = {"rounds": rounds, "steps": steps, "batch_per_rank": batch, "world": 2}
    path = write_json(args.results / "join.json", {"config": config, "run": run})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
