"""Weight-only quantization candidate families: ``int8``, ``int4``, ``int4_gptq``.

- ``int8``: per-channel symmetric RTN, and group-128 asymmetric RTN.
- ``int4``: asymmetric RTN at group 32, 64, 128, and symmetric RTN at group 128. Offered
  next to ``int4_gptq`` with a Gram, the asymmetric RTN layouts GPTQ also fits are left out:
  GPTQ's error-compensating rounding of the same grid is priced lower at every one of them
  (on SmolLM2's 450 such pairs its error was 0.06–0.59× RTN's, never above), so the solver
  would never pick them — their fits and error products were a third of the quantization
  families' time.
- ``int4_gptq``: asymmetric GPTQ at group 32, 64, 128; needs a Gram matrix (no candidates
  without one: with an identity Gram GPTQ is RTN, already offered by ``int4``).

Only group sizes that divide ``in_features`` are offered (the runtime op and the rule need
whole groups), and int4 only for an even ``in_features``. Each candidate's error is the
relative output error tr(E G Eᵀ)/tr(W G Wᵀ) of the dequantized weight — the same
activation-aware scale as the low-rank family (``numerics.relative_output_error``, here with
float32 products and float64 sums, and the denominator W G Wᵀ computed once per site).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from slimfx.cost.families import Candidate, SiteContext
from slimfx.numerics.quant import dequantize, quantize_gptq_many, quantize_rtn
from slimfx.planning.configs import Decision, QuantConfig

__all__ = [
    "INT8_CONFIGS",
    "INT4_CONFIGS",
    "INT4_GPTQ_CONFIGS",
    "quant_candidates",
    "quant_fits",
    "int8_candidates",
    "int4_candidates",
    "int4_gptq_candidates",
    "timed_quant",
]

INT8_CONFIGS: tuple[QuantConfig, ...] = (
    QuantConfig(8, None, True, "rtn"),
    QuantConfig(8, 128, False, "rtn"),
)
INT4_CONFIGS: tuple[QuantConfig, ...] = (
    QuantConfig(4, 32, False, "rtn"),
    QuantConfig(4, 64, False, "rtn"),
    QuantConfig(4, 128, False, "rtn"),
    QuantConfig(4, 128, True, "rtn"),
)
INT4_GPTQ_CONFIGS: tuple[QuantConfig, ...] = (
    QuantConfig(4, 32, False, "gptq"),
    QuantConfig(4, 64, False, "gptq"),
    QuantConfig(4, 128, False, "gptq"),
)


def quant_fits(d: QuantConfig, in_features: int) -> bool:
    """Whether ``d`` can quantize a weight with ``in_features`` columns: whole groups, and an
    even width for 4-bit codes (two per byte)."""
    G = in_features if d.group_size is None else d.group_size
    return in_features % G == 0 and not (d.bits == 4 and in_features % 2)


class _Errors:
    """tr(E G Eᵀ)/tr(W G Wᵀ) for several approximations of one weight.

    The products M·G run in float32 (≈10× faster than float64 on CPU, and the dominant cost of
    these families: 49152×576×576 for SmolLM2's lm_head), the sums accumulate in float64.
    On SmolLM2's calibration Grams (condition numbers up to 1.5e8) this agrees with the float64
    ``numerics.relative_output_error`` to ≤ 2e-7 relative, GPTQ errors included."""

    def __init__(self, weight: Tensor, gram: Tensor | None) -> None:
        self.W = weight.detach().to(torch.float32)
        self.G = None if gram is None else gram.detach().to(torch.float32)
        self.den = self._quad(self.W)

    def _quad(self, M: Tensor) -> float:
        if self.G is None:
            return float(M.to(torch.float64).square().sum())
        return float(((M @ self.G) * M).sum(dtype=torch.float64))

    def __call__(self, approx: Tensor) -> float:
        num = self._quad(self.W - approx.detach().to(torch.float32))
        return num / self.den if self.den > 0 else float(num > 0)

    def from_gptq_loss(self, approx: Tensor, loss: float, ridge: float) -> float:
        """The same ratio from GPTQ's own loss tr(E (G + ridge·I) Eᵀ) (``quantize_gptq_many``'s
        ``losses``): minus ridge·‖E‖²_F, no in × in product. Agrees with :meth:`__call__` to
        ≤ 2e-7 relative on SmolLM2-shaped fits (the float32 factor the loop used; the ridge
        bounds its conditioning)."""
        if self.G is None:
            return self(approx)
        E = self.W - approx.detach().to(torch.float32)
        num = max(loss - ridge * float(E.square().sum(dtype=torch.float64)), 0.0)
        return num / self.den if self.den > 0 else float(num > 0)


def quant_candidates(ctx: SiteContext, configs: tuple[QuantConfig, ...]) -> list[Candidate]:
    """One candidate per config that fits the site, error from the dequantized weight."""
    out_f, in_f = ctx.weight.shape
    fitting = [d for d in configs if quant_fits(d, in_f)]
    if not fitting or not ctx.weight.is_floating_point():
        return []
    errors = ctx.shared.get("quant_errors")
    if errors is None:  # int8, int4 and int4_gptq of one site share W, G in fp32 and W G Wᵀ
        errors = ctx.shared["quant_errors"] = _Errors(ctx.weight, ctx.gram)
    dense = 2 * in_f * out_f
    gptq = [d for d in fitting if d.method == "gptq"]
    by_config: dict[QuantConfig, dict[str, Tensor]] = {}
    own_loss: dict[QuantConfig, tuple[float, float]] = {}
    for bits, sym in sorted({(d.bits, d.symmetric) for d in gptq}):  # one column loop per grid
        same = [d for d in gptq if (d.bits, d.symmetric) == (bits, sym)]
        groups = [d.group_size for d in same]
        losses: list[tuple[float, float]] = []
        fits = quantize_gptq_many(ctx.weight, ctx.gram, bits, groups, sym, losses=losses)
        by_config.update(zip(same, fits))
        own_loss.update(zip(same, losses))  # empty when an input channel is dead
    found: list[Candidate] = []
    for d in fitting:
        tensors = by_config.get(d)
        if tensors is None:
            tensors = quantize_rtn(ctx.weight, d.bits, d.group_size, d.symmetric)
        approx = dequantize(tensors, d.bits, d.group_size, d.symmetric, in_f)
        frac = d.weight_bytes(ctx.shape) / dense
        err = errors.from_gptq_loss(approx, *own_loss[d]) if d in own_loss else errors(approx)
        found.append(Candidate(d, err, f"{frac:.3f} of dense bytes"))
    return found


def int8_candidates(ctx: SiteContext) -> list[Candidate]:
    """int8 RTN: per-channel symmetric and group-128 asymmetric."""
    return quant_candidates(ctx, INT8_CONFIGS)


def int4_candidates(ctx: SiteContext) -> list[Candidate]:
    """int4 RTN: asymmetric g32/g64/g128 and symmetric g128 — without the layouts
    ``int4_gptq`` fits at this site when that family is offered too (see the module doc)."""
    configs = INT4_CONFIGS
    if "int4_gptq" in ctx.families and ctx.gram is not None:
        gptq = {dataclasses.replace(d, method="rtn") for d in INT4_GPTQ_CONFIGS}
        configs = tuple(d for d in configs if d not in gptq)
    return quant_candidates(ctx, configs)


def int4_gptq_candidates(ctx: SiteContext) -> list[Candidate]:
    """int4 GPTQ, asymmetric g32/g64/g128; empty without a Gram matrix."""
    if ctx.gram is None:
        return []
    return quant_candidates(ctx, INT4_GPTQ_CONFIGS)


def timed_quant(in_f: int, out_f: int) -> list[Decision]:
    """The int8 / int4 layouts ``calibrate-target`` times by default (GPTQ and RTN share a
    layout, and so one measurement: ``target.runtime_label``)."""
    return [d for d in INT8_CONFIGS + INT4_CONFIGS if quant_fits(d, in_f)]
