"""The compile backend's CPU pass: quantized op nodes become torch's packed CPU kernel calls
(the kernels eager runs), with a record per node; layouts no kernel takes keep their op."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfx.backends.compile as sc
from slimfx.backends import plan_backend
from slimfx.backends.cpu_pack import GRAD_REASON, LIFTED_REASON
from slimfx.ir.cpu_runtime import prepare_cpu, release_cpu
from slimfx.ir.find import discover_linear_sites
from slimfx.passes import apply_plan
from slimfx.planning.configs import QuantConfig
from slimfx.planning.plan import Plan


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    sc.clear_sessions()
    yield
    torch._dynamo.reset()
    sc.clear_sessions()


class Net(nn.Module):
    """fc1 64→32 (bias) → ReLU → fc2 32→16 → ReLU → fc3 16→8."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.fc3 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.fc1(x).relu()).relu())


PLAN = Plan({
    "fc1": QuantConfig(4, 32, False),  # int4pack
    "fc2": QuantConfig(8, None, True),  # int8pack
    "fc3": QuantConfig(4, None, False),  # out 8: no int4 kernel (out % 16) → reference op
})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_compiled_graph_runs_the_packed_kernels_like_eager() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    be = plan_backend(plan=PLAN, model=net, inner="aot_eager")
    compiled = torch.compile(net, backend=be)
    with torch.no_grad():
        y = compiled(x)
    # the same decisions swapped into modules, run by eager with and without packed kernels
    swapped, _ = apply_plan(net, PLAN, discover_linear_sites(net))
    prepare_cpu(swapped)
    with torch.no_grad():
        eager = swapped(x)
        release_cpu(swapped)
        ref = swapped(x)
    assert _rel(y, eager) < 1e-5  # the same kernels on the same bf16-rounded activations
    assert 0 < _rel(y, ref) < 1e-2  # against the exact reference ops: bf16 rounding only
    lowering = be.graphs[0].lowering
    by = {r.fqn: r for r in lowering.records}
    assert by["fc1"].status == "applied" and by["fc1"].extra["kernel"] == "int4pack"
    assert by["fc2"].status == "applied" and by["fc2"].extra["kernel"] == "int8pack"
    assert by["fc3"].status == "fallback" and "multiple of 16" in by["fc3"].reason
    report = be.report
    assert report.site("fc1").extra["backend"] == {"graph 0": {"kernel": "int4pack"}}


def test_no_packing_when_gradients_flow_or_disabled() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    be = plan_backend(plan=PLAN, model=net, inner="eager", cpu_kernels=False)
    with torch.no_grad():
        torch.compile(net, backend=be)(x)
    assert be.graphs[0].lowering is None
    torch._dynamo.reset()
    be2 = plan_backend(plan=PLAN, model=net, inner="eager")
    out = torch.compile(net, backend=be2)(x.requires_grad_(True))  # grad wanted: reference ops
    out.sum().backward()
    assert x.grad is not None
    # recorded and noted (it ran the reference ops silently, 22× dense on a 512-wide Llama)
    records = be2.graphs[0].lowering.records
    assert {r.fqn: r.status for r in records} == dict.fromkeys(["fc1", "fc2", "fc3"], "fallback")
    assert all(r.reason == GRAD_REASON for r in records)
    assert f"graph(s) 0: {GRAD_REASON}" in be2.report.notes


def test_a_model_optimize_left_unpacked_compiles_with_its_reference_ops() -> None:
    """cpu_kernels=False (or release_cpu): the codes are module buffers, which dynamo lifts to
    graph inputs — fake tensors while compiling. Packing them crashed the compile ("Cannot
    access data pointer of Tensor"); they keep the exact reference op, with the reason."""
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    swapped, _ = apply_plan(net, PLAN, discover_linear_sites(net))
    with torch.no_grad():
        ref = swapped(x)
        compiled = torch.compile(swapped, backend="slimfx", options={"inner": "aot_eager", "lower_to_triton": False})
        y = compiled(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    report = sc.report_of_compiled(compiled)
    assert {e.fqn: e.status for e in report.sites if e.fqn in ("fc1", "fc2")} == {
        "fc1": "fallback", "fc2": "fallback"}
    assert report.site("fc1").reason == LIFTED_REASON
