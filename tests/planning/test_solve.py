"""Budget solvers on toy tables (no torch): exact methods against brute force, greedy bounds,
latency and error caps, infeasibility messages, tie rules, DP coarsening, Plan round-trip."""

from __future__ import annotations

import ast
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import slimfx.planning.solve as solve_mod
from slimfx.planning.configs import DenseConfig, LowRankConfig, QuantConfig
from slimfx.planning.plan import Plan
from slimfx.planning.problem import (
    Budget,
    BudgetProblem,
    InfeasibleBudgetError,
    Option,
    SiteOptions,
    allowed,
)
from slimfx.planning.solve import Solution, frontier, solve

# Errors on a 1/64 grid are exact in float64, so sums tie exactly and the tie rules are tested
# without tolerance games. Float-error problems use REL for HiGHS's MIP gap (abs 1e-6 on an
# objective scaled by 1e3 / max error, i.e. ≤ 1e-9 of the largest error) plus summation order.
REL = 1e-7


def _site(name: str, dense: int, opts: list[tuple[int, float, float]], shuffle_rng=None):
    """A site whose option 0 is dense (error 0) unless shuffled; opts: (bytes, error, lat)."""
    options = [Option(DenseConfig(), dense, 0.0, latency_s=dense * 1e-6)]
    options += [Option(LowRankConfig(r + 1), b, e, latency_s=t) for r, (b, e, t) in enumerate(opts)]
    if shuffle_rng is not None:
        order = shuffle_rng.permutation(len(options))
        options = [options[i] for i in order]
    return SiteOptions(name, options, dense, dense * 1e-6)


def _random_problem(rng: np.random.Generator, grid: bool = True, dense: bool = True):
    """3–5 sites × 2–4 options, integer bytes, errors on a 1/64 grid (ties) or floats."""
    sites = []
    for s in range(int(rng.integers(3, 6))):
        d = int(rng.integers(20, 80))
        opts = []
        for _ in range(int(rng.integers(1, 4))):
            b = int(rng.integers(1, d + 1))  # may equal dense: a tie on bytes
            e = float(rng.integers(1, 16)) / 64 if grid else float(rng.random())
            opts.append((b, e, float(rng.uniform(0.1, 1.2)) * d * 1e-6))
        site = _site(f"blk{s}.lin", d, opts, shuffle_rng=rng)
        if not dense:  # drop dense: the min-error option is then something else
            site = SiteOptions(
                site.name, [o for o in site.options if o.decision.kind != "dense"], d
            )
        sites.append(site)
    return BudgetProblem(sites)


def _totals(p: BudgetProblem, ch: tuple[int, ...]) -> tuple[float, int, float]:
    opts = [s.options[j] for s, j in zip(p.sites, ch)]
    return (
        sum(o.error for o in opts),
        sum(o.bytes for o in opts),
        sum(o.latency_s for o in opts),
    )


def _brute(p: BudgetProblem, budget: Budget):
    """(error, bytes, choice) minimizing (error, bytes, choice tuple), or None if infeasible."""
    mem = budget.memory_bytes(p.dense_bytes)
    lat = None if budget.latency is None else budget.latency * p.dense_latency_s * (1 + 1e-9)
    ranges = [
        [i for i, o in enumerate(s.options) if any(o is a for a in allowed(s, budget.max_error))]
        for s in p.sites
    ]
    best = None
    for ch in itertools.product(*ranges):
        e, b, t = _totals(p, ch)
        if (mem is not None and b > mem * (1 + 1e-12)) or (lat is not None and t > lat):
            continue
        if best is None or e < best[0] - 1e-9 * best[0]:
            best = (e, b, ch)
        elif abs(e - best[0]) <= 1e-9 * best[0] and (b, ch) < (best[1], best[2]):
            best = (e, b, ch)
    return best


def _choice(p: BudgetProblem, sol: Solution) -> tuple[int, ...]:
    return tuple(sol.choice[s.name] for s in p.sites)


def _check_totals(p: BudgetProblem, sol: Solution) -> None:
    e, b, t = _totals(p, _choice(p, sol))
    assert sol.bytes == b and sol.error == pytest.approx(e) and sol.latency_s == pytest.approx(t)


# ---------------------------------------------------------------------------- exactness


