"""Options that own other sites and budgets over several dimensions.

A toy attention-kind site has a toy decision that owns its two linear k/v projections (they
take no decision of their own when it is chosen) and cuts the KV cache. Every MILP answer is
checked against brute force over all consistent choices of this small problem.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from slimfx.planning.configs import DECISIONS, Decision, DenseConfig, QuantConfig
from slimfx.planning.plan import PLAN_VERSION, Plan
from slimfx.planning.problem import (
    Budget,
    BudgetProblem,
    InfeasibleBudgetError,
    Option,
    SiteOptions,
)
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN, WEIGHT_BYTES, AttentionShape, LinearShape
from slimfx.planning.solve import solve


@dataclass(frozen=True)
class ToyLatentAttention(Decision):
    """Toy attention conversion: k/v projections replaced by a rank-``rank`` latent."""

    kind: ClassVar[str] = "toy_latent_attention"
    rank: int = 8

    def weight_bytes(self, shape: LinearShape) -> int:
        return 2 * self.rank * (shape.in_features + shape.out_features)


@dataclass(frozen=True)
class ToyDenseAttention(Decision):
    """Toy attention kept as it is (owns nothing)."""

    kind: ClassVar[str] = "toy_dense_attention"

    def weight_bytes(self, shape: LinearShape) -> int:
        return 0


@pytest.fixture(autouse=True)
def toy_decisions():
    """Register the toy decisions for JSON round trips, and only for this module's tests."""
    added = [c for c in (ToyLatentAttention, ToyDenseAttention) if c.kind not in DECISIONS]
    for c in added:
        DECISIONS[c.kind] = c
    yield
    for c in added:
        DECISIONS.pop(c.kind, None)


ATTN = AttentionShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, layer_idx=0)
KV_DENSE = ATTN.kv_bytes_per_token()  # 2 · 32 · 2 = 128
LIN = LinearShape(64, 32)  # k and v: 64 → 32
INT4 = QuantConfig(4, 32)


def _linear(name: str, err4: float) -> SiteOptions:
    dense = DenseConfig().weight_bytes(LIN)
    return SiteOptions(
        name,
        [
            Option(DenseConfig(), dense, 0.0),
            Option(INT4, INT4.weight_bytes(LIN), err4),
        ],
        dense,
        shape=LIN,
    )


def _problem(latent_error: float, latent_rank: int = 8) -> BudgetProblem:
    latent = ToyLatentAttention(latent_rank)
    latent_bytes = latent.weight_bytes(LinearShape(64, 2 * 32))  # one down-projection, k and v up
    attn = SiteOptions(
        "attn",
        [
            Option(ToyDenseAttention(), 0, 0.0, costs={KV_BYTES_PER_TOKEN: KV_DENSE}),
            Option(
                latent,
                latent_bytes,
                latent_error,
                costs={KV_BYTES_PER_TOKEN: 2 * latent_rank * 2},
                covers=("k", "v"),
            ),
        ],
        0,
        kind="attention",
        shape=ATTN,
        dense_costs={KV_BYTES_PER_TOKEN: KV_DENSE},
    )
    q = _linear("q", 0.02)
    return BudgetProblem([attn, _linear("k", 0.01), _linear("v", 0.01), q])


def _brute(problem: BudgetProblem, budget: Budget) -> tuple[float, int] | None:
    """(least error, its fewest bytes) over all consistent choices within the caps."""
    caps = budget.caps(problem.dense_costs)
    best = None
    names = [s.name for s in problem.sites]
    options = {s.name: s.options for s in problem.sites}
    for combo in itertools.product(*[range(len(options[n])) for n in names]):
        chosen = dict(zip(names, combo))
        covered = {c for n, i in chosen.items() for c in options[n][i].covers}
        picked = [options[n][i] for n, i in chosen.items() if n not in covered]
        costs = {d: sum(o.cost(d) for o in picked) for d in (WEIGHT_BYTES, KV_BYTES_PER_TOKEN)}
        if any(costs[d] > cap + 1e-9 for d, cap in caps.items()):
            continue
        key = (sum(o.error for o in picked), costs[WEIGHT_BYTES])
        best = key if best is None or key < best else best
    return best


