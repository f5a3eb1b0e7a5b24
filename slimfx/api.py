"""``slimfx.optimize``: the one call. Orchestrates capture → sites → calibration → cost →
plan → passes → report, and nothing else: every step lives in its own package.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from slimfx.cost.target import MeasuredCache, Target
from slimfx.loss_check import loss_checks
from slimfx.passes.transaction import in_transaction, run_in_transaction
from slimfx.planning.configs import DEFAULT_FAMILIES, Decision
from slimfx.planning.plan import Plan
from slimfx.planning.problem import Budget
from slimfx.report import Report
from slimfx.report_builder import build_report, lead_notes, target_name
from slimfx.stages import (
    Planning,
    PlanningOptions,
    find_sites,
    measure_site_errors,
    optimize_stages,
    plan_model,
    run_stages,
    select_sites,
    start,
)
from slimfx.validate import check_flags, check_model

__all__ = [
    "optimize",
    "plan_model",
    "Planning",
    "PlanningOptions",
    "report_of",
    "find_sites",
    "select_sites",
    "measure_site_errors",
    "needs_gram",
]


REPORT_ATTR = "slimfx_report"


class _DefaultBudget(float):
    """``optimize``'s default budget (0.5): a float that says it was not given, so a replayed
    plan reports the budget it was solved for and notes a given one as unused."""


DEFAULT_BUDGET = _DefaultBudget(0.5)


def _budget_of(budget: float | Budget | None, plan: Plan | None, notes: list[str]) -> Budget:
    """The run's budget: ``budget``, or for a replayed ``plan`` the one it was solved for
    (``plan.meta["budget"]``; none recorded: no budget) — a given budget is not used then,
    and a note says so."""
    if plan is None:
        return Budget.of(budget)
    rec = plan.meta.get("budget")
    try:
        own = Budget(**rec) if isinstance(rec, dict) else Budget()
    except (TypeError, ValueError):
        own = Budget()
    given = None if budget is DEFAULT_BUDGET else Budget.of(budget)
    if given is not None and given != own:
        shown = ", ".join(f"{k}={v}" for k, v in given.to_dict().items() if v is not None)
        notes.append(
            f"budget ({shown or 'none'}) not used: a replayed plan is applied as it is, "
            "reported with the budget it was solved for"
        )
    return own


def report_of(model: nn.Module) -> Report:
    """The report of a model returned by ``optimize`` (or of its ``torch.compile`` wrapper);
    a ``ValueError`` otherwise, pointing a model compiled with a slimfx backend to
    :func:`slimfx.report_of_compiled`."""
    rep = getattr(model, REPORT_ATTR, None)
    orig = getattr(model, "_orig_mod", None)
    if rep is None and orig is not None:
        rep = getattr(orig, REPORT_ATTR, None)
    if rep is None:
        compiled = orig is not None or getattr(model, "_compiled_call_impl", None) is not None
        raise ValueError(
            "this model was not returned by slimfx.optimize (it has no report)"
            + ("; a model compiled with backend='slimfx' (or slimfx.backend(...)) has its "
               "compile report in slimfx.report_of_compiled(compiled)" if compiled else "")
        )
    return rep


def needs_gram(decision: Decision) -> bool:
    """Whether realizing ``decision`` uses calibration statistics (activation-aware): its
    form's answer (``slimfx.forms``; an unregistered kind raises, naming the registered ones)."""
    from slimfx import forms

    return forms.form_of(decision).needs_gram(decision)


