"""The report of one planned and applied model: a :class:`~slimfx.report.SiteEntry` per site
from the sites, the Plan, the priced problem (when one was solved) and the pass records.

Shared by ``slimfx.optimize`` and the torch.compile backend (``slimfx.compile_api``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimfx.cost.target import latency as estimate_site_latency
from slimfx.ir.sites import AttentionSite, LinearSite
from slimfx.passes.base import PassResult, SiteRecord
from slimfx.planning.configs import DenseConfig
from slimfx.planning.plan import Plan
from slimfx.planning.problem import Budget, BudgetProblem, SiteOptions
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN
from slimfx.report import KVEntry, Report, SiteEntry

__all__ = ["build_report", "runner_up", "target_name"]


def target_name(target: Any) -> str:
    """A target's name for plans and reports (``optimize`` takes a name or a ``Target``)."""
    return target if isinstance(target, str) else str(getattr(target, "name", target))


def runner_up(options: list, chosen_idx: int) -> Any:
    """The option a reader would weigh against the chosen one: the cheapest that is more
    accurate (and larger), else the most accurate that is smaller; ``None`` when neither."""
    ch = options[chosen_idx]
    better = [o for o in options if o is not ch and o.error < ch.error and o.bytes > ch.bytes]
    if better:
        return min(better, key=lambda o: (o.bytes, o.error))
    cheaper = [o for o in options if o is not ch and o.bytes < ch.bytes]
    return min(cheaper, key=lambda o: (o.error, -o.bytes)) if cheaper else None


def _dense_reason(problem: BudgetProblem | None, fqn: str, budget: Budget) -> str:
    """Why a site the plan keeps dense is dense: the solver chose it over compressed
    candidates under the budget, it had none, nothing was constrained, or a replayed plan
    says so."""
    if problem is None:
        return "the plan keeps it dense"
    if all(v is None for v in budget.to_dict().values()):
        return "no budget: the most accurate form"
    if any(not isinstance(o.decision, DenseConfig) for o in problem.site(fqn).options):
        return "the solver's choice under the budget"
    return "no compressed candidate fits this site"


def build_report(
    sites: list[LinearSite],
    plan: Plan,
    problem: BudgetProblem | None,
    result: PassResult,
    measured: Mapping[str, tuple[float, float]],
    budget: Budget,
    target: str,
    workload: str,
    cache: Any,
    attention_sites: list[AttentionSite] | None = None,
) -> Report:
    """One entry per site: decision, bytes, pass status; with a solved ``problem`` the
    estimated error, latency (and its source), runner-up and every candidate; without one
    (a replayed plan) latencies priced again for ``target`` / ``workload`` from ``cache`` or
    the roofline. ``measured``: site → (SQNR dB, relative error) on held-out batches."""
    records: dict[str, SiteRecord] = {r.fqn: r for r in result.records}
    entries, tied = [], []
    for s in sites:
        if s.fqn in plan.owned_by:  # a k/v projection a low-rank KV cache replaced
            owner = plan.owned_by[s.fqn]
            entries.append(
                SiteEntry(
                    fqn=s.fqn, shape=s.shape, group=s.group, chosen=f"owned by {owner}",
                    decision=plan[owner].to_dict(),
                    bytes_before=DenseConfig().weight_bytes(s.site_shape), bytes_after=0,
                    status="applied", reason=f"replaced by {plan[owner].short()}",
                    # its dense time stays in the total; the owner's option pays its work
                    latency_before_s=(
                        estimate_site_latency(DenseConfig(), s, target, workload, cache)[0]
                        if problem is None else _dense_latency(problem, s.fqn)
                    ),
                )
            )  # fmt: skip
            continue
        d = plan[s.fqn]
        rec = records.get(s.fqn)
        e = SiteEntry(
            fqn=s.fqn,
            shape=s.shape,
            group=s.group,
            chosen=d.short(),
            decision=d.to_dict(),
            bytes_before=DenseConfig().weight_bytes(s.site_shape),
            bytes_after=d.weight_bytes(s.site_shape),
            status=rec.status if rec else "skipped",
            reason=rec.reason if rec else "",
            seconds=rec.seconds if rec else 0.0,
            extra=dict(rec.extra) if rec else {},
        )
        if s.tied and not isinstance(d, DenseConfig):
            e.bytes_after += e.bytes_before  # the tied module keeps a dense copy
            e.extra.setdefault("note", "tied weight: the other user keeps a dense copy")
            tied.append(e)
        if isinstance(d, DenseConfig) and e.reason in ("", "dense"):
            e.reason = _dense_reason(problem, s.fqn, budget)
        if problem is not None:
            so = problem.site(s.fqn)
            idx = so.index_of(d)
            opt = so.options[idx]
            sens = so.sensitivity if so.sensitivity > 0 else 1.0
            e.est_error = opt.error / (opt.weight or sens)  # the site's own relative error
            e.sensitivity = so.sensitivity
            e.latency_before_s = so.dense_latency_s
            e.latency_after_s = opt.latency_s
            e.latency_source = opt.source
            ru = runner_up(so.options, idx)
            e.runner_up = ru.decision.short() if ru is not None else None
            e.candidates = [
                {
                    "decision": o.decision.short(),
                    "bytes": o.bytes,
                    "error": o.error / (o.weight or sens),
                    "latency_s": o.latency_s,
                }
                for o in so.options
            ]
        else:
            lat0, src = estimate_site_latency(DenseConfig(), s, target, workload, cache)
            lat1, _ = estimate_site_latency(d, s, target, workload, cache)
            e.latency_before_s, e.latency_after_s, e.latency_source = lat0, lat1, src
        if s.fqn in measured:
            e.measured_sqnr_db, e.measured_rel_error = measured[s.fqn]
        entries.append(e)
    report = Report(
        sites=entries, budget=budget.to_dict(), target=target_name(target), workload=workload
    )
    report.kv_sites = [
        _kv_entry(a, plan, problem, budget, target, workload, cache)
        for a in attention_sites or ()
        if a.fqn in plan
    ]
    if problem is None:  # a replayed plan: no cost model ran, nothing was estimated
        report.meta["estimated"] = False
        report.notes.append(REPLAY_NOTE)
    if tied:
        extra = sum(e.bytes_after - e.bytes_before for e in tied)
        report.notes.append(
            f"{', '.join(e.fqn for e in tied)}: a tied weight rewritten (its other user keeps "
            f"the dense copy), {extra / 1e6:.2f} MB more than dense in total"
        )
    return report


