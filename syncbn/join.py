"""Uneven inputs: SyncBatchNorm under ``torch.distributed.algorithms.Join``.

When ranks run different numbers of iterations, the rank that runs out of data stops
entering the layers' all-reduces and its peers wait forever. `joinable(model)` is the
`Joinable` that lets them go on: the joined rank shadows each SyncBN all-reduce with zeros,
so every later iteration normalizes over the union of the active ranks' batches, exactly
BatchNorm on their concatenation::

    with Join([syncbn.joinable(ddp_model), ddp_model]):
        for x, y in loader:  # a different number of batches on each rank
            loss_fn(ddp_model(x), y).backward()
            optimizer.step()

The design, and why:

* **A group of its own.** `joinable` moves the model's SyncBatchNorm layers onto a clone
  of their process group, made once, at wrap time. DDP's collectives (the join notification,
  the grad-sync check, the buffer broadcast, the gradient buckets) stay on the original
  group. A joined rank issues all of DDP's shadows in its hook and all of SyncBN's in
  another, in whatever order, while the active ranks interleave them; on separate groups
  each stream still pairs message for message and can neither deadlock nor pair the
  wrong buffers.
* **Announced messages.** Which SyncBN messages an iteration sends depends on the model's
  code (eval iterations send none, a skipped branch fewer), and a rank with no batches at
  all has never seen one. So while some rank has joined, each active rank precedes every
  SyncBN message with a header of three numbers, (1, n, n²) for a message of n: the sum
  over the active ranks tells the joined ranks how many zeros to contribute, and shows
  every rank at once whether the active ranks agree (they do iff Σ1·Σn² = (Σn)²). A
  thread on each joined rank serves the headers, so that its main thread can meanwhile run
  DDP's hook, which blocks until its gradient buckets are reduced; on the active ranks
  those buckets wait for the backward of every SyncBN layer, and so for the shadows.
* **Cost.** Iterations in which no rank has joined send no header: they only wait for the
  join notification, one all-reduce of one number that Join sends anyway, before the
  first SyncBN message. An iteration after some rank has joined pays one extra 3-number
  all-reduce per SyncBN message: two per layer in training.
* **Order: ``Join([syncbn.joinable(model), ddp_model])``.** A joined rank runs the hooks in
  list order, and DDP's hook blocks on its buckets, so this hook must have started the
  shadows before it. The first joinable is also the one whose notification counts, and the
  layers need that count to know whether to announce: the joinable notifies in a forward
  pre-hook on the model and hands the notification to DDP's reducer, as DDP does for
  itself when first, so that ``divide_by_initial_world_size=False`` still divides by the
  number of active ranks. The other order raises ``ValueError`` when Join is built.
* **The end.** When every rank has joined, a last all-zero header stops the threads, and
  one all-reduce copies the running stats and ``num_batches_tracked`` of a rank that ran
  to the end onto every rank, so that a checkpoint saved on any rank is right.
"""

from __future__ import annotations

import itertools
import threading
import zlib
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook, _JoinConfig

from . import comm as _comm
from . import debug
from .modules import SyncBatchNorm

__all__ = ["joinable", "SyncBatchNormJoinable"]


