"""MLA options priced in the loss: the layer replay gives the model's own KL, the rescaling puts
it on the proxy's scale, and planning with "mla" uses it (a note says so)."""

from __future__ import annotations

import types

import pytest
import torch

from forms.mla._tiny import calib_batches, tiny_gqa_llama
from slimfx.forms.kv.config import KVDenseConfig
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model
from slimfx.forms.mla.measured import LayerReplay, rescale
from slimfx.planning.problem import Budget

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl_full_forward(model, batches, ref):
    total = count = 0.0
    with torch.no_grad():
        for ids, lp in zip(batches, ref):
            lq = torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)
            total += float((lp.exp() * (lp - lq)).sum())
            count += lp.shape[0] * lp.shape[1]
    return total / count


@pytest.mark.parametrize("layer", [0, 1])
def test_replayed_kl_equals_the_full_forward_with_the_block_converted(layer):
    model = tiny_gqa_llama(3)
    batches = calib_batches(n=3)
    replay = LayerReplay(model, batches)
    orig = model.model.layers[layer].self_attn
    assert abs(replay.kl(layer, orig)) < 1e-6  # the original block: nothing changes
    cfg = MLAConfig(rank=20, rope_pairs=2)
    convert_model(model, {layer: cfg}, batches)
    conv = model.model.layers[layer].self_attn
    want = _kl_full_forward(model, batches, replay.ref)
    model.model.layers[layer].self_attn = orig
    got = replay.kl(layer, conv)
    assert want > 1e-4 and got == pytest.approx(want, rel=1e-4)
    assert model.model.layers[layer].self_attn is orig  # the replay swaps back


def test_a_model_whose_layers_do_not_replay_into_its_logits_is_refused():
    model = tiny_gqa_llama(1)
    forward = model.forward

    def doubled(self, *a, **kw):
        out = forward(*a, **kw)
        out.logits = out.logits * 2
        return out

    model.forward = types.MethodType(doubled, model)
    with pytest.raises(ValueError, match="replaying the last decoder layer does not give"):
        LayerReplay(model, calib_batches(n=1))
    with pytest.raises(ValueError, match="needs calibration batches"):
        LayerReplay(model, [])


def test_rescale_takes_the_median_ratio_and_floors_negative_kl():
    errors, c = rescale([2.0, 4.0, 6.0, 1.0], [1.0, 1.0, 3.0, -0.5])
    assert c == 2.0 and errors == [2.0, 2.0, 6.0, 0.0]
    assert rescale([0.0], [0.0]) == ([0.0], 1.0)
    with pytest.raises(ValueError, match="2 proxy errors for 1 measured"):
        rescale([1.0, 2.0], [1.0])


def _mla_errors(pl):
    return {
        (so.name, o.decision): o.error
        for so in pl.problem.sites
        for o in so.options
        if isinstance(o.decision, MLAConfig)
    }


def test_planning_with_mla_prices_its_options_by_measured_kl(tiny_llama, monkeypatch):
    """The wiring: each MLA option's error is the rescaled KL of its own converted block (the
    KL stubbed as 1/rank here; its numerics are the test above), the proxy where the model
    cannot be replayed — each with its note."""
    from slimfx.forms.mla import measured
    from slimfx.stages import PlanningOptions, plan_model

    g = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, 256, (1, 48), generator=g) for _ in range(5)]
    opts = PlanningOptions(calibration=calib, progress=False, kv_forms=[KVDenseConfig(), "mla"])

    def refuse(self, model, batches):
        raise ValueError("cannot replay this one")

    with monkeypatch.context() as m:
        m.setattr(measured.LayerReplay, "__init__", refuse)
        pl = plan_model(tiny_llama, Budget(kv=0.6), opts)
    assert any("keep the block-error proxy" in n and "cannot replay" in n for n in pl.notes)
    proxy = _mla_errors(pl)
    seen = []
    monkeypatch.setattr(
        measured.LayerReplay, "kl",
        lambda self, layer, attn: seen.append((layer, attn.rank)) or 1.0 / attn.rank,
    )  # fmt: skip
    pl = plan_model(tiny_llama, Budget(kv=0.6), opts)
    got = _mla_errors(pl)
    assert got.keys() == proxy.keys() and len(got) >= 4
    keys = list(got)
    want, c = rescale([proxy[k] for k in keys], [1.0 / k[1].rank for k in keys])
    assert [got[k] for k in keys] == pytest.approx(want, rel=1e-12)
    assert sorted({layer for layer, _ in seen}) == [0, 1]  # each block measured at its layer
    assert [n for n in pl.notes if "measured KL" in n and f"{c:.4g}" in n]
