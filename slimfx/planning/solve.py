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
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimfx.planning.configs import Decision
from slimfx.planning.plan import Plan
from slimfx.planning.problem import (
    Budget,
    BudgetProblem,
    InfeasibleBudgetError,
    Option,
    allowed,
)

__all__ = ["Solution", "solve", "frontier", "METHODS", "DP_MAX_CELLS", "MILP_TIME_LIMIT_S"]

METHODS = ("auto", "milp", "dp", "greedy")
DP_MAX_CELLS = 5_000_000  # float64 table cells (40 MB) before the DP coarsens bytes
MILP_TIME_LIMIT_S = 60.0  # per HiGHS call; past it the best point found is returned, "feasible"
STAGE2_NODE_LIMIT = 5000  # branch-and-bound nodes for the fewest-bytes tie refinement
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

    def option(self, name: str) -> Option:
        """The chosen Option of site ``name``."""
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
        shapes: dict[str, tuple[int, int]] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Plan:
        """A Plan of the chosen decisions; ``meta`` is merged over the solver's provenance."""
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
        prov.update(meta or {})
        decisions = {s.name: s.options[self.choice[s.name]].decision for s in self.problem.sites}
        return Plan(decisions, dict(shapes or {}), prov)

    def summary(self) -> str:
        """A few lines: totals against dense, then one line per site."""
        p = self.problem
        rewritten = sum(1 for s in p.sites if self.decision(s.name).kind != "dense")
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
    """One site's allowed options as arrays; ``idx[j]`` is the index into ``site.options``."""

    name: str
    idx: list[int]
    b: np.ndarray  # int64 bytes
    e: np.ndarray  # float64 error
    t: np.ndarray  # float64 latency seconds

    def best(self, key: str) -> int:
        """Local index minimizing (error, bytes, index) or (bytes, error, index)."""
        a, b = (self.e, self.b) if key == "error" else (self.b, self.e)
        return min(range(len(self.idx)), key=lambda j: (a[j], b[j], j))


@dataclass
class _Limits:
    """The budget's limits in problem units; ``fits`` checks a choice against them."""

    cap: int | None  # integer byte limit
    lat: float | None  # latency limit, seconds (slack included)
    mem_raw: float | None = None  # the limits as the budget states them
    lat_raw: float | None = None

    def fits(self, sites: list[_Site], ch: list[int]) -> bool:
        if self.cap is not None and sum(int(s.b[j]) for s, j in zip(sites, ch)) > self.cap:
            return False
        return self.lat is None or float(sum(s.t[j] for s, j in zip(sites, ch))) <= self.lat


def _arrays(problem: BudgetProblem, max_error: float | None) -> list[_Site]:
    out = []
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
            )
        )
    return out


def _limits(problem: BudgetProblem, budget: Budget) -> _Limits:
    mem = budget.memory_bytes(problem.dense_bytes)
    cap = None if mem is None else math.floor(mem * (1 + 1e-12))  # 0.57·100 is 56.999…
    lat_raw = None if budget.latency is None else budget.latency * problem.dense_latency_s
    lat = None if lat_raw is None else lat_raw * (1 + _LAT_REL)
    return _Limits(cap, lat, mem, lat_raw)


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


def _memory_parts(problem: BudgetProblem, budget: Budget, lim: _Limits) -> tuple[str, str]:
    """("memory budget 0.100 (1.2 MB)", "0.187 of dense (2.2 MB, 3.0 bits/weight)")."""
    dense = problem.dense_bytes
    limit = lim.mem_raw or 0.0
    bits = f"{budget.bits:g} bits/weight = " if budget.bits is not None else ""
    smallest = problem.min_bytes(budget.max_error)
    f = _frac(smallest, dense)
    return (
        f"memory budget {bits}{_frac(limit, dense):.3f} ({_fmt_bytes(limit)})",
        f"{f:.3f} of dense ({_fmt_bytes(smallest)}, {16 * f:.1f} bits/weight)",
    )


def _latency_parts(
    problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits
) -> tuple[str, str]:
    """("latency budget 0.500 (1.2 ms)", "0.620 of dense (1.5 ms)")."""
    smallest = float(sum(s.t.min() for s in sites))
    return (
        f"latency budget {budget.latency:.3f} ({(lim.lat_raw or 0.0) * 1e3:.4g} ms)",
        f"{_frac(smallest, problem.dense_latency_s):.3f} of dense ({smallest * 1e3:.4g} ms)",
    )


def _memory_message(problem: BudgetProblem, budget: Budget, lim: _Limits) -> str:
    limit, smallest = _memory_parts(problem, budget, lim)
    return f"{limit} is infeasible{_cap_note(budget)}: the smallest achievable is {smallest}"