def joinable(model: nn.Module) -> SyncBatchNormJoinable:
    """The Joinable that covers every SyncBatchNorm of ``model``, for ``Join``.

    ``model`` is what the training loop calls: the DDP-wrapped model when DDP is used (the
    joinable notifies Join in a forward pre-hook on it). Its SyncBatchNorm layers must share
    one torch.distributed group; they move to a clone of it. Creating that clone is a
    collective: every process of the job must call `joinable`. Calling it again on the same
    model returns the same joinable.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SyncBatchNorm)}
    if not layers:
        raise ValueError("expected a model with SyncBatchNorm layers (found none)")
    if all(isinstance(layer.process_group, _Announcing) for layer in layers.values()):
        joinables = {id(layer.process_group.joinable): layer.process_group.joinable for layer in layers.values()}
        if len(joinables) == 1:
            return next(iter(joinables.values()))
    groups = {id(layer.process_group): layer.process_group for layer in layers.values()}
    if len(groups) > 1:
        raise ValueError(f"expected the SyncBatchNorm layers to share one process group (got {len(groups)})")
    (group,) = groups.values()
    return SyncBatchNormJoinable(model, layers, group)


class SyncBatchNormJoinable(Joinable):
    """Shadows the SyncBatchNorm all-reduces of ``model`` on ranks that have joined."""

    def __init__(self, model: nn.Module, layers: dict[str, SyncBatchNorm], group: Any) -> None:
        super().__init__()
        self._model = model
        self._layers = list(layers.values())
        self._group = _comm.torch_group(group)
        size, job = _comm.resolve(self._group).world_size, _comm.resolve(None).world_size
        if size != job:
            # Join counts the ranks of one group, and the clone below is made by every rank.
            raise ValueError(f"expected the SyncBatchNorm layers on a group of all {job} ranks (got {size} ranks)")
        self._comm = _comm.resolve(_comm.clone_group(self._group))
        self._device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        self._notice = None  # this iteration's join notification, until read
        self._some_joined = False
        self._server: _ShadowServer | None = None
        # Debug mode names a layer by a hash of its path in the model.
        self._names = {zlib.crc32(name.encode()): (name, layer.num_features) for name, layer in layers.items()}
        for name, layer in layers.items():
            layer.process_group = _Announcing(self._comm, self, name)
        model.register_forward_pre_hook(self._notify)

    @property
    def join_device(self) -> torch.device:
        return self._device

    @property
    def join_process_group(self) -> Any:
        # Join reads this right after marking the first joinable: the place to refuse an order
        # that would deadlock, on every rank, before any iteration.
        config = self._join_config
        if config.enable and not config.is_first_joinable:
            raise ValueError(
                "expected syncbn.joinable(model) first in Join([...]) (got it after another joinable): "
                "the joined ranks run the hooks in order, and DDP's blocks until the SyncBN shadows ran"
            )
        ddp_config = getattr(self._model, "_join_config", None)
        if config.enable and ddp_config is not None and not ddp_config.enable:
            raise ValueError("expected the DDP model in Join([...]) too: Join([syncbn.joinable(ddp_model), ddp_model])")
        return self._group

    def join_hook(self, **kwargs: Any) -> JoinHook:
        # kwargs are other joinables' options (DDP's divide_by_initial_world_size).
        return _Hook(self)

    def _notify(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: tell Join that this rank has not joined, once per iteration."""
        work = Join.notify_join_context(self)
        self._notice = work
        if work is not None and hasattr(self._model, "reducer"):
            # What DDP does with its own notification when it is the first joinable.
            self._model.reducer._set_forward_pass_work_handle(
                work, getattr(self._model, "_divide_by_initial_world_size", True)
            )

    def some_joined(self) -> bool:
        """Whether a rank has joined, as this iteration's notification counted."""
        if self._notice is not None:
            self._notice.wait()
            active = self._notice.get_future().value()[0].item()
            self._some_joined = active < self._comm.world_size
            self._notice = None
        return self._some_joined

    def disagreement(self, header: torch.Tensor) -> str:
        """The error when the active ranks announced different messages."""
        message = "SyncBatchNorm under Join: the active ranks are not all in the same layer"
        if header.dim() == 1:
            return message + " (their messages differ in size); set SYNCBN_DEBUG=1 to name the layers"
        lines = []
        for rank, (layer, size, active) in enumerate(header.tolist()):
            name, channels = self._names.get(int(layer), ("an unknown layer", 0))
            kind = {2 * channels + 1: "forward of", 2 * channels: "backward of"}.get(int(size), "debug check in")
            lines.append(f"  rank {rank}: {kind} {name!r}" if active else f"  rank {rank}: joined")
        return message + ":\n" + "\n".join(lines)

    def _finish(self, is_last_joiner: bool) -> None:
        """Stop the shadows, then give every rank the running stats of a rank that ran to the end."""
        if self._server is None:
            self._comm.all_reduce_(_header(self._comm, 0, 0, self._device))
        else:
            self._server.stop()
            self._server = None
        self._notice, self._some_joined = None, False
        # Join leaves its configuration behind; without it, later forwards (an uneven
        # validation loop, say) would keep notifying a context that no rank is in.
        self._join_config = _JoinConfig.construct_disabled_join_config()
        authority = torch.zeros(self._comm.world_size, dtype=torch.float64, device=self._device)
        authority[self._comm.rank] = float(is_last_joiner)
        self._comm.all_reduce_(authority)
        source = int(authority.nonzero().max())
        buffers = [b for layer in self._layers for b in layer.buffers()]
        if not buffers:
            return
        packed = torch.cat([b.detach().double().flatten() for b in buffers])
        if self._comm.rank != source:
            packed.zero_()
        self._comm.all_reduce_(packed)
        with torch.no_grad():
            for b, values in zip(buffers, packed.split([b.numel() for b in buffers]), strict=True):
                b.copy_(values.view_as(b))


