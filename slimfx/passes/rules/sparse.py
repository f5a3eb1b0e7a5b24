"""aten.linear(x, W, b) → slimfx.sparse24_linear(x, values, meta, b),  W ≈ S  (2:4 sparse:
two of every four consecutive input weights kept; ``values`` out × in/2, ``meta`` uint8
out × in/8).

Accepted for a floating-point weight whose in_features is a multiple of 8 (the metadata packs
two groups of four columns per byte). 2:4 always saves bytes (1.125·in·out < 2·in·out).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimfx.formats import sparse24_unsupported
from slimfx.ir.sites import LinearSite
from slimfx.passes.base import Rule, Verdict
from slimfx.planning.configs import Decision

__all__ = ["LinearToSparse24", "site_dtype_is_float"]


def site_dtype_is_float(dtype: str) -> bool | None:
    """Whether the site's dtype string names a floating dtype (None when unknown)."""
    dt = getattr(torch, dtype.removeprefix("torch."), None)
    return dt.is_floating_point if isinstance(dt, torch.dtype) else None


class LinearToSparse24(Rule):
    """Replace a linear by its 2:4 semi-structured sparse form."""

    kind = "sparse24"
    name = "LinearToSparse24"

    def check(self, site: LinearSite, decision: Decision, weight: Tensor | None = None) -> Verdict:
        v = super().check(site, decision, weight)
        if not v.ok:
            return v
        if site_dtype_is_float(site.dtype) is False:
            return Verdict.reject(f"weight dtype {site.dtype} is not floating point")
        reason = sparse24_unsupported(site.in_features)
        return Verdict.reject(reason) if reason else Verdict.accept()

    def op_call(
        self, decision: Decision, tensors: dict[str, Tensor]
    ) -> tuple[Any, list[str], dict[str, Any]]:
        return torch.ops.slimfx.sparse24_linear.default, ["values", "meta"], {}


#: the rule the ``sparse24`` form names (``slimfx.forms``).
RULE = LinearToSparse24()
