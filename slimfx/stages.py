"""``optimize``'s stages, run as a pipeline by the pass manager over one ``Planning`` state.

    planning: capture → check_plan (replay) → calibration → candidates → solve | complete_plan
    optimize: … → apply → measure → frontier

Each stage is a function ``stage(pl: Planning) -> PassResult`` that reads and fills the state;
``passes.manager.PassManager`` runs them with a ``TimingInstrument`` whose seconds per stage
become the report's timings, and a ``MemoryInstrument``'s resident-memory readings at each
stage's boundaries (``slimfx.stage_memory``) its memory per stage. The caller's options
travel as one ``PlanningOptions`` object.
``plan_model`` runs the planning stages only (shared with the torch.compile backend,
``slimfx.compile_api``); ``slimfx.api.optimize`` runs all of them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor, nn

from slimfx import attention_stages as attention
from slimfx import validate
from slimfx.cost.batches import batch_units
from slimfx.cost.calibration import (
    CalibrationStats,
    collect_planning_stats,
    collect_stats,
    prepare_batches,
)
from slimfx.cost.candidates import build_problem
from slimfx.cost.sequential import run_sequential
from slimfx.cost.target import MeasuredCache, Target, latency_notes
from slimfx.ir.match import linear_weight
from slimfx.ir.modules import hooked
from slimfx.ir.sites import AttentionSite, LinearSite
from slimfx.passes.base import PassResult
from slimfx.passes.manager import Instrument, PassManager, TimingInstrument
from slimfx.passes.swap import apply_plan
from slimfx.passes.validate import validate_plan
from slimfx.planning.configs import DEFAULT_FAMILIES, DenseConfig
from slimfx.planning.plan import Plan
from slimfx.planning.problem import Budget, BudgetProblem, InfeasibleBudgetError
from slimfx.planning.solve import frontier as solve_frontier
from slimfx.planning.solve import solve as solve_budget
from slimfx.pool import site_pool
from slimfx.report_builder import target_name
from slimfx.site_selection import (
    _check_weights,
    _drop_tied_sites,
    _example_call,
    _needs_gram,
    _split_heldout,
    find_sites,
    measure_site_errors,
    select_sites,
)
from slimfx.stage_memory import MemoryInstrument, TrimAfter, rss_mb, trim_heap

__all__ = [
    "PlanningOptions",
    "Planning",
    "plan_model",
    "planning_stages",
    "optimize_stages",
    "run_stages",
    "find_sites",
    "select_sites",
    "measure_site_errors",
    "FitGrams",
    "MemoryInstrument",
    "rss_mb",
    "trim_heap",
]

Stage = Callable[["Planning"], PassResult]


@dataclass(frozen=True)
class PlanningOptions:
    """Everything ``optimize`` (and the torch.compile backend's planner) is told about how to
    plan, one field per keyword of ``optimize`` with its meaning and default there."""

    calibration: Sequence | None = None
    tokenizer: Any = None
    plan: Plan | None = None
    target: str | Target = "cpu"
    workload: str = "decode"
    families: Sequence[str] = DEFAULT_FAMILIES
    fisher: bool | None = None
    sensitivity: str = "geo"
    solver: str = "auto"
    heldout: Sequence | None = None
    example_inputs: tuple | None = None
    seq_len: int = 256
    latency_cache: MeasuredCache | str | os.PathLike[str] | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    progress: bool = True
    backend: str | None = None
    kv_forms: Sequence[Any] | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> PlanningOptions:
        """The options among ``values`` (a caller's keyword arguments); others are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class FitGrams(Mapping[str, "Tensor | None"]):
    """Site FQN → ``stats.fit_gram(fqn)``, computed on read; each thread keeps the last
    group's (``CalibrationStats.group_fit_grams``)."""

    def __init__(self, stats: CalibrationStats, fqns: Sequence[str]) -> None:
        self.stats, self.fqns = stats, list(dict.fromkeys(fqns))
        self._known = set(self.fqns)
        self._fit = stats.group_fit_grams()

    def __getitem__(self, fqn: str) -> Tensor | None:
        if fqn not in self._known:
            raise KeyError(fqn)
        return self._fit(fqn)

    def __iter__(self) -> Iterator[str]:
        return iter(self.fqns)

    def __len__(self) -> int:
        return len(self.fqns)


@dataclass
class Planning:
    """The state the stages fill: the sites, the statistics, the problem and solution
    (``None`` when a plan was replayed), the complete Plan; after ``optimize``'s own stages
    the rewritten model, the pass result and the measured errors."""

    budget: Budget
    options: PlanningOptions = field(default_factory=PlanningOptions)
    model: nn.Module | None = None
    sites: list[LinearSite] = field(default_factory=list)
    attention_sites: list[AttentionSite] = field(default_factory=list)
    attention_inputs: dict[str, list] = field(default_factory=dict)
    kv_refused: dict[str, list[str]] = field(default_factory=dict)
    #: candidates the backend cannot run: reason → ["fqn [decision]", ...]
    backend_refused: dict[str, list[str]] = field(default_factory=dict)
    plan: Plan | None = None
    capture: dict[str, Any] = field(default_factory=dict)
    fit_batches: list = field(default_factory=list)
    eval_batches: list = field(default_factory=list)
    stats: CalibrationStats | None = None
    problem: BudgetProblem | None = None
    solution: Any = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cache: MeasuredCache | None = None
    batches: list = field(default_factory=list)
    heldout: list | None = None
    # optimize's stages
    sequential: bool = False
    inplace: bool = False
    rewritten: nn.Module | None = None
    result: PassResult | None = None
    measured: dict[str, tuple[float, float]] = field(default_factory=dict)
    frontier: list = field(default_factory=list)
    dense_ref: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    family_seconds: dict[str, float] = field(default_factory=dict)

    def grams(
        self, sites: Sequence[LinearSite] | None = None
    ) -> Mapping[str, Tensor | None] | None:
        """The (damped) Gram each site is fitted with, by site FQN, or ``None`` without
        statistics. Each is formed when it is read (``FitGrams``), so a rewrite holds one
        damped copy at a time rather than one per site."""
        if self.stats is None:
            return None
        return FitGrams(self.stats, [s.fqn for s in (sites or self.sites)])

    @property
    def solver(self) -> str:
        return self.solution.solver if self.solution is not None else "replayed plan"


# ------------------------------------------------------------------------------ stages


def _done(name: str, modified: bool = False) -> PassResult:
    return PassResult(name=name, modified=modified)


def start(pl: Planning) -> None:
    """Checks before any work (``slimfx.validate``): the model, the options, the plan's type,
    the budget, the latency cache, the calibration and held-out batches (tokenized here)."""
    opts = pl.options
    pl.model = validate.check_model(pl.model)  # unwraps torch.compile; refuses TorchScript, meta
    validate.check_options(
        target=opts.target, workload=opts.workload, families=opts.families,
        seq_len=opts.seq_len, include=opts.include, exclude=opts.exclude, solver=opts.solver,
        sensitivity=opts.sensitivity, backend=opts.backend, example_inputs=opts.example_inputs,
    )  # fmt: skip
    if opts.heldout is not None:
        pl.heldout = validate.heldout_batches(pl.model, opts, pl.notes)
    if opts.plan is not None and not isinstance(opts.plan, Plan):
        raise TypeError(f"plan must be a slimfx Plan, got {type(opts.plan).__name__}")
    pl.cache = MeasuredCache.of(opts.latency_cache, opts.target)
    if opts.calibration is not None:
        if isinstance(opts.calibration, (str, bytes)):
            raise TypeError("calibration must be a list of batches or strings, not one string")
        items = validate.calibration_items(opts.calibration)
        seq_len = validate.window_length(pl.model, items, opts.seq_len, pl.notes)
        pl.batches = prepare_batches(items, tokenizer=opts.tokenizer, seq_len=seq_len)
        pl.batches = validate.check_batches(pl.model, pl.batches, pl.notes)
        if not pl.batches:
            raise ValueError("calibration is empty: pass at least one batch of real inputs")
    pl.notes += validate.option_notes(opts, pl.batches, pl.heldout)


def capture(pl: Planning) -> PassResult:
    """Capture the model, find its linear sites, apply include/exclude (and leave tied sites
    out of a bytes budget), check their weights."""
    model, opts = pl.model, pl.options
    assert model is not None
    if opts.example_inputs is not None:
        example = (tuple(opts.example_inputs), {})
    elif pl.batches:
        example = _example_call(model, pl.batches[0])
    else:
        raise ValueError(
            "optimize needs calibration data (or example_inputs when replaying a plan that "
            "uses no activation-aware decision) to capture the model"
        )
    graph_attention: list[AttentionSite] = []
    sites, pl.capture = find_sites(model, example, graph_attention)
    pl.notes += [f"{k}: {why}" for k, why in pl.capture.get("left_alone", {}).items()]
    pl.notes += [f"weights: {pl.capture['uncovered']}"] if "uncovered" in pl.capture else []
    if pl.capture["method"] != "export":
        pl.notes.append(
            "torch.export failed; sites found by module-level discovery instead: "
            + pl.capture.get("fallback_reason", "")[:300]
        )
    if not sites:
        raise ValueError("no linear layers found in this model: nothing to optimize")
    sites = select_sites(sites, opts.include, opts.exclude, pl.notes)
    if opts.plan is not None and opts.include is None:
        decided = {*opts.plan.decisions, *opts.plan.owned_by}
        why = "not in the replayed plan: left dense and outside the report, as in its solve"
        sites = _drop_tied_sites(sites, pl.notes, keep=decided, why=why)
    elif opts.include is None and pl.budget.latency is None:
        sites = _drop_tied_sites(sites, pl.notes)
    _check_weights(model, sites)
    pl.sites = sites
    if attention.wanted(pl):
        attention.find(pl, graph_attention)
    else:
        attention.note_unpriced(pl)
    return _done("capture")


def check_plan(pl: Planning) -> PassResult:
    """A replayed plan: its sites and shapes (``passes.validate.validate_plan``), what the
    backend runs, and the calibration its activation-aware decisions need."""
    plan, opts = pl.options.plan, pl.options
    assert plan is not None
    validate_plan(plan, [*pl.sites, *pl.attention_sites])
    if opts.backend is not None:
        from slimfx.backends.capabilities import check_plan as backend_check

        bad = backend_check(opts.backend, plan, pl.sites)
        if bad:
            raise ValueError(
                f"the plan has {len(bad)} site(s) backend {opts.backend!r} cannot run:\n  "
                + "\n  ".join(bad)
            )
    aware = [k for k, d in plan.items() if _needs_gram(d)]
    if aware and not pl.batches:
        raise ValueError(
            f"the plan uses activation-aware decisions at {len(aware)} site(s) (e.g. "
            f"{aware[0]}: {plan[aware[0]].short()}); pass the same calibration= to "
            "reproduce their factors"
        )
    return _done("check_plan")


def calibration(pl: Planning) -> PassResult:
    """Split fit / held-out batches; collect the statistics planning (or a replayed plan's
    activation-aware decisions) needs."""
    model, opts, plan = pl.model, pl.options, pl.options.plan
    assert model is not None
    fit, held, note = _split_heldout(pl.batches, pl.heldout) if pl.batches else ([], [], None)
    pl.fit_batches, pl.eval_batches = fit, held
    if note:
        pl.notes.append(note)
    if not fit or (plan is not None and not any(_needs_gram(d) for d in plan.values())):
        return _done("calibration")
    if plan is None:
        pl.stats, note = collect_planning_stats(
            model, pl.sites, fit, opts.fisher, opts.progress, estimator=opts.sensitivity
        )
        if note:
            pl.notes.append(note)
    else:  # a replayed plan needs the Grams only
        pl.stats = collect_stats(model, pl.sites, fit, fisher=False, progress=opts.progress)
    pl.stats.check_not_silent()  # all-zero inputs: every error would measure 0
    if pl.attention_sites and plan is None:
        attention.collect(pl)
    thin = pl.stats.underdetermined()
    if thin:
        grp, (n, f) = next(iter(thin.items()))
        pl.notes.append(
            f"calibration too small: {len(thin)} input group(s) saw fewer tokens than "
            f"input features (e.g. {grp}: {n} tokens for {f} features); activation-aware "
            "estimates are optimistic there — pass more calibration tokens"
        )
    return _done("calibration", True)


def candidates(pl: Planning) -> PassResult:
    """Price every candidate of every site (``cost.candidates.build_problem``)."""
    model, opts = pl.model, pl.options
    assert model is not None
    mods = dict(model.named_modules())
    weights = {s.fqn: linear_weight(mods[s.fqn]).detach() for s in pl.sites}
    allow = None
    if opts.backend is not None:
        from slimfx.backends.capabilities import allow_fn

        allow = allow_fn(opts.backend)
    families = tuple(opts.families)
    b = pl.budget
    if b.kv is not None and all(
        v is None for v in (b.memory, b.bits, b.latency, b.max_error, b.total_bytes)
    ):  # nothing limits the weights: every linear keeps its (error-free) dense form
        families = ()
        pl.notes.append("the budget caps the KV cache only: the linears stay dense (not priced)")
    pl.problem, _ = build_problem(
        pl.sites,
        weights,
        pl.stats,
        target=opts.target,
        workload=opts.workload,
        families=families,
        cache=pl.cache,
        progress=opts.progress,
        allow=allow,
        family_seconds=pl.family_seconds,
    )
    pl.notes += latency_notes(pl.cache, pl.problem.meta.get("latency_sources", {}),
                              target_name(opts.target), opts.backend, pl.budget.latency)  # fmt: skip
    if pl.attention_sites:
        attention.add_options(pl)
    if allow is not None:
        pl.backend_refused = dict(allow.refused)  # type: ignore[attr-defined]
    if pl.problem.meta.get("not_allowed"):
        pl.notes.append(
            f"backend {opts.backend}: {pl.problem.meta['not_allowed']} candidate(s) it cannot "
            f"run natively were not offered ({_refusals(pl.backend_refused)})"
        )
    return _done("candidates", True)


def _refusals(refused: dict[str, list[str]], n: int = 3) -> str:
    """The most frequent reasons in ``refused`` (reason → what it refused), each with a count
    and an example."""
    top = sorted(refused.items(), key=lambda kv: -len(kv[1]))[:n]
    return "; ".join(f"{len(w)} × {why} (e.g. {w[0]})" for why, w in top)


def solve(pl: Planning) -> PassResult:
    """Solve the budget and turn the solution into the Plan."""
    opts = pl.options
    assert pl.problem is not None and pl.model is not None
    try:
        with attention.explaining_infeasible(pl):  # a cache budget's error says what limits it
            pl.solution = solve_budget(pl.problem, pl.budget, method=opts.solver)
    except InfeasibleBudgetError as exc:
        if not pl.backend_refused:
            raise
        raise InfeasibleBudgetError(
            f"{exc} (backend {opts.backend} left out {pl.problem.meta.get('not_allowed', 0)} "
            f"candidate(s) it cannot run: {_refusals(pl.backend_refused)})", exc.limits
        ) from None
    if pl.solution.note:
        pl.notes.append(f"solver: {pl.solution.note}")
    grown = pl.solution.bytes - pl.problem.dense_bytes
    if grown > 0:  # only a cache budget lets the weights grow: the chosen KV forms' own weights
        pl.notes.append(
            f"the chosen attention forms add {grown / 1e6:.2f} MB of weights over the dense "
            "linears (low-rank caches keep the original k/v projections for their sink tokens; "
            "MLA stores its query maps); a kv= budget alone does not bound the weights: add "
            "memory=1.0 to the Budget to keep them at most dense"
        )
    pl.plan = pl.solution.to_plan(
        shapes={s.fqn: s.site_shape for s in [*pl.sites, *pl.attention_sites]},
        meta={
            "budget": pl.budget.to_dict(),
            "target": target_name(opts.target),
            "workload": opts.workload,
            "families": list(opts.families),
            "solver": pl.solution.solver,
            "model_class": type(pl.model).__name__,
        },
    )
    return _done("solve", True)


def complete_plan(pl: Planning) -> PassResult:
    """A replayed plan completed to every site (dense where it says nothing and no other
    site's decision owns the site)."""
    plan = pl.options.plan
    assert plan is not None
    unplanned = [s.fqn for s in pl.sites if s.fqn not in plan.owned_by]
    pl.plan = Plan(
        {**{fqn: DenseConfig() for fqn in unplanned}, **dict(plan.decisions)},
        {**{s.fqn: s.site_shape for s in [*pl.sites, *pl.attention_sites]}, **plan.shapes},
        dict(plan.meta),
        dict(plan.owned_by),
    )
    return _done("complete_plan")


def apply(pl: Planning) -> PassResult:
    """Rewrite the model (a copy unless ``inplace``) by the plan: module swap, or block by
    block with statistics from the rewritten prefix when ``sequential``. The dense weights of
    the rewritten sites are kept first when there are held-out batches to measure them on."""
    model, full = pl.model, pl.plan
    assert model is not None and full is not None
    plan, kv = attention.split(full)  # linear decisions for the module swap; KV forms after it
    swapped = hooked(model, [*plan.rewrites(), *(k for k, d in kv.items() if d.owns)])
    if swapped:
        pl.notes.append(
            f"{len(swapped)} rewritten module(s) had forward hooks (e.g. {swapped[0]}): they "
            "run on the modules that replace them, with the rewritten outputs"
        )
    if pl.eval_batches:
        # the caller's model is rewritten only with ``inplace``: otherwise its own tensors are
        # the dense reference (a copy would hold every rewritten weight twice more)
        keep = (lambda t: t.detach().clone()) if pl.inplace else (lambda t: t.detach())
        mods = dict(model.named_modules())
        pl.dense_ref = {
            s.fqn: (
                keep(linear_weight(mods[s.fqn])),
                None if getattr(mods[s.fqn], "bias", None) is None else keep(mods[s.fqn].bias),
            )
            for s in pl.sites
            if s.fqn in plan and not isinstance(plan[s.fqn], DenseConfig)
        }
    if pl.sequential and plan.rewrites():
        pl.rewritten, pl.result = _apply_sequential(
            model, plan, pl.sites, pl.fit_batches, pl.inplace, pl.options.progress
        )
        pl.notes.append(
            "sequential: each block factorized with statistics from the rewritten prefix"
        )
    else:
        target = model if pl.inplace else _copy_sharing(model, plan, pl.sites)
        pl.rewritten, pl.result = apply_plan(
            target,
            plan,
            pl.sites,
            pl.grams(),
            inplace=True,
            strict=True,
            progress=pl.options.progress,
        )
    if kv:
        done = attention.apply(pl, kv)
        pl.result.modified |= bool(done)
    return PassResult("apply", pl.result.modified, pl.result.records, pl.result.seconds)


def measure(pl: Planning) -> PassResult:
    """Each rewritten layer's output error on the held-out batches."""
    if pl.dense_ref and pl.rewritten is not None:
        fit = len(batch_units(pl.fit_batches))  # the user's batches (a padded one split)
        first = 0 if pl.heldout is not None or len(batch_units(pl.batches)) < 2 else fit
        what = "heldout batch" if pl.heldout is not None else "calibration batch"
        pl.measured = measure_site_errors(pl.rewritten, pl.dense_ref, pl.eval_batches,
                                          what=what, first=first)  # fmt: skip
    return _done("measure")


def frontier(pl: Planning) -> PassResult:
    """The error–budget frontier of the solved problem (the report's plot)."""
    if pl.problem is not None and any(
        len(s.options) > 1 for s in pl.problem.sites if s.kind == "linear"
    ):
        # independent solves, run side by side (the MILP solver releases the GIL): the same
        # points as one after the other
        problem, fractions = pl.problem, [round(0.1 * i, 1) for i in range(1, 11)]
        points = site_pool(lambda f: solve_frontier(problem, [f]), fractions)
        pl.frontier = [p for one in points for p in one]
    return _done("frontier")


# ------------------------------------------------------------------------------ pipelines


def planning_stages(options: PlanningOptions) -> list[Stage]:
    """The planning pipeline for ``options``: a replayed plan is checked and completed, a
    budget is priced and solved."""
    if options.plan is not None:
        return [capture, check_plan, calibration, complete_plan]
    return [capture, calibration, candidates, solve]


def optimize_stages(options: PlanningOptions) -> list[Stage]:
    """``optimize``'s pipeline: planning, then apply, measure and the frontier."""
    return [*planning_stages(options), apply, measure, frontier]


def run_stages(
    pl: Planning, stages: Sequence[Stage], instruments: Sequence[Instrument] = ()
) -> Planning:
    """Run ``stages`` over ``pl`` with the pass manager; their seconds go to ``pl.timings``,
    their resident memory (``MemoryInstrument``, MB) to ``pl.memory``."""
    timing, memory = TimingInstrument(), MemoryInstrument()
    PassManager(list(stages), [timing, memory, TrimAfter(), *instruments]).run(pl)
    for name, seconds in timing.timings:
        pl.timings[name] = pl.timings.get(name, 0.0) + seconds
    pl.memory.update(memory.memory)
    return pl


def plan_model(
    model: nn.Module,
    budget: float | Budget | None = 0.5,
    options: PlanningOptions | None = None,
    *,
    instruments: Sequence[Instrument] = (),
    **kwargs: Any,
) -> Planning:
    """``optimize``'s planning half — capture, sites, checks, calibration statistics,
    candidates, solve (or complete a replayed plan) — without rewriting anything. Shared by
    ``optimize`` and the torch.compile backend (``slimfx.compile_api``). ``options`` or the
    same keywords as ``optimize`` (``PlanningOptions``'s fields), not both."""
    if options is not None and kwargs:
        raise TypeError("give options= or keyword options, not both")
    opts = options if options is not None else PlanningOptions(**kwargs)
    pl = Planning(Budget.of(budget), opts, model)
    start(pl)
    return run_stages(pl, planning_stages(opts), instruments)


def _copy_sharing(model: nn.Module, plan: Plan, sites: Sequence[LinearSite]) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) the weight of every site
    the plan rewrites and whose weight no other module uses: ``apply_plan`` reads them once to
    build the replacement and then drops the copy's linear, so copying them would only hold
    every rewritten weight twice at the peak. The caller's tensors are never written."""
    mods = dict(model.named_modules())
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    memo: dict[int, Any] = {}
    for s in sites:
        d = plan.decisions.get(s.fqn)
        if d is None or isinstance(d, DenseConfig) or s.tied:
            continue
        lin = mods[s.fqn]
        w = lin.weight
        if isinstance(w, Tensor) and owners.get(id(w), 0) == 1:
            memo[id(w)] = w
    return copy.deepcopy(model, memo)


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
            {s.fqn: plan[s.fqn] for s in block_sites if s.fqn in plan},
            {s.fqn: s.site_shape for s in block_sites},
        )
        grams = {s.fqn: stats.fit_gram(s.fqn) for s in block_sites}
        _, res = apply_plan(target_model, sub, block_sites, grams, inplace=True, strict=True)
        merged.records.extend(res.records)
        merged.modified |= res.modified

    run_sequential(target_model, sites, batches, on_block, progress=progress)
    return target_model, merged
