"""Train a small CNN on scikit-learn's digits with SyncBatchNorm: syncbn's end-to-end demo.

1,797 8×8 images ship with scikit-learn, so nothing is downloaded. Each rank trains on
its shard of every epoch; a held-out fifth is the test set. At the end every rank checks
that its running stats equal everyone else's.

    bash launch/torchrun.sh 2                  # 2 Gloo ranks (NCCL on GPUs)
    bash launch/mpirun.sh 2                    # 2 MPI ranks through mpi4py
    python launch/train.py --norm bn           # one process, plain BatchNorm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

import syncbn
from syncbn import comm as syncbn_comm

NORMS = ("syncbn", "bn", "gn", "none")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norm", choices=NORMS, default="syncbn", help="normalization layer (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per rank per step (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="model and shuffling seed (default: %(default)s)")
    parser.add_argument(
        "--backend", choices=("auto", "gloo", "nccl", "mpi"), default="auto", help="(default: %(default)s)"
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="save model and optimizer here every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default: %(default)s)")
    parser.add_argument("--history", type=Path, default=None, help="write per-epoch metrics here as JSON")
    return parser.parse_args(argv)


def make_model(norm: str, process_group) -> nn.Module:
    def norm_layer(channels: int) -> nn.Module:
        if norm in ("syncbn", "bn"):
            return nn.BatchNorm2d(channels)
        if norm == "gn":
            return nn.GroupNorm(4, channels)
        return nn.Identity()

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), norm_layer(cout), nn.ReLU(inplace=True)]

    model = nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    return syncbn.convert_sync_batchnorm(model, process_group) if norm == "syncbn" else model


def digits() -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    cut = len(y) * 4 // 5
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


def global_sum(comm, *values: float) -> list[float]:
    buffer = torch.tensor(values, dtype=torch.float64)
    comm.all_reduce_(buffer)
    return buffer.tolist()


def average_gradients(model: nn.Module, comm) -> None:
    """Mean of the gradients over ranks in one all-reduce: what DDP does, for MPI."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(comm.world_size)
    comm.all_reduce_(flat)
    torch.nn.utils.vector_to_parameters(flat, grads)


def evaluate(model: nn.Module, test: TensorDataset, comm, device) -> float:
    model.eval()
    x, y = test.tensors[0][comm.rank :: comm.world_size], test.tensors[1][comm.rank :: comm.world_size]
    with torch.no_grad():
        correct = (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    model.train()
    correct, total = global_sum(comm, correct, len(y))
    return correct / total


def running_stats_spread(model: nn.Module, comm) -> float:
    """Sum over ranks of each rank's largest distance from the mean running stats: 0 iff identical."""
    stats = [b.detach().double().reshape(-1) for n, b in model.named_buffers() if n.endswith(("_mean", "_var"))]
    if not stats:
        return 0.0
    mine = torch.cat(stats).cpu()
    mean = mine.clone()
    comm.all_reduce_(mean)
    return global_sum(comm, (mine - mean / comm.world_size).abs().max().item())[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    group = syncbn_comm.init(args.backend)
    try:
        return train(args, group)
    finally:
        # After train() has returned, so that DDP has let go of the group first: a process
        # group freed by DDP's destructor at exit can deadlock Gloo's worker threads.
        syncbn_comm.shutdown(group)


def train(args: argparse.Namespace, group) -> int:
    comm = syncbn_comm.resolve(group)
    lead = comm.rank == 0
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.backend == "nccl" else "cpu")
    if lead:
        print(
            f"training digits: {comm.world_size} rank(s) via {type(comm).__name__}, norm={args.norm}, "
            f"{args.batch_size} per rank, lr={args.lr}",
            flush=True,
        )

    torch.manual_seed(args.seed)
    model = make_model(args.norm, group).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    start_epoch = 0
    if args.resume and args.checkpoint and args.checkpoint.exists():
        state = torch.load(args.checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        if lead:
            print(f"resumed from {args.checkpoint} after epoch {state['epoch'] + 1}", flush=True)
    use_ddp = isinstance(comm, syncbn_comm.TorchComm) and comm.world_size > 1
    # SyncBatchNorm keeps running stats identical on every rank, so DDP need not broadcast them
    # (and broadcasting would hide a difference from the check at the end).
    net = DistributedDataParallel(model, forward_sync_buffers=False) if use_ddp else model

    train, test = digits()
    sampler = DistributedSampler(train, num_replicas=comm.world_size, rank=comm.rank, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    history = []
    steps = (args.epochs - start_epoch) * len(loader)
    with tqdm(total=steps, disable=not lead, desc="train", file=sys.stdout, leave=False) as bar:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            loss_sum = seen = right = 0.0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits = net(x)
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not use_ddp and comm.world_size > 1:
                    average_gradients(model, comm)
                optimizer.step()
                loss_sum += loss.item() * len(y)
                seen += len(y)
                right += (logits.argmax(1) == y).sum().item()
                bar.update()
            loss_sum, seen, right = global_sum(comm, loss_sum, seen, right)
            accuracy = evaluate(model, test, comm, device)
            history.append(
                {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": right / seen, "test_acc": accuracy}
            )
            if lead:
                bar.write(
                    f"epoch {epoch + 1:2d}  loss {loss_sum / seen:.4f}  train acc {right / seen:.4f}  "
                    f"test acc {accuracy:.4f}"
                )
                if args.checkpoint:
                    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
                    torch.save(state, args.checkpoint)

    accuracy = evaluate(model, test, comm, device)
    spread = running_stats_spread(model, comm)
    if lead:
        print(
            f"done in {time.perf_counter() - started:.1f} s: test accuracy {accuracy:.4f}; "
            f"running stats differ across ranks by {spread:.3g}",
            flush=True,
        )
    if lead and args.history:
        args.history.write_text(json.dumps(history))
    same = spread == 0.0 or args.norm != "syncbn"
    if not same:
        print("error: SyncBatchNorm running stats differ between ranks", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