def optimize(
    model: nn.Module,
    budget: float | Budget | None = DEFAULT_BUDGET,
    *,
    calibration: Sequence | None = None,
    tokenizer: Any = None,
    plan: Plan | None = None,
    target: str | Target = "cpu",
    workload: str = "decode",
    families: Sequence[str] = DEFAULT_FAMILIES,
    sequential: bool = False,
    fisher: bool | None = None,
    sensitivity: str = "geo",
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
    kv_forms: Sequence[Any] | None = None,
    cpu_kernels: bool = True,
) -> nn.Module:
    """Rewrite ``model``'s linears into cheaper forms under ``budget``; return the rewritten
    model (same class) with its report at ``slimfx.report_of(model)``.

    - ``budget``: a fraction of the rewritable linears' bytes **at 16 bits per weight** (the
      reference is 16-bit whatever dtype the model is loaded in, so fp32 and bf16 loads give
      one result), or a ``Budget(memory=…, bits=…, latency=…, max_error=…)``. ``1.0`` changes
      nothing. ``Budget(kv=…)`` also compresses the KV cache (a fraction of the 16-bit
      cache; ``context=`` counts it at that many tokens, the 16-bit window included), and
      ``Budget(total_bytes=…, context=…, batch=…)`` trades weights against the cache of
      ``batch`` sequences: each attention layer then takes a KV form (quantized, low-rank,
      quantized latent; ``slimfx.forms.kv``) chosen with the linear forms, and the returned
      model's ``generate()`` keeps its cache in those forms.
    - ``kv_forms``: the KV-cache candidates offered at every attention site (configs of
      ``slimfx.forms.kv.config``); default ``forms.kv.candidates.default_kv_forms``.
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
    - ``sensitivity``: its estimator (``slimfx.cost.sensitivity``): "geo" (default; the
      geometric mean of the Fisher product and the probe weight, median-normalized, floored —
      on SmolLM2 no worse than "fisher" or unweighted at any budget measured, 0.25: perplexity
      75.8 vs 129.5 Fisher; ``benchmarks/RESULTS.md``), "fisher" (Σ E[g²]E[y²], the previous
      default), "probe" (the loss change of two probe compressions per unit error — tracks
      the loss behind post-/qk-norms best, but plans 4.9% worse than "fisher" on SmolLM2 at
      0.3), "probe-kind" (each option kind weighted by its own probe; the report shows the
      site's combined weight), "kfac" (diagonal Kronecker), "measured" (each probe run
      through the model: 2·sites·4 forwards, no backward).
    - ``include`` / ``exclude``: glob patterns over site FQNs (``"model.layers.0.*"``);
      only included, non-excluded linears are candidates, and the budget is a fraction of
      their bytes. A pattern that matches no site is an error. Without ``include``, a tied
      site (an ``lm_head`` sharing the embedding's weight) is left dense and outside a bytes
      budget — rewriting it would keep a dense copy — and the report notes it.
    - ``inplace``: rewrite the given model object instead of a copy — all or nothing: any
      exception, ``KeyboardInterrupt`` included, restores it (``passes.transaction``).
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
    - ``cpu_kernels``: pack the returned model's int4/int8 linears for torch's CPU kernels
      (``slimfx.prepare_cpu``: bf16 activations at the kernel boundary of an fp32 model, ≈
      3·10⁻³ relative error per layer) — without them, eager CPU inference dequantizes every
      weight on every call. The report's "runs as" column says what runs each site, and which
      sites still run slower than dense. ``False`` keeps the exact reference ops.

    A model given quantized KV caches reads them in place at one-token decode steps
    (``slimfx.forms.kv.fused.use_fused_decode``, installed when the model runs sdpa attention
    and ``backend`` is None, "eager" or "triton"; a report note says what runs): the store is
    never dequantized. ``model.set_attn_implementation("sdpa")`` returns to the plain path.
    """
    model = check_model(model)  # unwraps torch.compile; refuses TorchScript, meta, rewritten
    check_flags({"inplace": inplace, "sequential": sequential, "fisher?": fisher,
                 "progress": progress, "measure_loss": measure_loss, "cpu_kernels": cpu_kernels})
    if families is None:  # the default candidates (the CLI's "not given")
        families = DEFAULT_FAMILIES
    if inplace and not in_transaction(model):  # all or nothing, KeyboardInterrupt included
        return run_in_transaction(model, optimize, {**locals(), "model": model})
    t_start = time.perf_counter()
    # every keyword of this signature that is a planning option (PlanningOptions' fields)
    notes: list[str] = []
    pl = Planning(_budget_of(budget, plan, notes), PlanningOptions.of(locals()), model)
    if plan is None and not any(v is not None for v in pl.budget.to_dict().values()):
        notes.append("no budget (budget=None or an empty Budget): nothing is constrained, so "
                     "every site keeps its most accurate form, dense")  # fmt: skip
    pl.notes += notes
    pl.sequential, pl.inplace = sequential, inplace
    start(pl)
    run_stages(pl, optimize_stages(pl.options))
    assert pl.plan is not None and pl.rewritten is not None and pl.result is not None
    report = build_report(
        pl.sites, pl.plan, pl.problem, pl.result, pl.measured, pl.budget, target, workload,
        pl.cache, pl.attention_sites,
    )  # fmt: skip
    report.solver = pl.solver
    report.capture = pl.capture
    lead_notes(report, pl.notes)
    loss_checks(report, pl.rewritten, pl.dense_ref, pl.eval_batches, pl.stats, measure_loss)
    if pl.problem is not None:
        report.frontier = pl.frontier
    pl.timings["total"] = time.perf_counter() - t_start
    report.timings = pl.timings
    report.meta = {**report.meta, "model_class": type(model).__name__, "plan": pl.plan.to_dict()}
    if pl.memory:  # resident MB around each stage (stages.MemoryInstrument)
        report.meta["stage_memory_mb"] = pl.memory
    if pl.family_seconds:  # each candidate family's seconds in the candidates stage
        report.meta["candidate_seconds"] = {k: round(v, 3) for k, v in pl.family_seconds.items()}
    if backend is not None:
        report.meta["backend"] = backend
    if pl.cache is not None:
        report.meta["latency_cache"] = pl.cache.summary(target_name(target))
    new_model = pl.rewritten
    report.finalize(
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in new_model.parameters())
        + sum(b.numel() for b in new_model.buffers()),
    )
    _install_runtime(new_model, report, backend, cpu_kernels)
    setattr(new_model, REPORT_ATTR, report)
    return new_model