def lead_notes(report: Report, notes: list[str]) -> None:
    """Put the pipeline's ``notes`` first in ``report.notes``, then the builder's own ones
    (a replayed plan, a rewritten tied weight) not already among them."""
    report.notes = [*notes, *(n for n in report.notes if n not in notes)]


#: the note of a replayed plan's report (its error columns read "–")
REPLAY_NOTE = (
    "replayed plan: no cost model ran, so the estimated errors (est.err), the runner-ups and "
    "the frontier are not known ('–'); the measured SQNR columns are"
)


def _site_options(problem: BudgetProblem | None, name: str) -> SiteOptions | None:
    """The problem's options of site ``name`` (``None``: no problem, or not one of its sites)."""
    try:
        return None if problem is None else problem.site(name)
    except KeyError:
        return None


def _dense_latency(problem: BudgetProblem | None, name: str) -> float:
    """The dense latency the problem priced for site ``name`` (0.0 without one)."""
    so = _site_options(problem, name)
    return 0.0 if so is None else so.dense_latency_s


def _kv_entry(
    site: AttentionSite,
    plan: Plan,
    problem: BudgetProblem | None,
    budget: Budget,
    target: Any,
    workload: str,
    cache: Any = None,
) -> KVEntry:
    """The report line of one attention site's KV decision; without a problem (a replayed
    plan) its attention steps priced again for ``target`` / ``workload`` at the budget's
    context and batch (the step's own tokens without a context) from ``cache`` or the
    roofline, as the solve prices them."""
    from slimfx.cost.attention_price import attention_latency
    from slimfx.cost.target import workload_of
    from slimfx.forms.kv.config import KVDenseConfig

    d, shape, ctx = plan[site.fqn], site.site_shape, budget.context
    dense = KVDenseConfig()
    owns = sorted(k for k, o in plan.owned_by.items() if o == site.fqn)
    e = KVEntry(
        fqn=site.fqn,
        layer=site.layer_idx,
        chosen=d.short(),
        decision=d.to_dict(),
        kv_bytes_per_token_before=dense.bytes_per_token(shape, ctx),
        kv_bytes_per_token_after=d.bytes_per_token(shape, ctx),
        cache_bytes_before=None if ctx is None else dense.cache_bytes(shape, ctx),
        cache_bytes_after=None if ctx is None else d.cache_bytes(shape, ctx),
        weight_bytes_after=d.weight_bytes(shape),
        owns=owns,
        status="skipped" if isinstance(d, KVDenseConfig) else "applied",
    )
    so = _site_options(problem, site.fqn)
    if problem is None:
        c = ctx if ctx is not None else workload_of(workload).tokens
        (e.latency_before_s, _), (e.latency_after_s, e.latency_source) = (
            attention_latency(f, shape, target, workload, c, budget.batch or 1, cache)
            for f in (dense, d)
        )
    if so is not None:
        sens = so.sensitivity if so.sensitivity > 0 else 1.0
        e.sensitivity = so.sensitivity
        chosen = so.options[so.index_of(d)]
        e.est_error, e.weight_bytes_after = chosen.error / sens, chosen.bytes
        e.latency_before_s, e.latency_after_s = so.dense_latency_s, chosen.latency_s
        e.latency_source = chosen.source
        e.candidates = [
            {
                "decision": o.decision.short(),
                "kv_bytes_per_token": o.cost(KV_BYTES_PER_TOKEN),
                "weight_bytes": o.bytes,
                "error": o.error / sens,
                "latency_s": o.latency_s,
            }
            for o in so.options
        ]
    return e