def test_milp_and_dp_match_brute_force_on_random_problems():
    rng = np.random.default_rng(0)
    infeasible = feasible = 0
    for k in range(200):
        p = _random_problem(rng, grid=k % 2 == 0, dense=k % 5 != 0)
        budget = Budget(memory=float(rng.uniform(0.15, 1.0)))
        ref = _brute(p, budget)
        for method in ("milp", "dp"):  # "auto" is "milp" here; its fallback is tested below
            if ref is None:
                with pytest.raises(InfeasibleBudgetError):
                    solve(p, budget, method)
                continue
            sol = solve(p, budget, method)
            _check_totals(p, sol)
            assert sol.status == "optimal"
            assert sol.error == pytest.approx(ref[0], rel=REL, abs=1e-12), (k, method)
            if k % 2 == 0:  # exact ties: bytes must be the smallest among equal-error optima
                assert sol.bytes == ref[1], (k, method)
            if method == "dp" and k % 2 == 0:  # DP implements the full tie rule
                assert _choice(p, sol) == ref[2], k
        infeasible += ref is None
        feasible += ref is not None
    assert infeasible > 5 and feasible > 100  # the draw exercises both outcomes


def test_greedy_is_feasible_and_never_better_than_optimal():
    rng = np.random.default_rng(1)
    worse = 0
    for k in range(150):
        p = _random_problem(rng, grid=k % 2 == 0)
        budget = Budget(memory=float(rng.uniform(0.3, 1.0)))
        ref = _brute(p, budget)
        if ref is None:
            continue
        sol = solve(p, budget, "greedy")
        _check_totals(p, sol)
        assert sol.solver == "greedy"
        assert sol.bytes <= budget.memory_bytes(p.dense_bytes) * (1 + 1e-12)
        assert sol.error >= ref[0] - 1e-12
        if sol.status == "optimal":  # only claimed when no downgrade was needed
            assert sol.error == ref[0]
        worse += sol.error > ref[0] + 1e-12
    assert worse > 0  # the draw contains cases where greedy is strictly suboptimal


def test_latency_limit_honored_and_exact():
    rng = np.random.default_rng(2)
    checked = 0
    for k in range(120):
        p = _random_problem(rng, grid=k % 2 == 0)
        both = k % 2 == 1
        budget = Budget(
            memory=float(rng.uniform(0.4, 1.0)) if both else None,
            latency=float(rng.uniform(0.3, 1.0)),
        )
        ref = _brute(p, budget)
        if ref is None:
            with pytest.raises(InfeasibleBudgetError):
                solve(p, budget, "milp")
            continue
        limit = budget.latency * p.dense_latency_s * (1 + 1e-9)
        sol = solve(p, budget, "milp")
        assert sol.latency_s <= limit
        assert sol.error == pytest.approx(ref[0], rel=REL, abs=1e-12)
        if not both:  # latency alone: greedy never gets stuck
            g = solve(p, budget, "greedy")
            assert g.latency_s <= limit and g.error >= ref[0] - 1e-12
        checked += 1
    assert checked > 60


def test_latency_binds_where_memory_alone_would_not():
    # Site a: int-ish option small but slow; lowrank bigger but fast.
    a = SiteOptions(
        "a",
        [
            Option(DenseConfig(), 100, 0.0, latency_s=10.0),
            Option(QuantConfig(4), 30, 0.1, latency_s=12.0),  # small, slow (dequant)
            Option(LowRankConfig(8), 50, 0.3, latency_s=4.0),  # larger, fast
        ],
        100,
        10.0,
    )
    p = BudgetProblem([a])
    assert p.site("a").options[solve(p, Budget(memory=0.5)).choice["a"]].bytes == 30
    sol = solve(p, Budget(memory=0.5, latency=0.5))
    assert sol.choice["a"] == 2 and sol.latency_s == 4.0
    assert solve(p, Budget(memory=0.5, latency=0.5), "greedy").choice["a"] == 2


def test_dp_rejects_a_latency_limit():
    p = _random_problem(np.random.default_rng(3))
    with pytest.raises(ValueError, match="memory limit only"):
        solve(p, Budget(memory=0.5, latency=0.9), "dp")


def test_unknown_method_rejected():
    p = _random_problem(np.random.default_rng(3))
    with pytest.raises(ValueError, match="unknown method 'simplex'"):
        solve(p, Budget(memory=0.5), "simplex")


