"""A user's script that stops right after training: a few SyncBatchNorm steps over Gloo, exit.

    python tests/exit_script.py RANK WORLD FILESTORE {destroy,keep}
    python tests/exit_script.py --runs N DIRECTORY {destroy,keep}

``destroy`` calls ``dist.destroy_process_group()`` last; ``keep`` leaves the group to
interpreter shutdown. Either way every process must exit 0. ``--runs`` forks N pairs of
ranks from one process that has imported torch once, so that many runs are cheap; each
child still leaves through interpreter shutdown, where the crashes it looks for happen.
It prints one line per failed process and exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import syncbn


def train(rank: int, world: int, store: str, ending: str) -> None:
    torch.set_num_threads(1)
    # The GIL then changes hands only where a thread lets go of it, which widens the window
    # in which a backend thread frees a tensor that Python has already dropped.
    sys.setswitchinterval(1.0)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), syncbn.SyncBatchNorm(8), torch.nn.ReLU())
    for _ in range(3):
        model(torch.randn(2 + rank, 3, 6, 6)).square().mean().backward()
    if ending == "destroy":
        dist.destroy_process_group()


def run_many(runs: int, directory: str, ending: str) -> int:
    failed = 0
    for run in range(runs):
        children = []
        for rank in range(2):
            pid = os.fork()
            if pid == 0:
                train(rank, 2, os.path.join(directory, f"store{run}"), ending)
                sys.exit(0)  # through interpreter shutdown, as a script ends
            children.append(pid)
        for rank, pid in enumerate(children):
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if code != 0:
                failed += 1
                print(f"run {run} rank {rank}: exit {code}", flush=True)
    print(f"{failed} of {2 * runs} processes failed", flush=True)
    return int(failed > 0)


if __name__ == "__main__":
    if sys.argv[1] == "--runs":
        sys.exit(run_many(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
    train(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