def _check_exclusive(sol) -> None:
    """Each owned site is covered by its owner's option or takes its own, never both."""
    for name in ("k", "v"):
        assert (name in sol.choice) != (name in sol.covered), (sol.choice, sol.covered)
    owner_covers = sol.option("attn").covers
    assert set(sol.covered) == set(owner_covers)


@pytest.mark.parametrize("memory", [None, 1.0, 0.6, 0.45, 0.35])
@pytest.mark.parametrize("kv", [None, 1.0, 0.5])
@pytest.mark.parametrize("latent_error", [0.005, 0.05])
def test_milp_matches_brute_force_and_honours_exclusivity(memory, kv, latent_error) -> None:
    problem = _problem(latent_error)
    budget = Budget(memory=memory, kv=kv)
    want = _brute(problem, budget)
    if want is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(problem, budget)
        return
    sol = solve(problem, budget)
    assert sol.solver == "milp"  # auto picks the MILP for ownership
    _check_exclusive(sol)
    assert sol.error == pytest.approx(want[0], abs=1e-12)
    assert sol.bytes == want[1]
    for dim, cap in budget.caps(problem.dense_costs).items():
        assert sol.costs[dim] <= cap  # every capped dimension honoured
    # totals are the chosen options' own sums (an owner's option carries its sites' costs)
    assert sol.bytes == sum(sol.option(n).bytes for n in sol.choice)


def test_owning_option_taken_when_it_is_the_better_deal_and_not_otherwise() -> None:
    # latent (rank 8): 2·8·(64+64) = 2048 bytes for k and v together, vs int4: 2 × 1216
    budget = Budget(memory=0.45)
    good = solve(_problem(latent_error=0.005), budget)  # cheaper and better than int4 k+v
    assert good.decision("attn") == ToyLatentAttention(8)
    assert good.covered == {"k": "attn", "v": "attn"}
    bad = solve(_problem(latent_error=0.05), budget)  # worse than int4 on both (0.02)
    assert isinstance(bad.decision("attn"), ToyDenseAttention)
    assert bad.covered == {} and bad.decision("k") == INT4 and bad.decision("v") == INT4


def test_kv_cap_forces_the_owning_option() -> None:
    sol = solve(_problem(latent_error=0.05), Budget(kv=0.5))
    assert sol.decision("attn") == ToyLatentAttention(8)
    assert sol.costs[KV_BYTES_PER_TOKEN] == 32 <= 0.5 * KV_DENSE
    assert "k" not in sol.choice and "v" not in sol.choice
    with pytest.raises(KeyError, match="takes no option of its own"):
        sol.option("k")
    assert "owned by attn" in sol.summary()


def test_plan_json_round_trip_keeps_ownership_and_shapes(tmp_path) -> None:
    sol = solve(_problem(latent_error=0.005), Budget(memory=0.45, kv=0.5))
    plan = sol.to_plan(meta={"model_class": "Toy"})
    assert plan.owned_by == {"k": "attn", "v": "attn"}
    assert set(plan.decisions) == {"attn", "q"}
    assert plan.shapes["attn"] == ATTN and plan.shapes["k"] == LIN
    d = json.loads(plan.to_json())
    assert d["version"] == PLAN_VERSION == 2
    assert d["shapes"]["attn"]["kind"] == "attention"
    back = Plan.load(plan.save(tmp_path / "plan.json"))
    assert back == plan and back.owned_by == plan.owned_by
    assert back["attn"] == ToyLatentAttention(8)
    assert plan.meta["costs"][KV_BYTES_PER_TOKEN] == 32


