"""Uneven inputs: SyncBatchNorm under torch's ``Join`` context manager.

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

The collectives (the notification, the headers, the shadows) are in `syncbn.comm`
(`notify_join`, `AnnouncedComm`, `shadow_announced`); this module decides when each runs.
"""

from __future__ import annotations

import itertools
import threading
import weakref
import zlib
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.join import Joinable, JoinHook, _JoinConfig

from . import comm as _comm
from .modules import SyncBatchNorm

__all__ = ["joinable", "SyncBatchNormJoinable"]

# The joinable of each model wrapped so far: its layers have moved to the joinable's group.
_made: weakref.WeakKeyDictionary[nn.Module, SyncBatchNormJoinable] = weakref.WeakKeyDictionary()


def joinable(model: nn.Module) -> SyncBatchNormJoinable:
    """The Joinable that covers every SyncBatchNorm of ``model``, for ``Join``.

    ``model`` is what the training loop calls: the DDP-wrapped model when DDP is used (the
    joinable notifies Join in a forward pre-hook on it). Its SyncBatchNorm layers must share
    one process group of all ranks; they move to a clone of it. Creating that clone is a
    collective: every process of the job must call `joinable`. Calling it again on the same
    model returns the same joinable.
    """
    if model in _made:
        return _made[model]
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SyncBatchNorm)}
    if not layers:
        raise ValueError("expected a model with SyncBatchNorm layers (found none)")
    groups = {id(layer.process_group): layer.process_group for layer in layers.values()}
    if len(groups) > 1:
        raise ValueError(f"expected the SyncBatchNorm layers to share one process group (got {len(groups)})")
    (group,) = groups.values()
    _made[model] = SyncBatchNormJoinable(model, layers, group)
    return _made[model]


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
        # Debug mode labels a layer's messages by a hash of its path in the model.
        labels = {name: zlib.crc32(name.encode()) for name in layers}
        self._names = {labels[name]: (name, layer.num_features) for name, layer in layers.items()}
        for name, layer in layers.items():
            layer.process_group = _comm.AnnouncedComm(self._comm, self.some_joined, labels[name], self.disagreement)
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
        self._notice = _comm.notify_join(self, self._model if hasattr(self._model, "reducer") else None)

    def some_joined(self) -> bool:
        """Whether a rank has joined, as this iteration's notification counted."""
        if self._notice is not None:
            self._some_joined = _comm.active_ranks(self._notice) < self._comm.world_size
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
            _comm.end_announced(self._comm, self._device)
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
            _comm.shadow_announced(self._comm, self._device)
        except BaseException as error:  # surfaced by stop(), on the main thread
            self._error = error

    def stop(self) -> None:
        """Wait for the last header (every rank has joined) and re-raise what the thread hit."""
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("SyncBatchNorm's join shadows failed") from self._error
