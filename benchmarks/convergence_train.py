"""The convergence study's task and training loop: W ranks as threads of one process.

**Task.** scikit-learn's 1,797 8×8 digits (nothing is downloaded), made harder: each image
is shifted by up to one pixel, its contrast scaled by U(0.6, 1.4), its brightness moved by
N(0, 0.2) and Gaussian noise of std 0.1 added, once, from a fixed seed. A fixed fifth is
the test set. Without normalization the CNN below barely learns it in a few epochs.

**Model.** Three conv–norm–ReLU blocks (16, 32, 64 channels, a max-pool after the second),
global average pooling and a linear layer, with the normalization under study:
``bn`` (BatchNorm), ``bn-local`` (BatchNorm on each rank, unsynchronized), ``syncbn``
(syncbn.SyncBatchNorm across the ranks), ``gn`` (GroupNorm, 8 groups), ``ln``
(GroupNorm with one group: LayerNorm over C, H, W), ``in`` (InstanceNorm with affine, as
GroupNorm with a group per channel) or ``none``.

**Ranks.** A run is a sequence of global batches, each the concatenation of the W ranks'
batches. The W ranks of a run are threads of one process (`train`), each with its own
replica of the model, averaging gradients as DDP does; ``syncbn`` layers synchronize
through a `ThreadComm`, a syncbn Communicator between the threads, so the layer's own code
runs on W ranks (on Gloo, spawning W processes per run would cost minutes on 2 cores).
``bn-local`` is plain BatchNorm on each rank, with each rank's own running stats.
``bn`` with one rank and the whole global batch is the one-process reference.

**Batches.** ``iid``: each epoch a fresh permutation, cut into global batches. ``non-iid``:
rank r draws only from classes 2r and 2r+1 (W=5 covers the ten classes), as when data is
sharded without shuffling.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from common import training_step
from sklearn.datasets import load_digits
from torch import nn

import syncbn

CHANNELS = (16, 32, 64)


@dataclass(frozen=True)
class Run:
    """One training run's settings."""

    norm: str
    ranks: int
    batch_per_rank: int
    lr: float
    epochs: int
    seed: int
    sharding: str = "iid"
    shards: int = 0  # the ranks the data is dealt to, when more than run it (0: ranks)
    init_scale: float = 1.0
    warmup_steps: int = 20
    head: str = "linear"  # "bn1d": a BatchNorm1d between two linear layers at the end
    evals_per_epoch: int = 1


