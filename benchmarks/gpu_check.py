"""One-shot GPU check: equivalence, speed against torch.nn.SyncBatchNorm, host syncs, CUDA graphs.

    python benchmarks/gpu_check.py          (make gpu-check)

Made for a lent GPU with minutes of device time: one run does every check and writes every
figure to results/gpu.json, with the GPU's name and the torch and CUDA versions.

1. Equivalence on one GPU, against nn.BatchNorm on the concatenated batch, with the CPU
   suite's tolerances: 2 ranks over Gloo with CUDA tensors, and a 1-rank NCCL group
   driving the synchronized path. fp32/fp64, channels_last, uneven and empty batches,
   running stats, no affine parameters and no bias; fp16/bf16 under autocast.
2. Speed of the compute path, fwd+bwd at ResNet-50's BN shapes (batch 32), fp32 and bf16:
   syncbn synchronized through a 2-rank communicator whose all-reduce is a no-op, torch's
   SyncBatchNorm autograd Function on a 1-rank NCCL group, and nn.BatchNorm2d; CUDA
   events, the variants interleaved, medians.
3. Host syncs: a training step under torch.cuda.set_sync_debug_mode("error").
4. CUDA-graph capture of a training step.
5. torch.compile(fullgraph=True) over the NCCL group: no graph break, two compiled training
   steps and an eval call equal to eager, the compile time, and no host sync in a compiled
   step.

Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
from common import NoOpComm, make_parser, on_ranks, write_json
from torch import nn

from syncbn import SyncBatchNorm
from syncbn.comm import TorchComm, resolve
from syncbn.functional import sync_batch_norm

# (channels, height = width) of every BatchNorm in torchvision's ResNet-50 at 224×224.
RESNET50_BN = [(64, 112), (64, 56), (128, 56), (256, 56), (128, 28), (512, 28), (256, 28)]
RESNET50_BN += [(256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)]
SIZES = {1: [7], 2: [3, 0], 3: [3, 0, 4]}
# The CPU suite's tolerances: fp64 exact to 1e-9; autocast outputs as in test_semantics.
ATOL = {torch.float64: 1e-9, torch.float32: 1e-5}
AUTOCAST_TOLERANCE = (0.15, 0.05)


def _rank_slice(sizes: list[int], rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def _parameter_grads(module: nn.Module) -> torch.Tensor:
    """The gradients of the module's trainable parameters, end to end (empty without any)."""
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    return torch.cat(grads) if grads else module.running_mean.new_zeros(0)


def equivalence_case(rank, world, group, dtype, channels_last, device="cuda", params="affine") -> dict:
    """One case of the spec on this rank: y, dx, summed dweight/dbias, running stats, eval.

    ``params``: "affine", "no affine" (no weight, no bias) or "no bias" (a weight alone,
    against a reference whose bias stays zero).
    """
    sizes = SIZES[world]
    mine = _rank_slice(sizes, rank)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(sum(sizes), 5, 4, 3, generator=g, dtype=torch.float64) * 3 + 2).to(device, dtype)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    ref = nn.BatchNorm2d(5, affine=params != "no affine").to(device, dtype)
    sync = SyncBatchNorm(5, affine=params != "no affine", bias=params != "no bias", process_group=group)
    sync = sync.to(device, dtype)
    if ref.affine:
        ref.bias.requires_grad_(params != "no bias")
    errors: dict[str, float] = {}
    for _ in range(2):  # the second step starts from updated running stats
        xr, xs = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
        ref.zero_grad()
        sync.zero_grad()
        y_ref, y = ref(xr), sync(xs)
        y_ref.backward(dy)
        y.backward(dy[mine])
        grads = _parameter_grads(sync)
        if world > 1:
            resolve(group).all_reduce_(grads)  # DDP's sum of the ranks' gradients
        for name, a, e in [
            ("y", y, y_ref[mine]),
            ("dx", xs.grad, xr.grad[mine]),
            ("dweight, dbias", grads, _parameter_grads(ref)),
            ("running_mean", sync.running_mean, ref.running_mean),
            ("running_var", sync.running_var, ref.running_var),
        ]:
            errors[name] = max(errors.get(name, 0.0), max_error(a, e))
        if not y.is_contiguous(memory_format=fmt):
            errors["memory format kept"] = float("inf")
    with torch.no_grad():
        errors["eval"] = max_error(sync.eval()(x[mine]), ref.eval()(x)[mine])
    ok = max(errors.values()) <= ATOL[dtype]
    return {"dtype": str(dtype), "channels_last": channels_last, "params": params, "errors": errors, "ok": ok}


