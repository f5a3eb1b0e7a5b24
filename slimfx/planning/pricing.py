"""A decision's costs for a site shape object: the one place the passes, backends and reports
price a decision against a site.

Written against the shape-generic contract — ``decision.weight_bytes(shape)``,
``decision.bytes(shape, bias)``, ``decision.costs(shape) -> {dimension: bytes}`` — while
``Decision`` still prices ``(in_features, out_features)``: each function below adapts a
``LinearShape`` to today's methods (marked ``ADAPTER``), and refuses other kinds with the
reason. When the decisions take shape objects, each body becomes the one call it names.
"""

from __future__ import annotations

from typing import Any

from slimfx.planning.configs import Decision
from slimfx.planning.shapes import WEIGHT_BYTES, LinearShape

__all__ = ["weight_bytes", "site_bytes", "costs"]


def _linear(decision: Decision, shape: Any) -> LinearShape:
    if not isinstance(shape, LinearShape):
        kind = getattr(shape, "kind", type(shape).__name__)
        raise ValueError(
            f"{decision.short()} cannot be priced for a {kind} site yet: decisions price "
            "linear shapes only"
        )
    return shape


def weight_bytes(decision: Decision, shape: Any) -> int:
    """Reference bytes of the weights ``decision`` stores for a site of ``shape``."""
    s = _linear(decision, shape)
    return decision.weight_bytes(s.in_features, s.out_features)  # ADAPTER: .weight_bytes(shape)


def site_bytes(decision: Decision, shape: Any, bias: bool = False) -> int:
    """``weight_bytes`` plus a 16-bit bias when the site has one."""
    s = _linear(decision, shape)
    return decision.bytes(s.in_features, s.out_features, bias)  # ADAPTER: .bytes(shape, bias)


def costs(decision: Decision, shape: Any) -> dict[str, int]:
    """Bytes per budget dimension (``slimfx.planning.shapes.DIMENSIONS``) of ``decision`` at a
    site of ``shape``; a linear form costs weight bytes only."""
    return {WEIGHT_BYTES: weight_bytes(decision, shape)}  # ADAPTER: decision.costs(shape)
