"""Graph rewrite (``apply_plan_graph`` / ``apply_plan_exported``) and the one editing helper
(``slimfx.ir.graph``): the graph before, node counts after, numerics against eager and against
the module swap, provenance, the factor cache, placeholder weights, rejections."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind

from slimfx.ir.capture import capture
from slimfx.ir.find import find_linear_sites
from slimfx.ir.graph import add_constant, replace_node
from slimfx.ir.verify import ORIGIN_KEY, verify
from slimfx.passes import apply_plan, apply_plan_exported, apply_plan_graph, rule_for
from slimfx.passes.rules.lowrank import LinearToLowRank
from slimfx.planning.configs import DenseConfig, LowRankConfig
from slimfx.planning.plan import Plan

LINEAR = torch.ops.aten.linear.default
LOWRANK = torch.ops.slimfx.lowrank_linear.default
# Same factorization code and the same op on both paths: outputs agree to fp32 round-off of
# different op orderings at most (in practice bit-equal).
SAME_CODE = {"atol": 1e-5, "rtol": 1e-5}
MLP_PLAN = Plan({"0": LowRankConfig(4, "svd"), "2": LowRankConfig(8), "4": DenseConfig()})


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine, 2-thread LAPACK calls (SVD) were
    measured 250× slower than 1-thread ones. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def count(gm: fx.GraphModule, target: object) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]  # type: ignore[attr-defined, index]


@pytest.fixture
def mlp_x() -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def mlp_captured(tiny_mlp: nn.Module, mlp_x: torch.Tensor):
    cap = capture(tiny_mlp, (mlp_x,), fallback=False)
    return cap, find_linear_sites(cap, tiny_mlp)


def weights_of(model: nn.Module, sites) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return {s.fqn: params[s.weight] for s in sites}


# --------------------------------------------------------------------------- torch.export


def test_exported_mlp_counts_provenance_and_swap_agreement(tiny_mlp, mlp_captured, mlp_x) -> None:
    cap, sites = mlp_captured
    assert count(cap.program.module(), LINEAR) == 3 and count(cap.program.module(), LOWRANK) == 0

    gm, result = apply_plan_exported(cap.program, MLP_PLAN, sites)
    assert count(gm, LINEAR) == 1 and count(gm, LOWRANK) == 2
    assert result.modified and [(r.fqn, r.status) for r in result.records] == [
        ("0", "applied"),
        ("2", "applied"),
        ("4", "skipped"),
    ]
    assert count(cap.program.graph_module, LINEAR) == 3  # the program itself is unchanged
    for node in gm.graph.nodes:
        if node.target == LOWRANK:
            site = node.meta[ORIGIN_KEY]["site"]
            assert node.meta[ORIGIN_KEY] == {
                "pass": "apply_plan_graph",
                "rule": "LinearToLowRank",
                "site": site,
            }
            assert node.meta["slimfx.fqn"] == site
            assert tuple(node.meta["val"].shape) == (8, tiny_mlp.get_submodule(site).out_features)
    verify(gm)

    swapped, _ = apply_plan(tiny_mlp, MLP_PLAN, sites)
    with torch.no_grad():
        torch.testing.assert_close(gm(mlp_x), swapped(mlp_x), **SAME_CODE)


def test_rewritten_graph_exports_again_with_slimfx_ops(mlp_captured, mlp_x) -> None:
    cap, sites = mlp_captured
    gm, _ = apply_plan_exported(cap.program, MLP_PLAN, sites)
    ep2 = torch.export.export(gm, (mlp_x,))
    assert count(ep2.graph_module, LOWRANK) == 2 and count(ep2.graph_module, LINEAR) == 1
    with torch.no_grad():
        torch.testing.assert_close(ep2.module()(mlp_x), gm(mlp_x), atol=0, rtol=0)


def test_full_rank_graph_equals_eager(tiny_mlp, mlp_captured, mlp_x) -> None:
    """r = min(in, out) reproduces W; the unregistered rule without the byte test lets the
    pass build it (see test_lowrank_swap.test_full_rank_output_equals_dense)."""
    cap, sites = mlp_captured
    plan = Plan({s.fqn: LowRankConfig(min(s.shape), "svd") for s in sites})
    gm, result = apply_plan_exported(
        cap.program, plan, sites, rules={"lowrank": LinearToLowRank(require_savings=False)}
    )
    assert count(gm, LOWRANK) == 3 and count(gm, LINEAR) == 0
    with torch.no_grad():
        # fp32 factors rounded from float64, two matmuls instead of one: ~1e-6 agreement
        torch.testing.assert_close(gm(mlp_x), tiny_mlp(mlp_x), atol=1e-5, rtol=1e-5)


def test_exported_llama_matches_module_swap(tiny_llama, tiny_ids) -> None:
    cap = capture(tiny_llama, (), {"input_ids": tiny_ids, "use_cache": False}, fallback=False)
    sites = find_linear_sites(cap, tiny_llama)
    plan = Plan({s.fqn: LowRankConfig(8, "svd") for s in sites}, {s.fqn: s.shape for s in sites})
    before = cap.program.module()
    assert count(before, LINEAR) == 15 and count(before, LOWRANK) == 0

    gm, result = apply_plan_exported(cap.program, plan, sites)
    assert count(gm, LINEAR) == 0 and count(gm, LOWRANK) == 15
    assert len(result.applied()) == 15
    verify(gm)
    swapped, _ = apply_plan(tiny_llama, plan, sites)
    with torch.no_grad():
        y_graph = logits(gm(input_ids=tiny_ids, use_cache=False))
        y_swap = swapped(tiny_ids, use_cache=False).logits
        torch.testing.assert_close(y_graph, y_swap, **SAME_CODE)
        # and the rewrite changed something: rank 8 of 64 is far from the dense model
        assert (y_swap - tiny_llama(tiny_ids, use_cache=False).logits).abs().max() > 1e-3


# --------------------------------------------------------------------------- other graph forms


def test_lifted_graph_with_placeholder_weights(tiny_mlp, mlp_captured, mlp_x) -> None:
    cap, sites = mlp_captured
    ep = cap.program
    gm = ep.graph_module  # parameters arrive as placeholders p_0_weight, …
    assert all(n.op == "placeholder" for n in gm.graph.nodes if n.name.startswith("p_"))
    with pytest.raises(ValueError, match=r"site '0': no dense weight.*weights="):
        apply_plan_graph(gm, MLP_PLAN, sites)
    assert count(gm, LINEAR) == 3  # the failed call edited nothing

    weights = {s.fqn: ep.state_dict[s.weight] for s in sites}
    gm, result = apply_plan_graph(gm, MLP_PLAN, sites, weights)
    assert result.modified and count(gm, LOWRANK) == 2 and count(gm, LINEAR) == 1
    params = [
        ep.state_dict[s.target]
        for s in ep.graph_signature.input_specs
        if s.kind == InputKind.PARAMETER
    ]
    swapped, _ = apply_plan(tiny_mlp, MLP_PLAN, sites)
    with torch.no_grad():
        torch.testing.assert_close(gm(*params, mlp_x)[0], swapped(mlp_x), **SAME_CODE)


def test_dynamo_graph_is_rewritten(tiny_mlp, mlp_captured, mlp_x) -> None:
    """A torch.compile backend graph: torch._C._nn.linear nodes, parameters as placeholders
    named L_<self>_modules_<i>_parameters_weight_, matched through nn_module_stack."""
    _, sites = mlp_captured
    seen = {}

    def backend(gm: fx.GraphModule, example_inputs):
        seen["before"] = count(gm, torch._C._nn.linear)
        gm, seen["result"] = apply_plan_graph(gm, MLP_PLAN, sites, weights_of(tiny_mlp, sites))
        seen["after"] = (count(gm, torch._C._nn.linear), count(gm, LOWRANK))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            y = torch.compile(tiny_mlp, backend=backend, fullgraph=True)(mlp_x)
    finally:
        torch._dynamo.reset()
    assert seen["before"] == 3 and seen["after"] == (1, 2)
    assert [r.status for r in seen["result"].records] == ["applied", "applied", "skipped"]
    swapped, _ = apply_plan(tiny_mlp, MLP_PLAN, sites)
    with torch.no_grad():
        torch.testing.assert_close(y, swapped(mlp_x), **SAME_CODE)


def test_factor_cache_prevents_refactorization(tiny_mlp, mlp_captured, monkeypatch) -> None:
    cap, sites = mlp_captured
    rule = rule_for(LowRankConfig())
    calls: list[str] = []
    real = rule.factorize

    def spy(weight, decision, gram):
        calls.append(decision.short())
        return real(weight, decision, gram)

    monkeypatch.setattr(rule, "factorize", spy)
    weights = weights_of(tiny_mlp, sites)
    cache: dict = {}
    # two sub-graphs of one model (here: two copies of the exported graph) share the cache
    gm1, r1 = apply_plan_graph(cap.program.module(), MLP_PLAN, sites, weights, factor_cache=cache)
    gm2, r2 = apply_plan_graph(cap.program.module(), MLP_PLAN, sites, weights, factor_cache=cache)
    assert len(calls) == 2 and len(cache) == 2
    assert [r.extra["factor_cache_hit"] for r in r1.applied()] == [False, False]
    assert [r.extra["factor_cache_hit"] for r in r2.applied()] == [True, True]
    assert torch.equal(gm1.get_buffer("slimfx_0_U"), gm2.get_buffer("slimfx_0_U"))

    apply_plan_graph(cap.program.module(), MLP_PLAN, sites, weights)  # no cache: factorizes
    assert len(calls) == 4


class _Borrower(nn.Module):
    """Calls its child's weight through F.linear: the op runs in this module, not the child."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.proj.weight, self.proj.bias).relu()