def hard_digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train x, y), (test x, y): the digits, shifted, rescaled and noisy, from fixed seeds."""
    data = load_digits()
    g = torch.Generator().manual_seed(0)
    x = F.pad(torch.tensor(data.images, dtype=torch.float32)[:, None] / 16, (1, 1, 1, 1))
    n = len(x)
    dx, dy = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    x = torch.stack([x[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(n)])
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=g)
    x = contrast * x + 0.2 * torch.randn(n, 1, 1, 1, generator=g) + 0.1 * torch.randn(x.shape, generator=g)
    y = torch.tensor(data.target)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    cut = n * 4 // 5
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def norm_layer(norm: str, channels: int) -> nn.Module:
    if norm in ("bn", "syncbn", "bn-local"):
        return nn.BatchNorm2d(channels)
    groups = {"gn": 8, "ln": 1, "in": channels}.get(norm)
    return nn.Identity() if groups is None else nn.GroupNorm(groups, channels)


def make_model(run: Run) -> nn.Module:
    """The CNN, seeded by ``run.seed``, with conv and linear weights scaled by ``run.init_scale``."""
    torch.manual_seed(run.seed)
    layers: list[nn.Module] = []
    cin = 1
    for i, cout in enumerate(CHANNELS):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=run.norm == "none"), norm_layer(run.norm, cout)]
        layers += [nn.ReLU()] + ([nn.MaxPool2d(2)] if i == 1 else [])
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if run.head == "bn1d":
        layers += [nn.Linear(cin, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)]
    else:
        layers += [nn.Linear(cin, 10)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(run.init_scale)
    return model


def global_batches(run: Run, labels: torch.Tensor, epoch: int) -> Iterator[list[torch.Tensor]]:
    """Each step's indices, one tensor per rank: the global batch dealt to ``run.shards``
    ranks, each rank's part joined when fewer ranks run it (one process: the whole batch)."""
    g = torch.Generator().manual_seed(run.seed * 1000 + epoch)
    shards = run.shards or run.ranks
    size = run.batch_per_rank * run.ranks
    b = size // shards
    if run.sharding == "iid":
        order = torch.randperm(len(labels), generator=g)
        steps = [list(order[start : start + size].split(b)) for start in range(0, len(order) - size + 1, size)]
    else:
        pools = []
        for r in range(shards):
            pool = torch.nonzero((labels == 2 * r % 10) | (labels == (2 * r + 1) % 10)).flatten()
            pools.append(pool[torch.randperm(len(pool), generator=g)])
        steps = [[p[step * b : (step + 1) * b] for p in pools] for step in range(min(len(p) for p in pools) // b)]
    per_rank = shards // run.ranks
    for parts in steps:
        yield [torch.cat(parts[r * per_rank : (r + 1) * per_rank]) for r in range(run.ranks)]


def steps_per_epoch(run: Run, labels: torch.Tensor) -> int:
    return sum(1 for _ in global_batches(run, labels, 0))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        right = (model(x).argmax(1) == y).sum().item()
    model.train(was)
    return right / len(y)


class ThreadComm:
    """A syncbn Communicator between threads of one process: rank r is thread r.

    The sum is taken in rank order by rank 0 and copied out by every rank, so every rank
    gets the same bits. Two barrier waits per all-reduce; an error on one rank breaks the
    barrier, so that its peers raise too instead of waiting.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        # Two sets, used by turns: a rank may start the next all-reduce while a slower one
        # still copies this one's total.
        self.slots: list[list[torch.Tensor | None]] = [[None] * world_size for _ in range(2)]
        self.totals: list[torch.Tensor | None] = [None, None]

    def member(self, rank: int) -> _Member:
        return _Member(self, rank)


class _Member:
    def __init__(self, shared: ThreadComm, rank: int) -> None:
        self.shared, self.rank, self.world_size = shared, rank, shared.world_size
        self.turn = 0

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        shared, turn = self.shared, self.turn
        self.turn ^= 1
        shared.slots[turn][self.rank] = tensor
        shared.barrier.wait()
        if self.rank == 0:
            shared.totals[turn] = torch.stack(shared.slots[turn]).sum(0)
        shared.barrier.wait()
        tensor.copy_(shared.totals[turn])


def train(run: Run) -> dict:
    """One run on ``run.ranks`` ranks, threads of this process: its settings and history.

    Each rank has its own replica of the model (the same initial weights), takes its part
    of each global batch, and averages the gradients over the ranks, as DDP does; ``syncbn``
    layers synchronize their statistics through the ranks' Communicator, and BatchNorm
    (``bn-local``) keeps each rank's own. Rank 0 evaluates, with its own running stats and,
    for ``bn-local``, with the running stats averaged over the ranks too.
    """
    torch.set_num_threads(1)
    data = hard_digits()
    shared = ThreadComm(run.ranks)
    models = [make_model(run) for _ in range(run.ranks)]  # here: seeding is not thread-safe
    records: list[dict | None] = [None] * run.ranks
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            records[rank] = _train_rank(run, rank, models[rank], shared.member(rank), data)
        except BaseException as error:
            errors.append(error)
            shared.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(run.ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record = asdict(run)
    first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), None)
    if isinstance(first, ValueError):  # what a user sees: BatchNorm1d on one sample per rank
        record["history"], record["error"] = [], f"{type(first).__name__}: {first}"
    elif errors:
        raise first or errors[0]
    else:
        record["history"] = records[0]
    return record


def _train_rank(run: Run, rank: int, model: nn.Module, comm: _Member, data) -> list[dict]:
    (train_x, train_y), (test_x, test_y) = data
    if run.norm == "syncbn":
        model = syncbn.convert_sync_batchnorm(model, comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9)
    per_epoch = steps_per_epoch(run, train_y)
    total = per_epoch * run.epochs
    marks = {round(per_epoch * k / run.evals_per_epoch) for k in range(1, run.evals_per_epoch + 1)}
    history, step, losses = [], 0, []
    for epoch in range(run.epochs):
        for i, parts in enumerate(global_batches(run, train_y, epoch), start=1):
            for group in optimizer.param_groups:  # linear warmup, then linear decay to 0
                group["lr"] = run.lr * min(1.0, (step + 1) / run.warmup_steps, 1 - step / total)
            x, y = train_x[parts[rank]], train_y[parts[rank]]
            losses.append(training_step(model, model, optimizer, x, y, comm, run.ranks).item())
            step += 1
            if not math.isfinite(losses[-1]):  # diverged: a last evaluation, and stop
                point = {"epoch": epoch + i / per_epoch, "step": step, "loss": losses[-1], "diverged": True}
                return history + [{**point, **_evaluate(run, model, comm, data, last=True)}]
            if i in marks:
                point = {"epoch": epoch + i / per_epoch, "step": step, "loss": sum(losses) / len(losses)}
                losses = []
                point.update(_evaluate(run, model, comm, data, last=epoch + 1 == run.epochs and i == per_epoch))
                history.append(point)
    return history


def _evaluate(run: Run, model: nn.Module, comm: _Member, data, last: bool) -> dict:
    """Rank 0's test accuracy (and train accuracy at the end); for ``bn-local`` also with
    the running stats averaged over the ranks, which every rank takes part in."""
    (train_x, train_y), (test_x, test_y) = data
    stats = [b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]
    averaged = None
    if run.norm == "bn-local" and run.ranks > 1:
        flat = torch.cat([b.reshape(-1) for b in stats]) / run.ranks
        comm.all_reduce_(flat)
        averaged = flat.split([b.numel() for b in stats])
    if comm.rank != 0:
        return {}
    point = {"test_acc": accuracy(model, test_x, test_y)}
    if last:
        point["train_acc"] = accuracy(model, train_x, train_y)
    if averaged is not None:
        own = [b.clone() for b in stats]
        for b, value in zip(stats, averaged, strict=True):
            b.copy_(value.view_as(b))
        point["test_acc_averaged_stats"] = accuracy(model, test_x, test_y)
        for b, value in zip(stats, own, strict=True):
            b.copy_(value)
    return point
