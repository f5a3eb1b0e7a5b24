"""The latent caches in Hugging Face ``generate()`` over a converted tiny Llama."""

from __future__ import annotations

import pytest
import torch
from _helpers import needs_triton_kernels

from forms.mla._tiny import calib_batches, tiny_gqa_llama
from slimfx.forms.mla.cache import (
    MLALatentCache,
    MLALatentLayer,
    MLAStaticLatentCache,
    quantize_latent,
)
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN, AttentionShape

NEW = 10


def _converted(kv_heads=3, **kw):
    model = tiny_gqa_llama(kv_heads)
    cfg = MLAConfig(**{**dict(rank=20, rope_pairs=2, method="pca"), **kw})
    convert_model(model, cfg, calib_batches())
    return model, cfg


def _prompt():
    return torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(5))


def _generate(model, **kw):
    with torch.no_grad():
        return model.generate(_prompt(), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, **kw)


def test_generate_with_latent_cache_equals_generate_without_cache():
    model, _ = _converted()
    no_cache = _generate(model, use_cache=False)
    cache = MLALatentCache(model.config.num_hidden_layers)
    with_cache = _generate(model, past_key_values=cache)
    assert torch.equal(with_cache, no_cache)
    assert cache.get_seq_length() == 7 + NEW - 1  # the last token is never fed back
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 1, 7 + NEW - 1, 20)  # the latent, one row per token
    assert layer.values.shape == (2, 1, 7 + NEW - 1, 3 * 2 * 2)  # RoPE keys of 3 kv heads


def test_plain_dynamic_cache_also_holds_the_latent():
    model, _ = _converted(kv_heads=2)
    assert torch.equal(_generate(model), _generate(model, use_cache=False))


def test_static_latent_cache_generates_the_same_tokens():
    model, _ = _converted(kv_heads=1)
    cache = MLAStaticLatentCache(model.config.num_hidden_layers, max_cache_len=32)
    assert torch.equal(_generate(model, past_key_values=cache), _generate(model, use_cache=False))
    assert cache.layers[0].keys.shape == (2, 1, 32, 20)


@pytest.mark.parametrize("latent_bits", [16, 8])
def test_a_static_cache_without_a_mask_attends_to_the_written_slots_only(latent_bits):
    """transformers passes no attention mask to the layers when none is given: the block's own
    causal mask puts the queries at the slots written so far — not at the end of the static
    cache's preallocated slots (it did: the prompt attended to empty slots, wrong tokens)."""
    from transformers import StaticCache

    model, _ = _converted(kv_heads=3, latent_bits=latent_bits)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for cache in (MLAStaticLatentCache(2, 32), StaticCache(model.config, max_cache_len=32)):
            got = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits]
            got += [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
                    for t in range(8, 12)]  # fmt: skip
            torch.testing.assert_close(torch.cat(got, 1), full, atol=2e-5, rtol=1e-5)
        want = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        got = model.generate(ids, max_new_tokens=NEW, do_sample=False,
                             cache_implementation="static")  # fmt: skip
    assert torch.equal(got, want)


def test_int8_latent_cache_bytes_and_tokens():
    """The cache holds MLAConfig.kv_bytes_per_token per token and layer at 16-bit storage (fp32
    model here: the stored RoPE keys and scales take 4 bytes, so count them at their size)."""
    model, cfg = _converted(latent_bits=8)
    cache = MLALatentCache(model.config.num_hidden_layers, latent_bits=8)
    out = _generate(model, past_key_values=cache)
    tokens = cache.get_seq_length()
    shape = AttentionShape(96, 6, 3, 16, rope_dim=16)
    per_token = cfg.costs(shape)[KV_BYTES_PER_TOKEN]  # r + 2 + 2·(K·2p), 16-bit scale and keys
    assert per_token == cfg.kv_bytes_per_token(shape)
    fp32_extra = 2 + 2 * (3 * 2 * 2)  # the fp32 model stores scale and RoPE key at 4 bytes
    assert cache.nbytes() == 2 * model.config.num_hidden_layers * tokens * (per_token + fp32_extra)
    assert cache.layers[0].latent_codes.dtype == torch.int8
    # the block rounds its latent to int8 itself, so caching the codes changes nothing:
    # generate() with the int8 cache = generate() without a cache
    assert torch.equal(out, _generate(model, use_cache=False))


def test_the_default_cache_of_an_int8_latent_model_holds_the_codes():
    """generate()'s own DynamicCache gets int8 latent layers (as the block is priced), not the
    dequantized latent in the model's dtype; a 16-bit latent model keeps its plain layers."""
    from transformers.cache_utils import DynamicLayer

    model, _ = _converted(latent_bits=8)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(_prompt(), **kw)
    explicit = MLALatentCache(model.config.num_hidden_layers, latent_bits=8)
    assert torch.equal(out.sequences, _generate(model, past_key_values=explicit))
    layers = out.past_key_values.layers
    assert all(type(ly) is MLALatentLayer and ly.latent_bits == 8 for ly in layers)
    assert sum(ly.nbytes() for ly in layers) == explicit.nbytes()
    model16, _ = _converted()
    with torch.no_grad():
        out16 = model16.generate(_prompt(), **kw)
    assert all(type(ly) is DynamicLayer for ly in out16.past_key_values.layers)


def test_int8_latent_block_rounds_its_latent():
    model, _ = _converted(latent_bits=8)
    ids = _prompt()
    with torch.no_grad():
        q8 = model(ids, use_cache=False).logits
        for blk in model.model.layers:
            blk.self_attn.latent_bits = 16
        full = model(ids, use_cache=False).logits
    err = (q8 - full).abs().max()
    assert 0 < err < 0.05 * full.abs().max(), err  # int8 rounding: small, but not nothing


def test_quantize_latent_round_trip_error_is_half_a_step():
    x = torch.randn(2, 1, 9, 13)
    codes, scales = quantize_latent(x)
    err = (codes.float() * scales - x).abs()
    assert codes.dtype == torch.int8 and scales.shape == (2, 1, 9, 1)
    assert torch.all(err <= scales * 0.5 + 1e-7)


def test_bad_latent_bits():
    with pytest.raises(ValueError, match="latent_bits"):
        MLALatentCache(2, latent_bits=4)


def test_generate_through_the_triton_decode_kernel():
    """Absorbed one-token steps run slimfx_kernels::mla_decode_triton (interpreted on CPU):
    the same greedy tokens as the torch path."""
    from slimfx.kernels import interpret_mode

    if not torch.cuda.is_available() and not interpret_mode():
        pytest.skip("no CUDA and TRITON_INTERPRET unset: the kernel cannot run here")
    needs_triton_kernels()
    model, _ = _converted(kv_heads=3)
    ref = _generate(model, past_key_values=MLALatentCache(model.config.num_hidden_layers))
    for blk in model.model.layers:
        blk.self_attn.decode_kernel = True
    out = _generate(model, past_key_values=MLALatentCache(model.config.num_hidden_layers))
    assert model.model.layers[0].self_attn.last_decode_path == "triton"
    assert torch.equal(out, ref)
