"""The torch.compile backend: entry point, default behaviour, plan and budget parity with the
module swap, graph breaks, recompiles, the factor cache, parameter matching, the report.

torch.compile is slow on CPU (a cold inductor compile takes tens of seconds), so only three
tests run a compiled model: the default entry point (inductor), a budget across a graph break
and a recompile (aot_eager), and a full-rank plan (eager). The others drive the backend object
directly on dynamo-shaped graphs built by hand (parameters as leading placeholders named as
dynamo names them, example_inputs holding the parameters themselves).
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from _helpers import needs_triton_kernels
from torch import fx, nn

import slimfx
import slimfx.passes.base as passes_base
from slimfx.backends import compile as sc
from slimfx.backends.compile import (
    DEFAULT_NOTE,
    SlimfxBackend,
    param_name_from_placeholder,
    plan_backend,
    report_of_compiled,
    slimfx_backend,
)
from slimfx.ir.find import discover_linear_sites
from slimfx.passes import apply_plan
from slimfx.passes.rules.lowrank import LinearToLowRank
from slimfx.planning.configs import DenseConfig, LowRankConfig
from slimfx.planning.plan import Plan

LOWRANK = torch.ops.slimfx.lowrank_linear.default
# Same factorization code, same op, different graph: fp32 round-off of op orderings at most.
SAME_CODE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo_one_thread():
    """Each test starts from a clean dynamo cache and slimfx session table; one intra-op
    thread (2-thread SVDs were measured 250× slower on this loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    sc.clear_sessions()
    yield
    torch._dynamo.reset()
    sc.clear_sessions()
    torch.set_num_threads(n)


class Broken(nn.Module):
    """fc1 → ReLU → graph break → fc2 → ReLU → fc3: dynamo makes two sub-graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x).relu()
        torch._dynamo.graph_break()
        return self.fc3(self.fc2(h).relu())


class Two(nn.Module):
    """fc1 (16→32, bias) → ReLU → fc2 (32→8, no bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).relu())


def dynamo_like(
    model: Two, x: torch.Tensor, w2_name: str, *, stack: bool = True, computed_w2: bool = False
) -> tuple[fx.GraphModule, list]:
    """``Two`` as dynamo hands it to a backend: ``torch._C._nn.linear`` nodes, parameters as
    leading placeholders (``example_inputs`` holds the parameters themselves)."""
    g = fx.Graph()
    w1 = g.placeholder("L_self_modules_fc1_parameters_weight_")
    b1 = g.placeholder("L_self_modules_fc1_parameters_bias_")
    w2 = g.placeholder(w2_name)
    xn = g.placeholder("L_x_")
    h = g.call_function(torch._C._nn.linear, (xn, w1, b1))
    r = g.call_function(torch.relu, (h,))
    w = g.call_function(torch.mul, (w2, 1.0)) if computed_w2 else w2
    y = g.call_function(torch._C._nn.linear, (r, w, None))
    if stack:
        h.meta["nn_module_stack"] = {"fc1": ("L['self'].fc1", nn.Linear)}
        y.meta["nn_module_stack"] = {"fc2": ("L['self'].fc2", nn.Linear)}
    g.output((y,))
    return fx.GraphModule(nn.Module(), g), [model.fc1.weight, model.fc1.bias, model.fc2.weight, x]


@pytest.fixture
def two() -> Two:
    torch.manual_seed(0)
    return Two().eval()


@pytest.fixture
def x16() -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(3))


TWO_PLAN = Plan({"fc1": LowRankConfig(4, "svd"), "fc2": LowRankConfig(3, "svd")})


# --------------------------------------------------------------------------- registration


def test_entry_point_is_registered() -> None:
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    (ep,) = [e for e in eps if e.name == "slimfx"]
    assert ep.value == "slimfx.backends.compile:slimfx_backend"
    assert ep.load() is slimfx_backend
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("slimfx") is slimfx_backend
    # the budget-capable factory is the same function with slimfx.api's planner wired in
    from slimfx.compile_api import backend as top_backend

    assert slimfx.backend is top_backend and slimfx.backends.plan_backend is plan_backend


