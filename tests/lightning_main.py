"""Fit a small CNN with Lightning's DDP on 2 CPU processes, syncbn's plugin converting its BatchNorm.

    python tests/lightning_main.py OUT_DIR [--group-size K]

Lightning starts the second rank itself (it reruns this script). Each rank saves its final
state_dict and the class of the BatchNorm layer to OUT_DIR/rank{R}.pt.
"""

from __future__ import annotations

import sys

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from cases import small_cnn, small_cnn_input
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from syncbn.lightning import SyncBatchNormPlugin

PER_RANK, STEPS, WORLD = 3, 4, 2


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = PER_RANK * STEPS * WORLD
    x = small_cnn_input(n, g)
    return TensorDataset(x, torch.randn(n, generator=g, dtype=torch.float64))


class Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()

    def training_step(self, batch, index):
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        # In order, rank r gets samples r, r+2, ...: step t's global batch is one slice.
        data = make_data()
        return DataLoader(data, batch_size=PER_RANK, sampler=DistributedSampler(data, shuffle=False))


def main() -> None:
    out = sys.argv[1]
    group_size = int(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    model = Model()
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=WORLD,
        precision="64-true",
        plugins=[SyncBatchNormPlugin(group_size=group_size)],
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out,
    )
    trainer.fit(model)
    torch.save({"state": model.net.state_dict(), "bn": type(model.net[1])}, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
