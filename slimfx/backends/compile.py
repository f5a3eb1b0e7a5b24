"""The ``torch.compile`` backend: apply one slimfx Plan to every dynamo sub-graph, then compile.

    torch.compile(model, backend="slimfx")                 # out of the box: see "Default" below
    torch.compile(model, backend=slimfx.backend(budget=0.5, model=model, calibration=batches))
    torch.compile(model, backend=slimfx.backends.plan_backend(plan=plan, model=model))

Dynamo hands the backend one ``GraphModule`` per graph-broken region of the model, and a new
one on every recompile (a new input shape, a failed guard). For each one the backend

1. finds the linear nodes (``torch._C._nn.linear`` / ``aten.linear`` / ``F.linear``) and maps
   each weight back to the model's parameter FQN. Recent torch lifts parameters to graph
   inputs (placeholders ``L_self_modules_fc1_parameters_weight_``); the tensors at those
   positions of ``example_inputs`` are the parameters themselves, so with ``model=`` they are
   matched by identity; without it by their normalized names (``…_modules_fc1_parameters_
   weight_`` → ``fc1.weight``; mangled ``L__self___fc1_weight`` / ``p_fc1_weight`` against the
   Plan's FQNs). The module that owns the weight (the node's own module when its ``.weight``
   is that tensor, else an ``nn.Linear`` holding it) is the site; linears reading the same
   input node share a group. Linears whose weight is computed in the graph, and ``nn.Linear``
   submodule calls, are left alone and recorded (``graph_sites``).
2. builds the ``LinearSite`` s of this sub-graph and takes their decisions from the Plan (given,
   or solved once for the whole model by a planner), so sites of other sub-graphs are simply
   absent here;
3. applies them with ``passes.graph_rewrite.apply_plan_graph`` — the same rules and
   factorization code as the module swap — with one ``factor_cache`` keyed by parameter
   identity shared by all sub-graphs and recompiles: no weight is factorized twice;
4. optionally lowers slimfx ops to Triton kernel ops (``triton_lowering.lower_graph``), not
   when gradients may flow (the kernel ops have no backward: recorded as a fallback); on a
   CPU graph without gradients, the quantized op nodes left are packed for torch's CPU
   kernels (``cpu_pack.pack_graph_cpu``, ``cpu_kernels=True``) — the kernels eager runs;
5. hands the graph to the inner backend (``"inductor"`` by default; ``"eager"``,
   ``"aot_eager"``, any registered name or a callable).

Every sub-graph leaves a :class:`GraphRecord`; ``backend_obj.report`` (or
:func:`report_of_compiled`) joins them into a :class:`slimfx.report.Report`: per site, what was
applied (in which graphs, factor-cache hits), rejected or skipped, and why
(``compile_records``). The factor tensors the rewrite adds are graph buffers; each gets a
dynamo ``ConstantSource`` so aot_autograd (aot_eager, inductor) accepts them.

Default (``backend="slimfx"`` with no options): there is no calibration data, so no rewrite
that needs it — no budget, no plan, **no linear is rewritten**. slimfx ops already in the graph
(a model returned by ``slimfx.optimize``) are lowered to Triton kernel ops where a kernel
accepts them (every fallback recorded with its reason), then inductor compiles the graph. The
report says so. ``torch.compile(..., backend="slimfx", options={...})`` takes the keyword
arguments of :func:`plan_backend` (e.g. ``{"plan": plan, "model": model, "inner": "eager"}``);
those sessions lower by default too; ``mode=`` is passed to inductor as its mode options.

Layering: solving a budget needs the cost model and the solver, which ``slimfx.backends`` may
not import. ``plan_backend(budget=…)`` therefore takes a ``planner`` callable; the top-level
``slimfx.backend`` (``slimfx.compile_api``) is this same function with the planner that reuses
``slimfx.api``'s machinery wired in.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, fx, nn

from slimfx.backends.compile_records import (
    DEFAULT_NOTE,
    GraphRecord,
    Planned,
    compile_report,
    merge_records,
)
from slimfx.backends.cpu_pack import (
    GRAD_REASON,
    grads_may_flow,
    grads_on_cpu,
    not_packed,
    pack_graph_cpu,
    wants_cpu_pack,
)
from slimfx.backends.graph_sites import GraphSites, graph_linear_sites, param_name_from_placeholder
from slimfx.backends.triton_lowering import lower_graph, not_lowered
from slimfx.passes.base import PassResult, Rule, SiteRecord
from slimfx.passes.graph_rewrite import apply_plan_graph
from slimfx.passes.manager import PassManager, TimingInstrument
from slimfx.passes.validate import validate_plan, weight_sites
from slimfx.planning.configs import DEFAULT_FAMILIES, Decision
from slimfx.planning.plan import Plan
from slimfx.report import Report

__all__ = [
    "slimfx_backend",
    "plan_backend",
    "SlimfxBackend",
    "Planned",
    "GraphRecord",
    "GraphSites",
    "graph_linear_sites",
    "param_name_from_placeholder",
    "report_of_compiled",
    "default_session",
    "clear_sessions",
    "DEFAULT_NOTE",
]

#: ``planner(model, *, budget, plan, calibration, families, target, workload, **kw) -> Planned``
Planner = Callable[..., "Planned"]

# --------------------------------------------------------------------------- the backend


def _resolve_inner(inner: str | Callable, options: Mapping[str, Any] | None) -> Callable:
    if callable(inner):
        fn = inner
    elif inner == "eager":
        return lambda gm, example_inputs: gm.forward
    elif inner == "slimfx":
        raise ValueError("inner='slimfx' would call this backend again; pick 'inductor' or another")
    else:
        from torch._dynamo.backends.registry import lookup_backend

        fn = lookup_backend(inner)
    return functools.partial(fn, **options) if options else fn


def _give_constants_a_source(gm: fx.GraphModule) -> None:
    """Name a dynamo-level Source for every tensor attribute slimfx added to a dynamo graph.

    aot_autograd (under aot_eager and inductor) maps each parameter and buffer of a dynamo
    graph to the Source it was read from (``gm._param_name_to_source``, set by dynamo) to
    dedup inputs and mark static ones, and fails on an attribute it cannot map. The factor
    tensors the rewrite registered come from no user code, so each gets a ``ConstantSource``
    spelled after it. Graphs not made by dynamo are left alone."""
    table = getattr(gm, "_param_name_to_source", None)
    if not isinstance(table, dict):
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in table:
            table[name] = ConstantSource(f"__slimfx_constant_{name.replace('.', '_')}")


NO_GRAD_REASON = (
    "gradients may flow through this graph (grad mode on, inputs that require grad) and the "
    "Triton kernel ops have no backward: lowering is for inference (torch.no_grad / "
    "torch.inference_mode)"
)


def _short(d: Decision) -> str:
    return d.short()


class _Subgraph:
    """One sub-graph's run of the backend's pipeline: the passes are bound methods that fill
    the fields the sub-graph's :class:`GraphRecord` is made of."""

    def __init__(self, be: SlimfxBackend, example_inputs: Sequence[Any]) -> None:
        self.be, self.example_inputs = be, example_inputs
        self.found: GraphSites | None = None
        self.rewrite_result: PassResult | None = None
        self.lowering: PassResult | None = None
        self.not_planned: list[str] = []

    def rewrite(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, PassResult]:
        """Map the graph's linears to the model's sites and apply the plan's decisions."""
        be = self.be
        found = self.found = graph_linear_sites(
            gm,
            self.example_inputs,
            be.model,
            candidates=[f"{f}.weight" if f else "weight" for f in (be.plan or ())],
        )
        be.check_same_model(self.example_inputs, found)
        self.not_planned = [s.fqn for s in found.sites if be.plan is None or s.fqn not in be.plan]
        if be.plan is None:
            return gm, PassResult(name="apply_plan_graph")
        here = [s for s in found.sites if s.fqn in be.plan]
        blocked = {s.fqn for s in here if s.fqn in found.left_alone}
        blocked |= {p for p in found.left_alone if p in be.plan}
        here = [s for s in here if s.fqn not in blocked]
        rewrite = None
        if here:
            sub = Plan(
                {s.fqn: be.plan[s.fqn] for s in here},
                {s.fqn: be.plan.shapes[s.fqn] for s in here if s.fqn in be.plan.shapes},
                dict(be.plan.meta),
            )
            gm, rewrite = apply_plan_graph(
                gm,
                sub,
                here,
                {s.fqn: found.weights[s.fqn] for s in here},
                be.grams,
                strict=be.strict,
                factor_cache=be.factor_cache,
                rules=be.rules,
            )
        if blocked:
            rewrite = rewrite or PassResult(name="apply_plan_graph")
            for fqn in sorted(blocked):
                d = be.plan[fqn]
                rewrite.records.append(SiteRecord(fqn, _short(d), "skipped", found.left_alone[fqn]))
        self.rewrite_result = rewrite
        return gm, rewrite or PassResult(name="apply_plan_graph")

    def pack_cpu(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, PassResult]:
        """Quantized op nodes → torch's packed CPU kernels (``backends.cpu_pack``)."""
        gm, packed = pack_graph_cpu(gm)
        if self.lowering is not None:  # keep Triton's records of the nodes it lowered
            taken = {r.fqn for r in packed.records}
            kept = [r for r in self.lowering.records if r.fqn not in taken]
            packed.records[:0] = kept
            packed.modified = packed.modified or self.lowering.modified
        self.lowering = packed
        return gm, packed

    def skip_pack(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, PassResult]:
        """Records why a CPU graph with gradients keeps its reference quantized ops."""
        self.lowering = not_packed(gm, GRAD_REASON)
        return gm, self.lowering

    def lower(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, PassResult]:
        """Lower slimfx ops to Triton kernel ops (not when gradients may flow)."""
        if grads_may_flow(self.example_inputs):
            self.lowering = not_lowered(gm, NO_GRAD_REASON)
        else:
            gm, self.lowering = lower_graph(gm)
        return gm, self.lowering