def test_budget_without_planner_names_the_top_level_entry() -> None:
    with pytest.raises(ValueError, match=r"slimfx\.backend\(budget=\.\.\., model=\.\.\."):
        plan_backend(budget=0.5)
    with pytest.raises(ValueError, match="not both"):
        plan_backend(budget=0.5, plan=TWO_PLAN)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        plan_backend(plan=TWO_PLAN, tokenizer=None)


# --------------------------------------------------------------------------- compiled (slow)


def test_default_entry_point_rewrites_nothing_lowers_and_matches_eager(tiny_mlp) -> None:
    """backend="slimfx" with no options: no plan, so the linears stay; the slimfx op already in
    the (module-swapped) model is lowered to its Triton kernel; inductor compiles."""
    needs_triton_kernels()
    sites = discover_linear_sites(tiny_mlp)
    model, _ = apply_plan(tiny_mlp, Plan({"2": LowRankConfig(4, "svd")}), sites)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="slimfx")
    with torch.no_grad():
        y, ref = compiled(x), model(x)
    # inductor fuses the dense linears; the Triton kernel sums in another order: fp32 round-off
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)

    report = report_of_compiled(compiled)
    status = {e.fqn: (e.status, e.reason) for e in report.sites}
    assert status["0"] == ("skipped", "no plan (no budget given)")
    assert status["4"] == ("skipped", "no plan (no budget given)")
    assert status["2"][0] == "lowered"
    assert report.site("2").extra["backend"] == {
        "graph 0": {"kernel": "lowrank_linear_triton_fused"}
    }
    assert report.totals["rewritten"] == 0 and DEFAULT_NOTE in report.notes
    assert report.meta["inner"] == "inductor"


def test_budget_across_graph_break_matches_optimize_and_never_refactorizes(monkeypatch) -> None:
    torch.manual_seed(0)
    model = Broken().eval()
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(16, 16, generator=gen) for _ in range(4)]
    swapped = slimfx.optimize(model, 0.5, calibration=batches, progress=False)

    calls: list[tuple[int, str]] = []
    real = passes_base.factorize

    def spy(weight, decision, gram=None):
        calls.append((id(weight), decision.short()))
        return real(weight, decision, gram)

    monkeypatch.setattr(passes_base, "factorize", spy)
    be = slimfx.backend(budget=0.5, model=model, calibration=batches, inner="aot_eager")
    # one plan for the whole model, solved once with optimize()'s machinery: the same plan
    assert be.plan == Plan.from_dict(slimfx.report_of(swapped).meta["plan"])
    rewrites = be.plan.rewrites()
    assert rewrites and calls == []  # solving does not factorize

    compiled = torch.compile(model, backend=be)
    x = torch.randn(5, 16, generator=gen)
    with torch.no_grad():
        y = compiled(x)
        # optimize()'s module swap with the same plan and factors: op-for-op the same math
        torch.testing.assert_close(y, swapped(x), atol=1e-4, rtol=1e-4)
    # two sub-graphs, each rewritten with its own sites' decisions only
    assert [[s.fqn for s in g.sites] for g in be.graphs] == [["fc1"], ["fc2", "fc3"]]
    for g in be.graphs:
        assert {r.fqn for r in g.rewrite.records} == {s.fqn for s in g.sites}
    applied = {r.fqn for g in be.graphs for r in g.rewrite.records if r.status == "applied"}
    assert applied == set(rewrites)
    assert len(calls) == len(rewrites) and len(set(calls)) == len(calls)  # once per weight

    n_graphs = len(be.graphs)
    with torch.no_grad():
        x2 = torch.randn(9, 16, generator=gen)  # new shape: dynamo recompiles both graphs
        torch.testing.assert_close(compiled(x2), swapped(x2), atol=1e-4, rtol=1e-4)
    assert len(be.graphs) > n_graphs
    assert len(calls) == len(rewrites)  # the recompile hit the factor cache
    for g in be.graphs[n_graphs:]:
        assert all(r.extra["factor_cache_hit"] for r in g.rewrite.records if r.status == "applied")

    report = report_of_compiled(compiled)
    assert report.totals["rewritten"] == len(rewrites)
    ref = slimfx.report_of(swapped)
    for fqn in rewrites:
        e = report.site(fqn)
        assert e.status == "applied" and e.chosen == ref.site(fqn).chosen
        assert e.est_error == pytest.approx(ref.site(fqn).est_error)  # the planner's estimate
        assert len(e.extra["graphs"]) == 2 and e.extra["factor_cache_hits"] == 1
    assert report.capture == {"method": "dynamo", "graphs": len(be.graphs)}
    # the sub-graphs ran as pipelines: every pass timed, summed over sub-graphs (a CPU graph
    # without gradients also gets its quantized nodes packed for torch's CPU kernels)
    assert [name for name, _ in be.graphs[0].timings] == ["rewrite", "pack_cpu",
                                                          "constant_sources"]
    assert {"plan", "capture", "solve", "compile:rewrite"} <= set(report.timings)


