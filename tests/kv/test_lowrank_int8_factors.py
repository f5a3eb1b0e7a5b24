"""Low-rank KV caches whose own weights are int8 rows (``factor_bits=8``): priced at the bytes
they store, computed as their simulation prices them, decoded as the 16-bit layers are, offered
to the solver from the same fit when the budget counts weights, saved and loaded."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from _helpers import lowrank_decode, tiny_qwen2_biased

import slimfx
from slimfx.forms.kv import calibrate
from slimfx.forms.kv.calibrate import attention_grams, capture_attention_inputs, fit_site
from slimfx.forms.kv.candidates import kv_site_options
from slimfx.forms.kv.config import KVDenseConfig, KVLatentQuantConfig, KVLowRankConfig
from slimfx.forms.kv.lowrank import LowRankKVAttention, apply_lowrank_kv
from slimfx.forms.kv.simulate import block_forward
from slimfx.ir.find import inspect_attention_sites
from slimfx.ir.int8_rows import Int8Factor, Int8Rows
from slimfx.planning.configs import decision_from_dict
from slimfx.planning.problem import Budget

pytestmark = pytest.mark.usefixtures("one_thread")

F16 = [
    KVLatentQuantConfig(16, 24, 2, "whitened", 4, 4, 2, sink=2, axis="channel"),
    KVLowRankConfig(16, 24, 2, "attention", sink=3),
]
F8 = [dataclasses.replace(f, factor_bits=8) for f in F16]


def _fitted():
    """The tiny Qwen2 (large k/v biases), its sites, per-site factors fitted once (16-bit
    forms), and calibration inputs of each block."""
    model = tiny_qwen2_biased("sdpa")
    sites, _ = inspect_attention_sites(model)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(3, 256, (1, 24), generator=g) for _ in range(3)]
    grams = attention_grams(model, sites, batches)
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], F16[i]) for i, s in enumerate(sites)}
    inputs = capture_attention_inputs(model, sites, batches)
    return model, sites, factors, inputs, grams


def _rewritten(model, sites, factors, forms):
    out = copy.deepcopy(model)
    apply_lowrank_kv(out, sites, {s.fqn: forms[i] for i, s in enumerate(sites)}, factors)
    return out


def _stored_bytes(attn: LowRankKVAttention) -> int:
    """Bytes of the block's own weight matrices as its tensors hold them (biases excluded)."""
    total = 0
    for m in attn.children():
        if isinstance(m, Int8Rows):
            assert m.codes.dtype == torch.int8 and m.scale.dtype == torch.float32
            total += m.codes.numel() + 2 * m.scale.numel()  # a scale priced 16-bit
    if attn.factor_bits == 16:
        mats = [attn.k_down.weight, attn.v_down.weight, attn.k_up, attn.v_up]
        mats += [attn.k_proj.weight, attn.v_proj.weight] if attn.sink else []
        total += sum(2 * t.numel() for t in mats)
    return total


def test_priced_bytes_are_the_stored_bytes_and_about_half_of_16_bit():
    model, sites, factors, _, _ = _fitted()
    m8, m16 = (_rewritten(model, sites, factors, f) for f in (F8, F16))
    for i, s in enumerate(sites):
        a8, a16 = m8.model.layers[i].self_attn, m16.model.layers[i].self_attn
        assert isinstance(a8.k_down, Int8Factor) and isinstance(a8.k_proj, Int8Factor)
        assert a8.k_proj.bias is a8.k_bias  # the sinks' projection shares the bias
        b8 = F8[i].projection_weight_bytes(s.site_shape)
        b16 = F16[i].projection_weight_bytes(s.site_shape)
        assert b8 == _stored_bytes(a8) and b16 == _stored_bytes(a16)
        assert 0.5 < b8 / b16 < 0.6
    # SmolLM2's shape by hand: k96 v192 with 4 sinks, hidden 576, kv 192
    shape = dataclasses.replace(sites[0].site_shape, hidden_size=576, num_heads=9,
                                num_kv_heads=3, head_dim=64)  # fmt: skip
    f8 = KVLowRankConfig(96, 192, 1, "whitened", 4, 8)
    entries = 288 * (576 + 192) + 2 * 576 * 192
    assert f8.projection_weight_bytes(shape) == entries + 2 * (288 + 2 * 192 + 2 * 192)
    assert dataclasses.replace(f8, factor_bits=16).projection_weight_bytes(shape) == 2 * entries


