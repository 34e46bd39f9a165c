"""syncbn.lightning: Lightning's DDP on 2 CPU processes trains exactly like one process."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("lightning")

import lightning.pytorch as L  # noqa: E402
from cases import small_cnn  # noqa: E402
from lightning_main import PER_RANK, STEPS, WORLD, make_data  # noqa: E402
from processes import run_command  # noqa: E402

from syncbn.lightning import SyncBatchNormPlugin  # noqa: E402


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _one_process_reference() -> dict:
    """Plain BatchNorm over each step's global batch, with the loss DDP averages."""
    net = small_cnn()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = make_data().tensors
    for step in range(STEPS):
        # Rank r's t-th batch is samples r + WORLD·(t·PER_RANK + j): together, one slice.
        batch = slice(step * PER_RANK * WORLD, (step + 1) * PER_RANK * WORLD)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(x[batch]).squeeze(1), y[batch]).backward()
        optimizer.step()
    return net.state_dict()


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("blocks", [[], ["--group-size", "2"]], ids=["default group", "new_groups block"])
def test_ddp_on_two_cpu_processes_equals_one_process(tmp_path, blocks):
    run_command(
        [sys.executable, "tests/lightning_main.py", str(tmp_path), *blocks],
        timeout=280,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=_free_port(),
    )
    expected = _one_process_reference()
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert saved["bn"] is torch.nn.BatchNorm2d, "reverted after fitting"
        assert_close(saved["state"], expected, atol=1e-9, rtol=1e-9)


def test_sync_batchnorm_flag_and_plugin_together_is_an_error():
    with pytest.raises(Exception, match="sync_batchnorm=True.*SyncBatchNormPlugin.*Choose one"):
        L.Trainer(accelerator="cpu", plugins=[SyncBatchNormPlugin()], sync_batchnorm=True)


def test_plugin_converts_and_reverts():
    from syncbn import SyncBatchNorm

    plugin = SyncBatchNormPlugin()
    net = plugin.apply(small_cnn())
    assert isinstance(net[1], SyncBatchNorm)
    assert type(plugin.revert(net)[1]) is torch.nn.BatchNorm2d
    with pytest.raises(ValueError, match="process_group or group_size"):
        SyncBatchNormPlugin(process_group=object(), group_size=2)
