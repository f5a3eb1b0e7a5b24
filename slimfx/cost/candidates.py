"""Candidate generation and the budget problem.

For each site the problem builder offers the dense form (error 0) plus what each enabled
family proposes, and prices every option:

- ``bytes``: ``decision.weight_bytes(shape)`` (reference bytes: 16-bit floats, true integer
  widths). A *tied* site (its weight is also, say, the input embedding) keeps the tie only
  when dense: any other form leaves the other module a dense copy, so its 2·in·out bytes are
  added to every non-dense option.
- ``error``: the family's relative output error tr(E G Eᵀ)/tr(W G Wᵀ) times the site's
  sensitivity (1 without Fisher statistics) — the weight of the option's decision kind when
  the statistics carry per-kind weights (``CalibrationStats.sensitivity_for``).
- ``flops``, ``latency_s`` / ``source``: for the workload, measured when the cache has the
  entry, roofline otherwise (``slimfx.cost.target``).

The ``lowrank`` family: ranks on a ladder whose byte fractions of dense are
0.05, 0.10, …, 0.90 (r = ⌊f·in·out/(in+out)⌋, deduplicated, 1 ≤ r and r·(in+out) < in·out),
for the ``whitened`` method with a Gram and plain ``svd`` without one. Plain SVD is not
offered next to whitened: at every rank the whitened truncation *minimizes* the output error
tr(E G Eᵀ) the candidates are priced by (Eckart–Young on W L), so a plain-SVD option of the
same rank and bytes is never better and the solver would never pick it. Errors come from one
eigen-decomposition per site (``numerics.lowrank.lowrank_error_curve``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from slimfx.cost.attention_price import attention_latency
from slimfx.cost.calibration import CalibrationStats
from slimfx.cost.families import Candidate, SiteContext, family, family_names
from slimfx.cost.target import (
    MeasuredCache,
    Target,
    Workload,
    attention_work,
    latency,
    target_of,
    workload_of,
)
from slimfx.ir.sites import LinearSite
from slimfx.numerics.lowrank import lowrank_error_curve, max_useful_rank
from slimfx.planning.configs import Decision, DenseConfig, LowRankConfig
from slimfx.planning.problem import BudgetProblem, Option, SiteOptions
from slimfx.planning.shapes import LinearShape
from slimfx.pool import site_pool

__all__ = [
    "LOWRANK_FRACTIONS",
    "lowrank_ranks",
    "lowrank_candidates",
    "timed_lowrank",
    "build_problem",
    "reprice",
    "time_attention_site",
]

#: byte fractions of dense the low-rank ladder aims at.
LOWRANK_FRACTIONS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 19))


def lowrank_ranks(
    in_f: int, out_f: int, fractions: Sequence[float] = LOWRANK_FRACTIONS
) -> list[int]:
    """Ranks whose bytes are at most each fraction of dense, ascending and deduplicated,
    keeping only ranks that save bytes (1 ≤ r, r·(in+out) < in·out)."""
    rmax = max_useful_rank(in_f, out_f)
    ranks = {int(f * in_f * out_f // (in_f + out_f)) for f in fractions}
    return sorted(r for r in ranks if 1 <= r <= rmax)


def lowrank_candidates(ctx: SiteContext) -> list[Candidate]:
    """Low-rank candidates of one site, ranks ascending: whitened with a Gram (it dominates
    plain SVD in the error it is priced by), plain SVD without one."""
    out_f, in_f = ctx.weight.shape
    ranks = lowrank_ranks(in_f, out_f)
    if not ranks:
        return []
    dense = 2 * in_f * out_f
    methods = ("whitened",) if ctx.gram is not None else ("svd",)
    found: list[Candidate] = []
    for method in methods:
        curve = lowrank_error_curve(ctx.weight, ctx.gram, method)
        for r in ranks:
            d = LowRankConfig(rank=r, method=method)
            frac = d.weight_bytes(ctx.shape) / dense
            found.append(Candidate(d, float(curve[r]), f"{frac:.2f} of dense bytes"))
    return found


def timed_lowrank(in_f: int, out_f: int) -> list[Decision]:
    """The low-rank layouts ``calibrate-target`` times by default: the family's rank ladder."""
    return [LowRankConfig(r) for r in lowrank_ranks(in_f, out_f)]


def _weight_of(weights: Mapping[str, Tensor], site: LinearSite) -> Tensor:
    """The site's weight by module FQN, weight FQN, or a tied alias (``named_parameters``
    lists a tied tensor once, under whichever name came first)."""
    keys = (site.fqn, site.weight, *site.tied)
    for key in keys:
        if key in weights:
            return weights[key]
    raise KeyError(f"no weight for site {site.fqn!r} (looked up {', '.join(map(repr, keys))})")


