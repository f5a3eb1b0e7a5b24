"""The exact solver behind ``slimfx.planning.solve``: a 0/1 program solved by HiGHS.

With ``x[s, j] ∈ {0, 1}`` meaning "site s takes its option j" (allowed options only)::

    minimize    Σ primary[s, j] · x[s, j]                 (error; or bytes under max_error only)
    subject to  Σ_j x[s, j] = 1                            every site s no option owns
                Σ_j x[s, j] + Σ_{(k, i) owns s} x[k, i] = 1 every owned site s (covering)
                Σ cost_d[s, j] · x[s, j] ≤ cap_d           every capped dimension d
                Σ latency_s[s, j] · x[s, j] ≤ latency_limit

An option that owns other sites carries their costs and error, so the totals stay one sum
over the chosen options; an owned site covered by its owner's option takes none of its own.
A second solve breaks ties (fewest bytes among the least-error solutions, or least error
among the fewest-bytes ones). Sites are given as ``solve._Site`` arrays (duck-typed here:
``b``, ``e``, ``t``, ``c`` per extra dimension, ``cov`` per option, ``owned``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["solve_milp", "milp_min", "MILP_TIME_LIMIT_S", "STAGE2_NODE_LIMIT"]

MILP_TIME_LIMIT_S = 60.0  # per HiGHS call; past it the best point found is returned, "feasible"
STAGE2_NODE_LIMIT = 5000  # branch-and-bound nodes for the tie refinement
_REL_TIE = 1e-9


_QUIET_LOCK = threading.Lock()
_quiet: dict[str, int] = {"depth": 0, "fd": -1, "saved": -1}


@contextlib.contextmanager
def _quiet_stdout() -> Any:
    """Silence HiGHS's C-level prints to file descriptor 1 (scipy's ``disp=False`` does not
    cover them); Python-level output is flushed first and restored afterwards.

    Solves may run on several threads at once (the report's frontier): the descriptor is
    process-wide, so the first to enter saves and redirects it and the last to leave restores
    it (a per-call save would let a later thread save the redirected descriptor and "restore"
    /dev/null for good)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured / replaced stdout: nothing to do
        yield
        return
    with _QUIET_LOCK:
        if _quiet["depth"] == 0:
            sys.stdout.flush()
            _quiet["fd"], _quiet["saved"] = fd, os.dup(fd)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                os.dup2(_quiet["saved"], _quiet["fd"])
                os.close(_quiet["saved"])


class _Model:
    """Columns, the one-per-site (or covering) rows, and per-site shifted cost vectors.

    A site that no option owns takes exactly one of its options, so shifting its values by
    their minimum changes every solution's total by the same constant (better conditioned
    rows); an owned site may take none, so its values are not shifted."""

    def __init__(self, sites: Sequence[Any]) -> None:
        from scipy.optimize import LinearConstraint
        from scipy.sparse import csr_array

        self.sites = sites
        self.sizes = [len(s.idx) for s in sites]
        self.offs = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n_var = int(self.offs[-1])
        pos = {s.name: k for k, s in enumerate(sites)}
        rows, cols = [], []
        for k, s in enumerate(sites):
            for j in range(len(s.idx)):
                col = int(self.offs[k]) + j
                rows.append(k)
                cols.append(col)
                for covered in s.cov[j]:
                    rows.append(pos[covered])
                    cols.append(col)
        matrix = csr_array((np.ones(len(rows)), (rows, cols)), shape=(len(sites), self.n_var))
        self.structure = LinearConstraint(matrix, 1, 1)

    def vector(self, values: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
        """Concatenated per-site values (shifted where allowed) and the shifted-out constant."""
        parts, base = [], 0.0
        for s, v in zip(self.sites, values):
            if s.owned or not len(v):
                parts.append(np.asarray(v))
            else:
                parts.append(v - v.min())
                base += v.min()
        return (np.concatenate(parts) if parts else np.zeros(0)), base

    def split(self, x: np.ndarray) -> list[int]:
        """Local option index per site, ``-1`` for an owned site covered by its owner."""
        out = []
        for k in range(len(self.sites)):
            block = x[self.offs[k] : self.offs[k + 1]]
            out.append(-1 if block.sum() < 0.5 else int(np.argmax(block)))
        return out

    def run(self, c: np.ndarray, extra: list, **limit: float) -> Any:
        from scipy.optimize import Bounds, milp

        options = {"mip_rel_gap": 0.0, "time_limit": MILP_TIME_LIMIT_S, "presolve": True}
        with _quiet_stdout():
            return milp(
                c,
                integrality=np.ones(self.n_var),
                bounds=Bounds(0, 1),
                constraints=[self.structure, *extra],
                options={**options, **limit},
            )


def _total(sites: Sequence[Any], ch: list[int], get: Any) -> float:
    return float(sum(get(s)[j] for s, j in zip(sites, ch) if j >= 0))


def milp_min(sites: Sequence[Any], get: Any) -> float:
    """The smallest achievable total of ``get(site)`` (an array per site) over every choice
    that honours the covering rows, limits ignored."""
    m = _Model(sites)
    vec, base = m.vector([get(s).astype(np.float64) for s in sites])
    scale = float(np.abs(vec).max()) or 1.0
    res = m.run(vec / scale, [])
    if res.x is None:
        raise RuntimeError(f"HiGHS: {res.message}")
    return _total(sites, m.split(res.x), get)


def solve_milp(
    sites: Sequence[Any], lim: Any, primary: str = "error"
) -> tuple[list[int] | None, str]:
    """Lexicographic MILP. ``primary="error"``: least error, then fewest bytes at that error;
    ``"bytes"``: fewest bytes, then least error. ``None`` when the limits are infeasible."""
    from scipy.optimize import LinearConstraint

    m = _Model(sites)
    e, _ = m.vector([s.e for s in sites])
    e_scale = float(e.max()) if len(e) else 0.0
    e_scale = e_scale or 1.0
    b, b_base = m.vector([s.b for s in sites])
    b = b.astype(np.int64)
    g = int(np.gcd.reduce(b)) if b.any() else 1
    t, t_base = m.vector([s.t for s in sites])
    t_scale = float(t.max()) if len(t) else 0.0
    t_scale = t_scale or 1.0

    # integer dimensions: weight bytes, then every extra capped dimension
    ints: list[tuple[str, np.ndarray, int, int]] = []  # (name, units, gcd, rhs in units)
    if lim.cap is not None:
        ints.append(("bytes", b // g, g, (lim.cap - int(b_base)) // g))
    for dim, cap in lim.extra.items():
        v, base = m.vector([s.c[dim] for s in sites])
        v = v.astype(np.int64)
        gd = int(np.gcd.reduce(v)) if v.any() else 1
        ints.append((dim, v // gd, gd, (cap - int(base)) // gd))
    lat_rhs = None if lim.lat is None else max(lim.lat - t_base, 0.0) / t_scale

    def rows(rhs: dict[str, int], lat_rhs: float | None) -> list:
        out = [
            LinearConstraint(u[None, :].astype(np.float64), -np.inf, rhs[name])
            for name, u, _, _ in ints
        ]
        if lat_rhs is not None:
            out.append(LinearConstraint((t / t_scale)[None, :], -np.inf, lat_rhs))
        return out

    def totals(ch: list[int]) -> dict[str, float]:
        out = {"bytes": _total(sites, ch, lambda s: s.b)}
        out.update({d: _total(sites, ch, lambda s, d=d: s.c[d]) for d in lim.extra})
        return out

    first_c = e / e_scale * 1e3 if primary == "error" else (b // g).astype(np.float64)
    rhs = {name: r for name, _, _, r in ints}
    caps = {"bytes": lim.cap, **lim.extra}
    ch1: list[int] | None = None
    status = "optimal"
    # Re-solve with a tighter row if rounding the binaries broke a limit (HiGHS accepts a row
    # violated within its feasibility tolerance).
    for attempt in range(4):
        res = m.run(first_c, rows(rhs, lat_rhs))
        if res.status == 2:
            if attempt == 0:
                return None, "infeasible"
            raise RuntimeError("HiGHS: tightening a rounded-off limit made the problem infeasible")
        if res.x is None:
            raise RuntimeError(f"HiGHS: {res.message}")
        ch = m.split(res.x)
        if lim.fits(sites, ch):
            ch1, status = ch, ("optimal" if res.status == 0 else "feasible")
            break
        tot = totals(ch)
        for name, _, gd, _ in ints:
            if tot[name] > caps[name]:
                rhs[name] -= -(-(int(tot[name]) - caps[name]) // gd)
        tt = _total(sites, ch, lambda s: s.t)
        if lat_rhs is not None and lim.lat is not None and tt > lim.lat:
            lat_rhs -= (tt - lim.lat) / t_scale * 1.001
    if ch1 is None:
        raise RuntimeError("HiGHS solutions kept violating the limits after rounding")

    def err(ch: list[int]) -> float:
        return _total(sites, ch, lambda s: s.e)

    def nbytes(ch: list[int]) -> float:
        return _total(sites, ch, lambda s: s.b)

    # Stage 2: the tie rule. A node limit, not a time limit, bounds this refinement: the
    # result stays the same whatever the machine's load.
    if primary == "error":
        e1 = err(ch1)
        tie = _REL_TIE * abs(e1)
        e_shift = e1 - float(sum(s.e.min() for s in sites if not s.owned))
        row = LinearConstraint(
            (e / e_scale)[None, :], -np.inf, e_shift / e_scale + max(tie / e_scale, 1e-12)
        )
        second_c = (b // g).astype(np.float64)
    else:
        b1 = nbytes(ch1)
        row = LinearConstraint((b // g)[None, :].astype(np.float64), -np.inf, (b1 - b_base) // g)
        second_c = e / e_scale * 1e3
    try:
        res = m.run(second_c, [*rows(rhs, lat_rhs), row], node_limit=STAGE2_NODE_LIMIT)
    except Exception:  # noqa: BLE001 — stage 2 only refines a tie; stage 1 stands
        return ch1, status
    if res.x is not None:
        ch2 = m.split(res.x)
        if lim.fits(sites, ch2):
            if primary == "error":
                better = err(ch2) <= err(ch1) + _REL_TIE * abs(err(ch1)) + 1e-12 * e_scale
                if better and nbytes(ch2) < nbytes(ch1):
                    return ch2, status
            elif nbytes(ch2) <= nbytes(ch1) and err(ch2) < err(ch1):
                return ch2, status
    return ch1, status