def test_full_rank_plan_with_rules_override_equals_eager(tiny_mlp) -> None:
    """r = min(in, out) reproduces W; the rule without the byte test lets the backend build it
    (the registered rule rejects it: test_rejection_strict_and_recorded). Parameters reach the
    graph as inputs and are matched to the model's by identity."""
    sites = discover_linear_sites(tiny_mlp)
    plan = Plan({s.fqn: LowRankConfig(min(s.shape), "svd") for s in sites})
    be = plan_backend(
        plan=plan,
        model=tiny_mlp,
        inner="eager",
        rules={"lowrank": LinearToLowRank(require_savings=False)},
    )
    compiled = torch.compile(tiny_mlp, backend=be, fullgraph=True)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # fp32 factors from a float64 SVD, two matmuls instead of one: ~1e-6 agreement
        torch.testing.assert_close(compiled(x), tiny_mlp(x), **SAME_CODE)
    (g,) = be.graphs
    assert {id(r()) for r in g.param_refs} == {id(p) for p in tiny_mlp.parameters()}
    assert [(s.fqn, s.weight, s.has_bias) for s in g.sites] == [
        ("0", "0.weight", True),
        ("2", "2.weight", False),
        ("4", "4.weight", True),
    ]
    assert [r.status for r in g.rewrite.records] == ["applied"] * 3 and not g.unresolved


# --------------------------------------------------------------------------- backend object


def test_parameters_matched_by_name_without_model(two, x16) -> None:
    """No model: dynamo placeholder names (and mangled ones, against the plan's FQNs) give the
    parameter FQNs; the rewrite equals the module swap of the same plan."""
    gm, inputs = dynamo_like(two, x16, "L__self___fc2_weight", stack=False)
    be = plan_backend(plan=TWO_PLAN, inner="eager")
    fn = be(gm, inputs)
    assert sum(n.target == LOWRANK for n in gm.graph.nodes) == 2
    ref, _ = apply_plan(two, TWO_PLAN, discover_linear_sites(two))
    with torch.no_grad():
        torch.testing.assert_close(fn(*inputs)[0], ref(x16), **SAME_CODE)
    assert [s.fqn for s in be.graphs[0].sites] == ["fc1", "fc2"]
    assert be.report.totals["rewritten"] == 2


def test_placeholder_name_normalization() -> None:
    name = "L_self_modules_layers_modules_0_modules_q_proj_parameters_weight_"
    assert param_name_from_placeholder(name) == "layers.0.q_proj.weight"
    assert param_name_from_placeholder("L_mod_parameters_weight_") == "weight"
    cands = ["layers.0.q_proj.weight", "fc2.weight"]
    assert param_name_from_placeholder("L__self___layers_0_q_proj_weight", cands) == cands[0]
    assert param_name_from_placeholder("p_fc2_weight", cands) == "fc2.weight"
    assert param_name_from_placeholder("L__self___fc9_weight", cands) is None


