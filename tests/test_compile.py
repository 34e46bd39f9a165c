"""torch.compile(model, fullgraph=True): no graph break, and compiled equals eager.

Each worker trains an eager model and a compiled copy side by side on the same uneven
batches (one rank empty in a step), then compares outputs, input and parameter gradients
and running stats, and eval-mode outputs: float64 to 1e-9, float32 to 1e-5. The same
bodies run over Gloo and, in test_mpi.py's way, under mpiexec with an MPI communicator.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cases import rank_slice
from distributed import run_distributed
from torch import nn
from torch.testing import assert_close

import syncbn

# Per step, each rank's batch size; with an empty rank in the second step, or not.
STEPS = {
    (1, True): [[6], [4], [5]],
    (2, True): [[3, 5], [4, 0], [5, 3]],
    (2, False): [[3, 5], [4, 2], [5, 3]],
}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


def _model(dtype: torch.dtype, group=None) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 3),
        nn.BatchNorm1d(3),
    )
    return syncbn.convert_sync_batchnorm(net, group).to(dtype)


def compiled_equals_eager(rank, world, dtype_name, backend, empty=True, group=None):
    dtype = getattr(torch, dtype_name)
    tol = dict(atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    torch._dynamo.reset()
    eager = _model(dtype, group)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    generator = torch.Generator().manual_seed(0)
    for step, sizes in enumerate(STEPS[world, empty or world == 1]):
        x = torch.randn(sum(sizes), 3, 6, 6, generator=generator, dtype=dtype) * 2 + 1
        mine = x[rank_slice(sizes, rank)]
        results = []
        for model in (eager, compiled):
            xi = mine.clone().requires_grad_()
            y = model(xi)
            y.square().sum().backward()
            results.append((y.detach(), xi.grad))
        assert_close(results[1], results[0], **tol, msg=lambda m, step=step: f"step {step}, rank {rank}: {m}")
    for (name, expected), (_, got) in zip(eager.state_dict().items(), twin.state_dict().items(), strict=True):
        assert_close(got, expected, **tol, msg=lambda m, name=name: f"{name}: {m}")
    for (name, expected), (_, got) in zip(eager.named_parameters(), twin.named_parameters(), strict=True):
        assert_close(got.grad, expected.grad, **tol, msg=lambda m, name=name: f"{name}.grad: {m}")
    eager.eval()
    twin.eval()
    with torch.no_grad():
        assert_close(compiled(mine), eager(mine), **tol)


def no_graph_breaks(rank, world, group=None):
    torch._dynamo.reset()
    model = _model(torch.float32, group)
    x = torch.randn(4 + rank, 3, 6, 6)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def one_recompile_for_uneven_batches(rank, world, group=None):
    """Batch sizes that change from step to step cost one recompile (N becomes dynamic)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = torch.compile(_model(torch.float32, group), fullgraph=True, backend=counter)
    for n in (3, 4, 5, 6):
        model(torch.randn(n + rank, 3, 6, 6)).sum().backward()
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_compiled_equals_eager_over_gloo(tmp_path, dtype):
    run_distributed(compiled_equals_eager, 2, tmp_path, dtype, "aot_eager", timeout=240)


@pytest.mark.distributed
def test_inductor_equals_eager_over_gloo(tmp_path):
    """The real thing: Inductor's generated code, functional collectives included. No empty
    rank: Inductor (torch 2.13) miscompiles a convolution's backward on an empty batch, with
    or without syncbn (its weight gradient's strides disagree with its meta kernel)."""
    run_distributed(compiled_equals_eager, 2, tmp_path, "float32", "inductor", False, timeout=600)


def test_compiled_equals_eager_in_one_process():
    compiled_equals_eager(0, 1, "float64", "aot_eager")


class _Twice:
    """A Communicator of the caller's own: a world of 2 whose other rank sends the same."""

    world_size, rank = 2, 0

    def all_reduce_(self, tensor):
        tensor.mul_(2)


def test_a_communicator_of_ones_own_compiles_through_the_custom_op():
    compiled_equals_eager(0, 1, "float64", "aot_eager", group=_Twice())


def test_check_finite_raises_before_running_stats_move_when_compiled():
    """With Inductor free to reorder the graph, the finite check still comes before the
    running-stat update: the update reads the stats the check passed on."""
    torch._dynamo.reset()
    layer = syncbn.SyncBatchNorm(3, process_group=_Twice(), check_finite=True)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(torch.randn(4, 3, 5))
    before = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(4, 3, 5)
    x[1, 2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="channels \\[2\\]"):
        compiled(x)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])


@pytest.mark.distributed
def test_no_graph_breaks_over_gloo(tmp_path):
    run_distributed(no_graph_breaks, 2, tmp_path, timeout=240)


@pytest.mark.distributed
def test_one_recompile_for_uneven_batches(tmp_path):
    run_distributed(one_recompile_for_uneven_batches, 2, tmp_path, timeout=240)


@pytest.mark.distributed
@pytest.mark.mpi
def test_fullgraph_under_mpiexec():
    from test_mpi import mpiexec

    mpiexec(
        2,
        [["test_compile", "compiled_equals_eager", ["float64", "aot_eager"]], ["test_compile", "no_graph_breaks", []]],
    )


@pytest.mark.distributed
def test_the_backward_all_reduce_is_in_the_backward_graph(tmp_path):
    """AOTAutograd puts each layer's backward all-reduce into the compiled backward graph."""
    path = tmp_path / "graphs.json"
    run_distributed(_collectives_in_graphs, 2, tmp_path, str(path), timeout=240)
    assert json.loads(path.read_text()) == {"forward": 3, "backward": 3}


def _collectives_in_graphs(rank, world, path):
    from torch._functorch.aot_autograd import aot_module_simplified

    counts = {}

    def count(name):
        def compiler(graph, inputs):
            counts[name] = sum("_c10d_functional.all_reduce" in str(node.target) for node in graph.graph.nodes)
            return graph

        return compiler

    def backend(graph, inputs):
        return aot_module_simplified(graph, inputs, fw_compiler=count("forward"), bw_compiler=count("backward"))

    torch._dynamo.reset()
    model = torch.compile(_model(torch.float32), fullgraph=True, backend=backend)
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    if rank == 0:
        with open(path, "w") as file:
            json.dump(counts, file)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_equals_eager_without_affine(dtype):
    """The traced step's other branches: no weight or bias, and half precision applied in
    float32; a world of 2 through a Communicator of one's own."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    group = _Twice()
    eager = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        syncbn.SyncBatchNorm(4, affine=False, process_group=group),
        nn.Flatten(),
        nn.Linear(4 * 25, 3),
        syncbn.SyncBatchNorm(3, affine=False, process_group=group),
    ).to(dtype)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = (torch.randn(6, 3, 7, 7) * 2 + 1).to(dtype)
    results = []
    for model in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = model(xi)
        (y.float() * torch.arange(3.0)).sum().backward()
        results.append((y.detach(), xi.grad, *(p.grad for p in model.parameters())))
    tol = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]
    assert_close(results[1], results[0], **tol)
    assert_close(twin.state_dict(), eager.state_dict(), **tol)
