"""The price of one attention step from measured steps (``calibrate-target --attention``,
``slimfx.cost.measure_attention``): along the context and along the batch from the measured
points, scaled by the roofline where there is only one, else the roofline
(:func:`~slimfx.cost.target.estimate_attention_latency`)."""

from __future__ import annotations

import functools
from typing import Any

from slimfx.cost.target import (
    MeasuredCache,
    Target,
    Workload,
    compute_dtype,
    estimate_attention_latency,
    target_of,
    workload_of,
)
from slimfx.planning.configs import Decision
from slimfx.planning.shapes import AttentionShape

__all__ = ["attention_latency"]


def attention_latency(
    decision: Decision,
    shape: AttentionShape,
    target: str | Target,
    workload: str | Workload,
    context: int,
    batch: int = 1,
    cache: MeasuredCache | None = None,
    work: Any = None,
) -> tuple[float, str]:
    """``(seconds, source)`` of one attention step (:func:`estimate_attention_latency`'s
    arguments) from the steps ``cache`` holds for this shape, decision, batch and the target's
    compute dtype (``slimfx.cost.measure_attention``), else the roofline:

    - ``"measured"``: the step measured at ``context``, or linear in the context between the
      two measured contexts around it;
    - ``"measured, extrapolated"``: beyond the largest along the line through the two largest
      (an attention step is affine in its context: a fixed part, a part per token);
    - ``"measured, roofline-scaled"``: below the smallest measured context (or with one
      context only, or a line that falls), the nearest measurement times the roofline's
      ratio between the two contexts;
    - ``"roofline"``: no measurement of this shape and decision.

    A batch not measured is priced from the measured ones at ``context`` the same way along the
    batch (a step is affine in it too: a fixed part, a part per sequence): linear between the
    two measured batches around it (``"measured"``) or along the two largest beyond them
    (``"measured, extrapolated"``), else
    the nearest measured batch times the roofline's ratio between the two batches
    (``"measured, roofline-scaled"``)."""
    tgt, wl = target_of(target), workload_of(workload)
    roof = functools.partial(estimate_attention_latency, decision, shape, tgt, wl)
    if cache is not None:
        key = MeasuredCache.attention_key(
            shape, wl.tokens, context, batch, str(compute_dtype(tgt)), decision, tgt.name
        )
        curves = cache.batches(key)
        if batch in curves:
            return _from_curve(curves[batch], context, functools.partial(roof, batch=batch), work)
        if curves:
            at = {
                b: _from_curve(pts, context, functools.partial(roof, batch=b), work)
                for b, pts in curves.items()
            }
            return _along_batch(at, batch, roof, context, work)
    return roof(context=context, batch=batch, work=work), "roofline"


def _line(pts: list[tuple[int, float]], x: int) -> tuple[float, list[int], bool] | None:
    """The value at ``x`` on the measured ``(x, value)`` points (sorted by ``x``), the points
    it used and whether it lies beyond them: the point at ``x``, linear between its
    neighbours, or beyond the largest along the line through the two largest (unless that line
    falls); ``None`` otherwise (below the smallest, one point, a falling line)."""
    below = [p for p in pts if p[0] <= x]
    above = [p for p in pts if p[0] >= x]
    if below and above:
        (x0, y0), (x1, y1) = below[-1], above[0]
        if x0 == x1:
            return y0, [x0], False
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0), [x0, x1], False
    if below and len(pts) >= 2 and pts[-1][1] >= pts[-2][1]:
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return y1 + (y1 - y0) * (x - x1) / (x1 - x0), [x0, x1], True
    return None


#: the source of a price on the measured line past its largest point
EXTRAPOLATED = "measured, extrapolated"


def _nearest(pts: list[tuple[int, float]], x: int) -> tuple[int, float]:
    """The measured point to scale from when :func:`_line` has no value: the largest below
    ``x``, else the smallest."""
    below = [p for p in pts if p[0] <= x]
    return below[-1] if below else pts[0]


def _along_batch(
    at: dict[int, tuple[float, str]], b: int, roof: Any, context: int, work: Any
) -> tuple[float, str]:
    """:func:`attention_latency` at batch ``b`` from the prices ``at`` measured batches (each
    ``(seconds, source)`` at the context)."""
    pts = sorted((m, s) for m, (s, _) in at.items())
    scaled = "measured, roofline-scaled"
    got = _line(pts, b)
    if got is not None:
        s, used, beyond = got
        srcs = {at[m][1] for m in used}
        if scaled in srcs:
            return s, scaled
        return s, EXTRAPOLATED if beyond or EXTRAPOLATED in srcs else "measured"
    b0, s0 = _nearest(pts, b)
    ratio = roof(context=context, batch=b, work=work) / roof(context=context, batch=b0, work=work)
    return s0 * ratio, scaled


def _from_curve(pts: list[tuple[int, float]], c: int, roof: Any, work: Any) -> tuple[float, str]:
    """:func:`attention_latency` from measured ``(context, seconds)`` points."""
    got = _line(pts, c)
    if got is not None:
        return got[0], EXTRAPOLATED if got[2] else "measured"
    c0, s0 = _nearest(pts, c)
    scale = roof(context=c, work=work) / roof(context=c0)
    return s0 * scale, "measured, roofline-scaled"
