"""``slimfx.optimize``: the one call. Orchestrates capture → sites → calibration → cost →
plan → passes → report, and nothing else: every step lives in its own package.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.cost.calibration import (
    CalibrationStats,
    collect_planning_stats,
    collect_stats,
    prepare_batches,
)
from slimfx.cost.candidates import build_problem
from slimfx.cost.sequential import run_sequential
from slimfx.cost.target import MeasuredCache, Target, roofline_caveat
from slimfx.ir.capture import capture
from slimfx.ir.find import find_linear_sites
from slimfx.ir.sites import LinearSite
from slimfx.loss_check import loss_checks
from slimfx.passes.base import PassResult
from slimfx.passes.swap import apply_plan
from slimfx.planning.configs import DEFAULT_FAMILIES, Decision, DenseConfig
from slimfx.planning.plan import Plan
from slimfx.planning.problem import Budget, BudgetProblem
from slimfx.planning.solve import frontier, solve
from slimfx.report import Report
from slimfx.reporting import build_report, target_name

__all__ = ["optimize", "plan_model", "Planning", "report_of", "find_sites", "needs_gram"]

REPORT_ATTR = "slimfx_report"


def report_of(model: nn.Module) -> Report:
    """The report of a model returned by ``optimize`` (KeyError-like error otherwise)."""
    rep = getattr(model, REPORT_ATTR, None)
    if rep is None:
        raise ValueError("this model was not returned by slimfx.optimize (it has no report)")
    return rep


def needs_gram(decision: Decision) -> bool:
    """Whether realizing ``decision`` uses calibration statistics (activation-aware)."""
    kind = decision.kind
    if kind == "lowrank":
        return decision.method == "whitened"  # type: ignore[attr-defined]
    if kind == "quant":
        return decision.method in ("gptq", "awq")  # type: ignore[attr-defined]
    if kind == "sparse24":
        return decision.mask == "wanda" or decision.compensate  # type: ignore[attr-defined]
    return kind in ("lowrank_quant", "sparse24_lowrank")


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "generate")


def _example_call(model: nn.Module, batch: Any, max_tokens: int = 16) -> tuple[tuple, dict]:
    """Arguments for capturing ``model`` from one calibration batch (trimmed for speed)."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if _is_hf(model) and isinstance(batch, Tensor) and not batch.is_floating_point():
        return (), {"input_ids": batch[:1, :max_tokens], "use_cache": False}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def find_sites(
    model: nn.Module, example: tuple[tuple, dict]
) -> tuple[list[LinearSite], dict[str, Any]]:
    """Capture ``model`` and find its linear sites; the second value says how."""
    t0 = time.perf_counter()
    captured = capture(model, example[0], example[1], fallback=True)
    sites = find_linear_sites(captured, model)
    info = {"method": captured.method, "seconds": round(time.perf_counter() - t0, 2)}
    if captured.fallback_reason:
        info["fallback_reason"] = captured.fallback_reason
    return sites, info


def _drop_tied_sites(sites: list[LinearSite], notes: list[str]) -> list[LinearSite]:
    """Leave tied sites (an ``lm_head`` sharing the embedding's weight) out of a bytes budget.

    Rewriting a tied weight keeps a dense copy for its other user, so under a memory/bits
    budget no form of it saves a byte: counted in the budget, its dense bytes would only shrink
    what the other linears may keep (SmolLM2 at budget 0.3: 0.11 of their bytes instead of 0.3).
    ``include=[...]`` naming it, or a latency budget (decode reads the whole head every token),
    offers it again."""
    tied = [s for s in sites if s.tied]
    if not tied or len(tied) == len(sites):
        return sites
    for s in tied:
        notes.append(
            f"{s.fqn}: weight tied to {', '.join(s.tied)} — any rewrite keeps a dense copy, so "
            "under a bytes budget it stays dense and outside the budget (include=[...] or a "
            "latency budget offers it)"
        )
    return [s for s in sites if not s.tied]