# ---------------------------------------------------------------------------- error cap


def _capped_problem() -> BudgetProblem:
    return BudgetProblem(
        [
            _site("x", 100, [(25, 0.02, 0), (50, 0.005, 0), (12, 0.2, 0)]),
            _site("y", 100, [(25, 0.3, 0), (50, 0.2, 0)]),  # nothing under the cap but dense
        ]
    )


def test_max_error_alone_minimizes_bytes_within_the_cap():
    p = _capped_problem()
    for method in ("auto", "milp", "dp", "greedy"):
        sol = solve(p, Budget(max_error=0.05), method)
        assert sol.option("x").bytes == 25  # cheapest with error ≤ 0.05 (12 B has 0.2)
        assert sol.decision("y") == DenseConfig()  # dense stays allowed when nothing else fits
        assert sol.status == "optimal"


def test_max_error_cap_honored_under_a_memory_budget():
    p = _capped_problem()
    ref = _brute(p, Budget(memory=0.8, max_error=0.05))
    for method in ("milp", "dp", "greedy"):
        sol = solve(p, Budget(memory=0.8, max_error=0.05), method)
        for s in p.sites:
            o = sol.option(s.name)
            assert o.error <= 0.05 or o.decision == DenseConfig()
        assert sol.bytes <= 160
    assert solve(p, Budget(memory=0.8, max_error=0.05)).error == pytest.approx(ref[0])
    # Without the cap the same budget would use y's 0.2-error option.
    assert solve(p, Budget(memory=0.5)).option("y").error > 0.05
    with pytest.raises(InfeasibleBudgetError, match="max_error=0.05.*0.625 of dense"):
        solve(p, Budget(memory=0.5, max_error=0.05))  # min bytes with the cap: 25 + 100


# ---------------------------------------------------------------------------- infeasible


def test_infeasible_memory_message_names_the_smallest_achievable():
    p = BudgetProblem(
        [_site(f"s{i}", 600_000, [(112_200, 0.4, 0), (300_000, 0.1, 0)]) for i in range(2)]
    )
    assert p.min_bytes() == 224_400  # 0.187 of the 1.2 MB dense
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(p, Budget(memory=0.1))
    msg = str(info.value)
    assert msg == (
        "memory budget 0.100 (120.0 kB) is infeasible: the smallest achievable is 0.187 of "
        "dense (224.4 kB, 3.0 bits/weight)"
    )
    with pytest.raises(InfeasibleBudgetError, match=r"2 bits/weight = 0.125 .*0\.187 of dense"):
        solve(p, Budget(bits=2), "greedy")
    with pytest.raises(InfeasibleBudgetError, match="0.187 of dense"):
        solve(p, Budget(memory=100_000), "dp")  # absolute bytes


def test_infeasible_latency_message_names_the_smallest_achievable():
    p = BudgetProblem([_site("s", 1000, [(500, 0.1, 0.4e-3), (250, 0.3, 0.6e-3)])])
    # dense latency 1 ms; fastest option 0.4 ms
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(p, Budget(latency=0.3))
    assert str(info.value) == (
        "latency budget 0.300 (0.3 ms) is infeasible: the smallest achievable is 0.400 of "
        "dense (0.4 ms)"
    )


def test_jointly_infeasible_limits_are_reported_by_milp():
    # Small-but-slow or big-but-fast: each limit alone is reachable, both together not.
    p = BudgetProblem([_site("s", 1000, [(250, 0.2, 0.9e-3), (700, 0.2, 0.3e-3)])])
    solve(p, Budget(memory=0.3))
    solve(p, Budget(latency=0.5))
    with pytest.raises(InfeasibleBudgetError, match="together with latency budget 0.500"):
        solve(p, Budget(memory=0.3, latency=0.5), "milp")


# ---------------------------------------------------------------------------- dense, ties


def test_full_budget_and_no_budget_keep_everything_dense():
    rng = np.random.default_rng(4)
    for _ in range(30):
        p = _random_problem(rng)  # dense shuffled to random positions
        for budget in (Budget(memory=1.0), Budget.of(1.0), Budget(), Budget(latency=1.0)):
            for method in ("auto", "milp", "greedy") + (("dp",) if budget.latency is None else ()):
                sol = solve(p, budget, method)
                assert all(sol.decision(s.name) == DenseConfig() for s in p.sites)
                assert sol.error == 0.0 and sol.bytes == p.dense_bytes
                assert sol.status == "optimal"


