"""What the torch.compile backend records per sub-graph, and how the records become a Report.

A :class:`GraphRecord` per dynamo sub-graph (its sites, the rewrite's and the lowering's
``PassResult``, linears left alone); :func:`merge_records` joins them into one record per site
(applied in which graphs and with how many factor-cache hits, rejected, or skipped and why);
:func:`compile_report` turns that into a :class:`slimfx.report.Report` — the planner's, with
its estimates, when the Plan was solved under a budget (:class:`Planned`), else one built here.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from slimfx.backends.cpu_pack import GRAD_REASON
from slimfx.ir.sites import LinearSite
from slimfx.passes.base import PassResult, SiteRecord
from slimfx.planning.configs import DenseConfig
from slimfx.planning.plan import Plan
from slimfx.planning.shapes import LinearShape
from slimfx.report import Report, SiteEntry

__all__ = ["DEFAULT_NOTE", "Planned", "GraphRecord", "merge_records", "compile_report"]

DEFAULT_NOTE = (
    "no budget and no plan: no linear was rewritten (a budget needs calibration data: use "
    "slimfx.backend(budget=..., model=..., calibration=...) or pass a plan); slimfx ops already "
    "in the graph (a model slimfx.optimize returned) were lowered to Triton kernels, or on the "
    "CPU packed for torch's kernels, where a kernel accepts them (the sites' records say which)"
)


@dataclass
class Planned:
    """A Plan for the whole model, solved once, and what the backend needs to apply it.

    - ``plan``: site FQN → Decision.
    - ``sites``: the model's linear sites as the planner found them (report order and shapes).
    - ``grams``: site FQN (or group) → input Gram for activation-aware factorization.
    - ``build_report``: turns the backend's merged ``PassResult`` into a Report with the
      planner's estimates (candidates, errors, latencies); ``None`` for the backend's own.
    - ``notes``: what the planner wants the report to say.
    """

    plan: Plan
    sites: list[LinearSite] = field(default_factory=list)
    grams: Mapping[str, Tensor | None] | None = None
    build_report: Callable[[PassResult], Report] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class GraphRecord:
    """What the backend did with one dynamo sub-graph (in compilation order)."""

    index: int
    sites: list[LinearSite]
    rewrite: PassResult | None
    lowering: PassResult | None
    unresolved: list[str]
    not_planned: list[str]
    seconds: float
    param_refs: list[weakref.ref] = field(default_factory=list, repr=False)
    #: (pass name, seconds) of this sub-graph's pipeline, in run order
    timings: list[tuple[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """A JSON-able line for the report: sites, applied / rejected / skipped, lowering."""
        out: dict[str, Any] = {"graph": self.index, "sites": [s.fqn for s in self.sites]}
        if self.rewrite is not None:
            for status in ("applied", "rejected", "skipped"):
                rows = [r for r in self.rewrite.records if r.status == status]
                if rows:
                    out[status] = (
                        {r.fqn: r.reason for r in rows}
                        if status != "applied"
                        else [r.fqn for r in rows]
                    )
        if self.not_planned:
            out["not_planned"] = list(self.not_planned)
        if self.unresolved:
            out["unresolved"] = list(self.unresolved)
        if self.lowering is not None:
            out["lowered"] = [r.fqn for r in self.lowering.records if r.status == "applied"]
            fb = {r.fqn: r.reason for r in self.lowering.records if r.status == "fallback"}
            if fb:
                out["fallback"] = fb
        out["seconds"] = round(self.seconds, 3)
        return out

    def uses_any(self, params: Iterable[Tensor]) -> bool:
        """Whether one of ``params`` was an input of this sub-graph."""
        live = {id(t): t for t in (r() for r in self.param_refs) if t is not None}
        return any(live.get(id(p)) is p for p in params)


def _gram_free(fqn: str, plan: Plan) -> bool:
    """Whether the decision at ``fqn`` is plainly independent of calibration statistics
    (plain SVD low-rank, round-to-nearest quantization); anything else may use them."""
    d = plan[fqn]
    return (d.kind, getattr(d, "method", None)) in {("lowrank", "svd"), ("quant", "rtn")}


def _closest(name: str, compiled: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(compiled), n=1, cutoff=0.6)
    return f" so far; the closest compiled site is {close[0]!r}" if close else ""


def merge_records(be: Any, graphs: Sequence[GraphRecord]) -> PassResult:
    """One record per site of backend ``be`` over ``graphs``: ``applied`` when applied in
    some sub-graph (``extra``: graphs, factor_cache_hits), else the rejection, else why it
    was skipped; planned sites no sub-graph contained are ``skipped`` ("not in any
    compiled graph")."""
    per: dict[str, list[tuple[int, SiteRecord]]] = {}
    order: list[str] = [s.fqn for s in be.planned.sites] if be.planned else []
    for g in graphs:
        for s in g.sites:
            if s.fqn not in order:
                order.append(s.fqn)
        for r in g.rewrite.records if g.rewrite is not None else []:
            per.setdefault(r.fqn, []).append((g.index, r))
        for fqn in g.not_planned:
            per.setdefault(fqn, []).append((g.index, SiteRecord(fqn, "dense", "skipped", "")))
    for fqn in be.plan or ():
        if fqn not in order:
            order.append(fqn)
    records = []
    for fqn in order:
        rows = per.get(fqn, [])
        applied = [(i, r) for i, r in rows if r.status == "applied"]
        rejected = [(i, r) for i, r in rows if r.status == "rejected"]
        if applied:
            r0 = applied[0][1]
            rec = SiteRecord(
                r0.fqn,
                r0.decision,
                "applied",
                "",
                sum(r.seconds for _, r in applied),
                r0.bytes_before,
                r0.bytes_after,
                dict(r0.extra),
            )
            rec.extra.pop("nodes", None)
            rec.extra["factor_cache_hit"] = all(r.extra.get("factor_cache_hit") for _, r in applied)
            rec.extra["graphs"] = [i for i, _ in applied]
            rec.extra["factor_cache_hits"] = sum(
                bool(r.extra.get("factor_cache_hit")) for _, r in applied
            )
        elif rejected:
            rec = rejected[0][1]
        elif rows:
            r0 = rows[0][1]
            planned = be.plan is not None and fqn in be.plan
            reason = r0.reason or ("not in the plan" if not planned else "")
            if be.plan is None:
                reason = "no plan (no budget given)"
            rec = SiteRecord(fqn, r0.decision, "skipped", reason)
            rec.extra["graphs"] = [i for i, _ in rows]
        else:
            d = be.plan[fqn] if be.plan is not None and fqn in be.plan else DenseConfig()
            why = "dense" if isinstance(d, DenseConfig) else (
                "not in any compiled graph" + _closest(fqn, [f for f in per if f != fqn])
            )  # or a misspelt plan name: without model= nothing checked it before
            rec = SiteRecord(fqn, d.short(), "skipped", why)
        records.append(rec)
    return PassResult(
        name="slimfx_backend",
        modified=any(r.status == "applied" for r in records),
        records=records,
        seconds=sum(g.seconds for g in graphs),
    )


def compile_report(be: Any, graphs: Sequence[GraphRecord]) -> Report:
    """The Report of ``graphs`` (records of backend ``be``): the planner's report when it has
    one (estimates, candidates), else one built from the records; then the lowering per site
    (``extra["backend"]``), slimfx ops that were already in the model (status ``lowered`` /
    ``fallback``), notes, and the per-graph summaries in ``meta["graphs"]``. Bytes after are
    what runs: a site not applied keeps its dense bytes."""
    result = merge_records(be, graphs)
    if be.planned is not None and be.planned.build_report is not None:
        report = be.planned.build_report(result)
    else:
        report = _own_report(be, result, graphs)
    by = {e.fqn: e for e in report.sites}
    for e in report.sites:
        if e.status != "applied":
            e.bytes_after = e.bytes_before  # what runs, not what was planned
    _attach_lowering(report, by, graphs)
    notes = list(be.planned.notes) if be.planned else []
    if be.plan is None:
        notes.append(DEFAULT_NOTE if be.lower_to_triton else DEFAULT_NOTE.split(";")[0])
    elif be.grams is None:
        maybe = [
            r for r in result.records if r.status == "applied" and not _gram_free(r.fqn, be.plan)
        ]
        if maybe:
            notes.append(
                f"no calibration statistics: {len(maybe)} applied decision(s) that may be "
                f"activation-aware (e.g. {maybe[0].fqn}: {maybe[0].decision}) were fitted "
                "with identity Grams; pass calibration= to slimfx.backend to match optimize()"
            )
    unpacked = [g.index for g in graphs if g.lowering is not None and any(
        r.reason == GRAD_REASON for r in g.lowering.records)]
    if unpacked:
        notes.append(f"graph(s) {', '.join(map(str, unpacked))}: {GRAD_REASON}")
    absent = [r for r in result.records if r.reason.startswith("not in any compiled graph")]
    if absent and graphs:
        notes.append(
            f"{len(absent)} planned site(s) in no compiled graph so far (a name the model does "
            f"not have, or a part not called yet), e.g. {absent[0].fqn}: {absent[0].reason}"
        )
    unresolved = [u for g in graphs for u in g.unresolved]
    if unresolved:
        notes.append(f"{len(unresolved)} linear node(s) left alone: {'; '.join(unresolved[:3])}")
    report.notes = [*report.notes, *(n for n in [*notes, *be.notes] if n not in report.notes)]
    report.capture = {"method": "dynamo", "graphs": len(graphs)}
    report.runtime = "torch-compile"  # what runs the graphs (api.RUNTIMES)
    timings = dict(report.timings)
    for g in graphs:  # the per-sub-graph pipelines' passes, summed over sub-graphs
        for name, seconds in g.timings:
            timings[f"compile:{name}"] = timings.get(f"compile:{name}", 0.0) + seconds
    report.timings = timings
    report.meta = {
        **report.meta,
        "backend": "slimfx",
        "inner": be.inner_name,
        "lower_to_triton": be.lower_to_triton,
        "graphs": [g.summary() for g in graphs],
    }
    if be.plan is not None:
        report.meta.setdefault("plan", be.plan.to_dict())
    return report.finalize()


def _shape_of(be: Any, fqn: str, graphs: Sequence[GraphRecord]) -> tuple[LinearSite | None, tuple]:
    for g in graphs:
        for s in g.sites:
            if s.fqn == fqn:
                return s, s.shape
    for s in be.planned.sites if be.planned else ():
        if s.fqn == fqn:
            return s, s.shape
    recorded = be.plan.shapes.get(fqn) if be.plan is not None else None
    if isinstance(recorded, LinearShape):
        return None, (recorded.out_features, recorded.in_features)
    return None, (0, 0)


def _own_report(be: Any, result: PassResult, graphs: Sequence[GraphRecord]) -> Report:
    entries = []
    for r in result.records:
        site, shape = _shape_of(be, r.fqn, graphs)
        d = be.plan[r.fqn] if be.plan is not None and r.fqn in be.plan else DenseConfig()
        out_f, in_f = shape
        lin = LinearShape(in_f, out_f) if in_f > 0 and out_f > 0 else None  # (0, 0): unknown
        before = DenseConfig().weight_bytes(lin) if lin is not None else 0
        entries.append(
            SiteEntry(
                fqn=r.fqn,
                shape=(int(out_f), int(in_f)),
                group=site.group if site is not None else r.fqn,
                chosen=d.short(),
                decision=d.to_dict(),
                bytes_before=before,
                bytes_after=(
                    d.weight_bytes(lin) if r.status == "applied" and lin is not None else before
                ),
                status=r.status,
                reason=r.reason,
                seconds=r.seconds,
                extra=dict(r.extra),
            )
        )
    budget = {"plan": "given"} if be.plan is not None else {}
    return Report(sites=entries, budget=budget, solver="none")


def _attach_lowering(
    report: Report, by: dict[str, SiteEntry], graphs: Sequence[GraphRecord]
) -> None:
    for g in graphs:
        for r in g.lowering.records if g.lowering is not None else []:
            info = (
                {"kernel": r.extra.get("kernel")}
                if r.status == "applied"
                else {"fallback": r.reason}
            )
            e = by.get(r.fqn)
            if e is None:  # a slimfx op that was in the model already (optimize()d)
                shape = tuple(r.extra.get("shape", (0, 0)))
                e = SiteEntry(
                    fqn=r.fqn,
                    shape=shape,  # type: ignore[arg-type]
                    group=r.fqn,
                    chosen=f"slimfx::{r.decision} (in the model)",
                    status="lowered" if r.status == "applied" else "fallback",
                    reason=r.reason,
                )
                report.sites.append(e)
                by[r.fqn] = e
            e.extra.setdefault("backend", {})[f"graph {g.index}"] = info
