"""MLA with int8 factors (``MLAConfig(factor_bits=8)``): the converted block's own projections
stored as int8 rows compute what a 16-bit block of the dequantized weights computes, cost what
they store, save, load, and are offered to the solver when the budget counts weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import slimfx
from forms.mla._tiny import calib_batches, eval_ids, tiny_gqa_llama
from slimfx.cost.target import estimate_attention_latency
from slimfx.forms.kv.calibrate import attention_grams, capture_attention_inputs
from slimfx.forms.kv.config import KVDenseConfig
from slimfx.forms.mla.candidates import MLAContext, mla_candidates
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model
from slimfx.forms.mla.module import MLAAttention
from slimfx.forms.mla.save import load_converted, save_converted
from slimfx.ir.find import describe_attention
from slimfx.ir.int8_rows import Int8Factor, Int8Rows, quantize_rows
from slimfx.planning.configs import decision_from_dict
from slimfx.planning.problem import Budget
from slimfx.planning.shapes import AttentionShape

pytestmark = pytest.mark.usefixtures("one_thread")

SMOL = AttentionShape(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, rope_dim=64)
CFG = MLAConfig(rank=12, rope_pairs=2)
F8 = dataclasses.replace(CFG, factor_bits=8)
_FACTORS = ("k_rope_proj", "kv_down", "k_up", "v_up")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_quantize_rows_codes_scales_and_rounding():
    w = torch.tensor([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0], [2.54, 1.0, -0.01]])
    codes, scale = quantize_rows(w, torch.float32)
    torch.testing.assert_close(scale[:, 0], torch.tensor([0.01, 0.0, 0.02]).clamp_min(
        torch.finfo(torch.float32).tiny), rtol=1e-6, atol=0)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[50, -127, 0], [0, 0, 0], [127, 50, -0]]  # -0.5 rounds to even 0
    # any tensor: the rows are its last dim; the error is at most half a step of the row
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    rows = Int8Rows(x, torch.bfloat16)
    assert rows.codes.shape == (15, 7) and rows.scale.shape == (15,)
    assert rows.scale.dtype == torch.bfloat16 and rows.weight.dtype == torch.bfloat16
    assert rows.weight.shape == x.shape
    # the codes are exact against the stored (bf16-rounded) scale
    step = rows.scale.float().view(3, 5, 1)
    exact = (rows.codes.float() * rows.scale.float()[:, None]).view(3, 5, 7)
    assert bool(((exact - x).abs() <= step / 2 + 1e-7).all())
    # the export path (slimfx::dequant_rows) computes the same tensor
    torch.testing.assert_close(torch.ops.slimfx.dequant_rows(rows.codes, rows.scale).view(3, 5, 7),
                               rows.weight, rtol=0, atol=0)


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_int8_block_equals_the_16_bit_block_of_its_dequantized_weights(kv_heads):
    """Reference: the 16-bit block whose factors and q_mix are replaced by the int8 block's
    dequantized ones — every path (no cache, absorbed decode over a cache) equal."""
    model = tiny_gqa_llama(kv_heads, attention_bias=True)
    ref = tiny_gqa_llama(kv_heads, attention_bias=True)
    convert_model(model, F8, calib_batches())
    convert_model(ref, CFG, calib_batches())
    ids = eval_ids()
    for blk, rblk in zip(model.model.layers, ref.model.layers):
        a, r = blk.self_attn, rblk.self_attn
        assert a.factor_bits == 8 and not hasattr(a, "q_mix") and a.q_mix_rows.shape[0] == kv_heads
        for name in _FACTORS:
            m = getattr(a, name)
            assert isinstance(m, Int8Factor) and m.codes.dtype == torch.int8
            # the fit is the 16-bit one: its rows within half a step of the 16-bit weights
            assert bool(((m.weight - getattr(r, name).weight).abs()
                         <= m.scale[:, None] / 2 + 1e-6).all())
        # the two differ (the test can fail) ...
        assert not torch.equal(a.kv_down.weight, r.kv_down.weight)
        with torch.no_grad():  # ... until the reference takes the dequantized tensors
            for name in _FACTORS:
                getattr(r, name).weight.copy_(getattr(a, name).weight)
            r.q_mix.copy_(a.stored_query_mix())
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=0)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got, want = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(got, want)
    # absorbed = unabsorbed for the int8 block too
    for blk in model.model.layers:
        blk.self_attn.absorb = "always"
    absorbed = _logits(model, ids)
    for blk in model.model.layers:
        blk.self_attn.absorb = "never"
    torch.testing.assert_close(absorbed, _logits(model, ids), atol=1e-5, rtol=0)


def test_priced_bytes_are_the_stored_bytes_and_about_half_of_16_bit():
    model = tiny_gqa_llama(2, attention_bias=True)
    convert_model(model, F8, calib_batches())
    attn = model.model.layers[0].self_attn
    stored = sum(
        t.numel() * (1 if t.dtype == torch.int8 else 2)  # codes 1 byte; floats priced 16-bit
        for n, t in [*attn.named_parameters(), *attn.named_buffers()]
        if not n.startswith(("q_proj.", "o_proj."))
    )
    assert F8.converted_weight_bytes(AttentionShape(96, 6, 2, 16, rope_dim=16), bias=True) == stored
    # SmolLM2's shape, rank 168, 2 pairs per kv head kept (12 RoPE rows): the matrices at 1 byte,
    # a 2-byte scale per row, the value bias and the 6 frequency indices at 2 bytes
    cfg16, cfg8 = (dataclasses.replace(c, rank=168) for c in (CFG, F8))
    matrices = 576 * 12 + 576 * 168 + 168 * 180 + 168 * 192 + 3 * 192 * 64  # q_mix per kv group
    rows = 12 + 168 + 180 + 192 + 3 * 192
    assert cfg8.converted_weight_bytes(SMOL) == matrices + 2 * rows + 2 * 192 + 2 * 6
    assert cfg16.converted_weight_bytes(SMOL) == 2 * matrices + 2 * 192 + 2 * 6
    assert 0.5 < cfg8.converted_weight_bytes(SMOL) / cfg16.converted_weight_bytes(SMOL) < 0.53
    assert cfg8.costs(SMOL)["weight_bytes"] == cfg8.converted_weight_bytes(SMOL)


def test_step_work_reads_codes_and_rebuilds_the_factors():
    w16, w8 = CFG.step_work(SMOL, 4096), F8.step_work(SMOL, 4096)
    assert w16.weight_ints == 0 and w8.weight_ints > 0
    assert w8.weight_floats == 2 * w16.weight_floats  # written and read back in float
    assert w8.cache_floats == w16.cache_floats and w8.cache_ints == w16.cache_ints
    # the roofline counts the codes: an int8-factor step is no faster in this runtime
    t16 = estimate_attention_latency(CFG, SMOL, "h100", "decode", 4096)
    t8 = estimate_attention_latency(F8, SMOL, "h100", "decode", 4096)
    assert t8 > t16


def test_config_validation_json_and_short_name():
    assert decision_from_dict(F8.to_dict()) == F8
    old = {k: v for k, v in CFG.to_dict().items() if k != "factor_bits"}
    assert decision_from_dict(old).factor_bits == 16  # plans written before the field
    with pytest.raises(ValueError, match="factor_bits"):
        MLAConfig(factor_bits=4)
    assert F8.short().endswith(" f8") and "f8" not in CFG.short()
    with pytest.raises(ValueError, match="factor_bits must be 16 or 8"):
        MLAAttention(tiny_gqa_llama(2).model.layers[0].self_attn, None, 6, 2, factor_bits=4)


def test_candidates_offer_int8_factors_from_the_same_fit():
    model = tiny_gqa_llama(2)
    site = describe_attention(model.model.layers[1].self_attn, "model.layers.1.self_attn",
                              model.config, 1)
    batches = calib_batches(n=4)
    inputs = capture_attention_inputs(model, [site], batches)[site.fqn]
    gram = attention_grams(model, [site], batches)[site.fqn]
    ctx = MLAContext(base=CFG, latent_bits=(16,), factor_bits=(16, 8))
    (c16, e16, k16), (c8, e8, k8) = mla_candidates(model, site, inputs, gram,
                                                   rank_fractions=(0.5,), context=ctx)
    assert (c16.factor_bits, c8.factor_bits) == (16, 8) and c16.rank == c8.rank
    assert k8["weight_bytes"] < 0.6 * k16["weight_bytes"]
    assert k8["kv_bytes_per_token"] == k16["kv_bytes_per_token"]
    assert e16 < e8 < e16 * 1.2  # the same fit, rounded: a small extra error


def test_save_and_load_converted_with_int8_factors(tmp_path):
    model = tiny_gqa_llama(2)
    convert_model(model, {0: F8, 1: CFG}, calib_batches())
    ids = eval_ids()
    save_converted(model, tmp_path / "m")
    back = load_converted(tmp_path / "m")
    assert back.model.layers[0].self_attn.factor_bits == 8
    assert back.model.layers[1].self_attn.factor_bits == 16
    assert back.model.layers[0].self_attn.kv_down.codes.dtype == torch.int8
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=0, rtol=0)


def test_optimize_offers_int8_factors_under_a_weights_budget(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, 256, (1, 48), generator=g) for _ in range(5)]
    kw = dict(calibration=calib, kv_forms=[KVDenseConfig(), "mla"], progress=False)
    out = slimfx.optimize(tiny_llama, Budget(memory=0.3, kv=0.6), **kw)
    rep = slimfx.report_of(out)
    bits = [k.decision.get("factor_bits") for k in rep.kv_sites if k.decision["kind"] == "mla"]
    assert bits and set(bits) == {8}  # at 0.3 of the weights the int8 factors win
    ids = calib[0][:, :9]
    slimfx.save(out, tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    assert back.model.layers[0].self_attn.kv_down.codes.dtype == torch.int8
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out(ids).logits, rtol=0, atol=0)
    # a KV-only budget does not count weights: int8 factors would only add error, not offered
    only_kv = slimfx.report_of(slimfx.optimize(tiny_llama, Budget(kv=0.6), **kw))
    assert {k.decision.get("factor_bits") for k in only_kv.kv_sites} <= {16, None}
    why = "MLA with int8 factors not offered: this budget does not count weight bytes"
    assert any(why in n for n in only_kv.notes) and not any(why in n for n in rep.notes)


def test_which_budgets_price_weight_bytes():
    assert Budget(memory=0.5).prices_weights and Budget(bits=4).prices_weights
    assert Budget(total_bytes=1e9, context=4096).prices_weights
    assert Budget(memory=0.5, kv=0.5).prices_weights
    assert Budget(max_error=0.1).prices_weights  # minimizes bytes
    assert not Budget(kv=0.5).prices_weights and not Budget(latency=0.5).prices_weights
