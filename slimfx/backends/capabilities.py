"""Which backend can run which decision at which site, and why not.

    supports(backend, site, decision) -> (ok, reason)
    check_plan(backend, plan, sites) -> ["<fqn> [<decision>]: <reason>", …]   (empty: all run)

Backends:

- ``"eager"``: the slimfx module / custom op with its CPU reference — every decision whose rule
  accepts the site (``slimfx.passes``) and whose form has a module class.
- ``"compile"``: ``torch.compile`` of the same modules: what eager runs.
- ``"triton"``: eager's answer, then the form must have a Triton lowering, and a Triton kernel
  of its op must accept a one-row (decode) call of the site's shape and dtype on the target
  device, probed with the form's module built empty on that device and the lowering's
  arguments (``slimfx.kernels.select``); on CPU that needs ``TRITON_INTERPRET=1``.
- ``"onnx"``: ONNX Runtime (CPU), the form's ``onnx_probe``: dense and low-rank run as MatMul;
  weight-only int4/int8 as ``com.microsoft::MatMulNBits`` when a power-of-two block ≥ 16
  divides the group (:func:`matmul_nbits_block`); 2:4 sparse forms are exported dense (no 2:4
  kernel), so they are *not* supported: they would be priced as compressed but run and ship
  as dense.

Every answer comes from the decision's form (``slimfx.forms``); an unregistered kind raises
``forms.UnknownFormError`` naming the registered ones, and a piece a form lacks answers
``(False, <its NotSupported reason>)``.

``reason`` is non-empty in both cases: what runs the site, or why it cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from slimfx import forms
from slimfx.formats import RUNTIME_BITS
from slimfx.ir.sites import LinearSite
from slimfx.planning.configs import Decision
from slimfx.planning.plan import Plan

__all__ = [
    "BACKENDS",
    "supports",
    "check_plan",
    "allow_fn",
    "matmul_nbits_block",
    "onnx_lowrank",
    "onnx_quant",
]

BACKENDS: tuple[str, ...] = ("eager", "compile", "triton", "onnx")


def matmul_nbits_block(group_size: int) -> int | None:
    """The MatMulNBits block for a slimfx group of ``group_size`` columns: the largest power of
    two ≥ 16 that divides it (scales repeat over the group's blocks, the same numbers), or
    ``None`` when there is none (ONNX Runtime's kernel takes only such blocks)."""
    if group_size <= 0:
        return None
    block = group_size & -group_size  # largest power of two dividing group_size
    return block if block >= 16 else None


def _group(decision: Decision, site: LinearSite) -> int:
    g = getattr(decision, "group_size", None)
    return site.in_features if g is None else int(g)


def _eager(site: LinearSite, decision: Decision) -> tuple[bool, str]:
    form = forms.form_of(decision)
    if form.native:
        return True, f"{decision.kind}: {form.native}"
    from slimfx.passes.base import Verdict
    from slimfx.passes.swap import resolve_rule

    rule = resolve_rule(decision)
    if isinstance(rule, Verdict):
        return False, rule.reason
    verdict = rule.check(site, decision, None)
    if not verdict.ok:
        return False, verdict.reason
    if not form.has("module"):
        why = form.why_not("module")
        return False, f"no module realizes decision kind {decision.kind!r}: {why}"
    return True, f"slimfx::{form.op_name} (CPU reference)"


def _dtype(site: LinearSite) -> torch.dtype:
    dt = getattr(torch, site.dtype.removeprefix("torch."), None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def _triton(
    site: LinearSite, decision: Decision, device: str | torch.device | None, tokens: int
) -> tuple[bool, str]:
    from slimfx import kernels

    form = forms.form_of(decision)
    if form.native:
        return True, f"{decision.kind}: {form.native} (no Triton kernel needed)"
    dev = torch.device(
        device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if dev.type == "cpu" and not kernels.interpret_mode():
        return False, "triton: needs CUDA or TRITON_INTERPRET"
    if not form.has("triton_lowering"):
        return False, f"triton: {form.why_not('triton_lowering')}"
    lowering = form.get("triton_lowering")
    module = form.get("module").empty(
        decision, site.in_features, site.out_features, site.has_bias, _dtype(site), dev
    )
    x = torch.zeros(tokens, site.in_features, dtype=_dtype(site), device=dev)
    kernel, reasons = kernels.select(form.op_name, x, **lowering.args(module))
    if kernel is None:
        return False, "triton: " + "; ".join(reasons)
    return True, f"triton: {kernel.name}"


def onnx_lowrank(site: LinearSite, decision: Decision) -> tuple[bool, str]:
    """The ``lowrank`` form's ONNX probe: two MatMul."""
    return True, "onnx: two MatMul"


def onnx_quant(site: LinearSite, decision: Decision) -> tuple[bool, str]:
    """The quantized forms' ONNX probe: MatMulNBits when ORT can take the bits and group."""
    bits = decision.bits  # type: ignore[attr-defined]
    g = decision.group_size  # type: ignore[attr-defined]
    G = site.in_features if g is None else int(g)
    if bits not in RUNTIME_BITS:
        return False, f"MatMulNBits runs 4 or 8 bits, not {bits}"
    block = matmul_nbits_block(G)
    if block is None:
        return False, (
            f"no power-of-two block ≥ 16 divides group size {G} (MatMulNBits needs one); "
            "it would be exported dense"
        )
    how = f"onnx: MatMulNBits bits={bits} block={block}"
    if block != G:
        how += f" (group {G} = {G // block} blocks, scales repeated)"
    return True, how + (" + two MatMul" if getattr(decision, "rank", 0) else "")


def _onnx(site: LinearSite, decision: Decision) -> tuple[bool, str]:
    form = forms.form_of(decision)
    if form.native:
        return True, "onnx: MatMul"
    if not form.has("onnx_translation"):
        return False, f"no ONNX translation for decision kind {decision.kind!r}: " + form.why_not(
            "onnx_translation"
        )
    if not form.has("onnx_probe"):
        return False, form.why_not("onnx_probe")
    return form.get("onnx_probe")(site, decision)


def supports(
    backend: str,
    site: LinearSite,
    decision: Decision,
    *,
    device: str | torch.device | None = None,
    tokens: int = 1,
) -> tuple[bool, str]:
    """``(True, what runs it)`` or ``(False, why not)`` for ``decision`` at ``site`` on
    ``backend`` (one of :data:`BACKENDS`). ``device`` (triton only): where the kernels would
    run (default: cuda when available, else cpu); ``tokens``: rows of the probe input."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    ok, why = _eager(site, decision)
    if not ok or backend in ("eager", "compile"):
        return ok, why
    if backend == "triton":
        return _triton(site, decision, device, tokens)
    return _onnx(site, decision)


def check_plan(
    backend: str,
    plan: Plan,
    sites: Iterable[LinearSite],
    *,
    device: str | torch.device | None = None,
) -> list[str]:
    """``"<fqn> [<decision>]: <reason>"`` for every planned site ``backend`` cannot run (in site
    order; plan entries naming no given site are skipped — ``validate_plan`` reports those)."""
    problems = []
    for site in sites:
        if site.fqn not in plan:
            continue
        decision = plan[site.fqn]
        ok, why = supports(backend, site, decision, device=device)
        if not ok:
            problems.append(f"{site.fqn} [{decision.short()}]: {why}")
    return problems


def allow_fn(
    backend: str, *, device: str | torch.device | None = None
) -> Callable[[LinearSite, Decision], bool]:
    """A ``(site, decision) -> bool`` filter for candidate generation: only what ``backend``
    runs natively is offered to the solver. Answers are cached per (site, decision); the
    filter's ``refused`` dict maps each reason to the ``"fqn [decision]"`` it refused."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    cache: dict[tuple[LinearSite, Decision], bool] = {}
    refused: dict[str, list[str]] = {}

    def allow(site: LinearSite, decision: Decision) -> bool:
        key = (site, decision)
        if key not in cache:
            ok, why = supports(backend, site, decision, device=device)
            cache[key] = ok
            if not ok:
                refused.setdefault(why, []).append(f"{site.fqn} [{decision.short()}]")
        return cache[key]

    allow.refused = refused  # type: ignore[attr-defined]
    return allow