def _latency_message(
    problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits
) -> str:
    limit, smallest = _latency_parts(problem, budget, sites, lim)
    return f"{limit} is infeasible{_cap_note(budget)}: the smallest achievable is {smallest}"


def _joint_message(problem: BudgetProblem, budget: Budget, sites: list[_Site], lim: _Limits) -> str:
    mem, mem_min = _memory_parts(problem, budget, lim)
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
    smallest achievable), ``ValueError`` for an unknown method or ``dp`` with a latency limit.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    budget = Budget.of(budget)
    lim = _limits(problem, budget)
    if method == "dp" and lim.lat is not None:
        raise ValueError("method 'dp' handles a memory limit only; use 'milp' for latency")
    sites = _arrays(problem, budget.max_error)
    name = "milp" if method == "auto" else method

    def done(ch: list[int], solver: str, status: str, note: str = "") -> Solution:
        return _solution(problem, budget, sites, ch, solver, status, note)

    if lim.cap is None and lim.lat is None:  # separable: each site alone
        key = "bytes" if budget.max_error is not None else "error"
        return done([s.best(key) for s in sites], name, "optimal")

    start = [s.best("error") for s in sites]
    if lim.fits(sites, start):  # the unconstrained optimum already fits
        return done(start, name, "optimal")
    if lim.cap is not None and sum(int(s.b.min()) for s in sites) > lim.cap:
        raise InfeasibleBudgetError(_memory_message(problem, budget, lim))
    if lim.lat is not None and float(sum(s.t.min() for s in sites)) > lim.lat:
        raise InfeasibleBudgetError(_latency_message(problem, budget, sites, lim))

    if method == "dp":
        ch, status = _solve_dp(sites, lim.cap)  # type: ignore[arg-type]
        return done(_polish(sites, ch, lim), "dp", status)
    if method == "greedy":
        ch, status = _solve_greedy(sites, lim, start)
        return done(_polish(sites, ch, lim), "greedy", status)
    try:
        ch, status = _solve_milp(sites, lim)
    except InfeasibleBudgetError:
        raise
    except Exception as exc:  # noqa: BLE001 — auto falls back on any solver failure
        if method == "milp":
            raise
        ch, status = _solve_greedy(sites, lim, start)
        note = f"milp unavailable or failed ({type(exc).__name__}: {exc}); greedy used"
        return done(_polish(sites, ch, lim), "greedy", status, note)
    if ch is None:  # proven infeasible: each limit alone is reachable, both together not
        raise InfeasibleBudgetError(_joint_message(problem, budget, sites, lim))
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
    return Solution(
        choice={s.name: s.idx[j] for s, j in zip(sites, ch)},
        problem=problem,
        solver=solver,
        status=status,
        bytes=sum(int(s.b[j]) for s, j in zip(sites, ch)),
        error=float(sum(s.e[j] for s, j in zip(sites, ch))),
        latency_s=float(sum(s.t[j] for s, j in zip(sites, ch))),
        budget=budget,
        note=note,
    )


def _polish(sites: list[_Site], ch: list[int], lim: _Limits) -> list[int]:
    """Per site, move to the option with the smallest (error, bytes, index) that is no worse
    in error, bytes and (under a latency limit) latency: the tie rule within a site."""
    out = []
    for s, j in zip(sites, ch):
        ok = (s.e <= s.e[j]) & (s.b <= s.b[j])
        if lim.lat is not None:
            ok &= s.t <= s.t[j]
        out.append(min(np.flatnonzero(ok).tolist(), key=lambda i: (s.e[i], s.b[i], i)))
    return out


# ---------------------------------------------------------------------------------------------
# MILP