def test_linear_with_computed_weight_is_left_alone_and_reported(two, x16) -> None:
    gm, inputs = dynamo_like(two, x16, "L_self_modules_fc2_parameters_weight_", computed_w2=True)
    be = plan_backend(plan=TWO_PLAN, model=two, inner="eager")
    fn = be(gm, inputs)
    assert sum(n.target == LOWRANK for n in gm.graph.nodes) == 1  # fc1 only
    with torch.no_grad():
        y = fn(*inputs)[0]
    assert torch.isfinite(y).all()
    report = be.report
    assert report.site("fc1").status == "applied"
    fc2 = report.site("fc2")
    assert fc2.status == "skipped" and "weight is not a graph input or attribute" in fc2.reason
    assert fc2.bytes_after == fc2.bytes_before  # what runs, not what was planned
    assert any("left alone" in n for n in report.notes)


def test_rejection_strict_and_recorded(two, x16) -> None:
    plan = Plan({"fc1": LowRankConfig(16, "svd"), "fc2": LowRankConfig(3, "svd")})
    gm, inputs = dynamo_like(two, x16, "L_self_modules_fc2_parameters_weight_")
    with pytest.raises(ValueError, match=r"rank 16 saves no bytes"):
        plan_backend(plan=plan, model=two, inner="eager")(gm, inputs)
    assert not any(n.target == LOWRANK for n in gm.graph.nodes)  # nothing edited

    be = plan_backend(plan=plan, model=two, inner="eager", strict=False)
    be(gm, inputs)
    report = be.report
    assert report.site("fc1").status == "rejected" and "saves no bytes" in report.site("fc1").reason
    assert report.site("fc2").status == "applied"


def test_recompile_of_the_same_graph_hits_the_cache_and_absent_sites_are_reported(
    two, x16, monkeypatch
) -> None:
    calls: list[str] = []
    real = passes_base.factorize
    monkeypatch.setattr(
        passes_base, "factorize", lambda w, d, g=None: calls.append(d.short()) or real(w, d, g)
    )
    plan = Plan({**TWO_PLAN.decisions, "fc3": LowRankConfig(2, "svd")})
    be = SlimfxBackend(plan, inner="eager")
    for _ in range(2):
        gm, inputs = dynamo_like(two, x16, "L_self_modules_fc2_parameters_weight_")
        be(gm, inputs)
    assert len(calls) == 2 and len(be.factor_cache) == 2
    report = be.report
    assert report.site("fc3").status == "skipped"
    assert report.site("fc3").reason == (
        "not in any compiled graph so far; the closest compiled site is 'fc2'")
    assert report.site("fc1").extra["graphs"] == [0, 1]
    assert report.site("fc1").extra["factor_cache_hits"] == 1


def test_plan_names_are_checked_against_the_model(two) -> None:
    with pytest.raises(ValueError, match=r"'fc_2' \(did you mean 'fc2'\?\)"):
        plan_backend(plan=Plan({"fc_2": DenseConfig()}), model=two)
    # the same check as optimize and the module swap: shapes too
    with pytest.raises(ValueError, match=r"shapes do not match.*'fc2'.*\(3, 3\)"):
        plan_backend(plan=Plan({"fc2": DenseConfig()}, {"fc2": (3, 3)}), model=two)