def test_linear_run_by_a_parent_module_is_matched_by_its_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Borrower(), nn.Linear(10, 4)).eval()
    x = torch.randn(5, 12)
    cap = capture(model, (x,), fallback=False)
    sites = find_linear_sites(cap, model)
    assert [s.fqn for s in sites] == ["0.proj", "1"]
    plan = Plan({"0.proj": LowRankConfig(3, "svd")})
    gm, result = apply_plan_exported(cap.program, plan, sites)
    assert [(r.fqn, r.status) for r in result.records] == [("0.proj", "applied")]
    assert count(gm, LOWRANK) == 1 and count(gm, LINEAR) == 1
    # (a module swap cannot serve this model: the parent reads proj.weight itself)
    U, V = gm.get_buffer("slimfx_0_proj_U"), gm.get_buffer("slimfx_0_proj_V")
    with torch.no_grad():
        model[0].proj.weight.copy_(U @ V)  # the dense model with the approximated weight
        # U @ V folded into one matmul vs two: fp32 round-off only
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- rejections, errors


def test_rejection_strict_raises_and_non_strict_records(mlp_captured) -> None:
    cap, sites = mlp_captured
    plan = Plan({"0": LowRankConfig(4), "2": LowRankConfig(16), "4": LowRankConfig(9)})
    gm = cap.program.module()
    code = gm.code
    with pytest.raises(ValueError) as err:
        apply_plan_graph(gm, plan, sites)
    msg = str(err.value)
    assert "2 site(s) rejected" in msg and "saves no bytes" in msg
    assert "rank 9 exceeds min(in, out) = 8" in msg
    assert gm.code == code and not any(k.startswith("slimfx_") for k, _ in gm.named_buffers())

    gm, result = apply_plan_graph(gm, plan, sites, strict=False)
    status = {r.fqn: r.status for r in result.records}
    assert status == {"0": "applied", "2": "rejected", "4": "rejected"}
    assert count(gm, LOWRANK) == 1 and count(gm, LINEAR) == 2


