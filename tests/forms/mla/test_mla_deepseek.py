"""A converted model written as a DeepSeek-V3 checkpoint (``export_deepseek_v3``): transformers'
``DeepseekV3ForCausalLM`` computes the converted model's logits and greedy tokens; what does not
map is refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from forms.mla._tiny import calib_batches, eval_ids, qwen2_with_biases, tiny_gqa_llama
from slimfx.forms.mla import deepseek
from slimfx.forms.mla.cache import MLALatentCache
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model
from slimfx.forms.mla.deepseek import deepseek_v3_model, export_deepseek_v3

pytest.importorskip("transformers.models.deepseek_v3")


def _converted(model, cfg):
    convert_model(model, cfg, calib_batches())
    return model


def _logits(model, ids=None):
    with torch.no_grad():
        return model(eval_ids() if ids is None else ids, use_cache=False).logits.float()


def _close(a, b, rtol=2e-6):
    assert (a - b).abs().max() <= rtol * a.abs().max()


@pytest.mark.parametrize("kv_heads", [1, 2, 3])
def test_gqa_conversion_same_logits(kv_heads):
    model = _converted(tiny_gqa_llama(kv_heads), MLAConfig(rank=12, rope_pairs=2, method="pca"))
    ds, info = deepseek_v3_model(model)
    assert type(ds).__name__ == "DeepseekV3ForCausalLM"
    c = ds.config
    # keys and values rebuilt per query head; one latent and one RoPE key per token
    assert c.num_key_value_heads == c.num_attention_heads == 6
    assert (c.kv_lora_rank, c.v_head_dim, c.q_lora_rank) == (12, 16, None)
    assert c.qk_rope_head_dim == info.qk_rope_head_dim and c.qk_rope_head_dim >= 2 * 2 * kv_heads
    assert c.qk_nope_head_dim == kv_heads * 16 - 2 * 2 * kv_heads
    assert c.rope_interleave and c.first_k_dense_replace == c.num_hidden_layers
    assert c.num_nextn_predict_layers == 0  # no multi-token-prediction layer is written
    # the generation settings are copied, not shared with the source
    assert ds.generation_config is not model.generation_config
    assert ds.generation_config.to_dict() == model.generation_config.to_dict()
    _close(_logits(model), _logits(ds))


def test_layers_of_different_ranks_are_padded_and_kept_exact():
    cfgs = {0: MLAConfig(rank=10, rope_pairs=1, method="pca"),
            1: MLAConfig(rank=20, rope_pairs=3, method="pca")}
    model = _converted(tiny_gqa_llama(2), cfgs)
    ds, info = deepseek_v3_model(model)
    assert info.kv_lora_rank == 20 and info.converted_cache_values == [10 + 4, 20 + 12]
    # the RoPE key holds, per frequency, as many pairs as the layer keeping the most of it
    assert 12 <= info.qk_rope_head_dim <= 16 and info.cache_values == 20 + info.qk_rope_head_dim
    _close(_logits(model), _logits(ds))


def test_no_bias_fit_exports_without_attention_bias():
    # the uncentred (whitened) fit has no value bias: nothing for o_proj's bias to carry
    model = _converted(tiny_gqa_llama(3), MLAConfig(rank=20, rope_pairs=3, method="whitened"))
    ds, info = deepseek_v3_model(model)
    assert not info.attention_bias and ds.model.layers[0].self_attn.o_proj.bias is None
    assert not any("attention_bias" in n for n in info.engine_notes)
    _close(_logits(model), _logits(ds))


def test_centred_fit_folds_value_bias_into_o_proj():
    model = _converted(tiny_gqa_llama(2), MLAConfig(rank=12, rope_pairs=2, method="pca"))
    ds, info = deepseek_v3_model(model)
    assert info.attention_bias and float(ds.model.layers[0].self_attn.o_proj.bias.detach().abs().max()) > 0
    assert any("no projection biases" in n for n in info.engine_notes)


def test_query_bias_goes_through_q_a_proj():
    model = _converted(qwen2_with_biases(), MLAConfig(rank=12, rope_pairs=2, method="pca"))
    ds, info = deepseek_v3_model(model)
    attn = ds.model.layers[0].self_attn
    assert info.q_lora_rank == 96 and attn.q_proj is None and attn.q_a_proj.bias is not None
    _close(_logits(model), _logits(ds))


def test_every_pair_kept_in_order_is_plain_rope():
    model = _converted(tiny_gqa_llama(1), MLAConfig(rank=8, rope_pairs=8, rope_select="high_freq"))
    ds, info = deepseek_v3_model(model)
    assert info.rope_type == "default" and info.qk_nope_head_dim == 0
    assert ds.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert not any("longrope" in n for n in info.engine_notes)
    _close(_logits(model), _logits(ds))


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 32}


@pytest.mark.parametrize("rope", [LLAMA3, YARN], ids=["llama3", "yarn"])
def test_scaled_source_rope_is_reproduced(rope):
    # llama3 rescales the slow frequencies; yarn also scales cos/sin (attention_factor ≠ 1)
    model = _converted(tiny_gqa_llama(2, rope_parameters=dict(rope)),
                       MLAConfig(rank=12, rope_pairs=3, method="pca"))
    ds, info = deepseek_v3_model(model)
    att = model.model.rotary_emb.attention_scaling
    assert info.rope_type == "longrope"
    assert ds.config.rope_parameters["attention_factor"] == att and (att != 1.0) == (rope is YARN)
    ids = torch.randint(3, 256, (1, 100), generator=torch.Generator().manual_seed(2))
    _close(_logits(model, ids), _logits(ds, ids), rtol=1e-5)  # past the original length


def test_dynamic_source_rope_refused():
    model = _converted(tiny_gqa_llama(2), MLAConfig(rank=12, rope_pairs=2, method="pca"))
    model.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="'dynamic' changes its frequencies"):
        deepseek_v3_model(model)


def test_longrope_factors_give_the_frequencies():
    base, dim = 10000.0, 12
    target = 1.0 / base ** (torch.tensor([0, 0, 1, 3, 3, 7]).float() / 8)  # a 16-dim head's
    factors = torch.tensor(deepseek._longrope_factors(target, base, dim))
    got = 1.0 / (factors * base ** (torch.arange(0, dim, 2).float() / dim))
    # a product of two float32 cannot land on every float32: at most one ulp off
    assert float(((got - target) / target).abs().max()) <= 1.2e-7
    assert int((got == target).sum()) >= 4


def test_small_scale_bounds_the_latent_for_any_normalized_input():
    torch.manual_seed(0)
    w, b, hidden, width = torch.randn(20, 32) * 3, torch.randn(20), 32, 24
    gamma = 5.0
    a = deepseek._small_scale(w, b, gamma, hidden, width)
    # the worst input: the top right-singular vector at the largest norm the RMSNorm allows
    x = torch.linalg.svd(w.double())[2][0] * gamma * math.sqrt(hidden)
    worst = ((w.double() @ x).abs() + b.double().abs()).pow(2).sum() / width
    assert a * a * float(worst) <= 1.0001e-9 * deepseek.LATENT_NORM_EPS
    assert a * a * float(worst) >= 0.5e-9 * deepseek.LATENT_NORM_EPS  # not needlessly small


def test_int8_factors_and_rounded_latent(tmp_path):
    model = _converted(tiny_gqa_llama(2), MLAConfig(rank=12, rope_pairs=2, method="pca",
                                                    latent_bits=8, factor_bits=8))
    with pytest.raises(ValueError, match="round their latent to int8.*drop_latent_rounding"):
        export_deepseek_v3(model, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    info = export_deepseek_v3(model, tmp_path / "ds", drop_latent_rounding=True)
    assert all(b.self_attn.latent_bits == 8 for b in model.model.layers)  # put back
    from transformers import AutoModelForCausalLM

    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds")
    for b in model.model.layers:
        b.self_attn.latent_bits = 16
    _close(_logits(model), _logits(ds), rtol=1e-5)
    assert info.max_abs_logit_diff <= 1e-5 * info.logit_scale


def test_checkpoint_loads_with_from_pretrained_and_generates_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _converted(tiny_gqa_llama(2), MLAConfig(rank=12, rope_pairs=2, method="pca"))
    info = export_deepseek_v3(model, tmp_path / "ds")
    files = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors",
                     "slimfx_export.json"]
    manifest = json.loads((tmp_path / "ds" / "slimfx_export.json").read_text())
    assert manifest["format"] == "slimfx.deepseek_v3" and manifest["kv_lora_rank"] == 12
    assert info.max_abs_logit_diff <= 2e-6 * info.logit_scale
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds")
    assert json.loads((tmp_path / "ds" / "config.json").read_text())["model_type"] == "deepseek_v3"
    _close(_logits(model), _logits(ds))
    prompt = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0,
                             past_key_values=MLALatentCache(2))
        # transformers' DeepSeek cache holds the latent and the RoPE key, as slimfx's does
        got = ds.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)


def test_bfloat16_model_keeps_the_small_scale():
    model = _converted(tiny_gqa_llama(2), MLAConfig(rank=12, rope_pairs=2, method="pca"))
    model = model.to(torch.bfloat16)
    ds, _ = deepseek_v3_model(model)
    assert ds.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.dtype == torch.bfloat16
    _close(_logits(model), _logits(ds), rtol=2e-2)
    with pytest.raises(ValueError, match="float16 cannot hold"):
        deepseek_v3_model(model.to(torch.float16))


def test_refusals_write_nothing(tmp_path):
    model = _converted(tiny_gqa_llama(2), {1: MLAConfig(rank=12, rope_pairs=2)})
    with pytest.raises(ValueError, match=r"every layer must be converted.*layers \[0\]"):
        export_deepseek_v3(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    model = _converted(tiny_gqa_llama(2), MLAConfig(rank=12, rope_pairs=2, method="pca"))
    keep = tmp_path / "b"
    keep.mkdir()
    (keep / "mine.txt").write_text("user file")
    with pytest.raises(FileExistsError, match=r"non-empty directory \(mine\.txt\).*overwrite"):
        export_deepseek_v3(model, keep)
    assert [p.name for p in keep.iterdir()] == ["mine.txt"]


def test_a_decoder_that_is_not_llama_style_is_caught():
    from transformers import GemmaConfig, GemmaForCausalLM

    # Gemma scales its embedding and normalizes with 1 + w: no DeepSeek-V3 equivalent
    cfg = GemmaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                      intermediate_size=128, num_hidden_layers=2, vocab_size=256)
    torch.manual_seed(0)
    model = _converted(GemmaForCausalLM(cfg).eval(), MLAConfig(rank=12, rope_pairs=2))
    with pytest.raises(deepseek.DeepSeekMismatch, match="model_type 'gemma'.*not Llama-style"):
        deepseek_v3_model(model)


def test_a_mismatch_is_caught_before_writing(tmp_path, monkeypatch):
    # an engine's latent norm eps (1e-5 instead of transformers' 1e-6) scales the latent
    model = _converted(tiny_gqa_llama(2), MLAConfig(rank=12, rope_pairs=2, method="pca"))
    monkeypatch.setattr(deepseek, "LATENT_NORM_EPS", 1e-5)
    with pytest.raises(deepseek.DeepSeekMismatch, match="logits differ"):
        export_deepseek_v3(model, tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not list(tmp_path.iterdir())


def test_per_frequency_whitened_conversion_is_engine_ready():
    # one entry per frequency (the default RoPE schedule, the same in every layer: no padding),
    # an uncentred fit (no bias), the latent norm's eps in the config, the tied head written
    # apart: nothing left to note
    cfg = MLAConfig(rank=20, rope_select="per_frequency", method="whitened")
    model = _converted(tiny_gqa_llama(3, rms_norm_eps=1e-6), cfg)
    assert all(b.self_attn.rope_entries == 8 for b in model.model.layers)
    ds, info = deepseek_v3_model(model, untie_head=True)
    assert info.rope_type == "default" and not info.attention_bias
    assert info.qk_rope_head_dim == 16 and info.converted_cache_values == [36, 36]
    assert info.cache_values == 36 and info.engine_notes == []
    _close(_logits(model), _logits(ds))


def test_fastest_frequencies_are_plain_rope_with_another_base():
    # the first component of the 3 fastest of 8 frequencies: 1, q, q² with q = θ^(-1/8), which
    # DeepSeek's plain RoPE over 3 pairs computes with base θ^(3/8)
    cfg = MLAConfig(rank=20, rope_pairs=1, rope_select="per_frequency", method="whitened")
    model = _converted(tiny_gqa_llama(3, rms_norm_eps=1e-6), cfg)
    ds, info = deepseek_v3_model(model, untie_head=True)
    assert info.rope_type == "default" and info.qk_rope_head_dim == 6
    theta = model.config.rope_parameters["rope_theta"]
    assert ds.config.rope_parameters["rope_theta"] == pytest.approx(theta ** (3 / 8), rel=1e-6)
    assert info.engine_notes == []
    ids = torch.randint(3, 256, (1, 120), generator=torch.Generator().manual_seed(4))
    _close(_logits(model, ids), _logits(ds, ids), rtol=1e-5)


def test_rms_norm_eps_for_engines_is_checked(tmp_path):
    cfg = MLAConfig(rank=20, rope_select="per_frequency", method="whitened")
    model = _converted(tiny_gqa_llama(3, rms_norm_eps=1e-5), cfg)
    _, kept = deepseek_v3_model(model)
    # an engine taking eps 1e-5 for the latent norm divides by √1e-5 where transformers takes √1e-6
    assert any("rms_norm_eps is 1e-05" in n and "by 0.316" in n for n in kept.engine_notes)
    # the decoder norms' eps changed: a tiny random model's small hidden states feel it, and
    # the check says so, naming the change asked for (the export writes nothing)
    with pytest.raises(deepseek.DeepSeekMismatch,
                       match=r"logits differ.*rms_norm_eps=1e-06 replaces the source's 1e-05.*rtol="):
        export_deepseek_v3(model, tmp_path / "ds", rms_norm_eps=1e-6)
    assert not (tmp_path / "ds").exists()
    with pytest.raises(deepseek.DeepSeekMismatch, match="a larger rtol="):
        deepseek_v3_model(model, rms_norm_eps=1e-6, rtol=1e-5)
    for bad in ({"rtol": 0.0}, {"rtol": float("nan")}, {"rms_norm_eps": 0}, {"rms_norm_eps": -1e-6}):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            deepseek_v3_model(model, **bad)
    ds, info = deepseek_v3_model(model, rms_norm_eps=1e-6, rtol=0.05, untie_head=True)
    assert ds.config.rms_norm_eps == 1e-6 and info.engine_notes == []
    info = export_deepseek_v3(model, tmp_path / "ds", rms_norm_eps=1e-6, rtol=0.05)
    assert 1e-4 < info.max_abs_logit_diff / info.logit_scale < 0.05


def test_per_frequency_needs_pca_mixing():
    from slimfx.planning.shapes import AttentionShape

    shape = AttentionShape(hidden_size=96, num_heads=6, num_kv_heads=3, head_dim=16, rope_dim=16)
    bad = MLAConfig(rank=20, rope_select="per_frequency", rope_mix="none")
    assert "needs rope_mix='pca'" in bad.reason_invalid(shape)
    # the first component of the K·p fastest frequencies, at most every one of them
    assert MLAConfig(rank=20, rope_select="per_frequency", rope_pairs=1).rope_entries(3, 16) == 3
    good = MLAConfig(rank=20, rope_select="per_frequency")  # 8 pairs: 24 > 8 frequencies
    assert good.rope_entries(3, 16) == 8 and good.reason_invalid(shape) is None
    assert good.kv_bytes_per_token(shape) == 2 * 20 + 2 * 16
    assert good.full_rank(shape) == 2 * 3 * 16 - 16


def test_tied_head_rewritten_apart_from_the_embedding_gets_its_own():
    model = _converted(tiny_gqa_llama(2, tie_word_embeddings=True),
                       MLAConfig(rank=12, rope_pairs=2, method="pca"))
    ds, info = deepseek_v3_model(model)
    assert ds.config.tie_word_embeddings and ds.lm_head.weight is ds.model.embed_tokens.weight
    assert any(n.startswith("tie_word_embeddings=True") for n in info.engine_notes)
    # untie_head: the same matrix, stored apart (engines without a tied DeepSeek head)
    ds, info = deepseek_v3_model(model, untie_head=True)
    assert not ds.config.tie_word_embeddings
    assert ds.lm_head.weight is not ds.model.embed_tokens.weight
    assert torch.equal(ds.lm_head.weight, ds.model.embed_tokens.weight)
    assert not any("tie_word_embeddings" in n for n in info.engine_notes)
    _close(_logits(model), _logits(ds))
    # a weights budget's form on a tied lm_head computes another matrix than the embedding
    head = torch.nn.Linear(96, 256, bias=False)
    model.lm_head = head
    ds, _ = deepseek_v3_model(model)
    assert not ds.config.tie_word_embeddings and torch.equal(ds.lm_head.weight, head.weight)
    _close(_logits(model), _logits(ds))
