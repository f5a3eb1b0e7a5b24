"""Cropping compressed caches — what assisted generation and prompt lookup do after rejected
draft tokens: the quantized store gives back the blocks a shorter cache would not hold yet
(a draft decodes token by token, so its rejected tokens were stored), the latent layers drop
the cropped tokens' positions too (a quantized latent's next step failed on a shape mismatch)
and a 16-bit latent crops exactly (it refused any crop); static caches refuse up front."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import Cache

from slimfx.forms.kv.cache import LatentLayer, QuantizedKVLayer, QuantizedLatentLayer
from slimfx.forms.kv.config import KVLatentQuantConfig, KVLowRankConfig, KVQuantConfig
from slimfx.forms.kv.static_cache import StaticKVCache

pytestmark = pytest.mark.usefixtures("one_thread")

QUANT = KVQuantConfig(4, 4, key_group=4, value_group=8, residual=3, sink=2)
LATENT = KVLatentQuantConfig(8, 8, 1, "attention", 8, group=4, residual=2, sink=1, axis="channel")
BLOCK = 4  # tokens per stored block of both (QUANT's key_group, LATENT's group)


def _layer(form):
    return QuantizedKVLayer(form) if isinstance(form, KVQuantConfig) else QuantizedLatentLayer(form)


def _feed(layer, x, start=0):
    """Tokens of ``x`` (B, H, T, D) one call each (how a draft decodes); the last output."""
    out = None
    for t in range(x.shape[2]):
        kw = {} if isinstance(layer, QuantizedKVLayer) else {"positions": torch.tensor([[start + t]])}
        out = layer.update(x[:, :, t : t + 1], x[:, :, t : t + 1] * 0.5, **kw)
    return out


@pytest.mark.parametrize("form", [QUANT, LATENT], ids=["kv_quant", "kv_latent_quant"])
@pytest.mark.parametrize("n", [1, 3, 6, 11, 22])
def test_a_crop_into_the_store_keeps_what_the_kept_tokens_read(form, n):
    """22 tokens decoded one by one, the last ``n`` cropped (into the store from n=4 on): the
    store holds what the config prices for the shorter cache, the next call reads every kept
    token exactly as before the crop (blocks given back to the window dequantized, as they
    were read) and its own token exact; when those blocks leave the window again they are
    stored again, reading as before to the rounding of storing a dequantized block."""
    H, D = (2, 16) if isinstance(form, KVQuantConfig) else (1, 16)
    x = torch.randn(1, H, 30, D, generator=torch.Generator().manual_seed(n))
    layer, keep = _layer(form), 22 - n
    before = _feed(layer, x[:, :, :22])  # every token as the cache holds it
    stored = layer.n_stored
    assert stored > 0
    layer.crop(-n)
    assert layer.get_seq_length() == keep
    assert layer.n_stored == form.quantized_tokens(keep)
    if isinstance(layer, QuantizedLatentLayer):
        assert layer.positions.shape == (1, keep)
    got = _feed(layer, x[:, :, 22:23], keep)
    for g, b, scale in zip(got, before, (1.0, 0.5)):
        assert g.shape[2] == keep + 1
        assert torch.equal(g[:, :, :keep], b[:, :, :keep])
        assert torch.equal(g[:, :, keep], x[:, :, 22] * scale)
    later = _feed(layer, x[:, :, 23:], keep + 1)  # 7 more: the given-back blocks are stored
    assert layer.n_stored == form.quantized_tokens(keep + 7)  # flushed before the last call
    # the tokens stored before the crop (and the sinks) in blocks wholly kept: a block the
    # crop cut is stored again with new tokens, so with other scales
    old = min(keep, form.sink + min(stored, max(0, keep - form.sink) // BLOCK * BLOCK))
    for g, b in zip(later, before):
        torch.testing.assert_close(g[:, :, :old], b[:, :, :old], rtol=0,
                                   atol=1e-2 * b.abs().max().item())  # fmt: skip


def test_a_crop_past_the_held_tokens_and_a_positive_one_are_refused():
    layer = _layer(QUANT)
    _feed(layer, torch.randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match="cannot crop 10 tokens: the layer holds 9"):
        layer.crop(-10)
    with pytest.raises(ValueError, match="negative number of tokens"):
        layer.crop(3)
    assert layer.get_seq_length() == 9


def test_a_16bit_latent_crops_exactly_with_its_positions():
    form = KVLowRankConfig(8, 8, 1, "attention", sink=2)
    layer, ref = LatentLayer(form), LatentLayer(form)
    x = torch.randn(1, 1, 12, 8)
    layer.update(x, x, positions=torch.arange(12)[None])
    layer.crop(-4)
    ref.update(x[:, :, :8], x[:, :, :8], positions=torch.arange(8)[None])
    assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.positions, ref.positions)
    assert layer.get_seq_length() == 8 and not layer.sinks_full  # slots checked again


def test_static_caches_refuse_to_be_cropped_up_front():
    from slimfx.forms.mla.cache import MLAStaticLatentCache

    for cache in (StaticKVCache([QUANT], 32), MLAStaticLatentCache(1, 32)):
        cache.crop(0)  # nothing to remove: fine
        with pytest.raises(ValueError, match=r"is static and cannot be cropped: assisted "
                           r"generation and prompt lookup .* need the dynamic cache"):  # fmt: skip
            cache.crop(-2)


@pytest.mark.parametrize(
    "form", [KVLowRankConfig(16, 16), LATENT, QUANT], ids=["lowrank", "latent_int8", "int4"]
)
def test_prompt_lookup_decoding_runs_over_every_compressed_cache(form):
    """Prompt lookup drafts from the prompt and crops what the model rejects (a model with
    std-0.2 weights rejects most drafts). A 16-bit latent's lookup decoding is the model's own
    greedy decoding; quantized caches run (their verification call reads its own draft tokens
    exact, so the tokens may differ from the token-by-token decode — README)."""
    from slimfx.forms.kv.apply import apply_kv_plan
    from slimfx.forms.kv.calibrate import attention_grams
    from slimfx.ir.find import inspect_attention_sites
    from slimfx.models import tiny_llama

    model = tiny_llama(initializer_range=0.2)
    sites, _ = inspect_attention_sites(model)
    g = torch.Generator().manual_seed(1)
    grams = attention_grams(model, sites, [torch.randint(3, 256, (1, 48), generator=g)
                                           for _ in range(3)])  # fmt: skip
    apply_kv_plan(model, {s.fqn: form for s in sites}, sites, grams)
    p = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(7))
    prompt = torch.cat([p, p, p[:, :5]], 1)
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    crops = []
    real = Cache.crop
    Cache.crop = lambda self, n: crops.append(n) or real(self, n)
    try:
        looked = model.generate(prompt, prompt_lookup_num_tokens=3, **kw)
    finally:
        Cache.crop = real
    assert any(n < 0 for n in crops)  # drafts were rejected and cropped
    plain = model.generate(prompt, **kw)
    assert looked.shape == plain.shape
    if isinstance(form, KVLowRankConfig):
        assert torch.equal(looked, plain)