def test_models_compiled_with_one_options_dict_report_their_own_graphs(x16) -> None:
    """One options dict is one session: each model's report keeps the sub-graphs that read
    its own weights (model a's report listed model b's graphs and bytes too)."""
    torch.manual_seed(0)
    a, b = Two().eval(), Broken().eval()
    opts = {"plan": Plan({"fc1": LowRankConfig(4, "svd")}), "inner": "eager"}
    ca = torch.compile(a, backend="slimfx", options=opts)
    cb = torch.compile(b, backend="slimfx", options=opts)
    with torch.no_grad():
        ca(x16), cb(x16)
    ra, rb = report_of_compiled(ca), report_of_compiled(cb)
    assert ra.capture["graphs"] == 1 and rb.capture["graphs"] == 2
    assert ra.runtime == "torch-compile" and "(torch-compile on cpu/decode" in ra.headline()
    assert "fc3" not in {e.fqn for e in ra.sites} and "fc3" in {e.fqn for e in rb.sites}


def test_a_misspelt_plan_name_without_a_model_is_noted(two, x16) -> None:
    """Without model= nothing checks plan names up front: a typo rewrote nothing silently;
    the site's reason and a note name the closest site of the compiled graphs."""
    plan = Plan({"fc_2": LowRankConfig(3, "svd")})
    be = plan_backend(plan=plan, inner="eager")
    gm, inputs = dynamo_like(two, x16, "L_self_modules_fc2_parameters_weight_")
    be(gm, inputs)
    why = "not in any compiled graph so far; the closest compiled site is 'fc2'"
    assert be.report.site("fc_2").reason == why
    assert any(n.startswith("1 planned site(s) in no compiled graph so far") and
               n.endswith(f"e.g. fc_2: {why}") for n in be.report.notes)  # fmt: skip


def test_report_of_compiled_finds_the_session_or_says_why(two) -> None:
    with pytest.raises(ValueError, match="not compiled with a slimfx backend"):
        report_of_compiled(torch.compile(two, backend="eager"))
    opts = {"plan": TWO_PLAN, "model": two, "inner": "eager"}
    compiled = torch.compile(two, backend="slimfx", options=opts)  # nothing compiled yet
    report = report_of_compiled(compiled)
    assert [(e.fqn, e.reason) for e in report.sites] == [
        ("fc1", "not in any compiled graph"),
        ("fc2", "not in any compiled graph"),
    ]
    be = plan_backend(plan=TWO_PLAN, inner="eager")
    assert report_of_compiled(torch.compile(two, backend=be)).sites == be.report.sites
    # model.compile(backend=...) (the route generate() takes) and the public names
    two.compile(backend=be)
    assert slimfx.report_of_compiled(two).sites == be.report.sites
    with pytest.raises(ValueError, match=r"compile report in slimfx.report_of_compiled"):
        slimfx.report_of(torch.compile(two, backend=be))


def test_linear_submodule_calls_are_reported_not_rewritten(two, x16) -> None:
    """A graph that calls nn.Linear as a submodule (dynamo without inlined nn modules, or
    symbolic_trace) has no linear on parameters to rewrite: each is left alone, with why."""
    gm = fx.symbolic_trace(two)
    be = plan_backend(plan=TWO_PLAN, model=two, inner="eager")
    fn = be(gm, [x16])
    with torch.no_grad():
        torch.testing.assert_close(fn(x16), two(x16), atol=0, rtol=0)
    report = be.report
    assert report.totals["rewritten"] == 0
    for fqn in ("fc1", "fc2"):
        assert report.site(fqn).status == "skipped"
        assert "called as a submodule (call_module)" in report.site(fqn).reason


def test_lowering_is_declined_when_gradients_may_flow(tiny_mlp) -> None:
    sites = discover_linear_sites(tiny_mlp)
    model, _ = apply_plan(tiny_mlp, Plan({"2": LowRankConfig(4, "svd")}), sites)
    x = torch.randn(3, 16, requires_grad=True)
    gm = torch.export.export(model, (x,)).module()
    be = plan_backend(lower_to_triton=True, inner="eager")
    be(gm, [x])  # grad mode on and x requires grad: the kernel ops have no backward
    assert sum(n.target == LOWRANK for n in gm.graph.nodes) == 1
    (rec,) = be.graphs[0].lowering.records
    assert rec.status == "fallback" and "no backward" in rec.reason
    assert be.report.site("2").status == "fallback"
