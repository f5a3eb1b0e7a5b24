"""aten.linear(x, W, b) → slimfx.lowrank_linear(x, U, V, b),  W ≈ U·V  (U: out×r, V: r×in).

Accepted only where it saves bytes, r·(in + out) < in·out, and r ≤ min(in, out).
``LinearToLowRank(require_savings=False)`` drops the byte test (never registered: tests use it
to check full-rank numerics, where U·V must reproduce W).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimfx.ir.sites import LinearSite
from slimfx.passes.base import Rule, Verdict
from slimfx.planning.configs import Decision, LowRankConfig


class LinearToLowRank(Rule):
    """Replace a linear by its rank-r factorization."""

    kind = "lowrank"
    name = "LinearToLowRank"

    def __init__(self, require_savings: bool = True) -> None:
        self.require_savings = require_savings

    def check(self, site: LinearSite, decision: Decision, weight: Tensor | None = None) -> Verdict:
        v = super().check(site, decision, weight)
        if not v.ok:
            return v
        assert isinstance(decision, LowRankConfig)
        r, i, o = decision.rank, site.in_features, site.out_features
        if r > min(i, o):
            return Verdict.reject(f"rank {r} exceeds min(in, out) = {min(i, o)}")
        if self.require_savings and r * (i + o) >= i * o:
            return Verdict.reject(
                f"rank {r} saves no bytes: r·(in+out) = {r * (i + o)} ≥ in·out = {i * o}"
            )
        return Verdict.accept()

    def op_call(
        self, decision: Decision, tensors: dict[str, Tensor]
    ) -> tuple[Any, list[str], dict[str, Any]]:
        return torch.ops.slimfx.lowrank_linear.default, ["U", "V"], {}


#: the rule the ``lowrank`` form names (``slimfx.forms``).
RULE = LinearToLowRank()
