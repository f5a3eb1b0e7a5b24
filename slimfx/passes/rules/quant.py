"""aten.linear(x, W, b) → slimfx.quant_linear(x, qweight, scales, zeros?, b, bits, G),
W ≈ (q − z)·s per (row, group of G input columns); ``zeros`` is None when symmetric.

Accepted when the runtime op can run it: bits ∈ ``formats.RUNTIME_BITS`` (4, 8), in_features a
multiple of the group size (per-channel: G = in_features), an even in_features for int4 (two
codes per byte), and a floating-point weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimfx.formats import RUNTIME_BITS
from slimfx.ir.sites import LinearSite
from slimfx.passes.base import Rule, Verdict
from slimfx.planning.configs import Decision, QuantConfig

__all__ = ["LinearToQuant"]

_RUNTIME_BITS = RUNTIME_BITS


def _site_dtype_is_float(dtype: str) -> bool | None:
    """Whether the site's dtype string names a floating dtype (None when unknown)."""
    dt = getattr(torch, dtype.removeprefix("torch."), None)
    return dt.is_floating_point if isinstance(dt, torch.dtype) else None


class LinearToQuant(Rule):
    """Replace a linear by its weight-only int4 / int8 quantization."""

    kind = "quant"
    name = "LinearToQuant"

    def check(self, site: LinearSite, decision: Decision, weight: Tensor | None = None) -> Verdict:
        v = super().check(site, decision, weight)
        if not v.ok:
            return v
        assert isinstance(decision, QuantConfig)
        if _site_dtype_is_float(site.dtype) is False:
            return Verdict.reject(f"weight dtype {site.dtype} is not floating point")
        if decision.bits not in _RUNTIME_BITS:
            return Verdict.reject(
                f"bits {decision.bits} has no kernel (slimfx::quant_linear runs 4 or 8 bits)"
            )
        i = site.in_features
        G = i if decision.group_size is None else decision.group_size
        if i % G:
            return Verdict.reject(f"in_features {i} is not a multiple of group size {G}")
        if decision.bits == 4 and i % 2:
            return Verdict.reject(f"int4 packs two codes per byte: in_features {i} is odd")
        return Verdict.accept()

    def op_call(
        self, decision: Decision, tensors: dict[str, Tensor]
    ) -> tuple[Any, list[str], dict[str, Any]]:
        """``slimfx.quant_linear``: tensor args ``qweight, scales, zeros`` after ``x`` (then the
        bias), and ``bits``/``group_size`` as kwargs. A symmetric form has no ``zeros`` tensor:
        the name stays in the list so positions hold, and the caller passes ``None`` for a name
        missing from ``tensors``."""
        assert isinstance(decision, QuantConfig)
        in_features = tensors["qweight"].shape[1] * 8 // decision.bits  # whole packed chunks
        G = in_features if decision.group_size is None else decision.group_size
        extra = {"bits": decision.bits, "group_size": G}
        return torch.ops.slimfx.quant_linear.default, ["qweight", "scales", "zeros"], extra


#: the rule the ``quant`` form names (``slimfx.forms``).
RULE = LinearToQuant()