def autocast_case(rank, world, group, dtype, device="cuda") -> dict:
    """A conv-BN model under autocast against the float64 model on the concatenated batch."""
    sizes = SIZES[world]
    mine = _rank_slice(sizes, rank)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).to(device, torch.float64)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), SyncBatchNorm(8, process_group=group)).to(device)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(sum(sizes), 3, 10, 10, generator=torch.Generator().manual_seed(0)).to(device) * 4 + 20
    expected = ref(x.double())
    with torch.autocast("cuda", dtype=dtype):
        y = model(x[mine])
    y.float().sum().backward()
    errors = {"y": max_error(y, expected[mine]), "running_mean": max_error(model[1].running_mean, ref[1].running_mean)}
    atol, rtol = AUTOCAST_TOLERANCE
    ok = y.dtype == dtype and torch.allclose(y.double(), expected[mine], atol=atol, rtol=rtol)
    return {"dtype": str(dtype), "autocast": True, "errors": errors, "ok": bool(ok)}


def equivalence(rank, world, group, device="cuda") -> list[dict]:
    """Every case on this rank; rank 0's list is what on_ranks returns."""
    rows = []
    for dtype in (torch.float64, torch.float32):
        for channels_last in (False, True):
            rows.append(equivalence_case(rank, world, group, dtype, channels_last, device))
    for params in ("no affine", "no bias"):
        rows.append(equivalence_case(rank, world, group, torch.float32, False, device, params))
    if device == "cuda":
        rows += [autocast_case(rank, world, group, dtype) for dtype in (torch.float16, torch.bfloat16)]
    return rows


