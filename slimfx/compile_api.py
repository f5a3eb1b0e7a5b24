"""``slimfx.backend``: the torch.compile backend with a budget.

    compiled = torch.compile(model, backend=slimfx.backend(budget=0.5, model=model,
                                                           calibration=batches))

``slimfx.backends.compile.plan_backend`` applies a Plan to each dynamo sub-graph; solving a budget
needs the cost model and the solver, which ``slimfx.backends`` may not import. This top-level
module (orchestration, like ``slimfx.api``) supplies the planner: :func:`plan_for_compile`
runs ``optimize``'s planning steps — capture and sites, include/exclude, weight checks,
calibration statistics on the same fit/held-out split, candidates, solve — with
``slimfx.api``'s own functions, once for the whole model, and returns the Plan, the fitted
Gram matrices and a report builder (``slimfx.report_builder.build_report``). The backend then applies that one
Plan per sub-graph, so compiling gives the rewrite ``optimize(model, budget, calibration=…)``
gives, with the same factors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from slimfx import api, report_builder
from slimfx.backends.compile import Planned, SlimfxBackend, plan_backend
from slimfx.passes.base import PassResult
from slimfx.planning.configs import DEFAULT_FAMILIES
from slimfx.planning.plan import Plan
from slimfx.report import Report
from slimfx.stages import PlanningOptions

__all__ = ["backend", "plan_for_compile"]


def plan_for_compile(model: nn.Module, *, budget: Any = None, **options: Any) -> Planned:
    """Solve (``budget``) or complete (``plan``) one Plan for ``model`` as ``optimize`` does,
    without rewriting the model; see the module docstring. ``options``: the planning keywords
    of ``optimize`` (``slimfx.stages.PlanningOptions``; ``progress`` defaults to False here)."""
    t_start = time.perf_counter()
    options.setdefault("progress", False)
    opts = PlanningOptions(**options)
    if budget is None and opts.plan is None:
        raise ValueError("plan_for_compile needs budget= or plan=")
    if opts.calibration is None and opts.example_inputs is None:
        raise ValueError("solving a budget needs calibration data (or example_inputs with plan=)")
    pl = api.plan_model(model, budget, opts)
    target, workload = opts.target, opts.workload
    seconds = time.perf_counter() - t_start

    def build_report(result: PassResult) -> Report:
        report = report_builder.build_report(
            pl.sites, pl.plan, pl.problem, result, {}, pl.budget, target, workload, pl.cache
        )
        report.solver = pl.solver
        report_builder.lead_notes(report, pl.notes)
        report.timings = {**pl.timings, "plan": seconds}
        report.meta = {
            "model_class": type(model).__name__,
            "plan": pl.plan.to_dict(),
            "capture_for_planning": pl.capture,
        }
        return report

    return Planned(
        plan=pl.plan, sites=pl.sites, grams=pl.grams(), build_report=build_report, notes=pl.notes
    )


def backend(
    budget: Any = None,
    plan: Plan | None = None,
    calibration: Sequence | None = None,
    families: Sequence[str] = DEFAULT_FAMILIES,
    target: str = "cpu",
    workload: str = "decode",
    inner: Any = "inductor",
    lower_to_triton: bool = False,
    **kw: Any,
) -> SlimfxBackend:
    """``slimfx.backends.plan_backend`` with :func:`plan_for_compile` as its planner: with
    ``budget=`` (and ``model=``, ``calibration=``) one Plan is solved for the whole model, then
    applied to each dynamo sub-graph. All other arguments as there and in ``optimize``."""
    kw.setdefault("planner", plan_for_compile)
    return plan_backend(
        budget,
        plan,
        calibration,
        families,
        target,
        workload,
        inner,
        lower_to_triton,
        **kw,
    )
