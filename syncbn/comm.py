"""The one door to other processes: collectives over torch.distributed or mpi4py.

SyncBatchNorm needs three things from a group of processes: its size, this process's
rank in it, and a summing all-reduce. `Communicator` names exactly that, so the math never
knows which backend carries the numbers.

`all_reduce(comm, tensor)` is the out-of-place sum the layer uses, and torch.compile can
trace it: torch.distributed groups go through functional collectives
(``_c10d_functional.all_reduce`` + ``wait_tensor``) while tracing, and MPI or a
Communicator of the caller's own through the ``syncbn::all_reduce`` custom op. Each
communicator has a string `key`, by which a traced backward all-reduces over it again
(`traced_all_reduce`).
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# torch.distributed.nn's functions take the default group of the moment they are imported as
# a default argument, and so keep it alive for good. torch imports that module lazily (the
# first call of a custom op does, through torch._dynamo), and a default group pinned that way
# outlives destroy_process_group and is torn down in interpreter shutdown, where Gloo aborts
# the process. Imported here, with syncbn, it is imported before any group exists.
import torch.distributed.nn  # noqa: F401
from torch.distributed._functional_collectives import _are_we_tracing
from torch.distributed.algorithms.join import Join

from . import debug
from .placement import discover

__all__ = [
    "Communicator",
    "LocalComm",
    "TorchComm",
    "MPIComm",
    "resolve",
    "all_reduce",
    "tracing",
    "key",
    "traced_all_reduce",
    "all_reduce_by_key_",
    "new_groups",
    "torch_group",
    "clone_group",
    "AnnouncedComm",
    "shadow_announced",
    "end_announced",
    "notify_join",
    "active_ranks",
    "init",
    "shutdown",
]


# Every communicator resolved in this process, by key: torch.distributed ones so that their
# buffers outlive the backend's use of them (see TorchComm), and every one that the
# syncbn::all_reduce op reduces over, for the eager C++ step and traced graphs (see `key`).
_by_key: dict[str, Any] = {}


class Communicator(Protocol):
    """A group of processes that can sum a tensor across its members."""

    world_size: int
    rank: int

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` on every member by the elementwise sum over all members."""


