"""Budget solvers: pick exactly one option per site under the user's budget.

The problem is a multiple-choice knapsack. With ``x[s, j] ∈ {0, 1}`` meaning "site s takes
its option j" (only options within the per-site ``max_error`` cap take part):

    minimize    Σ error[s, j] · x[s, j]
    subject to  Σ_j x[s, j] = 1                              for every site s
                Σ bytes[s, j] · x[s, j]     ≤ memory_limit    (when a memory/bits budget is set)
                Σ latency_s[s, j] · x[s, j] ≤ latency_limit   (when a latency budget is set)

memory_limit = ``budget.memory_bytes(problem.dense_bytes)``; latency_limit =
``budget.latency × problem.dense_latency_s``. A budget with only ``max_error`` minimizes total
bytes instead (ties: lower error); a budget with no limit at all keeps every site at its
min-error option (dense, whose error is 0). Ties are broken deterministically: lower total
error (totals within a relative 1e-9 tie), then lower total bytes, then lower option index.
The index rule holds within each site for every method; between sites (two choices of equal
error *and* bytes) ``dp`` takes the lowest index in site order, while ``milp`` keeps the one
HiGHS returns (the same on every run, but not chosen by index).

Methods:

- ``milp``: ``scipy.optimize.milp`` (HiGHS), exact. A first solve minimizes error; a second
  minimizes bytes among the solutions of that error (the tie rule).
- ``dp``: exact dynamic programming over integer bytes, memory limit only. Bytes are shifted
  by each site's smallest option and divided by the gcd of the shifted values; a table over
  ``DP_MAX_CELLS`` cells is coarsened by rounding bytes *up* to a quantum (the answer stays
  within the limit, status ``feasible``).
- ``greedy``: from each site's min-error option, repeatedly take the single downgrade with
  the smallest Δerror/Δbytes (Δerror/Δlatency for a latency limit): the next vertex of that
  site's lower convex hull. Status ``feasible`` (``optimal`` when no downgrade was needed).
- ``auto``: ``milp``, or ``greedy`` when scipy's milp is missing or fails (``Solution.note``
  says why).

Beyond the knapsack (``slimfx.planning.milp`` has the program): options that own other sites
(``Option.covers``) turn "exactly one option per site" into a covering row for each owned site
(one of its own options or one owning option), and a cap on another budget dimension
(``Budget.kv``) adds its row. Only the MILP expresses them: ``dp`` and ``greedy`` refuse such
a problem with the reason, ``auto`` takes the MILP and does not fall back. The totals of an
infeasible budget are named per capped dimension (the smallest achievable of each).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimfx.planning.configs import Decision
from slimfx.planning.heuristics import solve_dp, solve_greedy
from slimfx.planning.milp import MILP_TIME_LIMIT_S, STAGE2_NODE_LIMIT, milp_min, solve_milp
from slimfx.planning.plan import Plan
from slimfx.planning.problem import (
    Budget,
    BudgetProblem,
    InfeasibleBudgetError,
    Option,
    allowed,
)
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN, KV_CACHE_BYTES, TOTAL_BYTES, WEIGHT_BYTES

__all__ = [
    "Solution",
    "solve",
    "frontier",
    "METHODS",
    "DP_MAX_CELLS",
    "MILP_TIME_LIMIT_S",
    "STAGE2_NODE_LIMIT",
]

METHODS = ("auto", "milp", "dp", "greedy")
DP_MAX_CELLS = 5_000_000  # float64 table cells (40 MB) before the DP coarsens bytes
_REL_TIE = 1e-9  # two error totals within this relative distance are a tie
_LAT_REL = 1e-9  # relative slack on the latency limit: float sums of seconds


# ---------------------------------------------------------------------------------------------
# Solution


@dataclass
class Solution:
    """One option per site, with the totals it reaches.

    ``choice`` maps site name to an index into that site's ``options``. ``solver`` is the
    method that produced it (``milp``, ``dp`` or ``greedy``); ``status`` is ``optimal`` when
    the method proved it (or the problem was separable) and ``feasible`` otherwise.
    """

    choice: dict[str, int]
    problem: BudgetProblem
    solver: str
    status: str
    bytes: int
    error: float
    latency_s: float
    budget: Budget | None = None
    note: str = ""
    costs: dict[str, int] = field(default_factory=dict)
    covered: dict[str, str] = field(default_factory=dict)

    def option(self, name: str) -> Option:
        """The chosen Option of site ``name`` (``KeyError`` for a site an owner covers)."""
        if name in self.covered:
            raise KeyError(
                f"site {name!r} takes no option of its own: {self.covered[name]!r}'s chosen "
                "option owns it"
            )
        return self.problem.site(name).options[self.choice[name]]

    def decision(self, name: str) -> Decision:
        """The chosen Decision of site ``name``."""
        return self.option(name).decision

    @property
    def fraction(self) -> float:
        """Total bytes as a fraction of the problem's dense 16-bit bytes."""
        dense = self.problem.dense_bytes
        return self.bytes / dense if dense else 0.0

    def to_plan(
        self,
        shapes: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Plan:
        """A Plan of the chosen decisions (owned sites in ``owned_by``), with the problem's
        site shapes updated by ``shapes``; ``meta`` is merged over the solver's provenance."""
        prov: dict[str, Any] = {
            "solver": self.solver,
            "status": self.status,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "workload": self.problem.workload,
            "target": self.problem.target,
            "bytes": self.bytes,
            "dense_bytes": self.problem.dense_bytes,
            "error": self.error,
            "latency_s": self.latency_s,
        }
        if set(self.costs) - {WEIGHT_BYTES}:
            prov["costs"] = dict(sorted(self.costs.items()))
        prov.update(meta or {})
        decisions = {
            s.name: s.options[self.choice[s.name]].decision
            for s in self.problem.sites
            if s.name in self.choice
        }
        recorded = {s.name: s.shape for s in self.problem.sites if s.shape is not None}
        return Plan(decisions, {**recorded, **(shapes or {})}, prov, dict(self.covered))

    def summary(self) -> str:
        """A few lines: totals against dense, then one line per site."""
        p = self.problem
        rewritten = sum(
            1 for s in p.sites if s.name in self.choice and self.decision(s.name).kind != "dense"
        )
        lines = [
            f"{len(p.sites)} sites, {rewritten} rewritten — {self.solver} ({self.status})",
            f"  bytes   {_fmt_bytes(self.bytes)} = {self.fraction:.3f} of dense "
            f"({16 * self.fraction:.2f} bits/weight)",
            f"  error   {self.error:.4g} (sum over sites)",
        ]
        if p.dense_latency_s > 0:
            lines.append(
                f"  latency {self.latency_s * 1e3:.4g} ms = "
                f"{self.latency_s / p.dense_latency_s:.3f} of dense"
            )
        if self.note:
            lines.append(f"  note    {self.note}")
        width = max((len(s.name) for s in p.sites), default=4)
        for s in p.sites:
            if s.name in self.covered:
                lines.append(f"  {s.name:<{width}}  owned by {self.covered[s.name]}")
                continue
            o = self.option(s.name)
            lines.append(
                f"  {s.name:<{width}}  {o.decision.short():<28} {_fmt_bytes(o.bytes):>10}"
                f"  err {o.error:.3g}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ---------------------------------------------------------------------------------------------
# Problem in arrays


@dataclass
class _Site:
    """One site's allowed options as arrays; ``idx[j]`` is the index into ``site.options``.
    ``c``: costs per extra capped dimension; ``cov[j]``: the sites option j owns; ``owned``:
    whether an option of another site owns this one."""

    name: str
    idx: list[int]
    b: np.ndarray  # int64 bytes
    e: np.ndarray  # float64 error
    t: np.ndarray  # float64 latency seconds
    c: dict[str, np.ndarray] = field(default_factory=dict)
    cov: list[tuple[str, ...]] = field(default_factory=list)
    owned: bool = False

    def best(self, key: str) -> int:
        """Local index minimizing (error, bytes, index) or (bytes, error, index)."""
        a, b = (self.e, self.b) if key == "error" else (self.b, self.e)
        return min(range(len(self.idx)), key=lambda j: (a[j], b[j], j))


@dataclass
class _Limits:
    """The budget's limits in problem units; ``fits`` checks a choice against them (``-1``:
    a site its owner covers, counted in the owner's option)."""

    cap: int | None  # integer byte limit
    lat: float | None  # latency limit, seconds (slack included)
    mem_raw: float | None = None  # the limits as the budget states them
    lat_raw: float | None = None
    extra: dict[str, int] = field(default_factory=dict)  # other dimensions: integer caps
    extra_raw: dict[str, float] = field(default_factory=dict)

    def fits(self, sites: list[_Site], ch: list[int]) -> bool:
        chosen = [(s, j) for s, j in zip(sites, ch) if j >= 0]
        if self.cap is not None and sum(int(s.b[j]) for s, j in chosen) > self.cap:
            return False
        for dim, cap in self.extra.items():
            if sum(int(s.c[dim][j]) for s, j in chosen) > cap:
                return False
        return self.lat is None or float(sum(s.t[j] for s, j in chosen)) <= self.lat


def _dim(o: Option, dim: str, batch: int) -> int:
    """``o``'s cost in ``dim``; ``TOTAL_BYTES`` is derived: weight bytes + batch × cache bytes."""
    if dim == TOTAL_BYTES:
        return int(o.bytes) + batch * o.cost(KV_CACHE_BYTES)
    return o.cost(dim)


def _arrays(
    problem: BudgetProblem, max_error: float | None, dims: Sequence[str] = (), batch: int = 1
) -> list[_Site]:
    out = []
    owned = problem.owners()
    for s in problem.sites:
        keep = {id(o) for o in allowed(s, max_error)}
        idx = [i for i, o in enumerate(s.options) if id(o) in keep]
        opts = [s.options[i] for i in idx]
        out.append(
            _Site(
                s.name,
                idx,
                np.array([int(o.bytes) for o in opts], dtype=np.int64),
                np.array([float(o.error) for o in opts], dtype=np.float64),
                np.array([float(o.latency_s) for o in opts], dtype=np.float64),
                {d: np.array([_dim(o, d, batch) for o in opts], dtype=np.int64) for d in dims},
                [o.covers for o in opts],
                s.name in owned,
            )
        )
    return out


def _limits(problem: BudgetProblem, budget: Budget) -> _Limits:
    mem = budget.memory_bytes(problem.dense_bytes)
    cap = None if mem is None else math.floor(mem * (1 + 1e-12))  # 0.57·100 is 56.999…
    lat_raw = None if budget.latency is None else budget.latency * problem.dense_latency_s
    lat = None if lat_raw is None else lat_raw * (1 + _LAT_REL)
    raw = {k: v for k, v in budget.caps(problem.dense_costs).items() if k != WEIGHT_BYTES}
    extra = {k: math.floor(v * (1 + 1e-12)) for k, v in raw.items()}
    return _Limits(cap, lat, mem, lat_raw, extra, raw)


def _smallest(sites: list[_Site], get: Any) -> float:
    """The smallest achievable total of ``get(site)``: per-site minima, or (with ownership,
    where an owned site may take nothing) the MILP's."""
    if any(s.owned for s in sites):
        return milp_min(sites, get)
    return float(sum(get(s).min() for s in sites))


# ---------------------------------------------------------------------------------------------
# Messages


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _frac(x: float, dense: float) -> float:
    return x / dense if dense else math.inf


def _cap_note(budget: Budget) -> str:
    return f" with max_error={budget.max_error:g}" if budget.max_error is not None else ""


def _memory_parts(
    problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits
) -> tuple[str, str]:
    """("memory budget 0.100 (1.2 MB)", "0.187 of dense (2.2 MB, 3.0 bits/weight)")."""
    dense = problem.dense_bytes
    limit = lim.mem_raw or 0.0
    bits = f"{budget.bits:g} bits/weight = " if budget.bits is not None else ""
    smallest = _smallest(sites, lambda s: s.b)
    f = _frac(smallest, dense)
    stuck = [so.name for so in problem.sites if so.kind != "attention"
             and min(o.bytes for o in so.options) >= so.dense_bytes]  # fmt: skip
    why = (
        f"; {len(stuck)} of {sum(so.kind != 'attention' for so in problem.sites)} linear "
        f"site(s) have no form smaller than dense ({', '.join(stuck[:3])}"
        f"{' …' if len(stuck) > 3 else ''}: a tied weight keeps its dense copy, or no "
        "family's layout fits the shape)" if stuck else ""
    )
    return (
        f"memory budget {bits}{_frac(limit, dense):.3f} ({_fmt_bytes(limit)})",
        f"{f:.3f} of dense ({_fmt_bytes(smallest)}, {16 * f:.1f} bits/weight){why}",
    )


def _latency_parts(
    problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits
) -> tuple[str, str]:
    """("latency budget 0.500 (1.2 ms)", "0.620 of dense (1.5 ms)")."""
    smallest = _smallest(sites, lambda s: s.t)
    return (
        f"latency budget {budget.latency:.3f} ({(lim.lat_raw or 0.0) * 1e3:.4g} ms)",
        f"{_frac(smallest, problem.dense_latency_s):.3f} of dense ({smallest * 1e3:.4g} ms)",
    )


def _kv_parts(
    problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits
) -> tuple[str, str]:
    """("kv budget 0.500 (96 B/token)", "0.750 of dense (144 B/token)")."""
    if KV_CACHE_BYTES in lim.extra:  # priced at a context: one sequence's cache
        dense = problem.dense_costs.get(KV_CACHE_BYTES, 0)
        smallest = _smallest(sites, lambda s: s.c[KV_CACHE_BYTES])
        return (
            f"kv budget {budget.kv:.3f} ({_fmt_bytes(lim.extra_raw[KV_CACHE_BYTES])} per "
            f"sequence at {budget.context} tokens)",
            f"{_frac(smallest, dense):.3f} of dense ({_fmt_bytes(smallest)})",
        )
    dense = problem.dense_costs.get(KV_BYTES_PER_TOKEN, 0)
    smallest = _smallest(sites, lambda s: s.c[KV_BYTES_PER_TOKEN])
    return (
        f"kv budget {budget.kv:.3f} ({lim.extra_raw[KV_BYTES_PER_TOKEN]:.0f} B/token)",
        f"{_frac(smallest, dense):.3f} of dense ({smallest:.0f} B/token)",
    )


def _total_parts(
    problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits
) -> tuple[str, str]:
    """("total budget 1.2 GB (weights + cache of 16 × 8192 tokens)", "1.5 GB")."""
    smallest = _smallest(sites, lambda s: s.c[TOTAL_BYTES])
    where = f"weights + cache of {budget.batch or 1} × {budget.context} tokens"
    return (
        f"total budget {_fmt_bytes(lim.extra_raw[TOTAL_BYTES])} ({where})",
        f"{_fmt_bytes(smallest)}",
    )


def _memory_message(
    problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits
) -> str:
    limit, smallest = _memory_parts(problem, budget, sites, lim)
    return f"{limit} is infeasible{_cap_note(budget)}: the smallest achievable is {smallest}"


def _latency_message(
    problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits
) -> str:
    limit, smallest = _latency_parts(problem, budget, sites, lim)
    return f"{limit} is infeasible{_cap_note(budget)}: the smallest achievable is {smallest}"


def _joint_message(problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits) -> str:
    mem, mem_min = _memory_parts(problem, budget, sites, lim)
    lat, lat_min = _latency_parts(problem, budget, sites, lim)
    return (
        f"{mem} together with {lat} is infeasible{_cap_note(budget)}, though each alone is "
        f"reachable: the smallest achievable memory is {mem_min}, the smallest achievable "
        f"latency is {lat_min}"
    )


# ---------------------------------------------------------------------------------------------
# Entry points


def solve(problem: BudgetProblem, budget: Budget, method: str = "auto") -> Solution:
    """Pick one option per site of ``problem`` under ``budget`` (see the module docstring).

    Raises ``InfeasibleBudgetError`` when no choice meets the limits (the message names the
    smallest achievable), ``ValueError`` for an unknown method, ``dp`` with a latency limit,
    or ``dp`` / ``greedy`` on a problem only the MILP expresses (ownership, a cap on a budget
    dimension other than weight bytes).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    budget = Budget.of(budget)
    _check_cache_pricing(problem, budget)
    lim = _limits(problem, budget)
    milp_only = _needs_milp(problem, lim)
    if method in ("dp", "greedy") and milp_only:
        raise ValueError(f"method {method!r} cannot solve this problem: {milp_only}; use 'milp'")
    if method == "dp" and lim.lat is not None:
        raise ValueError("method 'dp' handles a memory limit only; use 'milp' for latency")
    sites = _arrays(problem, budget.max_error, list(lim.extra), budget.batch or 1)
    name = "milp" if method == "auto" else method

    def done(ch: list[int], solver: str, status: str, note: str = "") -> Solution:
        return _solution(problem, budget, sites, ch, solver, status, note)

    if milp_only:
        return _solve_general(problem, budget, sites, lim, done)

    if lim.cap is None and lim.lat is None:  # separable: each site alone
        key = "bytes" if budget.max_error is not None else "error"
        return done([s.best(key) for s in sites], name, "optimal")

    start = [s.best("error") for s in sites]
    if lim.fits(sites, start):  # the unconstrained optimum already fits
        return done(start, name, "optimal")
    if lim.cap is not None and sum(int(s.b.min()) for s in sites) > lim.cap:
        raise InfeasibleBudgetError(_memory_message(problem, budget, sites, lim), ("memory",))
    if lim.lat is not None and float(sum(s.t.min() for s in sites)) > lim.lat:
        raise InfeasibleBudgetError(_latency_message(problem, budget, sites, lim), ("latency",))

    if method == "dp":
        ch, status = solve_dp(sites, lim.cap, DP_MAX_CELLS)  # type: ignore[arg-type]
        return done(_polish(sites, ch, lim), "dp", status)
    if method == "greedy":
        ch, status = solve_greedy(sites, lim, start)
        return done(_polish(sites, ch, lim), "greedy", status)
    try:
        ch, status = solve_milp(sites, lim)
    except InfeasibleBudgetError:
        raise
    except Exception as exc:  # noqa: BLE001 — auto falls back on any solver failure
        if method == "milp":
            raise
        ch, status = solve_greedy(sites, lim, start)
        note = f"milp unavailable or failed ({type(exc).__name__}: {exc}); greedy used"
        return done(_polish(sites, ch, lim), "greedy", status, note)
    if ch is None:  # proven infeasible: each limit alone is reachable, both together not
        raise InfeasibleBudgetError(
            _joint_message(problem, budget, sites, lim), ("memory", "latency")
        )
    return done(_polish(sites, ch, lim), "milp", status)


def _check_cache_pricing(problem: BudgetProblem, budget: Budget) -> None:
    """A budget on the cache needs attention sites priced at the budget's context."""
    if not budget.prices_cache:
        return
    what = f"kv={budget.kv:g}" if budget.kv is not None else f"total_bytes={budget.total_bytes:g}"
    if not problem.dense_costs.get(KV_BYTES_PER_TOKEN):
        raise ValueError(
            f"Budget({what}) counts the KV cache, but no site of this problem holds one "
            "(no attention site was priced)"
        )
    priced = problem.meta.get("kv_context")
    has_context = KV_CACHE_BYTES in problem.dense_costs
    if (budget.context is not None or has_context) and priced != budget.context:
        raise ValueError(
            f"the problem's KV cache was priced at context={priced!r} but the budget counts it at "
            f"context={budget.context!r}: build the problem for the budget's context"
        )


def _needs_milp(problem: BudgetProblem, lim: _Limits) -> str:
    """Why only the MILP can solve ``problem`` under ``lim`` (``""`` when any method can)."""
    why = []
    if problem.covering:
        owned = sorted(problem.owners())
        why.append(
            f"options own other sites ({', '.join(owned[:3])}{' …' if len(owned) > 3 else ''} "
            "take no decision of their own when their owner's option is chosen)"
        )
    if lim.extra:
        why.append(f"the budget caps {', '.join(sorted(lim.extra))}")
    return " and ".join(why)


def _solve_general(
    problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits, done: Any
) -> Solution:
    """The MILP path for ownership and extra dimensions: every capped dimension is checked
    alone first (the message names its smallest achievable), then all together."""
    parts = []  # (label, cap, per-site values, describe)
    if lim.cap is not None:
        parts.append(("memory", lim.cap, lambda s: s.b, _memory_parts))
    if lim.lat is not None:
        parts.append(("latency", lim.lat, lambda s: s.t, _latency_parts))
    for dim in (KV_BYTES_PER_TOKEN, KV_CACHE_BYTES):
        if dim in lim.extra:
            parts.append(("kv", lim.extra[dim], lambda s, d=dim: s.c[d], _kv_parts))
    if TOTAL_BYTES in lim.extra:
        parts.append(("total", lim.extra[TOTAL_BYTES], lambda s: s.c[TOTAL_BYTES], _total_parts))
    for label, cap, get, describe in parts:
        if _smallest(sites, get) > cap:
            limit, smallest = describe(problem, budget, sites, lim)
            raise InfeasibleBudgetError(
                f"{limit} is infeasible{_cap_note(budget)}: the smallest achievable is {smallest}",
                (label,),
            )
    bytes_first = not parts and budget.max_error is not None
    ch, status = solve_milp(sites, lim, "bytes" if bytes_first else "error")
    if ch is None:  # each limit alone is reachable, all together not
        described = [(label, *describe(problem, budget, sites, lim)) for label, *_, describe in parts]
        raise InfeasibleBudgetError(
            " together with ".join(limit for _, limit, _ in described)
            + f" is infeasible{_cap_note(budget)}, though each alone is reachable: "
            + ", ".join(f"the smallest achievable {label} is {low}" for label, _, low in described),
            tuple(label for label, *_ in described),
        )
    return done(_polish(sites, ch, lim), "milp", status)


def frontier(
    problem: BudgetProblem, fractions: Sequence[float], method: str = "auto"
) -> list[tuple[float, float, int]]:
    """``(fraction, total error, total bytes)`` of the memory budget at each fraction in (0, 1].

    Infeasible fractions are skipped. Feeds the report's error-vs-budget plot.
    """
    out = []
    for f in fractions:
        if not (0 < f <= 1):
            raise ValueError(f"frontier fractions must be in (0, 1], got {f}")
        try:
            sol = solve(problem, Budget(memory=float(f)), method)
        except InfeasibleBudgetError:
            continue
        out.append((float(f), sol.error, sol.bytes))
    return out


def _solution(
    problem: BudgetProblem,
    budget: Budget,
    sites: list[_Site],
    ch: list[int],
    solver: str,
    status: str,
    note: str = "",
) -> Solution:
    chosen = [(s, j) for s, j in zip(sites, ch) if j >= 0]
    costs: dict[str, int] = {}
    covered: dict[str, str] = {}
    for s, j in chosen:
        for dim, v in problem.site(s.name).options[s.idx[j]].costs.items():
            costs[dim] = costs.get(dim, 0) + v
        covered.update({c: s.name for c in s.cov[j]})
    if budget.total_bytes is not None:
        costs[TOTAL_BYTES] = costs.get(WEIGHT_BYTES, 0) + (budget.batch or 1) * costs.get(
            KV_CACHE_BYTES, 0
        )
    return Solution(
        choice={s.name: s.idx[j] for s, j in chosen},
        problem=problem,
        solver=solver,
        status=status,
        bytes=sum(int(s.b[j]) for s, j in chosen),
        error=float(sum(s.e[j] for s, j in chosen)),
        latency_s=float(sum(s.t[j] for s, j in chosen)),
        budget=budget,
        note=note,
        costs=costs,
        covered=covered,
    )


def _polish(sites: list[_Site], ch: list[int], lim: _Limits) -> list[int]:
    """Per site, move to the option with the smallest (error, bytes, index) that is no worse
    in error, bytes, (under a latency limit) latency and every other capped dimension, and
    owns the same sites: the tie rule within a site."""
    out = []
    for s, j in zip(sites, ch):
        if j < 0:  # covered by its owner's option
            out.append(j)
            continue
        ok = (s.e <= s.e[j]) & (s.b <= s.b[j])
        if lim.lat is not None:
            ok &= s.t <= s.t[j]
        for dim in lim.extra:
            ok &= s.c[dim] <= s.c[dim][j]
        if s.cov and any(s.cov):
            ok &= np.array([c == s.cov[j] for c in s.cov])
        out.append(min(np.flatnonzero(ok).tolist(), key=lambda i: (s.e[i], s.b[i], i)))
    return out