def median_cuda_ms(variants: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median milliseconds per call of each variant, timed with CUDA events, interleaved."""
    for fn in variants.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in samples.items()}


def _train_step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        xs = x.detach().requires_grad_()
        fn(xs).backward(dy)

    return run


def speed(group, reps: int) -> list[dict]:
    """fwd+bwd of syncbn's synchronized path, torch's SyncBatchNorm Function and nn.BatchNorm2d."""
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBNFunction

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels, size in RESNET50_BN:
            x = torch.randn(32, channels, size, size, device="cuda", dtype=dtype)
            dy = torch.randn_like(x)
            ours, theirs, local = (nn.BatchNorm2d(channels).cuda() for _ in range(3))
            comm = NoOpComm()

            def syncbn(t, m=ours, comm=comm):
                return sync_batch_norm(
                    t, m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked, m.momentum, m.eps, comm
                )

            def torch_sync(t, m=theirs):
                args = (m.weight, m.bias, m.running_mean, m.running_var, m.eps, m.momentum, group, 1)
                return TorchSyncBNFunction.apply(t, *args)

            ms = median_cuda_ms(
                {
                    "syncbn": _train_step(syncbn, x, dy),
                    "torch.nn.SyncBatchNorm": _train_step(torch_sync, x, dy),
                    "nn.BatchNorm2d": _train_step(local, x, dy),
                },
                reps,
            )
            rows.append(
                {
                    "shape": [32, channels, size, size],
                    "dtype": str(dtype),
                    "median_ms": ms,
                    "syncbn / torch.nn.SyncBatchNorm": ms["syncbn"] / ms["torch.nn.SyncBatchNorm"],
                }
            )
    return rows


def _model(group) -> nn.Module:
    """A small conv net whose SyncBatchNorm layers synchronize over ``group``."""
    torch.manual_seed(0)
    # No bias before a BatchNorm, as in a ResNet: its gradient is zero up to rounding.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, bias=False),
        SyncBatchNorm(16, process_group=group),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, bias=False),
        SyncBatchNorm(8, process_group=group),
    )


def host_syncs(group) -> dict:
    """A training step with every host sync an error; the layers synchronize over ``group``."""
    model = _model(group).cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    model(x).sum().backward()  # warm up outside the check: first calls allocate and load
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).sum().backward()
        return {"ok": True}
    except RuntimeError as error:
        return {"ok": False, "error": str(error).splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def graph_capture() -> dict:
    """Capture fwd+bwd of the synchronized path (no-op communicator) in a CUDA graph and replay it."""
    bn = nn.BatchNorm2d(16).cuda()
    x = torch.randn(8, 16, 8, 8, device="cuda", requires_grad=True)
    comm = NoOpComm()

    def step() -> None:
        y = sync_batch_norm(
            x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps, comm
        )
        y.sum().backward()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        return {"ok": True}
    except Exception as error:  # capture refuses host syncs: record why, the other checks still run
        return {"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}


def _tolerance_used(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> float:
    """max |actual − expected| / (tol·(1 + max |expected|)): at most 1 passes.

    Judged on the scale of the tensor's largest value, so that gradient sums that cancel to
    near zero are held to the precision of their terms.
    """
    if actual.numel() == 0:
        return 0.0
    actual, expected = actual.double(), expected.double()
    return (actual - expected).abs().max().item() / (tol * (1 + expected.abs().max().item()))


def compiled_case(comm, dtype: torch.dtype, device: str = "cuda", backend: str = "inductor") -> dict:
    """torch.compile(fullgraph=True) of a conv net whose layers synchronize over ``comm``.

    Two training steps and an eval call, compiled against eager from the same weights, to
    1e-9 (float64) and 1e-5 (float32) of each tensor's scale, each error given as the share
    of its tolerance it uses; the graph break count; the first compiled step's time.
    """
    eager = _model(comm).to(device, dtype)
    model = copy.deepcopy(eager)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(8, 3, 16, 16, device=device, dtype=dtype, generator=generator)
    dy = torch.randn(8, 8, 12, 12, device=device, dtype=dtype, generator=generator)
    result: dict = {
        "dtype": str(dtype),
        "graph breaks": torch._dynamo.explain(copy.deepcopy(model))(x).graph_break_count,
    }
    step = torch.compile(model, fullgraph=True, backend=backend)
    errors: dict[str, float] = {}
    for i in range(2):
        xs, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = eager(xs)
        expected.backward(dy)
        started = time.perf_counter()
        y = step(xc)
        y.backward(dy)
        if i == 0:
            result["first compiled step s"] = time.perf_counter() - started
        pairs = [("y", y, expected), ("dx", xc.grad, xs.grad)]
        pairs += [
            (f"grad {name}", p.grad, q.grad)
            for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True)
        ]
        pairs += [(f"buffer {name}", b, c) for (name, b), c in zip(model.named_buffers(), eager.buffers(), strict=True)]
        for name, actual, wanted in pairs:
            errors[name] = max(errors.get(name, 0.0), _tolerance_used(actual, wanted, ATOL[dtype]))
        model.zero_grad()
        eager.zero_grad()
    with torch.no_grad():
        errors["eval"] = _tolerance_used(step.eval()(x), eager.eval()(x), ATOL[dtype])
    result["errors"] = errors
    result["ok"] = result["graph breaks"] == 0 and max(errors.values()) <= 1.0
    return result


def compiled(comm) -> dict:
    """compiled_case in float64 and float32 on CUDA, then a compiled step with every host sync an error."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the same convolution arithmetic, compiled or not
    try:
        rows = [compiled_case(comm, dtype) for dtype in (torch.float64, torch.float32)]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    model = _model(comm).cuda()
    step = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 16, 16, device="cuda")
    step(x).sum().backward()  # compiles, outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x).sum().backward()
        syncs = {"ok": True}
    except RuntimeError as error:
        syncs = {"ok": False, "error": str(error).splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"cases": rows, "host syncs in a compiled step": syncs, "ok": all(r["ok"] for r in rows) and syncs["ok"]}


def _nccl_group(store_dir: str):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.FileStore(os.path.join(store_dir, "nccl"), 1), rank=0, world_size=1)
    return dist.group.WORLD


def _guarded(name: str, fn: Callable[[], object], results: dict) -> None:
    """Run one check; a failure is recorded with its traceback and the next check still runs."""
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception:
        results[name] = {"ok": False, "error": traceback.format_exc()}
    print(f"gpu_check: {name} done in {time.perf_counter() - started:.1f} s", flush=True)


def main() -> int:
    parser = make_parser(__doc__, "fewer timing repetitions")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check")
        return 0
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    _guarded("equivalence, 2 ranks over Gloo", lambda: on_ranks(equivalence, 2, "Gloo"), results)
    with tempfile.TemporaryDirectory() as tmp:
        group = _nccl_group(tmp)
        # Reported as a world of 2 so that the layers take the synchronized path; with one
        # rank NCCL's sum is the identity, so the results are those of the whole batch.
        nccl = TorchComm(group)
        nccl.world_size = 2
        _guarded("equivalence, 1-rank NCCL", lambda: equivalence(0, 1, nccl), results)
        _guarded("speed", lambda: speed(group, 10 if args.quick else 50), results)
        _guarded("host syncs", lambda: host_syncs(nccl), results)
        _guarded("CUDA graph", graph_capture, results)
        _guarded("torch.compile, fullgraph", lambda: compiled(nccl), results)
        dist.destroy_process_group()
    path = write_json(args.results / "gpu.json", results)
    print(f"gpu_check: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