class LocalComm:
    """The world of one process: the all-reduce is the identity.

    It makes a single process the degenerate case of the same code, not a special case.
    """

    world_size = 1
    rank = 0
    key = "local"

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchComm:
    """Any ``torch.distributed`` ProcessGroup (Gloo, NCCL, sub-groups).

    Lifetime rule: a tensor handed to a torch.distributed collective must outlive every
    reference the backend keeps to it. Gloo's worker thread drops its reference to the
    work, and with it the tensor, a moment after the collective has returned. If Python
    has already let go of that tensor, the worker owns its Python object and must take the
    GIL to free it; when that happens during interpreter shutdown the process aborts
    ("terminate called without an active exception"). So no caller's tensor ever reaches
    the backend: each message is copied into a buffer that this communicator owns and
    reuses, one per (size, dtype, device), and back out after the reduction. The buffers
    live as long as the communicator, which `resolve` keeps by group name until a new
    group takes that name; the copies are 2C+1 numbers, negligible next to a collective's
    latency. Under torch.compile the compiled graph owns the functional collectives'
    buffers instead.
    """

    def __init__(self, group: Any) -> None:
        # A weak reference, so that the communicator cached for a group never keeps a
        # destroyed group alive.
        self._group = weakref.ref(group)
        self.group_name = group.group_name
        self.key = f"torch:{self.group_name}"
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def group(self) -> Any:
        return self._group()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._summed(tensor).clone()

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        tensor.copy_(self._summed(tensor))

    def _summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the group, in this communicator's buffer for its size."""
        group = self.group
        if group is None:
            raise RuntimeError(f"SyncBatchNorm: process group {self.group_name!r} was destroyed")
        key = (tensor.numel(), tensor.dtype, tensor.device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(key[0], dtype=key[1], device=key[2])
        staged = buffer.view(tensor.shape)
        staged.copy_(tensor)
        dist.all_reduce(buffer, group=group)
        return staged


class MPIComm:
    """An ``mpi4py.MPI.Comm`` (COMM_WORLD or any sub-communicator).

    CPU tensors are reduced in place through the buffer protocol. CUDA tensors go straight
    to MPI when mpi4py reports a CUDA-aware library, and are staged through host memory
    otherwise: the buffer is only 2C+1 numbers, so the copy is cheap next to the latency.
    """

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        if comm == MPI.COMM_NULL:
            raise ValueError("expected this process to be a member of process_group (got MPI.COMM_NULL)")
        self.comm = comm
        self.key = f"mpi:{comm.py2f()}"
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self._in_place = MPI.IN_PLACE
        query = getattr(MPI, "Query_cuda_support", None)
        self._cuda_aware = bool(query and query())

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cpu":
            self.comm.Allreduce(self._in_place, tensor.numpy())
        elif self._cuda_aware:
            torch.cuda.current_stream(tensor.device).synchronize()
            self.comm.Allreduce(self._in_place, tensor)
        else:
            host = tensor.cpu()
            self.comm.Allreduce(self._in_place, host.numpy())
            tensor.copy_(host)


def _torch_comm(group: Any) -> TorchComm:
    # One communicator per live group, kept by key, so that its message buffers outlive the
    # backend's use of them (see TorchComm); a destroyed group's name can be reused.
    group = torch_group(group)
    comm = _by_key.get(f"torch:{group.group_name}")
    if comm is None or comm.group is None:
        comm = TorchComm(group)
        # A traced step owns its buffers and needs only the group's name; kept while
        # tracing, the communicator would be a side effect that Dynamo must replay, and
        # torch 2.11's cannot rebuild the group it holds (a graph break).
        if not _are_we_tracing():
            _by_key[comm.key] = comm
    return comm


def _mpi_comm(process_group: Any) -> MPIComm:
    comm = _by_key.get(f"mpi:{process_group.py2f()}")
    if comm is None or comm.comm is not process_group:
        comm = MPIComm(process_group)
        _by_key[comm.key] = comm
    return comm


def key(comm: Communicator) -> str:
    """The name by which the syncbn::all_reduce op finds ``comm`` in this process.

    Eager C++ steps and traced graphs hold names, not communicators. ``comm`` is kept under
    its name, so that the name finds this very communicator (and not one kept for an
    earlier group of the same name), except a torch.distributed one while tracing (see
    `_torch_comm`): its traced all-reduce needs only the group's name.
    """
    name = comm.key if isinstance(comm, (LocalComm, TorchComm, MPIComm)) else f"{type(comm).__qualname__}:{id(comm)}"
    if _by_key.get(name) is not comm and not (isinstance(comm, TorchComm) and tracing()):
        _by_key[name] = comm
    return name


def traced_all_reduce(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`all_reduce` over the communicator that `key` named ``name``, as traceable ops: the
    functional collective for a torch.distributed group, syncbn::all_reduce for the others.

    A traced backward holds only the name. Finding a torch.distributed group by its name
    cannot be traced (torch 2.11's Dynamo traces the backward with the forward, and cannot
    call into c10d), and a communicator resolved while tracing is not kept (`_torch_comm`),
    so the functional collective takes the group's name itself.
    """
    if name == LocalComm.key:
        return tensor
    if name.startswith("torch:"):
        return _functional_all_reduce(tensor, name.removeprefix("torch:"))
    return torch.ops.syncbn.all_reduce(tensor, name)


def tracing() -> bool:
    """Whether torch.compile (Dynamo, or AOTAutograd's fake tensors) is tracing this call."""
    return _are_we_tracing()


def all_reduce(comm: Communicator, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the members of ``comm``, as a new tensor; traceable."""
    if tracing():
        return traced_all_reduce(key(comm), tensor)
    return _summed(comm, tensor)


def _summed(comm: Communicator, tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(comm, (TorchComm, LocalComm)):
        return comm.all_reduce(tensor)
    summed = tensor.clone()
    comm.all_reduce_(summed)
    return summed


def _functional_all_reduce(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    return funcol.wait_tensor(torch.ops._c10d_functional.all_reduce(tensor, "sum", group_name))


# syncbn::all_reduce: the sum over the communicator that `key` named, as an op, which compiled
# graphs keep whole for MPI and the caller's own communicators. A plain Python kernel:
# torch.library.custom_op's wrappers cost about 0.13 ms a call, twice a layer's step.
_lib = torch.library.Library("syncbn", "FRAGMENT")
_lib.define("all_reduce(Tensor tensor, str comm) -> Tensor")


def _all_reduce_by_key(tensor: torch.Tensor, comm: str) -> torch.Tensor:
    # A kernel runs on real tensors only: never while tracing.
    return _summed(_by_key[comm], tensor)


_lib.impl("all_reduce", _all_reduce_by_key, "CompositeExplicitAutograd")


def all_reduce_by_key_(tensor: torch.Tensor, comm: str) -> torch.Tensor:
    """Sum ``tensor`` in place over the communicator that `key` named ``comm``, and return it:
    the collective of the eager C++ step, whose messages are its own, so that none is copied
    first (0.02-0.04 ms a step with a no-op world of 2). Real tensors only, never while
    tracing."""
    _by_key[comm].all_reduce_(tensor)
    return tensor


@torch.library.register_fake("syncbn::all_reduce", lib=_lib)
def _(tensor, comm):
    return torch.empty_like(tensor)


def _destroy_groups_left_open() -> None:
    """Destroy the process groups a script left open, while the interpreter is still whole.

    A Gloo group still alive when the interpreter shuts down is torn down with it, and its
    worker threads can then abort the process (SIGABRT, "terminate called without an active
    exception") after a run that succeeded. At exit nothing can use the groups any more, so
    syncbn destroys them first; a script that called ``destroy_process_group`` itself is left
    as it is. Registered when syncbn is imported (code that torch.compile traces cannot
    register it), it runs after the exit handlers registered later.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


atexit.register(_destroy_groups_left_open)


def _is_mpi_comm(obj: Any) -> bool:
    # Checked by module name so that importing syncbn never imports mpi4py.
    return type(obj).__module__ == "mpi4py.MPI"


def resolve(process_group: Any = None) -> Communicator:
    """Turn a ``process_group=`` argument into a Communicator.

    None means the default torch.distributed group when one is initialized, and a world of
    one otherwise, so a layer written for many processes runs unchanged in one. An object
    that already is a Communicator is used as it is.
    """
    if process_group is None:
        if dist.is_available() and dist.is_initialized():
            return _torch_comm(None)
        return LocalComm()
    if _is_mpi_comm(process_group):
        return _mpi_comm(process_group)
    if dist.is_available():
        if isinstance(process_group, dist.ProcessGroup):
            return _torch_comm(process_group)
        if process_group is dist.GroupMember.NON_GROUP_MEMBER:
            # What dist.new_group returns on the ranks it leaves out.
            raise ValueError("expected this process to be a member of process_group (it is not)")
    if all(hasattr(process_group, name) for name in ("all_reduce_", "world_size", "rank")):
        key(process_group)  # registered now, outside any torch.compile trace
        return process_group  # a Communicator of the caller's own: another backend, or instrumentation
    raise TypeError(
        "expected process_group to be None, a torch.distributed ProcessGroup, an "
        f"mpi4py.MPI.Comm or a syncbn Communicator (got {type(process_group).__name__})"
    )


def new_groups(group_size: int, process_group: Any = None) -> Any:
    """Split a group into consecutive blocks of ``group_size`` ranks; return this rank's block.

    Statistics are then synchronized within each block only (for example, per node, or in
    blocks of 8 GPUs when the per-GPU batch is already large enough). Creating a group is
    itself a collective: with torch.distributed every process of the job must call this, and
    with MPI every rank of ``process_group``, with the same ``group_size``, even for blocks
    it will not join, or the job hangs.
    """
    mpi = _is_mpi_comm(process_group)
    size = process_group.Get_size() if mpi else dist.get_world_size(process_group)
    if group_size < 1 or size % group_size:
        raise ValueError(f"expected group_size to divide the group size {size} (got {group_size})")
    if mpi:
        return process_group.Split(color=process_group.Get_rank() // group_size)
    ranks = dist.get_process_group_ranks(dist.group.WORLD if process_group is None else process_group)
    blocks = [ranks[i : i + group_size] for i in range(0, size, group_size)]
    mine, _ = dist.new_subgroups_by_enumeration(blocks)
    return mine


def torch_group(process_group: Any = None) -> Any:
    """The torch.distributed group a ``process_group=`` value names (None: the default one)."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("expected an initialized torch.distributed default process group (got none)")
        return dist.group.WORLD
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"expected a torch.distributed ProcessGroup (got {type(process_group).__name__})")
    return process_group


def clone_group(process_group: Any) -> Any:
    """A new group of the same ranks, whose collectives never pair with ``process_group``'s.

    Like ``dist.new_group``, a collective: every process of the job must call it.
    """
    return dist.new_group(dist.get_process_group_ranks(process_group))


class AnnouncedComm:
    """A Communicator that, while ``announcing()`` is true, precedes each float64 message
    with a header, so that ranks taking no part in the computation (ranks that have joined,
    see `syncbn.join`) can learn what to contribute: `shadow_announced` answers with zeros.

    The header is (1, n, n²) for a message of n numbers: its sum over the ranks gives n, and
    shows every rank at once whether the announcing ranks agree (Σ1·Σn² = (Σn)²). In debug
    mode it is a row (``label``, n, 1) per rank instead, so that ``disagreement`` can name
    each rank's layer. On a disagreement every announcing rank raises ``disagreement(header)``.
    """

    def __init__(
        self,
        inner: Communicator,
        announcing: Callable[[], bool],
        label: int,
        disagreement: Callable[[torch.Tensor], str],
    ) -> None:
        self.inner = inner
        self.announcing = announcing
        self.label = label
        self.disagreement = disagreement
        self.world_size = inner.world_size
        self.rank = inner.rank

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        if self.announcing():
            if tensor.dtype != torch.float64:
                raise TypeError(f"expected a float64 SyncBatchNorm message (got {tensor.dtype})")
            header = _header(self.inner, tensor.numel(), self.label, tensor.device)
            self.inner.all_reduce_(header)
            if _agreed_size(header) is None:
                raise RuntimeError(self.disagreement(header))
        self.inner.all_reduce_(tensor)


def _header(comm: Communicator, size: int, label: int, device: torch.device) -> torch.Tensor:
    """This rank's header for a message of ``size`` numbers; ``size=0`` from a silent rank."""
    if debug.enabled():
        header = torch.zeros(comm.world_size, 3, dtype=torch.float64)
        if size:
            header[comm.rank] = torch.tensor([label, size, 1])
        return header.to(device)
    return torch.tensor([1.0, size, size * size] if size else [0.0, 0.0, 0.0], dtype=torch.float64, device=device)


def _agreed_size(header: torch.Tensor) -> int | None:
    """From the summed header: the size every announcing rank gave, 0 when none announced,
    None when they disagree."""
    if header.dim() == 2:
        rows = [row for row in header.tolist() if row[2]]
        if not rows:
            return 0
        return int(rows[0][1]) if all(row == rows[0] for row in rows) else None
    active, total, squares = header.tolist()
    if active == 0:
        return 0
    return int(total / active) if active * squares == total * total else None


def shadow_announced(comm: Communicator, device: torch.device) -> None:
    """Answer each message announced on ``comm`` with zeros, until a header that no rank
    announced (`end_announced` from the others) or one they disagree on (they raise)."""
    while True:
        header = _header(comm, 0, 0, device)
        comm.all_reduce_(header)
        size = _agreed_size(header)
        if not size:
            return
        comm.all_reduce_(torch.zeros(size, dtype=torch.float64, device=device))


def end_announced(comm: Communicator, device: torch.device) -> None:
    """The header that ends `shadow_announced` on the ranks serving it: every other rank
    sends it once, when no rank announces any more."""
    comm.all_reduce_(_header(comm, 0, 0, device))


def notify_join(joinable: Any, ddp: Any = None) -> Any:
    """``Join.notify_join_context(joinable)``: the work handle of the all-reduce that tells
    Join this rank is still active, when ``joinable`` is the first in a live Join; else None.

    When ``ddp`` (a DistributedDataParallel) shares that Join, its reducer gets the handle too,
    as DDP does with its own notification when it is the first joinable, so that
    ``divide_by_initial_world_size=False`` still divides by the number of active ranks.
    """
    work = Join.notify_join_context(joinable)
    if work is not None and ddp is not None:
        ddp.reducer._set_forward_pass_work_handle(work, getattr(ddp, "_divide_by_initial_world_size", True))
    return work


def active_ranks(work: Any) -> int:
    """The number of active ranks that a `notify_join` handle counted (waits for it)."""
    work.wait()
    return int(work.get_future().value()[0].item())


def init(backend: str = "auto", timeout: timedelta = timedelta(minutes=10)) -> Any:
    """Join the job this process was launched into; return its ``process_group=`` value.

    ``backend="mpi"`` returns ``MPI.COMM_WORLD``. Otherwise torch.distributed is set up
    from the launcher's variables (torchrun, Open MPI, MPICH, SLURM), with NCCL when CUDA
    is available and Gloo when not, and the default group (``None``) is returned. The
    rendezvous address defaults to loopback (127.0.0.1:29500) unless MASTER_ADDR and
    MASTER_PORT say otherwise. ``timeout`` bounds how long a collective waits for a peer.
    """
    if backend == "mpi":
        from mpi4py import MPI

        return MPI.COMM_WORLD
    place = discover()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(place.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        backend, init_method="env://", rank=place.rank, world_size=place.world_size, timeout=timeout
    )
    return None


def shutdown(process_group: Any = None) -> None:
    """Leave the job joined by `init` (a no-op for MPI, which finalizes at exit)."""
    if not _is_mpi_comm(process_group) and dist.is_initialized():
        dist.destroy_process_group()