def test_nan_weight_raises_before_any_edit(tiny_mlp, mlp_captured) -> None:
    cap, sites = mlp_captured
    weights = {k: v.detach().clone() for k, v in weights_of(tiny_mlp, sites).items()}
    weights["2"][0, 0] = float("inf")
    gm = cap.program.module()
    with pytest.raises(ValueError, match=r"parameter '2\.weight'.*NaN or inf"):
        apply_plan_graph(gm, MLP_PLAN, sites, weights, strict=False)
    assert count(gm, LINEAR) == 3


def test_unknown_fqn_and_absent_site(mlp_captured) -> None:
    cap, sites = mlp_captured
    with pytest.raises(ValueError, match=r"not linear sites of this model: '3'"):
        apply_plan_graph(cap.program.module(), Plan({"3": LowRankConfig(2)}), sites)
    # a site known to the model but absent from this graph (a graph break elsewhere)
    other = [dataclasses.replace(sites[0], fqn="elsewhere", weight="elsewhere.weight", node=None)]
    gm, result = apply_plan_graph(
        cap.program.module(), Plan({"elsewhere": LowRankConfig(2)}), other
    )
    assert result.modified is False
    assert [(r.status, r.reason) for r in result.records] == [("skipped", "not in this graph")]


# --------------------------------------------------------------------------- the editing helper