class _Hook(JoinHook):
    def __init__(self, joinable: SyncBatchNormJoinable) -> None:
        self.joinable = joinable

    def main_hook(self) -> None:
        # Called once per iteration of the active ranks; the server spans them all.
        j = self.joinable
        if j._server is None:
            j._server = _ShadowServer(j._comm, j._device)

    def post_hook(self, is_last_joiner: bool) -> None:
        self.joinable._finish(is_last_joiner)


class _Announcing:
    """A layer's communicator under `joinable`: the layers' own group, announcing each message
    while a rank has joined (see the module docstring)."""

    def __init__(self, inner: _comm.Communicator, joinable: SyncBatchNormJoinable, name: str) -> None:
        self.inner = inner
        self.joinable = joinable
        self.name = name
        self.world_size = inner.world_size
        self.rank = inner.rank

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        if self.joinable.some_joined():
            if tensor.dtype != torch.float64:
                raise TypeError(f"expected a float64 SyncBatchNorm message (got {tensor.dtype})")
            header = _header(self.inner, tensor.numel(), zlib.crc32(self.name.encode()), tensor.device)
            self.inner.all_reduce_(header)
            if _agreed_size(header) is None:
                raise RuntimeError(self.joinable.disagreement(header))
        self.inner.all_reduce_(tensor)


def _header(comm: _comm.Communicator, size: int, layer: int, device: torch.device) -> torch.Tensor:
    """This rank's announcement of a message of ``size`` numbers from the layer whose name
    hashes to ``layer``; ``size=0`` on a joined rank.

    (1, n, n²) normally; in debug mode a row (layer, n, 1) per rank, so that a disagreement
    can name each rank's layer.
    """
    if debug.enabled():
        header = torch.zeros(comm.world_size, 3, dtype=torch.float64)
        if size:
            header[comm.rank] = torch.tensor([layer, size, 1])
        return header.to(device)
    return torch.tensor([1.0, size, size * size] if size else [0.0, 0.0, 0.0], dtype=torch.float64, device=device)


def _agreed_size(header: torch.Tensor) -> int | None:
    """From the summed header: the size every active rank announced, 0 when none is active
    (every rank has joined), None when the active ranks disagree."""
    if header.dim() == 2:
        rows = [row for row in header.tolist() if row[2]]
        if not rows:
            return 0
        return int(rows[0][1]) if all(row == rows[0] for row in rows) else None
    active, total, squares = header.tolist()
    if active == 0:
        return 0
    return int(total / active) if active * squares == total * total else None


class _ShadowServer:
    """A joined rank's thread that answers each announced SyncBN message with zeros."""

    def __init__(self, comm: _comm.Communicator, device: torch.device) -> None:
        self._comm = comm
        self._device = device
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="syncbn-join-shadows", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            if self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            while True:
                header = _header(self._comm, 0, 0, self._device)
                self._comm.all_reduce_(header)
                size = _agreed_size(header)
                if not size:
                    return  # every rank has joined, or the active ranks disagree and raise
                self._comm.all_reduce_(torch.zeros(size, dtype=torch.float64, device=self._device))
        except BaseException as error:  # surfaced by stop(), on the main thread
            self._error = error

    def stop(self) -> None:
        """Wait for the last header (every rank has joined) and re-raise what the thread hit."""
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("SyncBatchNorm's join shadows failed") from self._error
