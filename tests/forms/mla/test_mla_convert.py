"""GQA/MHA → MLA conversion on tiny random Llama models: exactness at full rank, absorbed vs
unabsorbed, partial RoPE, least-squares refinement, rejections, config bytes."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from forms.mla._tiny import calib_batches, eval_ids, qwen2_with_biases, tiny_gqa_llama
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import (
    attention_calib,
    capture_attention_inputs,
    convert_model,
    describe_block,
)
from slimfx.forms.mla.module import MLAAttention
from slimfx.forms.mla.numerics import fit_mla
from slimfx.planning.configs import decision_from_dict
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN, WEIGHT_BYTES, AttentionShape, LinearShape

# fp32 model, factors fitted in float64 and rounded to fp32: logits of the 2-layer model agree
# to ~1e-6 (measured ≤ 3e-7); 1e-5 leaves room for reassociation in other BLAS builds.
ATOL = 1e-5
D_HEAD = 16


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _set_absorb(model, mode: str) -> None:
    for blk in model.model.layers:
        blk.self_attn.absorb = mode


@pytest.mark.parametrize("kv_heads", [1, 2, 3])
@pytest.mark.parametrize("method", ["svd", "whitened", "pca"])
def test_full_rank_conversion_equals_original(kv_heads, method):
    model = tiny_gqa_llama(kv_heads)
    ids = eval_ids()
    ref = _logits(model, ids)
    # every RoPE pair kept, latent rank = K·d (the values' full width): nothing is dropped
    cfg = MLAConfig(rank=kv_heads * D_HEAD, rope_pairs=D_HEAD // 2, method=method,
                    rope_select="norm" if method != "svd" else "high_freq")
    res = convert_model(model, cfg, calib_batches())
    assert res.converted == [0, 1] and not res.rejected
    assert all(isinstance(b.self_attn, MLAAttention) for b in model.model.layers)
    torch.testing.assert_close(_logits(model, ids), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kv_heads", [1, 2, 3])
def test_absorbed_equals_unabsorbed_at_low_rank(kv_heads):
    model = tiny_gqa_llama(kv_heads)
    cfg = MLAConfig(rank=10, rope_pairs=2, method="pca", objective="attention")
    convert_model(model, cfg, calib_batches())
    ids = eval_ids()
    _set_absorb(model, "never")
    unabsorbed = _logits(model, ids)
    _set_absorb(model, "always")
    absorbed = _logits(model, ids)
    torch.testing.assert_close(absorbed, unabsorbed, atol=ATOL, rtol=0)
    # and the low-rank model really differs from the original (the test can fail)
    assert (unabsorbed - _logits(tiny_gqa_llama(kv_heads), ids)).abs().max() > 1e-3


def test_rope_dims_kept_exactly():
    """Full rank, p fastest pairs kept: the converted model equals the original model whose
    other pairs do not rotate (inv_freq zeroed there), and the RoPE key rows are k_proj's."""
    p = 3
    model = tiny_gqa_llama(2)
    ref_model = copy.deepcopy(model)
    orig_k = model.model.layers[0].self_attn.k_proj.weight.clone()
    cfg = MLAConfig(rank=MLAConfig(rope_pairs=p).full_rank(
        AttentionShape(96, 6, 2, D_HEAD, rope_dim=D_HEAD)), rope_pairs=p,
        rope_select="high_freq", rope_mix="none", method="pca")
    convert_model(model, cfg, calib_batches())
    attn = model.model.layers[0].self_attn
    assert attn.rope_freq.tolist() == [0, 0, 1, 1, 2, 2]  # both kv heads' 3 fastest pairs
    # the RoPE key rows are k_proj's rows of those pairs, copied exactly (first halves first)
    rows = [g * D_HEAD + i for i in range(p) for g in range(2)]
    rows += [r + D_HEAD // 2 for r in rows]
    assert torch.equal(attn.k_rope_proj.weight, orig_k[torch.tensor(rows)])
    ref_model.model.rotary_emb.inv_freq[p:] = 0.0  # cos = 1, sin = 0 on the dropped pairs
    ids = eval_ids()
    torch.testing.assert_close(_logits(model, ids), _logits(ref_model, ids), atol=ATOL, rtol=0)
    # keeping fewer pairs than that changes the model (the comparison above can fail)
    assert (_logits(model, ids) - _logits(tiny_gqa_llama(2), ids)).abs().max() > 1e-4


@pytest.mark.parametrize("kv_heads", [2, 3])
def test_rorope_mixing_is_exact_with_every_pair_kept(kv_heads):
    """Mixing the kv heads' pairs per frequency commutes with RoPE: nothing changes at full
    rank with every entry kept, and the RoPE key is one key shared by all query heads."""
    model = tiny_gqa_llama(kv_heads)
    ids = eval_ids()
    ref = _logits(model, ids)
    cfg = MLAConfig(rank=kv_heads * D_HEAD, rope_pairs=D_HEAD // 2, rope_mix="pca")
    convert_model(model, cfg, calib_batches())
    attn = model.model.layers[0].self_attn
    assert attn.k_rope_proj.out_features == kv_heads * D_HEAD
    mix = attn.query_mix().double()  # per head: T_g, its kv head's columns of the orthogonal map
    # stored once per kv group: the 6 heads read their group's map
    assert attn.q_mix.shape == (kv_heads, kv_heads * D_HEAD, D_HEAD)
    eye = torch.eye(D_HEAD, dtype=torch.float64).expand(6, -1, -1)
    torch.testing.assert_close(torch.einsum("ked,kef->kdf", mix, mix), eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, ids), ref, atol=ATOL, rtol=0)


def test_rorope_concentrates_key_energy_in_kept_entries():
    """With correlated kv heads (head 1 ≈ head 0), mixing puts a frequency's energy in one
    component: at p pairs per head the kept RoPE key holds more of the keys' energy."""
    model = tiny_gqa_llama(2)
    for blk in model.model.layers:
        with torch.no_grad():
            w = blk.self_attn.k_proj.weight
            w[D_HEAD:] = w[:D_HEAD] + 0.05 * w[D_HEAD:]
    x = capture_attention_inputs(model, calib_batches(), [0])[0]
    attn = model.model.layers[0].self_attn
    calib = attention_calib(attn, x, 6, 2, 32)
    energy = {}
    for mix in ("none", "pca"):
        cfg = MLAConfig(rank=8, rope_pairs=2, rope_mix=mix, rope_select="norm", method="svd")
        w = fit_mla(cfg, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                    attn.o_proj.weight, None, None, 6, 2, model.model.rotary_emb.inv_freq, calib)
        energy[mix] = float((x.double() @ w.w_krope.T).square().sum())
    # the first component of a frequency holds ~ both heads' energy: ~2× per kept entry
    assert energy["pca"] > 1.3 * energy["none"], energy


def test_norm_selection_follows_calibrated_pair_norms():
    model = tiny_gqa_llama(2)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # make pair 5 of kv head 1 dominate the keys
        attn.k_proj.weight[D_HEAD + 5] *= 50.0
        attn.k_proj.weight[D_HEAD + 5 + D_HEAD // 2] *= 50.0
    convert_model(model, {0: MLAConfig(rank=8, rope_pairs=1, rope_select="norm",
                                           rope_mix="none")},
                  calib_batches())
    attn = model.model.layers[0].self_attn
    # K·p = 2 entries: the dominant pair (5, kv head 1) is one of them, copied from k_proj
    assert 5 in attn.rope_freq.tolist()
    n = attn.rope_freq.tolist().index(5)
    scaled = tiny_gqa_llama(2).model.layers[0].self_attn.k_proj.weight[D_HEAD + 5] * 50.0
    torch.testing.assert_close(attn.k_rope_proj.weight[n], scaled)


def _kv_output_error(attn, w, x):
    """Relative error of the rebuilt [k_nope; v] outputs on inputs x (float64)."""
    n2 = w.w_krope.shape[0]
    G = w.q_mix.shape[0] // (w.w_uv.shape[0] // D_HEAD)
    T = torch.cat(list(w.q_mix[::G]), dim=1)  # (K·d, K·d): the key-space map
    wk = T @ attn.k_proj.weight.detach().double()
    target = torch.cat([x @ wk[n2:].T, x @ attn.v_proj.weight.detach().double().T], 1)
    c = x @ w.w_dkv.T
    rebuilt = torch.cat([c @ w.w_uk.T, c @ w.w_uv.T + w.b_uv], 1)
    # key offsets are softmax-invariant and dropped: compare keys up to their mean
    n_k = w.w_uk.shape[0]
    err = target - rebuilt
    err[:, :n_k] -= err[:, :n_k].mean(0)
    return float(err.square().sum() / target.square().sum())


def test_least_squares_refinement_lowers_the_calibration_error_of_svd():
    model = tiny_gqa_llama(3)
    batches = calib_batches()
    x = capture_attention_inputs(model, batches, [0])[0]
    attn = model.model.layers[0].self_attn
    calib = attention_calib(attn, x, 6, 3, 32)
    inv_freq = model.model.rotary_emb.inv_freq
    errs = {}
    for refine in (False, True):
        cfg = MLAConfig(rank=12, rope_pairs=2, method="svd", objective="kv", refine=refine)
        w = fit_mla(cfg, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                    attn.o_proj.weight, None, None, 6, 3, inv_freq, calib)
        errs[refine] = _kv_output_error(attn, w, x.double().detach())
    assert errs[True] < 0.9 * errs[False], errs


def test_data_aware_config_without_batches_is_rejected():
    model = tiny_gqa_llama(2)
    with pytest.raises(ValueError, match="calibration batches are needed"):
        convert_model(model, MLAConfig(rank=8, rope_pairs=2, method="pca"))


# -- rejections ---------------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(num_attention_heads=6, num_key_value_heads=2, head_dim=D_HEAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return SimpleNamespace(**base)


def test_rejects_no_rope():
    attn = tiny_gqa_llama(2).model.layers[0].self_attn
    assert describe_block(attn, _cfg(), 0).site_shape.rope_dim == D_HEAD
    info = describe_block(attn, _cfg(rope_parameters=None), 0)
    assert isinstance(info, str) and info.startswith("no RoPE found")
    info = describe_block(attn, _cfg(no_rope_layers=[0, 1]), 0)
    assert info.startswith("no RoPE found")


def test_rejects_partial_rotary_and_qk_norm():
    attn = tiny_gqa_llama(2).model.layers[0].self_attn
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    info = describe_block(attn, _cfg(rope_parameters=rope), 0)
    assert "partial rotary" in info and "8 of 16" in info
    attn.q_norm = torch.nn.Identity()
    info = describe_block(attn, _cfg(), 0)
    assert info.startswith("unsupported attention variant") and "q_norm" in info


def test_rejects_sliding_window_and_leaves_model_unchanged():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=128, num_hidden_layers=2, vocab_size=256,
                      use_sliding_window=True, sliding_window=8, max_window_layers=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sliding-window attention .* unsupported"):
        convert_model(model, MLAConfig(rank=8, rope_pairs=2), calib_batches())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(b.self_attn, MLAAttention) for b in model.model.layers)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_error_or_interrupt_mid_conversion_leaves_the_model_unchanged(monkeypatch, error):
    """Layer 1's fit fails (an interrupt, an out-of-memory): layer 0 had been swapped already
    and stayed so — the model was half converted. Every block is put back."""
    import slimfx.forms.mla.convert as conv

    model = tiny_gqa_llama(2)
    ids = eval_ids()
    ref, blocks = _logits(model, ids), [b.self_attn for b in model.model.layers]
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise error("stop")
        return fit_mla(*a, **k)

    monkeypatch.setattr(conv, "fit_mla", failing)
    with pytest.raises(error):
        convert_model(model, MLAConfig(rank=12, rope_pairs=4), calib_batches())
    assert len(calls) == 2
    assert [b.self_attn for b in model.model.layers] == blocks
    torch.testing.assert_close(_logits(model, ids), ref, atol=0, rtol=0)


def test_rejects_an_attention_unlike_the_llama_block_and_leaves_model_unchanged():
    """Cohere rotates interleaved RoPE pairs; MLA's fit assumes Llama's halves. The probe
    (simulation_mismatch on random ids) measures the difference and the conversion refuses."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        num_hidden_layers=2, vocab_size=256)).eval()  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 0: .*differs from the Llama-style attention"):
        convert_model(model, MLAConfig(rank=8, rope_pairs=2), calib_batches())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(b.self_attn, MLAAttention) for b in model.model.layers)
    gemma2 = Gemma2ForCausalLM(Gemma2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        num_hidden_layers=2, vocab_size=256, head_dim=16,
        layer_types=["full_attention"] * 2)).eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"soft-capped at 50"):
        convert_model(gemma2, MLAConfig(rank=8, rope_pairs=2), calib_batches())


def test_qwen2_with_biases_converts_exactly_at_full_rank():
    model = qwen2_with_biases()
    ids = eval_ids()
    ref = _logits(model, ids)
    convert_model(model, MLAConfig(rank=3 * D_HEAD, rope_pairs=D_HEAD // 2), calib_batches())
    torch.testing.assert_close(_logits(model, ids), ref, atol=ATOL, rtol=0)


def test_rejects_rank_above_full_rank_per_layer_without_strict():
    model = tiny_gqa_llama(1)
    res = convert_model(model, {1: MLAConfig(rank=64, rope_pairs=8, method="svd",
                                             rope_select="high_freq")}, strict=False)
    assert res.converted == [] and "exceeds the full latent rank 16" in res.rejected[1]


# -- config -------------------------------------------------------------------------------------
SMOL = AttentionShape(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, rope_dim=64)


def test_config_bytes_for_smollm2_shape():
    cfg = MLAConfig(rank=168, rope_pairs=4, rope_mix="none")
    assert cfg.kv_bytes_per_token(SMOL) == 2 * 168 + 2 * 3 * 8  # = 384 = half of 768
    assert SMOL.kv_bytes_per_token() == 768
    q = MLAConfig(rank=168, rope_pairs=4, latent_bits=8)
    assert q.kv_bytes_per_token(SMOL) == 168 + 2 + 48
    # k_rope rows 576·24, down 576·168, k_up 168·3·56, v_up 168·192, value bias 192, q_mix
    # 3·192·64 (one map per kv group), and the 12 kept frequencies' indices (2 bytes each)
    expect = 2 * (576 * 24 + 576 * 168 + 168 * 168 + 168 * 192 + 3 * 192 * 64) + 2 * 192 + 2 * 12
    assert cfg.converted_weight_bytes(SMOL) == expect
    assert cfg.weight_bytes_delta(SMOL) == expect - 2 * 2 * 576 * 192
    assert cfg.costs(SMOL) == {WEIGHT_BYTES: expect, KV_BYTES_PER_TOKEN: 384}
    assert cfg.weight_bytes(SMOL) == expect
    with pytest.raises(TypeError, match="'mla' prices attention sites .* linear shape"):
        cfg.weight_bytes(LinearShape(576, 192))
    # the RoRoPE-style mixing is folded into q_mix and the RoPE rows: no tensor of its own
    mixed = MLAConfig(rank=168, rope_pairs=4, rope_mix="pca")
    assert mixed.converted_weight_bytes(SMOL) == expect
    # rope_fold folds a rotation per query head into q_mix: 9 maps
    folded = MLAConfig(rank=168, rope_pairs=4, rope_fold=True)
    assert folded.converted_weight_bytes(SMOL) == expect + 2 * 6 * 192 * 64


def test_config_validation_and_json_round_trip():
    cfg = MLAConfig(rank=72, rope_pairs=2, method="whitened", objective="kv",
                    rope_select="norm_freq", refine=True, latent_bits=8)
    assert decision_from_dict(cfg.to_dict()) == cfg
    for bad, msg in [(dict(rank=0), "rank"), (dict(method="qr"), "method"),
                     (dict(latent_bits=4), "latent_bits"), (dict(rope_select="x"), "rope_sel")]:
        with pytest.raises(ValueError, match=msg):
            MLAConfig(**bad)
    assert "rope_pairs=40 exceeds" in MLAConfig(rope_pairs=40).reason_invalid(SMOL)
    nope = AttentionShape(576, 9, 3, 64, rope_dim=0)
    assert MLAConfig().reason_invalid(nope).startswith("no RoPE found")


def test_attention_distances_match_eager_attention_probabilities():
    """rot_mean = Σ_Δ w_h(Δ)·(cos θΔ, sin θΔ), w_h(Δ) = the head's attention mass at distance Δ
    read from transformers' own eager attention probabilities."""
    from slimfx.forms.mla.convert import attention_distances

    model = tiny_gqa_llama(3, num_hidden_layers=1, attn_implementation="eager")
    batches = calib_batches(n=3, length=20)
    x = capture_attention_inputs(model, batches, [0])[0]
    attn = model.model.layers[0].self_attn
    inv_freq = model.model.rotary_emb.inv_freq
    got = attention_distances(attn, x, 6, 3, 20, inv_freq)
    mass = torch.zeros(6, 20, dtype=torch.float64)
    for ids in batches:
        with torch.no_grad():
            probs = model(ids, output_attentions=True).attentions[0][0].double()  # (H, L, L)
        for s in range(20):
            for t in range(s + 1):
                mass[:, s - t] += probs[:, s, t]
    w = mass / mass.sum(1, keepdim=True)
    ang = torch.arange(20, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    want = torch.stack([w @ ang.cos(), w @ ang.sin()], -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # fp32 softmax vs HF's


def test_rope_fold_keeps_full_rank_exact_and_changes_dropped_pairs_only():
    model = tiny_gqa_llama(2)
    ids = eval_ids()
    ref = _logits(model, ids)
    full = MLAConfig(rank=2 * D_HEAD, rope_pairs=D_HEAD // 2, rope_fold=True,
                     rope_select="norm_attn")
    convert_model(model, full, calib_batches())
    torch.testing.assert_close(_logits(model, ids), ref, atol=ATOL, rtol=0)
    part = MLAConfig(rank=2 * (D_HEAD - 4) + 2 * D_HEAD, rope_pairs=2, rope_select="norm_attn")
    a, b = tiny_gqa_llama(2), tiny_gqa_llama(2)
    convert_model(a, part, calib_batches())
    convert_model(b, dataclasses.replace(part, rope_fold=True), calib_batches())
    qa, qb = a.model.layers[0].self_attn.query_mix(), b.model.layers[0].self_attn.q_mix
    assert qb.shape[0] == 6 and b.model.layers[0].self_attn.per_head_q_mix  # a map per head
    assert torch.equal(qa[:, :8], qb[:, :8])  # the 2·K·p kept RoPE rows are untouched
    assert not torch.allclose(qa[:, 8:], qb[:, 8:])


def test_absorbed_extra_bytes_match_the_absorbed_matrices():
    model = tiny_gqa_llama(3)
    cfg = MLAConfig(rank=10, rope_pairs=2)
    convert_model(model, cfg, calib_batches())
    attn = model.model.layers[0].self_attn
    w_o_lat, _ = attn.absorbed_weights()
    q_abs = torch.einsum("nr,hnd->hrd", attn.k_up.weight, attn.query_mix()[:, 12:])  # (H, r, d)
    shape = AttentionShape(96, 6, 3, D_HEAD, rope_dim=D_HEAD)
    assert cfg.absorbed_extra_bytes(shape) == 2 * (q_abs.numel() + w_o_lat.numel())


def test_value_upprojection_after_attention_equals_folding_it_into_o_proj():
    model = tiny_gqa_llama(3)
    convert_model(model, MLAConfig(rank=10, rope_pairs=2), calib_batches())
    attn = model.model.layers[0].self_attn
    ctx = torch.randn(2, 6, 3, 10)
    w_o_lat, bias = attn.absorbed_weights()
    with torch.no_grad():
        folded = torch.einsum("bhtr,hdr->btd", ctx, w_o_lat) + bias
        torch.testing.assert_close(attn._latent_to_output(ctx), folded, atol=1e-5, rtol=0)
