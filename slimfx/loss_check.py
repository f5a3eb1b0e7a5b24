"""Does the sensitivity weighting predict the loss? A report diagnostic for ``optimize``.

- :func:`site_loss_changes` (``optimize(measure_loss=True)``): each rewritten site's measured
  loss change on the held-out calibration batches, leave-one-out — the loss of the rewritten
  model minus its loss with only that site computing its dense output again (a forward hook
  replaces the output) — next to the prediction the solver used,
  ``sensitivity · scale · est_error`` (in the loss's units for the probe estimators).
- :func:`floor_warning`: a note when the solver gave a form with a low measured SQNR to a site
  whose weight sits near the floor, where the estimate is least trustworthy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.cost.calibration import CalibrationStats, call_model
from slimfx.cost.sensitivity import FLOOR
from slimfx.report import Report

__all__ = [
    "SQNR_WARN_DB",
    "annotate_loss_changes",
    "floor_warning",
    "loss_checks",
    "site_loss_changes",
]

#: measured SQNR (dB) below which a form on a floor-weighted site is flagged.
SQNR_WARN_DB = 10.0


def _mean_loss(model: nn.Module, batches: Sequence[Any]) -> float:
    total = 0.0
    for b in batches:
        out = call_model(model, b, labels=True)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, dict):
            loss = out.get("loss")
        if not isinstance(loss, Tensor):
            raise ValueError("measure_loss needs a model that returns a loss for labels=input_ids")
        total += float(loss)
    return total / max(len(batches), 1)


def site_loss_changes(
    model: nn.Module,
    dense: Mapping[str, tuple[Tensor, Tensor | None]],
    batches: Sequence[Any],
) -> dict[str, float]:
    """Site → loss(rewritten model) − loss(rewritten model with that site dense), mean over
    ``batches`` (one forward per site and batch, no gradients)."""
    mods = dict(model.named_modules())
    out: dict[str, float] = {}
    with torch.no_grad():
        base = _mean_loss(model, batches)
        for name, (W, b) in dense.items():

            def dense_out(_m: nn.Module, args: tuple, _o: Tensor, W: Tensor = W,
                          b: Tensor | None = b) -> Tensor:
                return nn.functional.linear(args[0].to(W.dtype), W, b).to(_o.dtype)

            h = mods[name].register_forward_hook(dense_out)
            try:
                out[name] = base - _mean_loss(model, batches)
            finally:
                h.remove()
    return out


def annotate_loss_changes(
    report: Report, measured: Mapping[str, float], stats: CalibrationStats | None
) -> None:
    """Each measured site's ``loss_change``: ``{"predicted", "measured"}`` (predicted only
    when the weights are in loss units, i.e. a probe estimator), and a note with the count."""
    loss_units = stats is not None and stats.estimator in ("geo", "probe", "probe-kind", "kfac", "measured")
    for e in report.sites:
        if e.fqn not in measured:
            continue
        pred = e.sensitivity * stats.sensitivity_scale * e.est_error if loss_units else None
        e.loss_change = {"predicted": pred, "measured": measured[e.fqn]}
    report.notes.append(
        f"measure_loss: {len(measured)} site(s) with their measured held-out loss change "
        "(leave-one-out: the rewritten model with only that site dense again)"
        + ("" if loss_units else "; no prediction in loss units without a probe estimator")
    )


def floor_warning(report: Report, threshold_db: float = SQNR_WARN_DB) -> str | None:
    """A note naming sites weighted within 2× the floor whose chosen form measured an SQNR
    below ``threshold_db`` (``None`` when there are none)."""
    bad = [
        e for e in report.sites
        if e.chosen != "dense" and e.sensitivity <= 2 * FLOOR
        and e.measured_sqnr_db is not None and e.measured_sqnr_db < threshold_db
    ]
    if not bad:
        return None
    ex = ", ".join(f"{e.fqn} ({e.chosen}, {e.measured_sqnr_db:.1f} dB)" for e in bad[:3])
    return (
        f"sensitivity: {len(bad)} site(s) weighted near the floor ({FLOOR:g}) got a form "
        f"measuring under {threshold_db:g} dB SQNR, e.g. {ex}: their loss weight is the least "
        "reliable estimate — check with measure_loss=True, or exclude them"
    )


def loss_checks(
    report: Report,
    model: nn.Module,
    dense: Mapping[str, tuple[Tensor, Tensor | None]],
    batches: Sequence[Any],
    stats: CalibrationStats | None,
    measure_loss: bool,
) -> None:
    """``optimize``'s diagnostics: the floor warning always; per-site loss changes when
    ``measure_loss`` (an error without held-out batches)."""
    note = floor_warning(report)
    if note:
        report.notes.append(note)
    if not measure_loss:
        return
    if not batches:
        raise ValueError("measure_loss=True needs held-out batches (calibration with ≥ 2 batches "
                         "or heldout=)")
    annotate_loss_changes(report, site_loss_changes(model, dense, batches), stats)