def lower_for_backend(model: nn.Module, report: Any) -> None:
    """A model optimized for ``backend="triton"`` (``report.meta["backend"]``): its slimfx
    linears switched to their Triton kernels where one accepts the module's dtype and device
    (``backends.triton_lowering.lower_module``, in place); those that keep the reference op
    are noted with why."""
    if report.meta.get("backend") != "triton":
        return
    from slimfx.backends.triton_lowering import lower_module

    records = lower_module(model)[1].records
    kept = [r for r in records if r.status != "applied"]
    note = kept and (
        f"backend='triton': {len(kept)} of {len(records)} rewritten linear(s) keep the "
        f"reference op, no Triton kernel taking them (e.g. {kept[0].fqn}: {kept[0].reason})"
    )
    if note and note not in report.notes:  # load() lowers a saved model again
        report.notes.append(note)


#: the runtime a report's latency estimates assume, by ``optimize``'s ``backend``
RUNTIMES = {None: "torch-eager", "eager": "torch-eager", "compile": "torch-compile",
            "triton": "triton", "onnx": "onnxruntime"}


def _install_runtime(model: nn.Module, report: Any, backend: str | None, pack: bool) -> None:
    """Install the packed CPU kernels (``pack``) and the in-place decode step of quantized KV
    caches, and record what runs each site."""
    from slimfx.forms.kv.fused import decode_step_label, install_in_place_decode
    from slimfx.ir.cpu_runtime import cpu_runtimes, prepare_cpu

    report.runtime = RUNTIMES.get(backend, str(backend))
    if backend in (None, "eager", "triton", "compile"):  # ORT runs its own step graph;
        # under torch.compile only the static cache's layers read in place (an opaque op)
        note = install_in_place_decode(model)
        if note is not None:
            report.notes.append(note)
    for k in report.kv_sites:
        k.decode_step = decode_step_label(k.decision.get("kind"), model)
    lower_for_backend(model, report)
    runs_as(report, model, prepare_cpu(model) if pack else cpu_runtimes(model))


_SLOW_NOTE = "rewritten linear(s) run a reference op slower than the dense layer"


def runs_as(report: Any, model: nn.Module, runs: Mapping[str, Any]) -> None:
    """Write what runs each site of ``model`` (its Triton-lowered modules' kernels, else
    ``runs``: ``ir.cpu_runtime``'s by name) into ``report``'s "runs as" column, and its note on
    the sites slower than dense, replacing an earlier one (``prepare_cpu`` / ``release_cpu`` /
    ``load`` call it again)."""
    lowered = {  # what lower_module set (unlower removes it)
        n: str(m.slimfx_lowering["kernel"])
        for n, m in model.named_modules()
        if isinstance(getattr(m, "slimfx_lowering", None), dict)
    }
    for s in report.sites:
        rt = runs.get(s.fqn)
        if s.fqn in lowered:
            s.runtime = f"triton {lowered[s.fqn]}"
        elif rt is not None:
            s.runtime = rt.label() + rt.caveat()
        if rt is not None:
            s.extra["cpu_runtime"] = rt.to_dict()  # kernel, activations, reason, flags
    report.notes = [n for n in report.notes if _SLOW_NOTE not in n]
    slow = sorted(n for n, rt in runs.items() if rt.slower_than_dense and n not in lowered)
    if slow:
        report.notes.append(
            f"on the CPU in PyTorch eager, {len(slow)} {_SLOW_NOTE} "
            f"({runs[slow[0]].reason}; e.g. {slow[0]}); their "
            "'runs as' column says so — price a latency budget with `slimfx calibrate-target "
            "--backend torch`, or deploy them with backend='triton' (or 'onnx', but for 2:4 "
            "sites, which ONNX Runtime runs dense)"
        )


def prepare_cpu(model: nn.Module, **kwargs: Any) -> dict[str, Any]:
    """``slimfx.ir.cpu_runtime.prepare_cpu`` (pack the quantized linears for torch's CPU
    kernels), then the model's report says what runs each site now."""
    from slimfx.ir import cpu_runtime

    runs = cpu_runtime.prepare_cpu(model, **kwargs)
    _refresh_runs_as(model, runs)
    return runs


def release_cpu(model: nn.Module) -> Any:
    """``slimfx.ir.cpu_runtime.release_cpu`` (back to the reference ops), then the model's
    report says what runs each site now."""
    from slimfx.ir import cpu_runtime

    out = cpu_runtime.release_cpu(model)
    _refresh_runs_as(model, cpu_runtime.cpu_runtimes(model))
    return out


def _refresh_runs_as(model: nn.Module, runs: Mapping[str, Any]) -> None:
    rep = getattr(model, REPORT_ATTR, None)
    if rep is not None:
        runs_as(rep, model, runs)