def test_no_budget_without_dense_takes_the_min_error_option():
    p = BudgetProblem(
        [SiteOptions("s", [Option(QuantConfig(4), 30, 0.2), Option(QuantConfig(8), 60, 0.01)], 120)]
    )
    assert solve(p, Budget()).choice["s"] == 1


def test_ties_prefer_fewer_bytes_then_lower_index():
    # Within a site: options 1 and 2 identical, option 3 same error but more bytes.
    s = SiteOptions(
        "s",
        [
            Option(DenseConfig(), 100, 0.0),
            Option(LowRankConfig(4), 40, 0.25),
            Option(LowRankConfig(4, "svd"), 40, 0.25),
            Option(QuantConfig(8), 45, 0.25),
        ],
        100,
    )
    for method in ("milp", "dp", "greedy", "auto"):
        sol = solve(BudgetProblem([s]), Budget(memory=0.45), method)
        assert sol.choice["s"] == 1, method  # 40 B beats 45 B; index 1 beats its twin 2
    # Across sites: compressing a or b costs the same error; b saves more bytes.
    a = _site("a", 100, [(60, 0.5, 0)])
    b = _site("b", 100, [(30, 0.5, 0)])
    p = BudgetProblem([a, b])
    for method in ("milp", "dp", "greedy", "auto"):
        sol = solve(p, Budget(memory=170 / 200), method)  # one of the two must give way
        assert (sol.choice["a"], sol.choice["b"], sol.bytes) == (0, 1, 130), method
    # Same error and same bytes across sites: DP takes the lowest index in site order.
    twins = BudgetProblem([_site("a", 100, [(50, 0.5, 0)]), _site("b", 100, [(50, 0.5, 0)])])
    sol = solve(twins, Budget(memory=0.75), "dp")
    assert (sol.choice["a"], sol.choice["b"]) == (0, 1)


def test_same_input_gives_same_choice():
    rng = np.random.default_rng(5)
    for k in range(20):
        p = _random_problem(rng, grid=True)
        again = BudgetProblem.from_json(p.to_json())
        budget = Budget(memory=float(rng.uniform(0.4, 0.9)), latency=0.95 if k % 2 else None)
        for method in ("milp", "greedy") + (("dp",) if k % 2 == 0 else ()):
            try:
                first = solve(p, budget, method)
            except (InfeasibleBudgetError, RuntimeError):
                continue
            assert solve(again, budget, method).choice == first.choice
            assert solve(p, budget, method).choice == first.choice


# ---------------------------------------------------------------------------- DP coarsening