def constant_sources(gm: fx.GraphModule) -> PassResult:
    """``_give_constants_a_source`` as a pipeline pass."""
    _give_constants_a_source(gm)
    return PassResult(name="constant_sources")


class SlimfxBackend:
    """A configured slimfx ``torch.compile`` backend (see the module docstring).

    Call it as dynamo does, ``backend_obj(gm, example_inputs)``; it rewrites, optionally
    lowers, and returns what the inner backend compiled. State kept across sub-graphs and
    recompiles: ``factor_cache`` (parameter identity × decision → factors) and ``graphs``
    (one :class:`GraphRecord` each). ``report`` joins them.
    """

    def __init__(
        self,
        plan: Plan | None = None,
        *,
        model: nn.Module | None = None,
        grams: Mapping[str, Tensor | None] | None = None,
        inner: str | Callable = "inductor",
        inner_options: Mapping[str, Any] | None = None,
        lower_to_triton: bool = False,
        cpu_kernels: bool = True,
        rules: Mapping[str, Rule] | None = None,
        strict: bool = True,
        planned: Planned | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        if planned is not None:
            if plan is not None and plan is not planned.plan:
                raise ValueError("give plan= or planned=, not both")
            plan, grams = planned.plan, planned.grams if grams is None else grams
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be a slimfx Plan, got {type(plan).__name__}")
        self.plan = plan
        self.model = model
        self.grams = grams
        self.inner_name = (
            inner if isinstance(inner, str) else getattr(inner, "__name__", "callable")
        )
        self._inner = _resolve_inner(inner, inner_options)
        self.lower_to_triton = lower_to_triton
        self.cpu_kernels = cpu_kernels
        self.rules = rules
        self.strict = strict
        self.planned = planned
        self.notes = list(notes)
        self.factor_cache: dict = {}
        self.graphs: list[GraphRecord] = []
        if model is not None and plan is not None:
            validate_plan(plan, weight_sites(model))

    def check_same_model(self, example_inputs: Sequence[Any], found: GraphSites) -> None:
        """Raise when the graph's weights are none of ``model=``'s: the backend was built for
        one module and is compiling another, so none of the planned sites can be found."""
        if self.model is None or self.plan is None or not self.plan.rewrites():
            return
        params = [t for t in example_inputs if isinstance(t, nn.Parameter)]
        own = {id(p) for p in self.model.parameters()}
        foreign = [u for u in found.unresolved if "is not a parameter of the model" in u]
        if (params and not any(id(p) in own for p in params)) or (foreign and not found.sites):
            raise ValueError(
                f"slimfx backend: this graph's weights belong to no module of the model= it "
                f"was built for ({type(self.model).__name__}), so none of the plan's "
                f"{len(self.plan.rewrites())} rewritten site(s) can be found; build the "
                "backend with model= the module you compile"
            )

    # ----------------------------------------------------------------- per sub-graph
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        t0 = time.perf_counter()
        run = _Subgraph(self, example_inputs)
        passes: list[Any] = [run.rewrite]
        if self.lower_to_triton:
            passes.append(run.lower)
        if self.cpu_kernels and wants_cpu_pack(example_inputs):
            passes.append(run.pack_cpu)  # what Triton did not take, on a CPU graph
        elif self.cpu_kernels and grads_on_cpu(example_inputs) and not self.lower_to_triton:
            passes.append(run.skip_pack)  # recorded: the reference ops run
        passes.append(constant_sources)
        timing = TimingInstrument()
        gm, _ = PassManager(passes, [timing]).run(gm)
        refs = [weakref.ref(t) for t in example_inputs if isinstance(t, nn.Parameter)]
        self.graphs.append(
            GraphRecord(
                index=len(self.graphs),
                sites=run.found.sites if run.found is not None else [],
                rewrite=run.rewrite_result,
                lowering=run.lowering,
                unresolved=run.found.unresolved if run.found is not None else [],
                not_planned=run.not_planned,
                seconds=time.perf_counter() - t0,
                param_refs=refs,
                timings=list(timing.timings),
            )
        )
        return self._inner(gm, example_inputs)

    def clear(self) -> None:
        """Forget the factor cache and the graph records (not called by dynamo's reset)."""
        self.factor_cache.clear()
        self.graphs.clear()

    # ----------------------------------------------------------------- report
    @property
    def report(self) -> Report:
        """The Report of every sub-graph compiled so far (built fresh on each access)."""
        return self.report_for(self.graphs)

    def report_for(self, graphs: Sequence[GraphRecord]) -> Report:
        """The Report of the given sub-graph records (see ``compile_records.compile_report``)."""
        return compile_report(self, graphs)

    def merged_result(self, graphs: Sequence[GraphRecord] | None = None) -> PassResult:
        """One record per site over ``graphs`` (default: all); see ``merge_records``."""
        return merge_records(self, self.graphs if graphs is None else graphs)


# --------------------------------------------------------------------------- factories


def plan_backend(
    budget: Any = None,
    plan: Plan | None = None,
    calibration: Sequence | None = None,
    families: Sequence[str] = DEFAULT_FAMILIES,
    target: str = "cpu",
    workload: str = "decode",
    inner: str | Callable = "inductor",
    lower_to_triton: bool = False,
    *,
    model: nn.Module | None = None,
    grams: Mapping[str, Tensor | None] | None = None,
    rules: Mapping[str, Rule] | None = None,
    strict: bool = True,
    inner_options: Mapping[str, Any] | None = None,
    planner: Planner | None = None,
    cpu_kernels: bool = True,
    **kw: Any,
) -> SlimfxBackend:
    """A configured slimfx backend for ``torch.compile(model, backend=...)``.

    - ``plan``: apply this Plan (no solver). With ``model=`` the graph's parameters are matched
      by identity and the plan's FQNs checked against the model; ``grams`` (site FQN → input
      Gram) feed activation-aware decisions (identity when absent).
    - ``budget`` (+ ``model``, ``calibration``, ``families``, ``target``, ``workload``, and
      ``**kw`` such as ``tokenizer``, ``include``, ``exclude``, ``solver``): solve one Plan for
      the whole model once, with ``planner`` (``slimfx.backend`` passes the one built on
      ``slimfx.api``), then apply it per sub-graph. ``plan`` + ``calibration`` likewise
      collects the statistics the plan's activation-aware decisions need.
    - ``inner``: the backend that compiles the rewritten graph: ``"inductor"`` (default),
      ``"eager"``, ``"aot_eager"``, a registered name or a callable; ``inner_options`` are
      passed to it as keyword arguments.
    - ``lower_to_triton``: lower slimfx ops to Triton kernel ops where a kernel accepts them.
    - ``cpu_kernels`` (keyword, default True): on CPU graphs, pack the quantized op nodes for
      torch's CPU kernels (``backends.cpu_pack``).
    - ``rules`` / ``strict``: as in ``passes.apply_plan_graph`` (strict: a rejected decision
      fails the compilation with every reason).

    With neither budget nor plan the backend rewrites nothing (it still lowers when asked).
    """
    if budget is not None and plan is not None:
        raise ValueError("give budget= (solve a plan) or plan= (replay one), not both")
    planned = None
    if budget is not None or calibration is not None:
        if planner is None:
            raise ValueError(
                "plan_backend(budget=...) / calibration= needs the cost model and the solver, which "
                "slimfx.backends may not import: call slimfx.backend(budget=..., model=..., "
                "calibration=...) (the same function with slimfx.api's planner), or pass a "
                "plan= (and grams=) or a planner="
            )
        if model is None:
            raise ValueError("plan_backend(budget=...) needs model= (the model torch.compile wraps)")
        planned = planner(
            model,
            budget=budget,
            plan=plan,
            calibration=calibration,
            families=tuple(families),
            target=target,
            workload=workload,
            **kw,
        )
        plan = None
    elif kw:
        raise TypeError(f"plan_backend() got unexpected keyword arguments {sorted(kw)}")
    return SlimfxBackend(
        plan,
        model=model,
        grams=grams,
        inner=inner,
        inner_options=inner_options,
        lower_to_triton=lower_to_triton,
        cpu_kernels=cpu_kernels,
        rules=rules,
        strict=strict,
        planned=planned,
    )


#: torch.compile(options=...) dict id → (the dict, its backend); None → the default session.
_SESSIONS: dict[Any, tuple[Any, SlimfxBackend]] = {}


def default_session() -> SlimfxBackend:
    """The backend behind ``torch.compile(model, backend="slimfx")`` without options (one per
    process: rewrites nothing, lowers slimfx ops, inductor)."""
    if None not in _SESSIONS:
        _SESSIONS[None] = (None, SlimfxBackend(lower_to_triton=True, inner="inductor"))
    return _SESSIONS[None][1]


def clear_sessions() -> None:
    """Drop every backend the ``"slimfx"`` entry point created (their caches and records)."""
    _SESSIONS.clear()


def _session(options: Mapping[str, Any] | None, mode: str | None) -> SlimfxBackend:
    if not options and not mode:
        return default_session()
    key: Any = id(options) if options else ("mode", mode)
    if key in _SESSIONS:
        return _SESSIONS[key][1]
    opts = dict(options or {})
    opts.setdefault("lower_to_triton", True)
    inner = opts.get("inner", "inductor")
    if mode:
        if inner != "inductor":
            raise ValueError(
                f"torch.compile(mode={mode!r}) applies to inductor, not inner={inner!r}"
            )
        from torch._inductor import list_mode_options

        io = dict(opts.get("inner_options") or {})
        io.setdefault("config_patches", {}).update(list_mode_options(mode))
        opts["inner_options"] = io
    be = plan_backend(**opts)
    _SESSIONS[key] = (options, be)
    return be


def slimfx_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> Callable:
    """The ``"slimfx"`` dynamo backend (entry point ``torch_dynamo_backends``).

    ``torch.compile(model, backend="slimfx")``: the default session — no budget, no plan, so no
    rewrite; slimfx ops already in the graph are lowered to Triton kernels where supported;
    inductor compiles. ``options={...}`` (keyword arguments of :func:`plan_backend`) configures one
    session per options dict (shared by that compilation's sub-graphs and recompiles);
    ``report_of_compiled(compiled)`` finds it. Direct calls may pass the same keywords.
    """
    if kwargs:
        return plan_backend(**{**dict(options or {}), **kwargs})(gm, example_inputs)
    return _session(options, mode)(gm, example_inputs)


# --------------------------------------------------------------------------- reports


def _walk(obj: Any) -> tuple[Any, Mapping[str, Any] | None, str | None]:
    """Follow a compiled object to the backend it was compiled with: ``(backend, options,
    mode)``; ``backend`` is ``None`` when the chain does not lead to a slimfx one."""
    start: list[Any] = []
    ctx = getattr(obj, "dynamo_ctx", None)
    if ctx is not None:
        start.append(getattr(ctx, "callback", None))
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:
            continue
        start.append(getattr(v, "callback", v))
    options, mode = None, None
    for x in start:
        seen = 0
        while x is not None and seen < 12:
            seen += 1
            if isinstance(x, SlimfxBackend):
                return x, options, mode
            if x is slimfx_backend:
                return slimfx_backend, options, mode
            kw = getattr(x, "kwargs", None)
            if isinstance(kw, dict) and type(x).__name__ == "_TorchCompileWrapper":
                options, mode = kw.get("options"), kw.get("mode")
            nxt = getattr(x, "_torchdynamo_orig_backend", None) or getattr(x, "compiler_fn", None)
            x = nxt if nxt is not x else None
    return None, None, None


def report_of_compiled(compiled_or_backend: Any) -> Report:
    """The Report of a slimfx-compiled model or function, or of a backend object.

    A session of the ``"slimfx"`` entry point may serve several models (without options the
    default session serves every such compilation in the process; one options dict or mode
    serves every model compiled with it): the report of a model keeps the sub-graphs whose
    inputs include its parameters (a compiled function: all of them)."""
    obj = compiled_or_backend
    if isinstance(obj, SlimfxBackend):
        return obj.report
    inner = getattr(obj, "_compiled_call_impl", None)  # model.compile(backend=...)
    be, options, mode = _walk(obj if inner is None else inner)
    if be is None:
        raise ValueError(
            f"{type(obj).__name__} was not compiled with a slimfx backend (no report); "
            "compile with backend='slimfx' or backend=slimfx.backend(...)"
        )
    entry = be is slimfx_backend  # a session of the entry point: may serve other models too
    if entry:
        be = _session(options, mode)
    orig = getattr(obj, "_orig_mod", obj if inner is not None else None)
    if isinstance(orig, nn.Module) and entry:  # the sub-graphs that read this model's weights
        params = list(orig.parameters())
        return be.report_for([g for g in be.graphs if g.uses_any(params)])
    return be.report
