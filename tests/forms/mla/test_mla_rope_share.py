"""``MLAConfig(rope_share=True)``: one choice of kept RoPE entries for every layer converted with
it (each layer's scores normalized, then summed), carried by the configs as ``rope_kept`` — a
plan replays it, and a DeepSeek-V3 export of it needs no padding of the RoPE key."""

from __future__ import annotations

import json

import pytest
import torch

from forms.mla._tiny import calib_batches, eval_ids, tiny_gqa_llama
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model
from slimfx.planning.configs import decision_from_dict

#: the plain 2-norm score (no frequency weight): the two random layers choose differently alone
SHARED = MLAConfig(rank=20, rope_pairs=2, rope_select="norm", rope_share=True)
ALONE = MLAConfig(rank=20, rope_pairs=2, rope_select="norm")


def _logits(model):
    with torch.no_grad():
        return model(eval_ids(), use_cache=False).logits


def _kept(model):
    return [blk.self_attn.mla_config.rope_kept for blk in model.model.layers]


def test_every_layer_keeps_the_same_entries_and_the_configs_carry_them():
    alone = tiny_gqa_llama(3)
    convert_model(alone, ALONE, calib_batches())
    own = [sorted(blk.self_attn.rope_freq.tolist()) for blk in alone.model.layers]
    assert own[0] != own[1]  # each layer alone rotates other frequencies
    model = tiny_gqa_llama(3)
    res = convert_model(model, SHARED, calib_batches())
    kept = _kept(model)
    assert kept[0] == kept[1] and len(kept[0]) == 3 * 2
    assert all(c.rope_kept == kept[0] and c.rope_share for c in res.configs.values())
    # the converted blocks rotate exactly those entries' frequencies
    freq = torch.tensor([e // 3 for e in kept[0]])
    for blk in model.model.layers:
        assert torch.equal(blk.self_attn.rope_freq.cpu(), freq)


def test_one_layer_shared_is_its_own_choice():
    a, b = tiny_gqa_llama(2), tiny_gqa_llama(2)
    convert_model(a, {1: SHARED}, calib_batches())
    convert_model(b, {1: ALONE}, calib_batches())
    assert torch.equal(_logits(a), _logits(b))


def test_each_layer_counts_alike_whatever_its_scale():
    """Scores are normalized per layer: a layer whose keys are 100× larger (its scores 100× the
    other's) does not decide alone."""
    cfg = SHARED
    own = []
    for i in (0, 1):  # sharing over one layer records that layer's own choice
        m = tiny_gqa_llama(3)
        convert_model(m, {i: cfg}, calib_batches())
        own.append(m.model.layers[i].self_attn.mla_config.rope_kept)
    a, b = tiny_gqa_llama(3), tiny_gqa_llama(3)
    with torch.no_grad():
        b.model.layers[1].self_attn.k_proj.weight.mul_(100.0)
    convert_model(a, cfg, calib_batches())
    convert_model(b, cfg, calib_batches())
    assert own[0] != own[1] and _kept(a)[0] != own[1]
    assert _kept(a) == _kept(b)


def test_the_configs_replay_the_shared_choice():
    model = tiny_gqa_llama(3)
    res = convert_model(model, SHARED, calib_batches())
    saved = json.loads(json.dumps({i: c.to_dict() for i, c in res.configs.items()}))
    replay = {int(i): decision_from_dict(d) for i, d in saved.items()}
    assert all(isinstance(c.rope_kept, tuple) for c in replay.values())
    again = tiny_gqa_llama(3)
    convert_model(again, replay, calib_batches())
    assert torch.equal(_logits(model), _logits(again))
    # on other calibration text the recorded entries hold where a fresh choice differs
    other = calib_batches(seed=11)
    fresh, kept = tiny_gqa_llama(3), tiny_gqa_llama(3)
    convert_model(fresh, SHARED, other)
    convert_model(kept, replay, other)
    assert _kept(fresh)[0] != _kept(model)[0] and _kept(kept) == _kept(model)


def test_an_optimize_plan_records_the_shared_choice(tmp_path):
    """A plan whose MLA decisions ask for ``rope_share``: the report's plan (what ``save``
    writes and ``load`` rebuilds from) holds the entries chosen."""
    import slimfx
    from slimfx.forms.kv.config import KVDenseConfig
    from slimfx.planning.problem import Budget

    calib = calib_batches()
    base = slimfx.optimize(tiny_gqa_llama(3), Budget(kv=0.6), calibration=calib,
                           kv_forms=[KVDenseConfig(), "mla"], progress=False)
    d = slimfx.report_of(base).meta["plan"]
    asked = [v for v in d["decisions"].values() if v["kind"] == "mla"]
    assert len(asked) == 2
    for v in asked:
        v.update(rope_share=True, rope_select="norm", rope_pairs=2, rank=20, latent_bits=16)
    out = slimfx.optimize(tiny_gqa_llama(3), plan=slimfx.Plan.from_dict(d), calibration=calib,
                          progress=False)
    plan = slimfx.Plan.from_dict(slimfx.report_of(out).meta["plan"])
    kept = [c.rope_kept for c in plan.decisions.values() if c.kind == "mla"]
    assert kept == [_kept(out)[0]] * 2 and len(kept[0]) == 6
    slimfx.save(out, tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    assert _kept(back) == _kept(out)
    assert torch.equal(_logits(back), _logits(out))


def test_a_deepseek_export_of_a_shared_choice_has_no_padding():
    pytest.importorskip("transformers.models.deepseek_v3")
    from slimfx.forms.mla.deepseek import deepseek_v3_model

    model = tiny_gqa_llama(3)
    convert_model(model, SHARED, calib_batches())
    ds, info = deepseek_v3_model(model)
    assert info.qk_rope_head_dim == 2 * 3 * 2
    assert info.converted_cache_values == [info.cache_values] * 2
    ref = _logits(model)
    assert (ref - _logits(ds)).abs().max() <= 2e-6 * ref.abs().max()


def test_refusals():
    model = tiny_gqa_llama(3)
    before = _logits(model)
    mixed = {0: SHARED, 1: MLAConfig(rank=20, rope_pairs=3, rope_share=True)}
    with pytest.raises(ValueError, match=r"rope_share chooses one set of RoPE entries.*"
                       r"layers \[0\]: \(3, 16, 2, 'norm', 'pca'\); layers \[1\]"):
        convert_model(model, mixed, calib_batches())
    bad = MLAConfig(rank=20, rope_pairs=2, rope_kept=(0, 1, 2))  # K·p = 6 entries, not 3
    with pytest.raises(ValueError, match="rope_kept holds 3 entries"):
        convert_model(model, bad, calib_batches())
    assert torch.equal(_logits(model), before)  # unchanged
    with pytest.raises(ValueError, match="distinct"):
        MLAConfig(rope_kept=(1, 1))
    with pytest.raises(ValueError, match="rope_share has nothing to choose"):
        MLAConfig(rope_select="per_frequency", rope_share=True)
