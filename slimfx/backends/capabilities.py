"""Which backend can run which decision at which site, and why not.

    supports(backend, site, decision) -> (ok, reason)
    check_plan(backend, plan, sites) -> ["<fqn> [<decision>]: <reason>", …]   (empty: all run)

Backends:

- ``"eager"``: the slimfx module / custom op with its CPU reference — every decision whose rule
  accepts the site (``slimfx.passes``) and that has a module class.
- ``"compile"``: ``torch.compile`` of the same modules: what eager runs.
- ``"triton"``: eager's answer, then a Triton kernel of the decision's op must accept a
  one-row (decode) call of the site's shape and dtype on the target device
  (``slimfx.kernels.select``); on CPU that needs ``TRITON_INTERPRET=1``.
- ``"onnx"``: ONNX Runtime (CPU): dense and low-rank run as MatMul; weight-only int4/int8 as
  ``com.microsoft::MatMulNBits`` when a power-of-two block ≥ 16 divides the group
  (:func:`matmul_nbits_block`); 2:4 sparse forms are exported dense (no 2:4 kernel), so they
  are *not* supported: they would be priced as compressed but run and ship as dense.

``reason`` is non-empty in both cases: what runs the site, or why it cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from slimfx.ir.sites import LinearSite
from slimfx.planning.configs import Decision, DenseConfig
from slimfx.planning.plan import Plan

__all__ = [
    "BACKENDS",
    "OP_OF_KIND",
    "supports",
    "check_plan",
    "allow_fn",
    "matmul_nbits_block",
]

BACKENDS: tuple[str, ...] = ("eager", "compile", "triton", "onnx")

#: decision kind → the slimfx op its module calls.
OP_OF_KIND: dict[str, str] = {
    "lowrank": "lowrank_linear",
    "quant": "quant_linear",
    "sparse24": "sparse24_linear",
    "lowrank_quant": "quant_lowrank_linear",
    "sparse24_lowrank": "sparse24_lowrank_linear",
}

NO_24_KERNEL = "onnxruntime has no 2:4 kernel"


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
    if isinstance(decision, DenseConfig):
        return True, "dense: nn.Linear"
    from slimfx.ir.modules import MODULES
    from slimfx.passes.base import Verdict
    from slimfx.passes.swap import resolve_rule

    rule = resolve_rule(decision)
    if isinstance(rule, Verdict):
        return False, rule.reason
    verdict = rule.check(site, decision, None)
    if not verdict.ok:
        return False, verdict.reason
    if decision.kind not in MODULES:
        return False, f"no module realizes decision kind {decision.kind!r}"
    return True, f"slimfx::{OP_OF_KIND.get(decision.kind, decision.kind)} (CPU reference)"


def _dtype(site: LinearSite) -> torch.dtype:
    dt = getattr(torch, site.dtype.removeprefix("torch."), None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def _dummy_call(
    site: LinearSite, decision: Decision, device: torch.device, tokens: int
) -> tuple[torch.Tensor, dict[str, object]]:
    """A zero input of the site's shape and zero tensors in the decision's storage format."""
    i, o, dt = site.in_features, site.out_features, _dtype(site)
    f = {"dtype": dt, "device": device}
    u8 = {"dtype": torch.uint8, "device": device}
    x = torch.zeros(tokens, i, **f)
    t: dict[str, object] = {}
    kind = decision.kind
    if kind in ("lowrank", "lowrank_quant", "sparse24_lowrank"):
        r = decision.rank  # type: ignore[attr-defined]
        t.update(U=torch.zeros(o, r, **f), V=torch.zeros(r, i, **f))
    if kind in ("quant", "lowrank_quant"):
        bits, G = decision.bits, _group(decision, site)  # type: ignore[attr-defined]
        width = (i + 1) // 2 if bits == 4 else i
        t.update(
            qweight=torch.zeros(o, width, **u8),
            scales=torch.ones(o, i // G, **f),
            zeros=None if decision.symmetric else torch.zeros(o, i // G, **u8),  # type: ignore[attr-defined]
            bits=bits,
            group_size=G,
        )
    if kind in ("sparse24", "sparse24_lowrank"):
        t.update(values=torch.zeros(o, i // 2, **f), meta=torch.zeros(o, (i + 7) // 8, **u8))
    t["bias"] = torch.zeros(o, **f) if site.has_bias else None
    return x, t


def _triton(
    site: LinearSite, decision: Decision, device: str | torch.device | None, tokens: int
) -> tuple[bool, str]:
    from slimfx import kernels

    if isinstance(decision, DenseConfig):
        return True, "dense: nn.Linear (no Triton kernel needed)"
    dev = torch.device(
        device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if dev.type == "cpu" and not kernels.interpret_mode():
        return False, "triton: needs CUDA or TRITON_INTERPRET"
    op = OP_OF_KIND[decision.kind]
    if op not in kernels.KERNELS:
        return False, f"triton: no Triton kernel for slimfx::{op} (it runs the CPU reference)"
    x, tensors = _dummy_call(site, decision, dev, tokens)
    kernel, reasons = kernels.select(op, x, **tensors)
    if kernel is None:
        return False, "triton: " + "; ".join(reasons)
    return True, f"triton: {kernel.name}"


def _onnx(site: LinearSite, decision: Decision) -> tuple[bool, str]:
    kind = decision.kind
    if kind == "dense":
        return True, "onnx: MatMul"
    if kind == "lowrank":
        return True, "onnx: two MatMul"
    if kind in ("sparse24", "sparse24_lowrank"):
        return False, f"no: priced as dense — {NO_24_KERNEL} (exported dense)"
    if kind in ("quant", "lowrank_quant"):
        bits, G = decision.bits, _group(decision, site)  # type: ignore[attr-defined]
        if bits not in (4, 8):
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
        return True, how + (" + two MatMul" if kind == "lowrank_quant" else "")
    return False, f"no ONNX translation for decision kind {kind!r}"


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
    runs natively is offered to the solver. Answers are cached per (site, decision)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    cache: dict[tuple[LinearSite, Decision], bool] = {}

    def allow(site: LinearSite, decision: Decision) -> bool:
        key = (site, decision)
        if key not in cache:
            cache[key] = supports(backend, site, decision, device=device)[0]
        return cache[key]

    return allow
