"""The one plan check: does a Plan fit these sites?

``validate_plan`` is called by every path that applies a plan — ``optimize`` (before any
statistics are collected), the module swap, the graph rewrite and the ``torch.compile``
backend — so a plan naming a site the model does not have, or made for other shapes, fails
the same way everywhere: every unknown name with its closest match, every shape mismatch with
both shapes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from slimfx.ir.match import linear_weight
from slimfx.ir.sites import AttentionSite, LinearSite
from slimfx.planning.plan import Plan
from slimfx.planning.shapes import LinearShape

__all__ = ["validate_plan", "suggest", "weight_sites", "format_shape"]


def suggest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_shape(shape: Any) -> str:
    """A linear shape as ``(out, in)`` (how the weight is laid out), others by their repr."""
    if isinstance(shape, LinearShape):
        return str((shape.out_features, shape.in_features))
    return repr(shape)


def validate_plan(
    plan: Plan, sites: Iterable[LinearSite | AttentionSite]
) -> dict[str, LinearSite | AttentionSite]:
    """FQN → site for every site; raise ``ValueError`` when the plan names FQNs that are not
    sites (each with its closest match), records a shape that disagrees with a site's, or has
    a site owned by another site's decision that is not a site either."""
    site_map = {s.fqn: s for s in sites}
    named = [*plan, *(k for k in plan.owned_by if k not in plan.decisions)]
    unknown = [fqn for fqn in named if fqn not in site_map]
    if unknown:
        listed = ", ".join(f"{fqn!r}{suggest(fqn, site_map)}" for fqn in unknown)
        raise ValueError(
            f"plan names {len(unknown)} site(s) that are not linear sites of this model: {listed}"
        )
    wrong = [
        f"site {fqn!r}: plan was made for shape {_axes(shape)} = {format_shape(shape)} but the "
        f"model's site has {format_shape(site_map[fqn].site_shape)}"
        for fqn, shape in plan.shapes.items()
        if fqn in site_map and fqn in named and shape != site_map[fqn].site_shape
    ]
    if wrong:
        raise ValueError("plan shapes do not match the model: " + "; ".join(wrong[:5]))
    return site_map


def _axes(shape: Any) -> str:
    return "(out, in)" if isinstance(shape, LinearShape) else shape.kind


def weight_sites(model: nn.Module, names: Iterable[str] | None = None) -> list[LinearSite]:
    """A ``LinearSite`` for each module of ``model`` (of ``names``, default all) with a 2-D
    ``weight``: what a plan for that model may name before a graph is captured."""
    mods = dict(model.named_modules())
    out = []
    for fqn in mods if names is None else names:
        mod = mods.get(fqn)
        w = getattr(mod, "weight", None)
        if not (isinstance(w, Tensor) and w.dim() == 2):
            continue
        w = linear_weight(mod)
        b = getattr(mod, "bias", None)
        out.append(
            LinearSite(
                fqn=fqn,
                in_features=int(w.shape[1]),
                out_features=int(w.shape[0]),
                dtype=str(w.dtype),
                has_bias=isinstance(b, Tensor),
                weight=f"{fqn}.weight" if fqn else "weight",
                group=fqn,
            )
        )
    return out
