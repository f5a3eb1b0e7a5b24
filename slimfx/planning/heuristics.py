"""The two approximate solvers behind ``slimfx.planning.solve`` (see its docstring): an
exact-bytes dynamic program for a memory limit and a lower-hull greedy for memory and latency.
Both take the solver's per-site arrays (``solve._Site``) and pick exactly one option per site:
problems with ownership or other budget dimensions never reach them (``solve`` refuses).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["solve_dp", "solve_greedy"]

_REL_TIE = 1e-9  # two error totals within this relative distance are a tie


# ---------------------------------------------------------------------------------------------
# DP


def solve_dp(sites: list[Any], cap: int, max_cells: int) -> tuple[list[int], str]:
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
    if (n + 1) * (room + 1) > max_cells:
        # Coarsen: round every option's units UP to a quantum q, so Σ ceil(u/q) ≤ room // q
        # implies Σ u ≤ room. Each site's smallest option stays at 0: never loses feasibility.
        per_row = max(max_cells // (n + 1) - 1, 1)
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


def solve_greedy(sites: list[Any], lim: Any, start: list[int]) -> tuple[list[int], str]:
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