@contextlib.contextmanager
def _quiet_stdout() -> Any:
    """Silence HiGHS's C-level prints to file descriptor 1 (scipy's ``disp=False`` does not
    cover them); Python-level output is flushed first and restored afterwards."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured / replaced stdout: nothing to do
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _solve_milp(sites: list[_Site], lim: _Limits) -> tuple[list[int] | None, str]:
    """Lexicographic MILP: min error, then min bytes at that error. ``None`` if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    sizes = [len(s.idx) for s in sites]
    offs = np.concatenate([[0], np.cumsum(sizes)])
    n_var = int(offs[-1])
    cols = np.arange(n_var)

    # Shift each site by its smallest value (exactly one option per site: a constant).
    e = np.concatenate([s.e - s.e.min() for s in sites])
    e_base = float(sum(s.e.min() for s in sites))
    e_scale = float(e.max()) or 1.0
    b = np.concatenate([s.b - s.b.min() for s in sites])
    b_base = int(sum(int(s.b.min()) for s in sites))
    g = int(np.gcd.reduce(b)) if b.any() else 1
    t = np.concatenate([s.t - s.t.min() for s in sites])
    t_base = float(sum(s.t.min() for s in sites))
    t_scale = float(t.max()) or 1.0

    rows = np.repeat(np.arange(len(sites)), sizes)
    one_each = LinearConstraint(csr_array((np.ones(n_var), (rows, cols))), 1, 1)

    def split(x: np.ndarray) -> list[int]:
        return [int(np.argmax(x[offs[k] : offs[k + 1]])) for k in range(len(sites))]

    def run(c: np.ndarray, extra: list[LinearConstraint], **limit: float) -> Any:
        options = {"mip_rel_gap": 0.0, "time_limit": MILP_TIME_LIMIT_S, "presolve": True}
        with _quiet_stdout():
            return milp(
                c,
                integrality=np.ones(n_var),
                bounds=Bounds(0, 1),
                constraints=[one_each, *extra],
                options={**options, **limit},
            )

    mem_rhs = None if lim.cap is None else (lim.cap - b_base) // g
    lat_rhs = None if lim.lat is None else max(lim.lat - t_base, 0.0) / t_scale

    def limits(mem_rhs: int | None, lat_rhs: float | None) -> list[LinearConstraint]:
        out = []
        if mem_rhs is not None:
            out.append(LinearConstraint((b // g)[None, :].astype(np.float64), -np.inf, mem_rhs))
        if lat_rhs is not None:
            out.append(LinearConstraint((t / t_scale)[None, :], -np.inf, lat_rhs))
        return out

    # Stage 1: minimize error. Re-solve with a tighter row if rounding the binaries broke a
    # limit (HiGHS accepts a row violated within its feasibility tolerance).
    ch1: list[int] | None = None
    status = "optimal"
    for attempt in range(4):
        res = run(e / e_scale * 1e3, limits(mem_rhs, lat_rhs))
        if res.status == 2:
            if attempt == 0:
                return None, "infeasible"
            raise RuntimeError("HiGHS: tightening a rounded-off limit made the problem infeasible")
        if res.x is None:
            raise RuntimeError(f"HiGHS: {res.message}")
        ch = split(res.x)
        if lim.fits(sites, ch):
            ch1, status = ch, ("optimal" if res.status == 0 else "feasible")
            break
        tb = sum(int(s.b[j]) for s, j in zip(sites, ch))
        tt = float(sum(s.t[j] for s, j in zip(sites, ch)))
        if mem_rhs is not None and lim.cap is not None and tb > lim.cap:
            mem_rhs -= -(-(tb - lim.cap) // g)
        if lat_rhs is not None and lim.lat is not None and tt > lim.lat:
            lat_rhs -= (tt - lim.lat) / t_scale * 1.001
    if ch1 is None:
        raise RuntimeError("HiGHS solutions kept violating the limits after rounding")

    def err(ch: list[int]) -> float:
        return float(sum(s.e[j] for s, j in zip(sites, ch)))

    def nbytes(ch: list[int]) -> int:
        return sum(int(s.b[j]) for s, j in zip(sites, ch))

    # Stage 2: among solutions of that error, fewest bytes (the tie rule).
    e1 = err(ch1)
    tie = _REL_TIE * abs(e1)
    e1_shift = (e1 - e_base) / e_scale
    row = LinearConstraint((e / e_scale)[None, :], -np.inf, e1_shift + max(tie / e_scale, 1e-12))
    try:
        # A node limit, not a time limit, bounds this refinement: the result stays the same
        # whatever the machine's load.
        res = run(b // g, [*limits(mem_rhs, lat_rhs), row], node_limit=STAGE2_NODE_LIMIT)
    except Exception:  # noqa: BLE001 — stage 2 only refines a tie; stage 1 stands
        return ch1, status
    if res.x is not None:
        ch2 = split(res.x)
        ok = lim.fits(sites, ch2) and err(ch2) <= e1 + tie + 1e-12 * e_scale
        if ok and nbytes(ch2) < nbytes(ch1):
            return ch2, status
    return ch1, status


# ---------------------------------------------------------------------------------------------
# DP


def _solve_dp(sites: list[_Site], cap: int) -> tuple[list[int], str]:
    """Exact-bytes DP: G[k, u] = least error of sites k.. using exactly u byte units."""
    base = sum(int(s.b.min()) for s in sites)
    shifted = [s.b - s.b.min() for s in sites]
    allb = np.concatenate(shifted) if shifted else np.zeros(0, np.int64)
    g = int(np.gcd.reduce(allb)) if allb.any() else 1
    units = [sh // g for sh in shifted]
    room = (cap - base) // g
    room = min(room, int(sum(int(u.max()) for u in units)))
    n = len(sites)
    status = "optimal"
    if (n + 1) * (room + 1) > DP_MAX_CELLS:
        # Coarsen: round every option's units UP to a quantum q, so Σ ceil(u/q) ≤ room // q
        # implies Σ u ≤ room. Each site's smallest option stays at 0: never loses feasibility.
        per_row = max(DP_MAX_CELLS // (n + 1) - 1, 1)
        q = -(-room // per_row)
        units = [-(-u // q) for u in units]
        room = min(room // q, int(sum(int(u.max()) for u in units)))
        status = "feasible"

    G = np.full((n + 1, room + 1), np.inf)
    G[n, 0] = 0.0
    for k in range(n - 1, -1, -1):
        row = G[k]
        for j, u in enumerate(units[k].tolist()):
            if u > room:
                continue
            np.minimum(row[u:], sites[k].e[j] + G[k + 1, : room + 1 - u], out=row[u:])
    best = float(G[0].min())
    rem = int(np.flatnonzero(G[0] <= best + _REL_TIE * abs(best))[0])  # ties: fewer bytes
    ch = []
    for k in range(n):
        target = G[k, rem]
        for j, u in enumerate(units[k].tolist()):  # ties: lowest index first
            if u <= rem:
                v = sites[k].e[j] + G[k + 1, rem - u]
                if np.isfinite(v) and v <= target + _REL_TIE * abs(target):
                    ch.append(j)
                    rem -= u
                    break
        else:  # pragma: no cover — G[k, rem] is finite by construction
            raise AssertionError("DP reconstruction failed")
    return ch, status


# ---------------------------------------------------------------------------------------------
# Greedy


def _solve_greedy(sites: list[_Site], lim: _Limits, start: list[int]) -> tuple[list[int], str]:
    """Downgrade along each site's lower hull of (resource, error) until within limits.

    A move on the violated resource (memory first) must lower it; under both limits it must
    also not raise the other resource on that site while the other is violated, and keep the
    other's total within its limit once it is met, so each phase strictly decreases one
    resource and the loop ends. When no such move exists, moves that shrink the summed
    relative violation are taken instead.
    """
    n = len(sites)
    sizes = [len(s.idx) for s in sites]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    site_of = np.repeat(np.arange(n), sizes)
    local = np.concatenate([np.arange(k) for k in sizes]) if n else np.zeros(0, np.int64)
    B = np.concatenate([s.b for s in sites]).astype(np.float64) if n else np.zeros(0)
    E = np.concatenate([s.e for s in sites]) if n else np.zeros(0)
    T = np.concatenate([s.t for s in sites]) if n else np.zeros(0)
    cur = offs[:-1] + np.asarray(start, dtype=np.int64)
    cap, lat = lim.cap, lim.lat
    moves = 0

    def violation(tb: np.ndarray | float, tt: np.ndarray | float) -> np.ndarray | float:
        v = 0.0
        if cap is not None:
            v = v + np.maximum(tb - cap, 0.0) / max(cap, 1)
        if lat is not None:
            v = v + np.maximum(tt - lat, 0.0) / max(lat, 1e-300)
        return v

    while True:
        tb = float(B[cur].sum())
        tt = float(T[cur].sum())
        mem_bad = cap is not None and tb > cap
        lat_bad = lat is not None and tt > lat
        if not (mem_bad or lat_bad):
            break
        c = cur[site_of]
        dB, dE, dT = B - B[c], E - E[c], T - T[c]
        pick = None
        for res in ("mem", "lat"):
            if (res == "mem" and not mem_bad) or (res == "lat" and not lat_bad):
                continue
            d_own, d_other = (dB, dT) if res == "mem" else (dT, dB)
            other_lim, other_tot, other_bad = (
                (lat, tt, lat_bad) if res == "mem" else (cap, tb, mem_bad)
            )
            ok = d_own < 0
            if other_lim is not None:
                ok &= (d_other <= 0) if other_bad else (other_tot + d_other <= other_lim)
            if ok.any():
                gain = -d_own
                pick = (ok, gain)
                break
        if pick is None:  # no clean move: shrink the summed relative violation
            gain = violation(tb, tt) - violation(tb + dB, tt + dT)
            ok = gain > 1e-15
            if not ok.any():
                raise RuntimeError(
                    "greedy is stuck short of the memory and latency limits together; "
                    "use method='milp' (exact)"
                )
            pick = (ok, gain)
        ok, gain = pick
        cand = np.flatnonzero(ok)
        slope = dE[cand] / gain[cand]
        # smallest Δerror per unit saved; then the nearest hull vertex; then site, option
        order = np.lexsort((local[cand], site_of[cand], gain[cand], slope))
        m = int(cand[order[0]])
        cur[site_of[m]] = m
        moves += 1
    ch = (cur - offs[:-1]).tolist()
    return ch, ("optimal" if moves == 0 else "feasible")