def test_plan_rejects_an_owned_site_with_its_own_decision() -> None:
    with pytest.raises(ValueError, match="owned by 'attn'.*has one of its own"):
        Plan({"attn": ToyLatentAttention(8), "k": INT4}, owned_by={"k": "attn"})
    with pytest.raises(ValueError, match="owned by 'attn', which has no decision"):
        Plan({"q": INT4}, owned_by={"k": "attn"})


def test_problem_json_round_trip_keeps_costs_covers_and_shapes() -> None:
    problem = _problem(0.005)
    back = BudgetProblem.from_json(problem.to_json())
    assert back.site("attn").shape == ATTN and back.site("attn").kind == "attention"
    assert back.site("attn").options[1].covers == ("k", "v")
    assert back.site("attn").options[1].costs == problem.site("attn").options[1].costs
    assert (
        back.dense_costs
        == problem.dense_costs
        == {WEIGHT_BYTES: 3 * 4096, KV_BYTES_PER_TOKEN: KV_DENSE}
    )
    assert back.to_json() == problem.to_json()


@pytest.mark.parametrize("method", ["dp", "greedy"])
def test_dp_and_greedy_refuse_with_the_reason(method) -> None:
    with pytest.raises(ValueError, match=rf"method '{method}' cannot solve.*own other sites.*milp"):
        solve(_problem(0.005), Budget(memory=0.5), method)
    dense_attn = SiteOptions(
        "attn",
        [Option(ToyDenseAttention(), 0, 0.0, costs={KV_BYTES_PER_TOKEN: KV_DENSE})],
        0,
        kind="attention",
        dense_costs={KV_BYTES_PER_TOKEN: KV_DENSE},
    )
    plain = BudgetProblem([_linear("k", 0.01), dense_attn])  # no ownership: only the kv cap
    with pytest.raises(ValueError, match=r"caps kv_bytes_per_token"):
        solve(plain, Budget(kv=0.5), method)


def test_kv_budget_without_a_cache_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Budget\(kv=0.5\) counts the KV cache, but no site"):
        solve(BudgetProblem([_linear("k", 0.01)]), Budget(kv=0.5))


def test_infeasible_budgets_name_the_smallest_achievable_per_dimension() -> None:
    problem = _problem(0.005)
    with pytest.raises(
        InfeasibleBudgetError,
        match=r"kv budget 0\.100 \(13 B/token\).*smallest "
        r"achievable is 0\.250 of dense \(32 B/token\)",
    ):
        solve(problem, Budget(kv=0.1))
    with pytest.raises(InfeasibleBudgetError, match=r"memory budget 0\.050 .*smallest achievable"):
        solve(problem, Budget(memory=0.05))
    # rank 16: the latent (4096 B) is no longer the smallest form of k and v (int4: 2 × 1216),
    # so memory 0.35 alone is reachable (int4 everywhere), kv 0.5 alone too, not both
    wide = _problem(0.005, latent_rank=16)
    tight = Budget(memory=0.35, kv=0.5)
    assert _brute(wide, tight) is None
    with pytest.raises(
        InfeasibleBudgetError,
        match=r"memory budget 0\.350 .* together with kv budget 0\.500 .* is infeasible, though "
        r"each alone is reachable: the smallest achievable memory is 0\.297 of dense .*, the "
        r"smallest achievable kv is 0\.500 of dense \(64 B/token\)",
    ):
        solve(wide, tight)


def test_option_costs_must_agree_with_bytes() -> None:
    with pytest.raises(ValueError, match="differs from bytes"):
        Option(DenseConfig(), 10, 0.0, costs={WEIGHT_BYTES: 11})
    with pytest.raises(ValueError, match="not other sites"):
        BudgetProblem([SiteOptions("a", [Option(DenseConfig(), 1, 0.0, covers=("zzz",))], 1)])


