"""Weight-only quantization candidate families: ``int8``, ``int4``, ``int4_gptq``.

- ``int8``: per-channel symmetric RTN, and group-128 asymmetric RTN.
- ``int4``: asymmetric RTN at group 32, 64, 128, and symmetric RTN at group 128.
- ``int4_gptq``: asymmetric GPTQ at group 32, 64, 128; needs a Gram matrix (no candidates
  without one: with an identity Gram GPTQ is RTN, already offered by ``int4``).

Only group sizes that divide ``in_features`` are offered (the runtime op and the rule need
whole groups), and int4 only for an even ``in_features``. Each candidate's error is the
relative output error tr(E G Eᵀ)/tr(W G Wᵀ) of the dequantized weight — the same
activation-aware scale as the low-rank family (``numerics.relative_output_error``; the
denominator W G Wᵀ is computed once per site and shared by its candidates).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.cost.families import Candidate, SiteContext, register_family
from slimfx.numerics.quant import dequantize, quantize_gptq, quantize_rtn
from slimfx.planning.configs import QuantConfig

__all__ = [
    "INT8_CONFIGS",
    "INT4_CONFIGS",
    "INT4_GPTQ_CONFIGS",
    "quant_candidates",
    "int8_candidates",
    "int4_candidates",
    "int4_gptq_candidates",
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


def _fits(d: QuantConfig, in_features: int) -> bool:
    G = in_features if d.group_size is None else d.group_size
    return in_features % G == 0 and not (d.bits == 4 and in_features % 2)


class _Errors:
    """tr(E G Eᵀ)/tr(W G Wᵀ) for several approximations of one weight, float64."""

    def __init__(self, weight: Tensor, gram: Tensor | None) -> None:
        self.W = weight.detach().to(torch.float64)
        self.G = None if gram is None else gram.detach().to(torch.float64)
        self.den = float(self._quad(self.W))

    def _quad(self, M: Tensor) -> Tensor:
        return (M * M).sum() if self.G is None else ((M @ self.G) * M).sum()

    def __call__(self, approx: Tensor) -> float:
        E = self.W - approx.detach().to(torch.float64)
        num = float(self._quad(E))
        return num / self.den if self.den > 0 else float(num > 0)


def quant_candidates(ctx: SiteContext, configs: tuple[QuantConfig, ...]) -> list[Candidate]:
    """One candidate per config that fits the site, error from the dequantized weight."""
    out_f, in_f = ctx.weight.shape
    fitting = [d for d in configs if _fits(d, in_f)]
    if not fitting or not ctx.weight.is_floating_point():
        return []
    errors = _Errors(ctx.weight, ctx.gram)
    dense = 2 * in_f * out_f
    found: list[Candidate] = []
    for d in fitting:
        if d.method == "gptq":
            tensors = quantize_gptq(ctx.weight, ctx.gram, d.bits, d.group_size, d.symmetric)
        else:
            tensors = quantize_rtn(ctx.weight, d.bits, d.group_size, d.symmetric)
        approx = dequantize(tensors, d.bits, d.group_size, d.symmetric, in_f)
        frac = d.weight_bytes(in_f, out_f) / dense
        found.append(Candidate(d, errors(approx), f"{frac:.3f} of dense bytes"))
    return found


def int8_candidates(ctx: SiteContext) -> list[Candidate]:
    """int8 RTN: per-channel symmetric and group-128 asymmetric."""
    return quant_candidates(ctx, INT8_CONFIGS)


def int4_candidates(ctx: SiteContext) -> list[Candidate]:
    """int4 RTN: asymmetric g32/g64/g128 and symmetric g128."""
    return quant_candidates(ctx, INT4_CONFIGS)


def int4_gptq_candidates(ctx: SiteContext) -> list[Candidate]:
    """int4 GPTQ, asymmetric g32/g64/g128; empty without a Gram matrix."""
    if ctx.gram is None:
        return []
    return quant_candidates(ctx, INT4_GPTQ_CONFIGS)


register_family("int8", int8_candidates)
register_family("int4", int4_candidates)
register_family("int4_gptq", int4_gptq_candidates)
