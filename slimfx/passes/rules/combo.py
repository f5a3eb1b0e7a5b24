"""Combined forms: a compressed core plus a low-rank correction.

    aten.linear(x, W, b) → slimfx.quant_lowrank_linear(x, qweight, scales, zeros?, U, V, b,
                                                       bits, G),     W ≈ deq(Q) + U·V
    aten.linear(x, W, b) → slimfx.sparse24_lowrank_linear(x, values, meta, U, V, b),
                                                                      W ≈ S + U·V

Accepted when the runtime op can run the core (quant: bits ∈ {4, 8}, in_features a multiple of
the group size, even for int4; 2:4: in_features a multiple of 8), the rank is at most
min(in, out), and the whole form — core plus factors — stores fewer bytes than the dense
16-bit weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimfx.formats import RUNTIME_BITS, sparse24_unsupported
from slimfx.ir.sites import LinearSite
from slimfx.passes.base import Rule, Verdict
from slimfx.passes.rules.sparse import site_dtype_is_float
from slimfx.planning.configs import (
    Decision,
    DenseConfig,
    LowRankQuantConfig,
    Sparse24LowRankConfig,
)
from slimfx.planning.shapes import LinearShape

__all__ = ["LinearToLowRankQuant", "LinearToSparse24LowRank"]


def _common(site: LinearSite, decision: Decision, rank: int) -> Verdict:
    i, o = site.in_features, site.out_features
    if site_dtype_is_float(site.dtype) is False:
        return Verdict.reject(f"weight dtype {site.dtype} is not floating point")
    if rank > min(i, o):
        return Verdict.reject(f"rank {rank} exceeds min(in, out) = {min(i, o)}")
    shape = LinearShape(i, o)
    total, dense = decision.weight_bytes(shape), DenseConfig().weight_bytes(shape)
    if total >= dense:
        return Verdict.reject(
            f"{decision.short()} saves no bytes: core + rank-{rank} factors = {total} B ≥ "
            f"dense {dense} B"
        )
    return Verdict.accept()


class LinearToLowRankQuant(Rule):
    """Replace a linear by a quantized weight plus a low-rank correction (LoRC / LQ-LoRA)."""

    kind = "lowrank_quant"
    name = "LinearToLowRankQuant"

    def check(self, site: LinearSite, decision: Decision, weight: Tensor | None = None) -> Verdict:
        v = super().check(site, decision, weight)
        if not v.ok:
            return v
        assert isinstance(decision, LowRankQuantConfig)
        i = site.in_features
        if decision.bits not in RUNTIME_BITS:
            return Verdict.reject(
                f"bits {decision.bits} has no kernel "
                "(slimfx::quant_lowrank_linear runs 4 or 8 bits)"
            )
        G = i if decision.group_size is None else decision.group_size
        if i % G:
            return Verdict.reject(f"in_features {i} is not a multiple of group size {G}")
        if decision.bits == 4 and i % 2:
            return Verdict.reject(f"int4 packs two codes per byte: in_features {i} is odd")
        return _common(site, decision, decision.rank)

    def op_call(
        self, decision: Decision, tensors: dict[str, Tensor]
    ) -> tuple[Any, list[str], dict[str, Any]]:
        """Tensor args ``qweight, scales, zeros, U, V`` after ``x`` (then the bias); ``zeros``
        is passed as None when the form is symmetric. ``bits``/``group_size`` as kwargs."""
        assert isinstance(decision, LowRankQuantConfig)
        in_features = tensors["V"].shape[1]
        G = in_features if decision.group_size is None else decision.group_size
        names = ["qweight", "scales", "zeros", "U", "V"]
        extra = {"bits": decision.bits, "group_size": G}
        return torch.ops.slimfx.quant_lowrank_linear.default, names, extra


class LinearToSparse24LowRank(Rule):
    """Replace a linear by a 2:4 sparse weight plus a low-rank correction (S + L)."""

    kind = "sparse24_lowrank"
    name = "LinearToSparse24LowRank"

    def check(self, site: LinearSite, decision: Decision, weight: Tensor | None = None) -> Verdict:
        v = super().check(site, decision, weight)
        if not v.ok:
            return v
        assert isinstance(decision, Sparse24LowRankConfig)
        reason = sparse24_unsupported(site.in_features)
        if reason:
            return Verdict.reject(reason)
        return _common(site, decision, decision.rank)

    def op_call(
        self, decision: Decision, tensors: dict[str, Tensor]
    ) -> tuple[Any, list[str], dict[str, Any]]:
        names = ["values", "meta", "U", "V"]
        return torch.ops.slimfx.sparse24_lowrank_linear.default, names, {}


#: the rules the ``lowrank_quant`` and ``sparse24_lowrank`` forms name (``slimfx.forms``).
LOWRANK_QUANT_RULE = LinearToLowRankQuant()
SPARSE24_LOWRANK_RULE = LinearToSparse24LowRank()