def test_dp_coarsens_big_tables_and_stays_feasible():
    rng = np.random.default_rng(6)
    sites = []
    for i in range(6):
        d = 2 * int(rng.integers(4_000_000, 8_000_000)) + 1  # odd: gcd of shifts stays tiny
        opts = [(int(rng.integers(d // 8, d)), float(rng.random()), 0.0) for _ in range(5)]
        sites.append(_site(f"s{i}", d, opts))
    p = BudgetProblem(sites)
    budget = Budget(memory=0.4)
    exact = solve(p, budget, "milp")
    dp = solve(p, budget, "dp")
    assert dp.status == "feasible"  # the table would be ~6·1.7e7 cells: coarsened
    assert dp.bytes <= budget.memory_bytes(p.dense_bytes)
    assert dp.error >= exact.error - 1e-12
    _check_totals(p, dp)


def test_dp_coarsening_threshold_is_what_switches_status(monkeypatch):
    p = _random_problem(np.random.default_rng(7))
    budget = Budget(memory=(p.min_bytes() + p.dense_bytes) / 2 / p.dense_bytes)
    assert solve(p, budget, "dp").status == "optimal"
    monkeypatch.setattr(solve_mod, "DP_MAX_CELLS", 12)
    sol = solve(p, budget, "dp")
    assert sol.status == "feasible" and sol.bytes <= budget.memory_bytes(p.dense_bytes)


# ---------------------------------------------------------------------------- auto, plan, misc


def test_auto_falls_back_to_greedy_when_milp_fails(monkeypatch):
    import scipy.optimize

    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(scipy.optimize, "milp", broken)
    p = _random_problem(np.random.default_rng(8))
    budget = Budget(memory=0.5)
    sol = solve(p, budget, "auto")
    assert sol.solver == "greedy" and "solver exploded" in sol.note
    assert sol.bytes <= budget.memory_bytes(p.dense_bytes)
    with pytest.raises(RuntimeError, match="solver exploded"):
        solve(p, budget, "milp")


def test_solution_to_plan_round_trips_through_json(tmp_path: Path):
    p = BudgetProblem(
        [
            _site("model.layers.0.mlp", 2 * 64 * 128, [(2 * 8 * 192, 0.1, 0)]),
            SiteOptions(
                "model.layers.0.attn",
                [Option(DenseConfig(), 8192, 0.0), Option(QuantConfig(4, 32), 2304, 0.05)],
                8192,
            ),
        ],
        workload="decode",
        target="h100",
    )
    sol = solve(p, Budget(memory=0.5))
    shapes = {"model.layers.0.mlp": (128, 64), "model.layers.0.attn": (64, 64)}
    plan = sol.to_plan(shapes, meta={"model_class": "Toy"})
    assert dict(plan) == {s.name: sol.decision(s.name) for s in p.sites}
    assert plan.meta["solver"] == "milp" and plan.meta["budget"]["memory"] == 0.5
    assert plan.meta["model_class"] == "Toy" and plan.meta["bytes"] == sol.bytes
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.meta == plan.meta
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    assert set(plan.rewrites()) == {s.name for s in p.sites if sol.decision(s.name).kind != "dense"}


def test_frontier_is_monotone_and_skips_infeasible_fractions():
    p = _random_problem(np.random.default_rng(9), grid=True)
    fractions = [0.05, 0.3, 0.5, 0.7, 1.0]
    pts = frontier(p, fractions)
    min_frac = p.min_bytes() / p.dense_bytes
    assert [f for f, _, _ in pts] == [f for f in fractions if f >= min_frac]
    errors = [e for _, e, _ in pts]
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    for f, e, b in pts:
        sol = solve(p, Budget(memory=f))
        assert (e, b) == (sol.error, sol.bytes) and b <= f * p.dense_bytes
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        frontier(p, [1.5])


def test_bits_budget_equals_memory_fraction():
    p = _random_problem(np.random.default_rng(10), grid=True)
    assert solve(p, Budget(bits=8)).choice == solve(p, Budget(memory=0.5)).choice


def test_summary_names_solver_sites_and_fraction():
    p = _capped_problem()
    text = solve(p, Budget(memory=0.5)).summary()
    assert "milp (optimal)" in text and "x" in text and "of dense" in text
    assert f"{solve(p, Budget(memory=0.5)).bytes / 200:.3f} of dense" in text


def test_problem_json_round_trip_keeps_solutions():
    p = _random_problem(np.random.default_rng(11))
    q = BudgetProblem.from_json(p.to_json())
    assert solve(q, Budget(memory=0.6)).choice == solve(p, Budget(memory=0.6)).choice


def test_planning_imports_only_planning_numpy_scipy_and_stdlib():
    root = Path(solve_mod.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for n in names:
                top = n.split(".")[0]
                assert top in sys.stdlib_module_names or top in ("numpy", "scipy", "slimfx"), n
                assert top != "slimfx" or n.startswith("slimfx.planning"), (path.name, n)
    # And at run time: solving does not pull torch in.
    code = (
        "import sys; from slimfx.planning.solve import solve; "
        "from slimfx.planning.problem import *; from slimfx.planning.configs import *; "
        "p = BudgetProblem([SiteOptions('a', [Option(DenseConfig(), 8, 0.0), "
        "Option(QuantConfig(4), 3, 0.1)], 8)]); solve(p, Budget(memory=0.5)); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root.parent.parent)


def test_errors_are_never_negative_in_totals():
    # Guard for the "errors ≥ 0, dense has 0" premise the full-budget rule rests on.
    with pytest.raises(ValueError, match="has error"):
        SiteOptions("s", [Option(DenseConfig(), 8, -1.0)], 8)
    assert math.isfinite(solve(_capped_problem(), Budget(memory=0.9)).error)
