"""PassManager: pipelines are lists; timing, verification and dumps are instruments."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import fx, nn

from slimfx.ir.capture import capture
from slimfx.ir.find import discover_linear_sites, find_linear_sites
from slimfx.ir.modules import LowRankLinear
from slimfx.ir.verify import VerificationError
from slimfx.passes import (
    ApplyPlan,
    ApplyPlanGraph,
    DumpInstrument,
    Instrument,
    Pass,
    PassManager,
    PassResult,
    TimingInstrument,
    VerifyInstrument,
    apply_plan,
)
from slimfx.planning.configs import LowRankConfig
from slimfx.planning.plan import Plan

LOWRANK = torch.ops.slimfx.lowrank_linear.default
PLAN = Plan({"0": LowRankConfig(4, "svd"), "2": LowRankConfig(8, "svd")})


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine, 2-thread LAPACK calls (SVD) were
    measured 250× slower than 1-thread ones. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Recorder:
    """An instrument that logs every call."""

    def __init__(self, log: list[str], tag: str) -> None:
        self.log, self.tag = log, tag

    def before(self, pass_name: str, obj: object) -> None:
        self.log.append(f"{self.tag}.before({pass_name})")

    def after(self, pass_name: str, obj: object, result: PassResult) -> None:
        self.log.append(f"{self.tag}.after({pass_name}, modified={result.modified})")


RELUS: list[int] = []


def count_relu(gm: fx.GraphModule) -> PassResult:
    """An analysis pass: changes nothing and returns only its result."""
    RELUS.append(sum(1 for node in gm.graph.nodes if node.target == torch.ops.aten.relu.default))
    return PassResult(name="count_relu", modified=False)


def test_graph_pipeline_with_all_instruments(tiny_mlp: nn.Module, tmp_path) -> None:
    x = torch.randn(4, 16)
    cap = capture(tiny_mlp, (x,), fallback=False)
    sites = find_linear_sites(cap, tiny_mlp)
    weights = {s.fqn: tiny_mlp.get_parameter(s.weight) for s in sites}
    timing, verify, dump = TimingInstrument(), VerifyInstrument(), DumpInstrument(tmp_path / "d")
    pipeline = [count_relu, ApplyPlanGraph(PLAN, sites, weights)]
    assert all(isinstance(p, Pass) for p in pipeline)
    assert all(isinstance(i, Instrument) for i in (timing, verify, dump))

    pm = PassManager(pipeline, instruments=[timing, verify, dump])
    gm, results = pm.run(cap.program.module())

    assert [r.name for r in results] == ["count_relu", "apply_plan_graph"]
    assert RELUS[-1] == 2 and not results[0].modified and results[1].modified
    assert pm.modified
    assert sum(1 for n in gm.graph.nodes if n.target == LOWRANK) == 2
    assert [name for name, _ in timing.timings] == ["count_relu", "apply_plan_graph"]
    assert all(t >= 0 for _, t in timing.timings) and "apply_plan_graph" in timing.summary()
    assert verify.checked == ["count_relu", "apply_plan_graph"]
    assert [p.name for p in dump.paths] == ["00_count_relu.py", "01_apply_plan_graph.py"]
    assert "slimfx.lowrank_linear" not in dump.paths[0].read_text()
    assert "slimfx.lowrank_linear" in dump.paths[1].read_text()
    with torch.no_grad():
        torch.testing.assert_close(
            gm(x), apply_plan(tiny_mlp, PLAN, sites)[0](x), atol=1e-5, rtol=1e-5
        )


def test_module_pipeline_threads_new_objects_and_orders_instruments(
    tiny_mlp: nn.Module, tmp_path
) -> None:
    sites = discover_linear_sites(tiny_mlp)
    log: list[str] = []
    second = Plan({"4": LowRankConfig(2, "svd")})
    pipeline = [
        ApplyPlan(PLAN, sites),  # returns a new (copied) model
        functools.partial(apply_plan, plan=second, sites=sites, inplace=True),
    ]
    dump = DumpInstrument(tmp_path)
    pm = PassManager(pipeline, instruments=[Recorder(log, "a"), Recorder(log, "b"), dump])
    model, results = pm(tiny_mlp)

    assert model is not tiny_mlp and type(tiny_mlp[0]) is nn.Linear
    assert [type(model[i]) for i in (0, 2, 4)] == [LowRankLinear] * 3
    assert [r.modified for r in results] == [True, True]
    assert log == [
        "a.before(apply_plan)", "b.before(apply_plan)",
        "b.after(apply_plan, modified=True)", "a.after(apply_plan, modified=True)",
    ] * 2  # fmt: skip
    assert [p.suffix for p in dump.paths] == [".txt", ".txt"]
    assert "LowRankLinear" in dump.paths[1].read_text()


def test_verify_instrument_names_the_pass_that_broke_the_graph(tiny_mlp: nn.Module) -> None:
    gm = capture(tiny_mlp, (torch.randn(2, 16),), fallback=False).program.module()

    def sloppy(g: fx.GraphModule) -> PassResult:
        """Inserts a slimfx op by hand: no fake value, no provenance."""
        (first,) = [n for n in g.graph.nodes if n.target == torch.ops.aten.linear.default][:1]
        x, w, b = first.args
        with g.graph.inserting_after(first):
            g.graph.call_function(LOWRANK, (x, w, w, b))
        g.recompile()
        return PassResult(name="sloppy", modified=True)

    with pytest.raises(VerificationError) as err:
        PassManager([sloppy], [VerifyInstrument()]).run(gm)
    failures = err.value.failures
    assert failures and all(f.startswith("after pass 'sloppy'") for f in failures)
    assert any("slimfx.origin" in f for f in failures) and any("meta['val']" in f for f in failures)


def test_pass_with_a_wrong_return_type_is_named() -> None:
    def broken(obj: object) -> int:
        return 3

    with pytest.raises(TypeError, match="pass 'broken' returned int"):
        PassManager([broken]).run(nn.Linear(2, 2))