def _toy_graph() -> fx.GraphModule:
    lin = nn.Linear(6, 5)
    return torch.export.export(nn.Sequential(lin).eval(), (torch.randn(3, 6),)).module()


def test_add_constant_unique_safe_names_and_fake_values() -> None:
    gm = _toy_graph()
    a = add_constant(gm, "model.layers.0-x U", torch.ones(2, 3))
    b = add_constant(gm, "model.layers.0-x U", torch.zeros(4))
    assert a.target == "model_layers_0_x_U" and b.target == "model_layers_0_x_U_1"
    assert torch.equal(gm.get_buffer(a.target), torch.ones(2, 3))
    assert tuple(a.meta["val"].shape) == (2, 3) and tuple(b.meta["val"].shape) == (4,)
    first_compute = next(n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr"))
    order = list(gm.graph.nodes)
    assert order.index(a) < order.index(b) < order.index(first_compute)


def test_replace_node_derives_val_and_requires_origin() -> None:
    gm = _toy_graph()
    (node,) = [n for n in gm.graph.nodes if n.target == LINEAR]
    x, _, bias = node.args
    U = add_constant(gm, "U", torch.randn(5, 2))
    V = add_constant(gm, "V", torch.randn(2, 6))
    with pytest.raises(ValueError, match="origin must name"):
        replace_node(gm, node, LOWRANK, (x, U, V, bias), origin={"pass": "p"})
    bad_V = add_constant(gm, "V", torch.randn(3, 6))  # rank 3 ≠ U's 2: the fake impl objects
    with pytest.raises(Exception, match="rank"):
        replace_node(
            gm, node, LOWRANK, (x, U, bad_V, bias), origin={"pass": "p", "rule": "r", "site": "0"}
        )
    assert count(gm, LINEAR) == 1  # nothing was inserted by the failed edit

    new = replace_node(
        gm, node, LOWRANK, (x, U, V, bias), origin={"pass": "p", "rule": "r", "site": "0"}
    )
    assert count(gm, LINEAR) == 0 and count(gm, LOWRANK) == 1
    assert tuple(new.meta["val"].shape) == (3, 5)
    assert new.meta[ORIGIN_KEY] == {"pass": "p", "rule": "r", "site": "0"}
    assert new.meta["slimfx.fqn"] == "0"

    # a replacement of another shape gets its own fake value, not the old node's
    (low,) = [n for n in gm.graph.nodes if n.target == LOWRANK]
    U3 = add_constant(gm, "U3", torch.randn(7, 2))
    newer = replace_node(
        gm, low, LOWRANK, (x, U3, V, None), origin={"pass": "p", "rule": "r", "site": "0"}
    )
    assert tuple(newer.meta["val"].shape) == (3, 7)
    assert gm(torch.randn(3, 6)).shape == (3, 7)
