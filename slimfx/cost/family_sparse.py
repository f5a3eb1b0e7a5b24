"""Candidate families for 2:4 sparsity and the combined forms: ``sparse24``, ``lowrank_quant``,
``sparse24_lowrank``.

- ``sparse24``: 2:4 by magnitude, by Wanda (|W|·‖x_j‖), and Wanda + SparseGPT compensation
  (needs a Gram; without one Wanda is magnitude and only magnitude is offered). Only for
  in_features % 8 == 0.
- ``lowrank_quant``: LoRC at int4 asymmetric g128 / g64 (group sizes dividing in_features) and
  ranks 8/16/32/64 (capped so the whole form stores fewer bytes than dense), and LQ-LoRA at
  ranks 32/64 (``LQLORA_RANKS``) of the (group, rank) pairs where LoRC was kept, when it lowers
  the error further. LQ-LoRA costs one GPTQ sweep per alternation (up to 5) and dominates the
  family's time, and its gain over LoRC grows with the rank (SmolLM2 layer 5, 5 rounds: ≈ 7–9 %
  at r=8, 12–19 % at r=32), hence the restriction.
- ``sparse24_lowrank``: S + L at ranks 8/16/32 (mask ``wanda`` with a Gram, else ``magnitude``).

A combined candidate is offered only where it beats both of its parts alone at equal bytes:
its error must be below (a) the plain whitened low-rank error at the largest rank whose bytes
fit in the combination's bytes (``lowrank_error_curve``), and (b) every plain candidate of its
core family whose bytes fit: int4 g32/g64/g128 asymmetric, int8 g128 asymmetric and int8
per-channel symmetric for ``lowrank_quant`` (quantized with the same quantizer as the core:
GPTQ with a Gram, RTN without), the three 2:4 variants for ``sparse24_lowrank``. The kept
candidate's note says what it beat; :func:`explain_lowrank_quant` /
:func:`explain_sparse24_lowrank` also return the dropped ones with the reason.

Cost sharing (one site): the quantized core Q_0 for each group size and the 2:4 core S_0 are
computed once, and one whitened SVD of their residual gives the first-iterate factors of every
rank (``numerics.combo.whitened_svd``); the iterative refinements (LQ-LoRA, S+L) start from
those. The errors are those of the tensors ``numerics.factorize`` would produce for the same
decision (same functions, same seeds), in the stored dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimfx.cost.families import Candidate, SiteContext
from slimfx.cost.family_quant import quant_fits
from slimfx.numerics.combo import (
    OutputError,
    default_quantizer,
    lqlora,
    quantize,
    sparse_plus_lowrank,
    split_factors,
    whitened_svd,
)
from slimfx.numerics.lowrank import lowrank_error_curve
from slimfx.numerics.quant import dequantize
from slimfx.numerics.sparse import Pruner24, sparse24_unsupported, unpack24
from slimfx.planning.configs import (
    Decision,
    DenseConfig,
    LowRankConfig,
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)
from slimfx.planning.shapes import LinearShape

__all__ = [
    "LQ_GROUPS",
    "LQ_RANKS",
    "LQLORA_RANKS",
    "SL_RANKS",
    "QUANT_REFERENCES",
    "ComboVerdict",
    "sparse24_candidates",
    "lowrank_quant_candidates",
    "sparse24_lowrank_candidates",
    "explain_lowrank_quant",
    "explain_sparse24_lowrank",
]

LQ_GROUPS: tuple[int, ...] = (128, 64)
LQ_RANKS: tuple[int, ...] = (8, 16, 32, 64)
LQLORA_RANKS: tuple[int, ...] = (32, 64)
SL_RANKS: tuple[int, ...] = (8, 16, 32)
#: the plain quantized forms a ``lowrank_quant`` candidate must beat when they fit its bytes.
QUANT_REFERENCES: tuple[tuple[int, int | None, bool], ...] = (
    (4, 32, False),
    (4, 64, False),
    (4, 128, False),
    (8, 128, False),
    (8, None, True),
)


@dataclass(frozen=True)
class ComboVerdict:
    """A combined candidate, whether the family keeps it, and why (what it beat, or what
    beat it)."""

    candidate: Candidate
    kept: bool
    reason: str


def _frac(d: Decision, in_f: int, out_f: int) -> str:
    return f"{d.weight_bytes(LinearShape(in_f, out_f)) / (2 * in_f * out_f):.3f} of dense bytes"


def _fits_dense(d: Decision, in_f: int, out_f: int) -> bool:
    shape = LinearShape(in_f, out_f)
    return d.weight_bytes(shape) < DenseConfig().weight_bytes(shape)


def _q_fits(bits: int, g: int | None, in_f: int) -> bool:
    return quant_fits(QuantConfig(bits, g), in_f)


# ----------------------------------------------------------------------------- sparse24


def sparse24_candidates(ctx: SiteContext) -> list[Candidate]:
    """2:4 magnitude, Wanda, Wanda + compensation (the last two need a Gram)."""
    out_f, in_f = ctx.weight.shape
    if sparse24_unsupported(in_f) or not ctx.weight.is_floating_point():
        return []
    metric = OutputError(ctx.weight, ctx.gram)
    W = ctx.weight.detach().to(torch.float32)
    configs = [Sparse24Config("magnitude", False)]
    if ctx.gram is not None:
        configs += [Sparse24Config("wanda", False), Sparse24Config("wanda", True)]
    found = []
    for d in configs:
        S = Pruner24(d.mask, ctx.gram, d.compensate)(ctx.weight).to(torch.float32)
        found.append(Candidate(d, metric.rel(metric.sq(W - S)), _frac(d, in_f, out_f)))
    return found


# ------------------------------------------------------------------------ the references


class _LowRankReference:
    """Plain whitened low-rank error at the largest rank fitting a byte count."""

    def __init__(self, weight: Tensor, gram: Tensor | None) -> None:
        self.out_f, self.in_f = weight.shape
        self.curve = lowrank_error_curve(weight, gram, "whitened")

    def at_bytes(self, nbytes: int) -> tuple[int, float]:
        per_rank = LowRankConfig(1).weight_bytes(LinearShape(self.in_f, self.out_f))
        r = min(nbytes // per_rank, self.curve.numel() - 1)
        return r, float(self.curve[r])


def _verdict(
    cand: Candidate, nbytes: int, lowrank: _LowRankReference, refs: list[tuple[str, int, float]]
) -> ComboVerdict:
    """Keep ``cand`` when its error is below the low-rank reference and every reference of its
    core family whose bytes (second field) are ≤ ``nbytes``."""
    r, lr_err = lowrank.at_bytes(nbytes)
    if cand.error >= lr_err:
        return ComboVerdict(
            cand, False, f"lowrank r={r} alone is as good ({lr_err:.3g} ≤ {cand.error:.3g})"
        )
    fitting = [(name, err) for name, b, err in refs if b <= nbytes]
    for name, err in fitting:
        if cand.error >= err:
            return ComboVerdict(
                cand, False, f"{name} alone is as good ({err:.3g} ≤ {cand.error:.3g})"
            )
    best = min(fitting, key=lambda t: t[1], default=None)
    core = f"; best core alone {best[0]} ({best[1]:.3g}) of {len(fitting)} that fit" if best else ""
    reason = f"beats lowrank r={r} ({lr_err:.3g}){core}"
    return ComboVerdict(
        Candidate(cand.decision, cand.error, f"{reason}; {cand.note}"), True, reason
    )


# ------------------------------------------------------------------------- lowrank_quant


def _lq_ranks(in_f: int, out_f: int, g: int, ranks: tuple[int, ...]) -> list[int]:
    return [
        r
        for r in ranks
        if r <= min(in_f, out_f) and _fits_dense(LowRankQuantConfig(r, 4, g), in_f, out_f)
    ]


def explain_lowrank_quant(
    ctx: SiteContext,
    groups: tuple[int, ...] = LQ_GROUPS,
    ranks: tuple[int, ...] = LQ_RANKS,
    lqlora_ranks: tuple[int, ...] = LQLORA_RANKS,
) -> list[ComboVerdict]:
    """Every LoRC candidate (and LQ-LoRA at ``lqlora_ranks`` where LoRC was kept) with its
    verdict."""
    out_f, in_f = ctx.weight.shape
    gs = [g for g in groups if _q_fits(4, g, in_f) and _lq_ranks(in_f, out_f, g, ranks)]
    if not gs or not ctx.weight.is_floating_point():
        return []
    W, gram = ctx.weight.detach(), ctx.gram
    W32 = W.to(torch.float32)
    metric = OutputError(W, gram)
    quantizer = default_quantizer(gram)
    lowrank = _LowRankReference(W, gram)
    cores: dict[tuple[int, int | None, bool], tuple[dict[str, Tensor], Tensor, float]] = {}

    def core(bits: int, g: int | None, sym: bool) -> tuple[dict[str, Tensor], Tensor, float]:
        key = (bits, g, sym)
        if key not in cores:
            q = quantize(W, gram, bits, g, sym, quantizer)
            E = W32 - dequantize(q, bits, g, sym, in_f).to(torch.float32)
            cores[key] = (q, E, metric.sq(E))
        return cores[key]

    def refs_upto(nbytes: int) -> list[tuple[str, int, float]]:
        out = []
        for bits, g, sym in QUANT_REFERENCES:
            qc = QuantConfig(bits, g, sym, quantizer)
            b = qc.weight_bytes(LinearShape(in_f, out_f))
            if _q_fits(bits, g, in_f) and b <= nbytes:
                out.append((qc.short(), b, metric.rel(core(bits, g, sym)[2])))
        return out

    verdicts: list[ComboVerdict] = []
    for g in gs:
        q0, E0, E0_sq = core(4, g, False)
        P, S, right = whitened_svd(E0, gram)
        for r in _lq_ranks(in_f, out_f, g, ranks):
            d = LowRankQuantConfig(r, 4, g, False, "lorc")
            U, V = split_factors(P, S, right, r, W.dtype)
            err = metric.rel(metric.with_lowrank(E0_sq, E0, U, V))
            nbytes = d.weight_bytes(LinearShape(in_f, out_f))
            v = _verdict(
                Candidate(d, err, _frac(d, in_f, out_f)), nbytes, lowrank, refs_upto(nbytes)
            )
            verdicts.append(v)
            if not v.kept or r not in lqlora_ranks:
                continue
            dq = LowRankQuantConfig(r, 4, g, False, "lqlora")
            t = lqlora(W, gram, r, 4, g, False, init=(q0, (U, V)))
            Wq = dequantize(t, 4, g, False, in_f).to(torch.float32)
            lq_err = metric.rel(metric.sq(W32 - Wq - t["U"].float() @ t["V"].float()))
            cand = Candidate(dq, lq_err, f"{_frac(dq, in_f, out_f)}; LoRC {err:.3g}")
            if lq_err < err:
                reason = f"{v.reason}; below LoRC ({err:.3g})"
                verdicts.append(
                    ComboVerdict(
                        Candidate(dq, lq_err, f"{reason}; {_frac(dq, in_f, out_f)}"), True, reason
                    )
                )
            else:
                verdicts.append(ComboVerdict(cand, False, "no gain over LoRC at the same bytes"))
    return verdicts


def lowrank_quant_candidates(ctx: SiteContext) -> list[Candidate]:
    """LoRC / LQ-LoRA candidates that beat both parts alone (see the module docstring)."""
    return [v.candidate for v in explain_lowrank_quant(ctx) if v.kept]


# ---------------------------------------------------------------------- sparse24_lowrank


def explain_sparse24_lowrank(
    ctx: SiteContext, ranks: tuple[int, ...] = SL_RANKS
) -> list[ComboVerdict]:
    """Every S + L candidate with its verdict."""
    out_f, in_f = ctx.weight.shape
    mask = "wanda" if ctx.gram is not None else "magnitude"
    rs = [
        r
        for r in ranks
        if r <= min(in_f, out_f) and _fits_dense(Sparse24LowRankConfig(r, mask), in_f, out_f)
    ]
    if sparse24_unsupported(in_f) or not rs or not ctx.weight.is_floating_point():
        return []
    W, gram = ctx.weight.detach(), ctx.gram
    W32 = W.to(torch.float32)
    metric = OutputError(W, gram)
    lowrank = _LowRankReference(W, gram)
    pruner = Pruner24(mask, gram, compensate=gram is not None)
    S0 = pruner(W)
    E0 = W32 - S0.to(torch.float32)
    E0_sq = metric.sq(E0)
    refs: list[tuple[str, int, float]] = []  # the plain 2:4 candidates; S_0 is the best of them
    nbytes_24 = Sparse24Config().weight_bytes(LinearShape(in_f, out_f))
    for d in [Sparse24Config("magnitude", False)] + (
        [Sparse24Config("wanda", False), Sparse24Config("wanda", True)] if gram is not None else []
    ):
        if d.compensate or gram is None:  # S_0 itself (Wanda + compensation, or magnitude)
            err = metric.rel(E0_sq)
        else:
            err = metric.rel(metric.sq(W32 - Pruner24(d.mask, gram, False)(W).to(torch.float32)))
        refs.append((d.short(), nbytes_24, err))
    P, S, right = whitened_svd(E0, gram)
    verdicts = []
    for r in rs:
        d = Sparse24LowRankConfig(r, mask)
        U, V = split_factors(P, S, right, r, W.dtype)
        t = sparse_plus_lowrank(W, gram, r, mask, init=(S0, (U, V)), pruner=pruner)
        Wh = (
            unpack24(t["values"], t["meta"], in_f).to(torch.float32)
            + t["U"].float() @ t["V"].float()
        )
        err = metric.rel(metric.sq(W32 - Wh))
        nbytes = d.weight_bytes(LinearShape(in_f, out_f))
        verdicts.append(_verdict(Candidate(d, err, _frac(d, in_f, out_f)), nbytes, lowrank, refs))
    return verdicts


def sparse24_lowrank_candidates(ctx: SiteContext) -> list[Candidate]:
    """S + L candidates that beat both parts alone (see the module docstring)."""
    return [v.candidate for v in explain_sparse24_lowrank(ctx) if v.kept]