def test_budget_kv_is_a_fraction_and_only_in_to_dict_when_set() -> None:
    assert "kv" not in Budget(memory=0.5).to_dict()
    assert Budget(kv=0.25).to_dict()["kv"] == 0.25
    assert Budget(kv=0.5).caps({KV_BYTES_PER_TOKEN: 128, WEIGHT_BYTES: 10}) == {
        KV_BYTES_PER_TOKEN: 64
    }
    with pytest.raises(ValueError, match="kv budget is a fraction"):
        Budget(kv=1.5)


def test_module_swap_rejects_an_attention_decision_with_the_reason() -> None:
    """A plan with an owning attention decision reaches the module swap: it validates the
    plan (sites, shapes, owned sites) and rejects the attention site by reason, since no
    pass rewrites attention sites yet; strict mode raises before touching the model."""
    from torch import nn

    from slimfx.ir.sites import AttentionSite, LinearSite
    from slimfx.passes.swap import apply_plan

    model = nn.ModuleDict({"k": nn.Linear(64, 32, bias=False), "v": nn.Linear(64, 32, bias=False)})
    lin = [LinearSite(n, 64, 32, "torch.float32", False, f"{n}.weight", n) for n in ("k", "v")]
    attn = AttentionSite("", 4, 2, 16, True, {"k": "k", "v": "v"}, hidden_size=64, layer_idx=0)
    assert attn.site_shape == ATTN
    plan = Plan(
        {"": ToyLatentAttention(8)},
        {"": ATTN, "k": LIN, "v": LIN},
        owned_by={"k": "", "v": ""},
    )
    new, result = apply_plan(model, plan, [attn, *lin], strict=False)
    assert [(r.fqn, r.status) for r in result.records] == [("", "rejected")]
    assert "rewrites linear sites, not attention sites" in result.records[0].reason
    assert not result.modified and isinstance(new["k"], nn.Linear)
    with pytest.raises(ValueError, match="1 site\\(s\\) rejected"):
        apply_plan(model, plan, [attn, *lin])
    wrong = Plan({"": ToyLatentAttention(8)}, {"": AttentionShape(64, 4, 4, 16)})
    with pytest.raises(ValueError, match="shapes do not match.*attention"):
        apply_plan(model, wrong, [attn, *lin])


@pytest.mark.parametrize("memory", [None, 0.5, 0.4])
@pytest.mark.parametrize("kv", [1.0, 0.5, 0.3])
def test_kv_cap_without_ownership_goes_through_the_milp(memory, kv) -> None:
    """A cache-only form of the attention site (no weights, half the cache) under caps on
    both dimensions: the MILP's answer equals brute force and honours each cap."""
    attn = SiteOptions(
        "attn",
        [
            Option(ToyDenseAttention(), 0, 0.0, costs={KV_BYTES_PER_TOKEN: KV_DENSE}),
            Option(ToyLatentAttention(4), 0, 0.03, costs={KV_BYTES_PER_TOKEN: KV_DENSE // 2}),
        ],
        0,
        kind="attention",
        shape=ATTN,
        dense_costs={KV_BYTES_PER_TOKEN: KV_DENSE},
    )
    problem = BudgetProblem([attn, _linear("k", 0.01), _linear("q", 0.02)])
    budget = Budget(memory=memory, kv=kv)
    want = _brute(problem, budget)
    if want is None:
        with pytest.raises(InfeasibleBudgetError, match="kv budget 0.300"):
            solve(problem, budget)
        return
    sol = solve(problem, budget)
    assert (sol.solver, sol.error, sol.bytes) == ("milp", pytest.approx(want[0]), want[1])
    assert sol.costs[KV_BYTES_PER_TOKEN] <= kv * KV_DENSE


def test_rules_reject_a_site_of_another_kind() -> None:
    from slimfx.ir.sites import AttentionSite
    from slimfx.passes.base import rule_for
    from slimfx.planning.configs import LowRankConfig

    attn = AttentionSite("attn", 4, 2, 16, True, {"k": "k"}, hidden_size=64)
    verdict = rule_for(LowRankConfig(4)).check(attn, LowRankConfig(4))
    assert not verdict.ok and "rewrites linear sites, not attention" in verdict.reason