def test_the_block_computes_what_its_simulation_prices():
    """The rewritten block (no cache, causal) equals ``block_forward`` of the original block
    with the form and the 16-bit fit — which rounds the factors and the sinks' projections as
    the block stores them — for both widths; int8 differs from 16-bit by the rounding only."""
    model, sites, factors, inputs, _ = _fitted()
    s = sites[1]  # KVLowRankConfig: the cache holds the latent exactly
    orig = dict(model.named_modules())[s.fqn]
    outs = {}
    for forms in (F8, F16):
        new = _rewritten(model, sites, factors, forms).model.layers[1].self_attn
        h, cos, sin = inputs[s.fqn][0]
        with torch.no_grad():
            got = new(h, (cos, sin), attention_mask=None)[0]
            want = block_forward(orig, h, cos, sin, forms[1], factors[s.fqn])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        outs[forms[1].factor_bits] = got
    rel = float((outs[8] - outs[16]).norm() / outs[16].norm())
    assert 1e-5 < rel < 2e-2


def test_decode_dynamic_static_absorbed_agree():
    model, sites, factors, _, _ = _fitted()
    m8 = _rewritten(model, sites, factors, F8)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row left-padded by 3
    want = lowrank_decode(m8, ids, mask, F8, absorb=False, steps=8)
    for static, absorb in ((False, True), (True, True), (True, False)):
        got = lowrank_decode(m8, ids, mask, F8, absorb=absorb, steps=8, static=static)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_config_validation_json_and_short_name():
    for f8, f16 in zip(F8, F16):
        assert decision_from_dict(f8.to_dict()) == f8
        old = {k: v for k, v in f16.to_dict().items() if k != "factor_bits"}
        assert decision_from_dict(old).factor_bits == 16  # plans written before the field
        assert " f8" in f8.short() and "f8" not in f16.short()
    with pytest.raises(ValueError, match="factor_bits must be one of"):
        KVLowRankConfig(16, 16, factor_bits=4)
    with pytest.raises(ValueError, match="factor_bits must be one of"):
        KVLatentQuantConfig(16, 16, factor_bits=32)


def test_step_work_reads_codes_and_makes_them_float():
    model, sites, _, _, _ = _fitted()
    shape = sites[0].site_shape
    for f8, f16 in zip(F8, F16):
        w8, w16 = f8.step_work(shape, 512), f16.step_work(shape, 512)
        assert w16.weight_ints == 0 and w8.weight_floats == 2 * w16.weight_floats
        w = getattr(f8, "lowrank", f8).latent_width
        entries = w * (shape.hidden_size + shape.kv_dim // 2)
        assert w8.weight_ints == entries + 2 * (w + 2 * shape.kv_dim)
        assert w8.cache_ints == w16.cache_ints and w8.cache_floats == w16.cache_floats


def test_candidates_offer_int8_factors_from_the_same_fit(monkeypatch):
    model, sites, _, inputs, grams = _fitted()
    s = sites[1]
    fits = []
    orig = calibrate.fit_site  # kv_site_options imports it when called
    monkeypatch.setattr(calibrate, "fit_site", lambda *a: fits.append(a[3]) or orig(*a))
    forms = [KVDenseConfig(), *F16]
    so, _ = kv_site_options(model, s, inputs[s.fqn], grams[s.fqn], forms=forms,
                            int8_factors=True)  # fmt: skip
    by = {o.decision: o for o in so.options}
    assert set(by) == {KVDenseConfig(), *F16, *F8} and len(fits) == 2  # one fit per 16-bit form
    for f8, f16 in zip(F8, F16):
        assert by[f8].bytes < 0.6 * by[f16].bytes
        assert by[f8].costs["kv_bytes_per_token"] == by[f16].costs["kv_bytes_per_token"]
        assert by[f16].error < by[f8].error < 1.2 * by[f16].error + 1e-6
    so, _ = kv_site_options(model, s, inputs[s.fqn], grams[s.fqn], forms=forms)
    assert {o.decision for o in so.options} == {KVDenseConfig(), *F16}


def test_optimize_picks_them_under_a_weights_budget_and_saves(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, 256, (1, 48), generator=g) for _ in range(5)]
    forms = [KVDenseConfig(), KVLowRankConfig(8, 16, 1, "whitened", 2)]
    kw = dict(calibration=calib, kv_forms=forms, progress=False)
    out = slimfx.optimize(tiny_llama, Budget(memory=0.35, kv=0.6), **kw)
    rep = slimfx.report_of(out)
    bits = {k.decision.get("factor_bits") for k in rep.kv_sites if k.decision["kind"] != "kv_dense"}
    assert bits == {8}  # at 0.35 of the weights the int8 factors win
    attn = out.model.layers[0].self_attn
    assert isinstance(attn, LowRankKVAttention) and attn.k_up_rows.codes.dtype == torch.int8
    ids = calib[0][:, :9]
    slimfx.save(out, tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out(ids).logits, rtol=0, atol=0)
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(back.generate(ids, **gen), out.generate(ids, **gen))
    only_kv = slimfx.report_of(slimfx.optimize(tiny_llama, Budget(kv=0.6), **kw))
    assert {k.decision.get("factor_bits") for k in only_kv.kv_sites} <= {16, None}
    why = "low-rank caches with int8 factors not offered: this budget does not count weight"
    assert any(why in n for n in only_kv.notes) and not any(why in n for n in rep.notes)
