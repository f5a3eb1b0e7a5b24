"""optimize(measure_loss=True): each rewritten site's measured held-out loss change next to the
predicted one, and the note on low-SQNR forms at floor-weighted sites."""

from __future__ import annotations

import copy

import pytest
import torch

import slimfx
from slimfx.cost.calibration import call_model
from slimfx.loss_check import floor_warning
from slimfx.report import Report, SiteEntry


def _ids(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, 32), generator=g) for _ in range(n)]


def _loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(call_model(model, b, labels=True).loss) for b in batches) / len(batches)


def test_measure_loss_reports_each_sites_leave_one_out_change() -> None:
    from slimfx.models import tiny_llama

    model = tiny_llama()
    held = _ids(2, seed=5)
    new = slimfx.optimize(model, 0.5, calibration=_ids(4), heldout=held, families=("lowrank",),
                          sensitivity="probe",
                          measure_loss=True, progress=False)
    rep = slimfx.report_of(new)
    rewritten = [e for e in rep.sites if e.chosen != "dense"]
    assert rewritten and all(e.loss_change is not None for e in rewritten)
    assert all(e.loss_change is None for e in rep.sites if e.chosen == "dense")
    assert any(n.startswith("measure_loss:") for n in rep.notes)
    # the predicted change is the solver's weight times its relative error, in nats
    for e in rewritten:
        assert e.loss_change["predicted"] > 0
    # recompute one site's change independently: swap the rewritten module for a dense linear
    e = rewritten[0]
    parent_name, _, child = e.fqn.rpartition(".")
    orig = dict(model.named_modules())[e.fqn]
    swapped = copy.deepcopy(new)
    dense = torch.nn.Linear(orig.in_features, orig.out_features, bias=orig.bias is not None)
    dense.load_state_dict(orig.state_dict())
    setattr(dict(swapped.named_modules())[parent_name], child, dense)
    want = _loss(new, held) - _loss(swapped, held)
    assert e.loss_change["measured"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    # it survives the JSON round trip
    back = Report.from_dict(rep.to_dict())
    assert back.sites[rep.sites.index(e)].loss_change == e.loss_change


def test_floor_warning_names_low_sqnr_forms_on_floor_weighted_sites() -> None:
    sites = [
        SiteEntry("a", (4, 4), chosen="lowrank(r=1,whitened)", sensitivity=0.05,
                  measured_sqnr_db=6.0),
        SiteEntry("b", (4, 4), chosen="lowrank(r=1,whitened)", sensitivity=1.0,
                  measured_sqnr_db=6.0),  # weighted normally: its estimate is trusted
        SiteEntry("c", (4, 4), chosen="int4(g32)", sensitivity=0.05, measured_sqnr_db=25.0),
    ]
    note = floor_warning(Report(sites=sites))
    assert note is not None and "1 site(s)" in note and "a (lowrank(r=1,whitened), 6.0 dB)" in note
    assert floor_warning(Report(sites=sites[1:])) is None