def _option(
    decision: Decision,
    error: float,
    site: LinearSite,
    tgt: Target,
    wl: Workload,
    cache: MeasuredCache | None,
    sources: Counter[str],
) -> Option:
    """One priced option; a tied site pays the dense copy the other module keeps."""
    in_f, out_f = site.in_features, site.out_features
    extra = 2 * in_f * out_f if site.tied and not isinstance(decision, DenseConfig) else 0
    return Option(
        decision,
        bytes=decision.weight_bytes(LinearShape(in_f, out_f)) + extra,
        error=error,
        **_timing(decision, site, tgt, wl, cache, sources),
    )


def _timing(
    decision: Decision,
    site: LinearSite,
    tgt: Target,
    wl: Workload,
    cache: MeasuredCache | None,
    sources: Counter[str],
) -> dict[str, Any]:
    """An option's ``flops``, ``latency_s`` and ``source`` for the workload (measured when the
    cache has the entry, roofline otherwise); ``sources`` counts where latencies came from."""
    secs, src = latency(decision, site, tgt, wl, cache)
    sources[src] += 1
    flops = decision.flops(LinearShape(site.in_features, site.out_features), wl.tokens)
    return {"flops": flops, "latency_s": secs, "source": src}


def build_problem(
    sites: Sequence[LinearSite],
    weights: Mapping[str, Tensor],
    stats: CalibrationStats | None,
    *,
    target: str | Target = "cpu",
    workload: str | Workload = "decode",
    families: Sequence[str] = ("lowrank",),
    cache: MeasuredCache | None = None,
    progress: bool = True,
    allow: Callable[[LinearSite, Decision], bool] | None = None,
    family_seconds: dict[str, float] | None = None,
    workers: int | None = None,
) -> tuple[BudgetProblem, dict[str, list[Candidate]]]:
    """The numbers-only :class:`BudgetProblem` and, per site FQN, the families' candidates.

    ``weights``: site FQN (or weight FQN, or a tied alias) → dense weight (out × in). ``stats``: Gram matrices
    (and sensitivity) from calibration; ``None`` prices errors in the weight's Frobenius norm.
    Sites and options come in a deterministic order: sites as given, dense first, then each
    family's candidates in the family's order (a decision proposed twice is kept once; one
    that saves no weight bytes over dense is dropped). ``allow(site, decision)``: when given,
    only candidates it accepts are offered (e.g. what a backend can run; dense always is);
    ``meta["not_allowed"]`` counts the others. ``family_seconds``: when given, each family's
    seconds over all sites are added to it (family name → seconds, summed over workers).
    ``workers``: sites fitted at once, each on one thread (``slimfx.pool.site_pool``; default:
    torch's intra-op thread count) — the same numbers as a one-thread run, in site order.
    """
    known = family_names()
    unknown = [f for f in families if f not in known]
    if unknown:
        raise ValueError(
            f"unknown candidate famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
            f"registered: {sorted(known)}"
        )
    tgt, wl = target_of(target), workload_of(workload)
    site_opts: list[SiteOptions] = []
    proposed: dict[str, list[Candidate]] = {}
    sources: Counter[str] = Counter()
    not_allowed = 0
    fam_seconds = family_seconds if family_seconds is not None else {}
    sites = list(sites)
    for site in sites:  # every shape checked before any fit runs
        W = _weight_of(weights, site)
        if tuple(W.shape) != site.shape:
            raise ValueError(
                f"weight of {site.fqn!r} has shape {tuple(W.shape)}, site says {site.shape}"
            )

    fit = stats.group_fit_grams() if stats is not None else None

    def propose(site: LinearSite) -> list[tuple[str, list[Candidate], float]]:
        # the sites of one group share one Gram object: its GPTQ factor is cached by identity
        gram = fit(site.fqn) if fit is not None else None
        ctx = SiteContext(site, _weight_of(weights, site), gram, wl.name, tuple(families))
        found = []
        for fam in families:
            t0 = time.perf_counter()
            found.append((fam, family(fam)(ctx), time.perf_counter() - t0))
        return found

    bar = tqdm(total=len(sites), desc="candidates", unit="site", disable=not progress,
               leave=False)
    by_group = (lambda s: stats.group_of(s.fqn)) if stats is not None else None
    proposals_in_order = site_pool(propose, sites, workers, key=by_group)
    for site, proposals in zip(sites, proposals_in_order, strict=True):
        bar.update()
        in_f, out_f = site.in_features, site.out_features
        sens = stats.sensitivity_of(site.fqn) if stats is not None else 1.0
        shape = LinearShape(in_f, out_f)

        def option(
            decision: Decision, error: float, weight: float | None = None, site: LinearSite = site
        ) -> Option:
            o = _option(decision, error, site, tgt, wl, cache, sources)
            return o if weight is None else dataclasses.replace(o, weight=weight)

        dense = option(DenseConfig(), 0.0)
        options, seen, cands = [dense], {DenseConfig()}, []
        for fam, found, secs in proposals:
            fam_seconds[fam] = fam_seconds.get(fam, 0.0) + secs
            for c in found:
                if c.decision in seen or c.decision.weight_bytes(shape) >= 2 * in_f * out_f:
                    continue  # proposed twice, or saves no bytes
                seen.add(c.decision)
                if allow is not None and not allow(site, c.decision):
                    not_allowed += 1
                    continue
                cands.append(c)
                w = stats.sensitivity_for(site.fqn, c.decision.kind) if stats is not None else 1.0
                own = None if w == sens else float(w)  # a per-kind weight differs
                options.append(option(c.decision, max(0.0, float(c.error)) * w, own))
        proposed[site.fqn] = cands
        site_opts.append(
            SiteOptions(site.fqn, options, 2 * in_f * out_f, dense.latency_s, float(sens))
        )
    bar.close()
    meta = {
        "families": list(families),
        "calibrated": stats is not None,
        "sensitivity": bool(stats is not None and stats.sensitivity is not None),
        "tokens": wl.tokens,
        "latency_sources": dict(sorted(sources.items())),
        "not_allowed": not_allowed,
    }
    return BudgetProblem(site_opts, workload=wl.name, target=tgt.name, meta=meta), proposed