def select_sites(
    sites: list[LinearSite], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[LinearSite]:
    """Filter sites by glob patterns; a pattern matching nothing raises (a typo would
    otherwise silently optimize nothing or everything)."""
    import fnmatch

    for label, pats in (("include", include), ("exclude", exclude)):
        if isinstance(pats, str):
            raise TypeError(f"{label} takes a list of patterns, not one string")
        for p in pats or ():
            if not any(fnmatch.fnmatchcase(s.fqn, p) for s in sites):
                raise ValueError(f"{label} pattern {p!r} matches no linear site of this model")
    keep = [
        s
        for s in sites
        if (not include or any(fnmatch.fnmatchcase(s.fqn, p) for p in include))
        and not any(fnmatch.fnmatchcase(s.fqn, p) for p in exclude or ())
    ]
    if not keep:
        raise ValueError("include/exclude leave no linear site to optimize")
    return keep


def _check_weights(model: nn.Module, sites: Sequence[LinearSite]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    bad = [s.weight for s in sites if s.weight in params and not torch.isfinite(params[s.weight]).all()]
    if bad:
        raise ValueError(
            f"{len(bad)} weight(s) contain NaN or inf: {', '.join(bad[:5])}"
            f"{' …' if len(bad) > 5 else ''}. Fix the checkpoint before optimizing."
        )


def _check_plan(plan: Plan, sites: Sequence[LinearSite]) -> None:
    by = {s.fqn: s for s in sites}
    unknown = [k for k in plan if k not in by]
    if unknown:
        import difflib

        hints = []
        for k in unknown[:3]:
            m = difflib.get_close_matches(k, by, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else ""))
        raise ValueError(
            f"plan names {len(unknown)} site(s) this model does not have: {', '.join(hints)}"
        )
    wrong = [
        f"{k}: plan {tuple(plan.shapes[k])} vs model {by[k].shape}"
        for k in plan
        if k in plan.shapes and tuple(plan.shapes[k]) != by[k].shape
    ]
    if wrong:
        raise ValueError("plan shapes do not match the model: " + "; ".join(wrong[:5]))


def _split_heldout(batches: list, heldout: Sequence | None) -> tuple[list, list, str | None]:
    if heldout is not None:
        return batches, list(heldout), None
    if len(batches) >= 2:
        k = max(1, len(batches) // 8)
        return batches[:-k], batches[-k:], None
    return batches, batches, "only one calibration batch: the measured SQNR uses the same batch"


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if _is_hf(model) and isinstance(batch, Tensor) and not batch.is_floating_point():
        return model(input_ids=batch, use_cache=False)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def measure_site_errors(
    model: nn.Module,
    dense: Mapping[str, tuple[Tensor, Tensor | None]],
    batches: Sequence,
) -> dict[str, tuple[float, float]]:
    """(SQNR dB, relative error) of each rewritten layer's output on ``batches``: the
    rewritten module against the dense weight it replaced, on the same inputs."""
    mods = dict(model.named_modules())
    acc: dict[str, list[float]] = {k: [0.0, 0.0] for k in dense}
    handles = []

    def hook(name: str):
        W, b = dense[name]

        def fn(mod: nn.Module, args: tuple, out: Tensor) -> None:
            ref = torch.nn.functional.linear(args[0].to(W.dtype), W, b).double()
            acc[name][0] += float((ref * ref).sum())
            acc[name][1] += float(((ref - out.double()) ** 2).sum())

        return fn

    try:
        for name in dense:
            handles.append(mods[name].register_forward_hook(hook(name)))
        for b in batches:
            _call(model, b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, (sig, err) in acc.items():
        rel = err / sig if sig > 0 else float("nan")
        out[k] = (10 * math.log10(sig / err) if err > 0 else float("inf"), rel)
    return out


@dataclass
class Planning:
    """Everything ``optimize`` decides before touching the model: the sites, the statistics,
    the problem and solution (``None`` when a plan was replayed) and the complete Plan."""

    budget: Budget
    sites: list[LinearSite]
    plan: Plan
    capture: dict[str, Any]
    fit_batches: list
    eval_batches: list
    stats: CalibrationStats | None = None
    problem: BudgetProblem | None = None
    solution: Any = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cache: MeasuredCache | None = None

    def grams(self, sites: Sequence[LinearSite] | None = None) -> dict[str, Tensor | None] | None:
        """The (damped) Gram each site is fitted with, or ``None`` without statistics."""
        if self.stats is None:
            return None
        return {s.fqn: self.stats.fit_gram(s.fqn) for s in (sites or self.sites)}

    @property
    def solver(self) -> str:
        return self.solution.solver if self.solution is not None else "replayed plan"


def plan_model(
    model: nn.Module,
    budget: float | Budget | None = 0.5,
    *,
    calibration: Sequence | None = None,
    tokenizer: Any = None,
    plan: Plan | None = None,
    target: str | Target = "cpu",
    workload: str = "decode",
    families: Sequence[str] = DEFAULT_FAMILIES,
    fisher: bool | None = None,
    sensitivity: str = "probe",
    solver: str = "auto",
    heldout: Sequence | None = None,
    example_inputs: tuple | None = None,
    seq_len: int = 256,
    latency_cache: MeasuredCache | str | os.PathLike[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = True,
    backend: str | None = None,
) -> Planning:
    """``optimize``'s planning half — capture, sites, checks, calibration statistics,
    candidates, solve (or complete a replayed plan) — without rewriting anything. Shared by
    ``optimize`` and the torch.compile backend (``slimfx.compile_api``). Arguments as there."""
    timings: dict[str, float] = {}
    notes: list[str] = []
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan must be a slimfx Plan, got {type(plan).__name__}")
    bud = Budget.of(budget)
    cache = MeasuredCache.of(latency_cache, target)
    batches: list = []
    if calibration is not None:
        if isinstance(calibration, (str, bytes)):
            raise TypeError("calibration must be a list of batches or strings, not one string")
        batches = prepare_batches(list(calibration), tokenizer=tokenizer, seq_len=seq_len)
        if not batches:
            raise ValueError("calibration is empty: pass at least one batch of real inputs")

    # ---- capture and sites
    if example_inputs is not None:
        example = (tuple(example_inputs), {})
    elif batches:
        example = _example_call(model, batches[0])
    else:
        raise ValueError(
            "optimize needs calibration data (or example_inputs when replaying a plan that "
            "uses no activation-aware decision) to capture the model"
        )
    t0 = time.perf_counter()
    sites, cap_info = find_sites(model, example)
    timings["capture"] = time.perf_counter() - t0
    if cap_info["method"] != "export":
        notes.append(
            "torch.export failed; sites found by module-level discovery instead: "
            + cap_info.get("fallback_reason", "")[:300]
        )
    if not sites:
        raise ValueError("no linear layers found in this model: nothing to optimize")
    sites = select_sites(sites, include, exclude)
    if plan is None and include is None and bud.latency is None:
        sites = _drop_tied_sites(sites, notes)
    _check_weights(model, sites)
    mods = dict(model.named_modules())

    if plan is not None:
        _check_plan(plan, sites)
        if backend is not None:
            from slimfx.backends.capabilities import check_plan

            bad = check_plan(backend, plan, sites)
            if bad:
                raise ValueError(
                    f"the plan has {len(bad)} site(s) backend {backend!r} cannot run:\n  "
                    + "\n  ".join(bad)
                )
        aware = [k for k, d in plan.items() if needs_gram(d)]
        if aware and not batches:
            raise ValueError(
                f"the plan uses activation-aware decisions at {len(aware)} site(s) (e.g. "
                f"{aware[0]}: {plan[aware[0]].short()}); pass the same calibration= to "
                "reproduce their factors"
            )

    fit_batches, eval_batches, note = _split_heldout(batches, heldout) if batches else ([], [], None)
    if note:
        notes.append(note)

    # ---- statistics, problem, solution
    stats: CalibrationStats | None = None
    problem: BudgetProblem | None = None
    if fit_batches and (plan is None or any(needs_gram(d) for d in plan.values())):
        t0 = time.perf_counter()
        if plan is None:
            stats, note = collect_planning_stats(
                model, sites, fit_batches, fisher, progress, estimator=sensitivity
            )
            if note:
                notes.append(note)
        else:  # a replayed plan needs the Grams only
            stats = collect_stats(model, sites, fit_batches, fisher=False, progress=progress)
        timings["calibration"] = time.perf_counter() - t0
        thin = stats.underdetermined()
        if thin:
            grp, (n, f) = next(iter(thin.items()))
            notes.append(
                f"calibration too small: {len(thin)} input group(s) saw fewer tokens than "
                f"input features (e.g. {grp}: {n} tokens for {f} features); activation-aware "
                "estimates are optimistic there — pass more calibration tokens"
            )
    weights = {s.fqn: mods[s.fqn].weight.detach() for s in sites}
    solution = None
    if plan is None:
        t0 = time.perf_counter()
        allow = None
        if backend is not None:
            from slimfx.backends.capabilities import allow_fn

            allow = allow_fn(backend)
        problem, _cands = build_problem(
            sites,
            weights,
            stats,
            target=target,
            workload=workload,
            families=tuple(families),
            cache=cache,
            progress=progress,
            allow=allow,
        )
        if cache is not None:
            src = problem.meta["latency_sources"]
            notes.append(
                f"latency: {src.get('measured', 0)} of {sum(src.values())} options measured "
                f"({cache.describe(target_name(target))}), the rest from the roofline"
            )
        elif bud.latency is not None:
            notes.append(roofline_caveat(target_name(target), backend))
        if problem.meta.get("not_allowed"):
            notes.append(
                f"backend {backend}: {problem.meta['not_allowed']} candidate(s) it cannot run "
                "natively were not offered"
            )
        timings["candidates"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        solution = solve(problem, bud, method=solver)
        timings["solve"] = time.perf_counter() - t0
        if solution.note:
            notes.append(f"solver: {solution.note}")
        plan = solution.to_plan(
            shapes={s.fqn: s.shape for s in sites},
            meta={
                "budget": bud.to_dict(),
                "target": target_name(target),
                "workload": workload,
                "families": list(families),
                "solver": solution.solver,
                "model_class": type(model).__name__,
            },
        )
    else:
        plan = Plan(
            {**{s.fqn: DenseConfig() for s in sites}, **dict(plan.decisions)},
            {**{s.fqn: s.shape for s in sites}, **plan.shapes},
            dict(plan.meta),
        )

    return Planning(
        bud, sites, plan, cap_info, fit_batches, eval_batches, stats, problem, solution,
        notes, timings, cache,
    )


#: ``plan_model``'s keyword-only options (``optimize`` and ``plan_for_compile`` take them too)
_PLANNING_OPTIONS: tuple[str, ...] = tuple(
    p.name
    for p in inspect.signature(plan_model).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def _planning_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The ``plan_model`` keyword arguments among ``arguments`` (a caller's ``locals()``).

    ``optimize`` and ``slimfx.compile_api.plan_for_compile`` forward their planning options
    with it, so each option is spelled once, in the signatures; an option the caller does not
    take (``backend`` for ``plan_for_compile``) keeps ``plan_model``'s default."""
    return {k: arguments[k] for k in _PLANNING_OPTIONS if k in arguments}


def optimize(
    model: nn.Module,
    budget: float | Budget | None = 0.5,
    *,
    calibration: Sequence | None = None,
    tokenizer: Any = None,
    plan: Plan | None = None,
    target: str | Target = "cpu",
    workload: str = "decode",
    families: Sequence[str] = DEFAULT_FAMILIES,
    sequential: bool = False,
    fisher: bool | None = None,
    sensitivity: str = "probe",
    solver: str = "auto",
    heldout: Sequence | None = None,
    example_inputs: tuple | None = None,
    inplace: bool = False,
    seq_len: int = 256,
    latency_cache: MeasuredCache | str | os.PathLike[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = True,
    backend: str | None = None,
    measure_loss: bool = False,
) -> nn.Module:
    """Rewrite ``model``'s linears into cheaper forms under ``budget``; return the rewritten
    model (same class) with its report at ``slimfx.report_of(model)``.

    - ``budget``: a fraction of the rewritable linears' bytes **at 16 bits per weight** (the
      reference is 16-bit whatever dtype the model is loaded in, so fp32 and bf16 loads give
      one result), or a ``Budget(memory=…, bits=…, latency=…, max_error=…)``. ``1.0`` changes
      nothing.
    - ``calibration``: token-id tensors (B, L), strings (with ``tokenizer``), tensors or kwarg
      dicts — real data the model will see; it drives every activation-aware estimate.
    - ``plan``: replay a saved ``Plan`` (``Plan.load(path)``) — no cost model, no solver.
      Activation-aware decisions still need the same calibration to reproduce the factors.
    - ``target`` / ``workload``: "cpu" | "h100" (or a ``slimfx.cost.target.Target`` with your
      own roofline numbers), "decode" | "prefill" — what latency means. The two workloads can
      choose different forms for one site: decode is bandwidth-bound (fewer bytes win), prefill
      compute-bound (dequantizing costs, fewer FLOPs win).
    - ``families``: candidate families offered to the solver, mixed per layer under the one
      budget: "lowrank", "int8", "int4", "int4_gptq" (the default, ``DEFAULT_FAMILIES``), and
      opt-in "sparse24", "lowrank_quant", "sparse24_lowrank".
    - ``sequential``: realize the plan block by block with statistics from the already
      rewritten prefix (later layers compensate earlier error); one block's activations live
      at a time.
    - ``fisher``: weight each site's error by a Fisher-style loss sensitivity (one backward
      pass per calibration batch). ``None`` (default): on for a causal language model
      calibrated on token ids — without it an error in the head that writes the logits weighs
      no more than the same relative error inside one block, and a latency budget may spend it
      there (SmolLM2 at ``Budget(latency=0.6)``: held-out perplexity 198 unweighted vs 36.8) —
      and off otherwise; the report notes which.
    - ``sensitivity``: its estimator: "probe" (default; the loss change of two probe
      compressions, median-normalized, floored — tracks the loss behind post-/qk-norms too,
      ``slimfx.cost.sensitivity``), "kfac" (diagonal Kronecker), "fisher" (Σ E[g²]E[y²]),
      "measured" (each probe run through the model: 2·sites·4 forwards, no backward).
    - ``include`` / ``exclude``: glob patterns over site FQNs (``"model.layers.0.*"``);
      only included, non-excluded linears are candidates, and the budget is a fraction of
      their bytes. A pattern that matches no site is an error. Without ``include``, a tied
      site (an ``lm_head`` sharing the embedding's weight) is left dense and outside a bytes
      budget — rewriting it would keep a dense copy — and the report notes it.
    - ``inplace``: rewrite the given model object instead of a copy.
    - ``backend``: "eager" | "compile" | "triton" | "onnx" — what will run the model. The solver
      is offered only candidates that backend runs natively (e.g. no 2:4 for "onnx": ONNX
      Runtime would run it dense), and a replayed ``plan`` with a site the backend cannot run
      raises ``ValueError`` naming every such site (``slimfx.backends.capabilities``).
    - ``measure_loss``: each rewritten site's held-out loss change, measured (leave-one-out,
      one forward per site and batch) and predicted, in ``report.sites[i].loss_change``.
    - ``latency_cache``: measured kernel times for ``target`` — a path written by ``slimfx
      calibrate-target`` (``slimfx.calibrate_target``) or a ``MeasuredCache``. Options it holds
      are priced from it, the rest by the roofline; each report entry says which
      (``latency_source``) and a note says how many. E.g. ``target="ort-cpu", backend="onnx",
      latency_cache="ort.json"`` prices ONNX Runtime's own MatMul / MatMulNBits times.
    """
    t_start = time.perf_counter()
    # every planning option of this signature, by name (see _planning_options)
    pl = plan_model(model, budget, **_planning_options(locals()))
    bud, sites, plan, problem = pl.budget, pl.sites, pl.plan, pl.problem
    fit_batches, eval_batches = pl.fit_batches, pl.eval_batches
    notes, timings = pl.notes, pl.timings
    mods = dict(model.named_modules())

    # ---- apply
    t0 = time.perf_counter()
    dense_ref = {
        s.fqn: (
            mods[s.fqn].weight.detach().clone(),
            None if mods[s.fqn].bias is None else mods[s.fqn].bias.detach().clone(),
        )
        for s in sites
        if not isinstance(plan[s.fqn], DenseConfig)
    }
    if sequential and plan.rewrites():
        new_model, result = _apply_sequential(model, plan, sites, fit_batches, inplace, progress)
        notes.append("sequential: each block factorized with statistics from the rewritten prefix")
    else:
        new_model, result = apply_plan(
            model, plan, sites, pl.grams(), inplace=inplace, strict=True, progress=progress
        )
    timings["apply"] = time.perf_counter() - t0

    # ---- measure
    measured: dict[str, tuple[float, float]] = {}
    if eval_batches and dense_ref:
        t0 = time.perf_counter()
        measured = measure_site_errors(new_model, dense_ref, eval_batches)
        timings["measure"] = time.perf_counter() - t0

    # ---- report
    report = build_report(
        sites, plan, problem, result, measured, bud, target, workload, pl.cache
    )
    report.solver = pl.solver
    report.capture = pl.capture
    report.notes = notes
    loss_checks(report, new_model, dense_ref, eval_batches, pl.stats, measure_loss)
    if problem is not None:
        t0 = time.perf_counter()
        report.frontier = frontier(problem, [round(0.1 * i, 1) for i in range(1, 11)])
        timings["frontier"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    report.timings = timings
    report.meta = {"model_class": type(model).__name__, "plan": plan.to_dict()}
    if backend is not None:
        report.meta["backend"] = backend
    if pl.cache is not None:
        report.meta["latency_cache"] = pl.cache.summary(target_name(target))
    report.finalize(
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in new_model.parameters())
        + sum(b.numel() for b in new_model.buffers()),
    )
    setattr(new_model, REPORT_ATTR, report)
    return new_model


def _apply_sequential(
    model: nn.Module,
    plan: Plan,
    sites: list[LinearSite],
    batches: list,
    inplace: bool,
    progress: bool,
) -> tuple[nn.Module, PassResult]:
    target_model = model if inplace else copy.deepcopy(model)
    merged = PassResult(name="apply_plan(sequential)")

    def on_block(i: int, name: str, block_sites: list[LinearSite], stats: CalibrationStats) -> None:
        sub = Plan(
            {s.fqn: plan[s.fqn] for s in block_sites},
            {s.fqn: s.shape for s in block_sites},
        )
        grams = {s.fqn: stats.fit_gram(s.fqn) for s in block_sites}
        _, res = apply_plan(target_model, sub, block_sites, grams, inplace=True, strict=True)
        merged.records.extend(res.records)
        merged.modified |= res.modified

    run_sequential(target_model, sites, batches, on_block, progress=progress)
    return target_model, merged
