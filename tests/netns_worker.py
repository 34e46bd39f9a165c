"""One rank of the two-host test: train a SyncBatchNorm layer, record stats and step times.

    torchrun --nnodes 2 ... tests/netns_worker.py OUT_DIR STEPS

Every rank draws the same global batches and takes its half, so the test can replay
them in one process. Each rank writes ``rank{R}.json`` into OUT_DIR.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import syncbn
from syncbn import comm as syncbn_comm

CHANNELS, PER_RANK = 8, 4


def global_batch(step: int, world: int) -> torch.Tensor:
    return torch.randn(world * PER_RANK, CHANNELS, 6, 6, generator=torch.Generator().manual_seed(step)).double()


def main(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    group = syncbn_comm.init("gloo")
    comm = syncbn_comm.resolve(group)
    layer = syncbn.SyncBatchNorm(CHANNELS, process_group=group).double()
    times = []
    for step in range(steps):
        x = global_batch(step, comm.world_size)[comm.rank * PER_RANK : (comm.rank + 1) * PER_RANK]
        start = time.perf_counter()
        layer(x.requires_grad_()).square().sum().backward()
        times.append(time.perf_counter() - start)
    result = {"running_mean": layer.running_mean.tolist(), "running_var": layer.running_var.tolist(), "step_s": times}
    (out / f"rank{comm.rank}.json").write_text(json.dumps(result))
    syncbn_comm.shutdown(group)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
