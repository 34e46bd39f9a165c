"""torch.compile(model, fullgraph=True) against eager: one training step, W=2 Gloo ranks.

Two models with SyncBatchNorm layers: the demo's CNN (launch/train.py, 8×8 digits, 32 per
rank) and a ResNet-18 at 32×32 (CIFAR-style stem, 8 per rank), one thread per rank; and
each with torch's own BatchNorm, not synchronized, as the yardstick of what torch.compile
gains on that network here. Per
model the first compiled step is timed on its own (compile time, forward and backward
graphs), then eager and compiled steps are interleaved, each started together on both
ranks (a barrier, untimed). A step is forward, cross-entropy, backward and SGD; the
gradients are summed with one flat all-reduce, as DDP would.

    python benchmarks/compile.py            # Inductor; writes results/compile.json
    python benchmarks/compile.py --quick    # the demo CNN with aot_eager, a few steps
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))
from common import make_parser, on_ranks, time_interleaved, training_step, write_json  # noqa: E402
from train import make_model  # noqa: E402

import syncbn  # noqa: E402
from syncbn.comm import resolve  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(classes: int = 10) -> nn.Module:
    """ResNet-18 with a 3×3 stem for 32×32 images: 20 BatchNorm layers."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


# Each model with SyncBatchNorm, and with torch's own BatchNorm (not synchronized): what
# torch.compile does for the same network without syncbn, measured in the same run. Steps
# per variant: the demo CNN's 15–60 ms steps spread over a factor of 3 on this machine
# (Gloo's threads and two ranks share 2 cores), so it takes many more than ResNet-18's 1 s.
# ResNet-18 also in channels_last (model and input), the layout Inductor gives every
# convolution on the CPU: in NCHW the compiled step copies each weight into it and each
# weight gradient back.
CL = torch.channels_last
MODELS = {
    "demo CNN": (lambda group: make_model("syncbn", group), (32, 1, 8, 8), 200, None),
    "demo CNN, nn.BatchNorm": (lambda group: make_model("bn", group), (32, 1, 8, 8), 200, None),
    "ResNet-18 32×32": (lambda group: syncbn.convert_sync_batchnorm(resnet18(), group), (8, 3, 32, 32), 15, None),
    "ResNet-18 32×32, nn.BatchNorm": (lambda group: resnet18(), (8, 3, 32, 32), 15, None),
    "ResNet-18 32×32 channels_last": (
        lambda group: syncbn.convert_sync_batchnorm(resnet18(), group),
        (8, 3, 32, 32),
        15,
        CL,
    ),
    "ResNet-18 32×32 channels_last, nn.BatchNorm": (lambda group: resnet18(), (8, 3, 32, 32), 15, CL),
}


def measure(rank: int, world: int, group, name: str, backend: str, quick: bool) -> dict:
    """Rank 0's compile time and interleaved step times, in seconds."""
    torch.manual_seed(0)
    build, shape, reps, memory_format = MODELS[name]
    reps = 3 if quick else reps
    eager = build(group)
    if memory_format is not None:
        eager = eager.to(memory_format=memory_format)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    comm = resolve(group)
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)

    def step(model: nn.Module, parameters: nn.Module, optimizer: torch.optim.Optimizer):
        return lambda: training_step(model, parameters, optimizer, x, y, comm, world)

    eager_step = step(eager, eager, torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9))
    compiled_step = step(compiled, twin, torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9))
    token = torch.zeros(1, dtype=torch.float64)
    comm.all_reduce_(token)
    start = time.perf_counter()
    compiled_step()
    first = time.perf_counter() - start
    samples = time_interleaved(
        {"eager": eager_step, "compiled": compiled_step}, reps, before=lambda: comm.all_reduce_(token)
    )
    medians = {key: statistics.median(value) for key, value in samples.items()}
    return {"first_compiled_step_s": first, "median_s": medians, "samples_s": samples}


def main() -> None:
    parser = make_parser(__doc__, "the demo CNN with aot_eager and a few steps (smoke run)")
    args = parser.parse_args()
    backend, names = ("aot_eager", ["demo CNN"]) if args.quick else ("inductor", list(MODELS))
    runs = {name: on_ranks(measure, 2, "Gloo", name, backend, args.quick) for name in names}
    print(f"\nW=2 Gloo, 1 thread per rank, torch.compile(fullgraph=True, backend={backend!r}); median step, ms:")
    print("| model | steps | eager | compiled | compiled / eager | first compiled step (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        eager, compiled = run["median_s"]["eager"], run["median_s"]["compiled"]
        run["ratio"] = compiled / eager
        print(
            f"| {name} | {len(run['samples_s']['eager'])} | {eager * 1e3:.1f} | {compiled * 1e3:.1f} "
            f"| {run['ratio']:.2f} | {run['first_compiled_step_s']:.1f} |"
        )
    path = write_json(args.results / "compile.json", {"config": {"backend": backend}, "runs": runs})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