def time_attention_site(
    so: SiteOptions,
    target: str | Target,
    workload: str | Workload,
    context: int,
    batch: int,
    cache: MeasuredCache | None = None,
) -> SiteOptions:
    """An attention site's options with their ``latency_s`` / ``flops``: one attention step of
    ``workload`` for ``batch`` sequences at ``context`` cached tokens — measured where ``cache``
    holds the step (:func:`~slimfx.cost.attention_price.attention_latency`), else the roofline
    (:func:`~slimfx.cost.target.estimate_attention_latency`); the 16-bit cache's is the site's
    dense latency."""
    tgt, wl = target_of(target), workload_of(workload)
    opts = []
    for o in so.options:
        work = attention_work(o.decision, so.shape, tgt, wl, context)
        secs, src = attention_latency(o.decision, so.shape, tgt, wl, context, batch, cache, work)
        opts.append(dataclasses.replace(o, latency_s=secs, flops=batch * work.flops, source=src))
    dense = next(o for o in opts if o.decision.kind == "kv_dense")
    return dataclasses.replace(so, options=opts, dense_latency_s=dense.latency_s)


def reprice(
    problem: BudgetProblem,
    sites: Sequence[LinearSite],
    *,
    target: str | Target,
    workload: str | Workload | None = None,
    cache: MeasuredCache | None = None,
) -> BudgetProblem:
    """``problem`` with every option's latency (and FLOPs) priced again for ``target`` /
    ``workload`` (default: the problem's) from ``cache`` where it has the entry, the roofline
    otherwise — bytes and errors unchanged, so new measurements or another deployment target
    need no new candidates. ``sites``: the problem's linear sites (shapes), by FQN; attention
    sites (KV-cache, MLA options) are priced from their own shapes (measured steps in
    ``cache``, else the roofline: :func:`time_attention_site`) at the context and batch the
    problem was priced for (``meta["kv_context"]`` /
    ``meta["kv_batch"]``)."""
    tgt = target_of(target)
    wl = workload_of(problem.workload if workload is None else workload)
    by_name = {s.fqn: s for s in sites}
    missing = [
        so.name for so in problem.sites if so.kind != "attention" and so.name not in by_name
    ]
    if missing:
        raise KeyError(f"no site for {len(missing)} problem site(s), e.g. {missing[0]!r}")
    sources: Counter[str] = Counter()
    new_sites = []
    ctx = problem.meta.get("kv_context") or wl.tokens
    batch = problem.meta.get("kv_batch") or 1
    for so in problem.sites:
        if so.kind == "attention":
            timed = time_attention_site(so, tgt, wl, ctx, batch, cache)
            sources.update(o.source for o in timed.options)
            new_sites.append(timed)
            continue
        site = by_name[so.name]
        opts = [
            dataclasses.replace(o, **_timing(o.decision, site, tgt, wl, cache, sources))
            for o in so.options
        ]
        dense = next((o for o in opts if isinstance(o.decision, DenseConfig)), None)
        dense_lat = dense.latency_s if dense is not None else so.dense_latency_s
        new_sites.append(dataclasses.replace(so, options=opts, dense_latency_s=dense_lat))
    meta = {
        **problem.meta,
        "tokens": wl.tokens,
        "latency_sources": dict(sorted(sources.items())),
    }
    return BudgetProblem(new_sites, workload=wl.name, target=tgt.name, meta=meta)
