"""optimize()'s loss-sensitivity weighting of site errors: the default for causal LMs, the
report's unweighted errors beside the weights, and the fallbacks (not a causal LM, no loss, no
target token) with their notes."""

from __future__ import annotations

import statistics

import pytest
import torch
from _helpers import calib_tokens as _calib

import slimfx
from slimfx.cost.sensitivity import FLOOR


def test_fisher_is_the_default_for_causal_lms_and_the_report_keeps_errors_unweighted():
    """fisher=None (default) weighs a causal LM's site errors by their loss sensitivity and
    says so; the report's est_error stays the site's own relative error (comparable with the
    measured SQNR), its weight shown apart: est_error · sensitivity is what the solver summed."""
    from slimfx.models import tiny_llama

    model = tiny_llama()
    kw = dict(calibration=_calib(4), families=("lowrank", "int8"), progress=False)
    auto = slimfx.report_of(slimfx.optimize(model, 0.6, **kw))
    off = slimfx.report_of(slimfx.optimize(model, 0.6, fisher=False, **kw))
    assert any(n.startswith("sensitivity: each site's error weighted") for n in auto.notes)
    assert not any(n.startswith("sensitivity") for n in off.notes)
    # the default estimator ("geo": Fisher × probe, geometric mean) is median-normalized with
    # a floor; "fisher" (the previous default) is mean-normalized
    assert any("the geometric mean of the Fisher product" in n for n in auto.notes)
    sens = [s.sensitivity for s in auto.sites]
    assert len(set(sens)) > 1 and statistics.median(sens) == pytest.approx(1.0, rel=1e-6)
    assert min(sens) >= FLOOR
    fisher = slimfx.report_of(slimfx.optimize(model, 0.6, sensitivity="fisher", **kw))
    assert any("Σ E[g²]E[y²] (Fisher), mean-normalized" in n for n in fisher.notes)
    old = [s.sensitivity for s in fisher.sites]
    assert len(set(old)) > 1 and sum(old) / len(old) == pytest.approx(1.0, rel=1e-6)
    assert {s.sensitivity for s in off.sites} == {1.0}
    same = [(a, b) for a, b in zip(auto.sites, off.sites) if a.chosen == b.chosen]
    assert same  # the same form at a site has the same unweighted estimate in both runs
    for a, b in same:
        assert a.est_error == pytest.approx(b.est_error, rel=1e-9, abs=1e-15)
    objective = sum(s.sensitivity * s.est_error for s in auto.sites)
    assert auto.totals["est_error_sum"] == pytest.approx(objective, abs=1e-6)  # 6 decimals


def test_fisher_default_off_without_an_lm_and_falls_back_with_a_note(monkeypatch):
    from slimfx.models import tiny_llama

    lin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    xs = [torch.randn(4, 16) for _ in range(3)]
    rep = slimfx.report_of(slimfx.optimize(lin, 0.8, calibration=xs, families=("lowrank",),
                                           progress=False))
    assert {s.sensitivity for s in rep.sites} == {1.0}
    # said (an encoder such as BERT was weighted 1.0 everywhere without a word)
    assert any(n.startswith("sensitivity: errors unweighted — Sequential calibrated on "
                            "non-token inputs is not a causal LM") for n in rep.notes)

    from slimfx.cost import calibration

    real = calibration.collect_stats

    from slimfx.cost.batches import NoLossError

    def no_loss(*a, fisher=False, **k):  # a causal LM whose loss cannot be taken
        if fisher:
            raise NoLossError("fisher=True needs a loss")
        return real(*a, fisher=fisher, **k)

    monkeypatch.setattr(calibration, "collect_stats", no_loss)
    rep = slimfx.report_of(slimfx.optimize(tiny_llama(), 0.8, calibration=_calib(3),
                                           families=("lowrank",), progress=False))
    note = next(n for n in rep.notes if n.startswith("sensitivity"))
    assert "unavailable" in note and "needs a loss" in note
    with pytest.raises(ValueError, match="needs a loss"):  # asked for explicitly: an error
        slimfx.optimize(tiny_llama(), 0.8, calibration=_calib(3), fisher=True, progress=False)


def test_labels_with_no_target_token_give_no_weighting_not_nan_weights():
    """Dict batches whose labels are all -100 give a NaN loss: the default falls back to
    unweighted errors and says why (it had weighted every site 1.0 behind a note claiming
    loss sensitivity); fisher=True raises."""
    from slimfx.models import tiny_llama

    ids = _calib(2)
    batches = [dict(input_ids=b, labels=torch.full_like(b, -100)) for b in ids]
    rep = slimfx.report_of(slimfx.optimize(tiny_llama(), 0.8, calibration=batches,
                                           families=("lowrank",), progress=False))  # fmt: skip
    note = next(n for n in rep.notes if n.startswith("sensitivity"))
    assert "unavailable" in note and "no target token (all -100)" in note
    assert {s.sensitivity for s in rep.sites} == {1.0}
    with pytest.raises(ValueError, match=r"loss is nan .*no target token"):
        slimfx.optimize(tiny_llama(), 0.8, calibration=batches, fisher=True, progress=False)
