"""The compressed cache in HF forward/generate: token-by-token decoding equals the one-pass
simulation, a 16-bit cache equals dense, greedy int8 tokens equal dense."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.cache_utils import DynamicCache

from slimfx.forms.kv.cache import KVCache, QuantizedKVLayer
from slimfx.forms.kv.config import KVDenseConfig, KVQuantConfig
from slimfx.forms.kv.simulate import SimulatedKVAttention
from slimfx.ir.find import inspect_attention_sites

pytestmark = pytest.mark.usefixtures("one_thread")


def _decode_logits(model, ids, cache):
    out = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            pos = torch.tensor([[t]])
            r = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, position_ids=pos)
            out.append(r.logits)
    return torch.cat(out, dim=1)


def _simulated_logits(model, ids, form):
    sites, _ = inspect_attention_sites(model)
    mods = dict(model.named_modules())
    for s in sites:
        parent, _, child = s.fqn.rpartition(".")
        setattr(mods[parent], child, SimulatedKVAttention(mods[s.fqn], form))
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize(
    "form",
    [
        KVQuantConfig(4, 4, 4, 8, 0),
        KVQuantConfig(2, 4, 4, 16, 3),
        KVQuantConfig(8, 2, 8, 4, 5),
        KVQuantConfig(2, 2, 4, 8, 2, sink=3),
    ],
)
def test_token_by_token_cache_equals_one_pass_simulation(tiny_llama, form):
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(3))
    got = _decode_logits(tiny_llama, ids, KVCache.for_model(tiny_llama, form))
    dense = _decode_logits(tiny_llama, ids, DynamicCache())
    want = _simulated_logits(tiny_llama, ids, form)  # rewires tiny_llama: last
    # same arithmetic in a different order (fp32): agreement to rounding
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - dense).abs().max() > 1e-4  # the cache really was compressed


def test_16bit_cache_equals_dense_and_bytes_are_counted(tiny_llama, tiny_ids):
    model = tiny_llama.half()
    ids = tiny_ids[:1]
    gen_kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    dense = model.generate(ids, past_key_values=DynamicCache(), **gen_kw)
    cache = KVCache.for_model(model, KVDenseConfig())
    same = model.generate(ids, past_key_values=cache, **gen_kw)
    assert torch.equal(dense, same)
    form = KVQuantConfig(8, 8, 4, 16, 2)
    cache = KVCache.for_model(model, form)
    model.generate(ids, past_key_values=cache, **gen_kw)
    (site, *_), _ = inspect_attention_sites(model)
    n = cache.get_seq_length()  # the last generated token is never fed back
    assert n == ids.shape[1] + 5
    for layer in cache.layers:
        layer.flush()
    assert cache.nbytes() == 2 * form.cache_bytes(site.site_shape, n)
    assert all(isinstance(layer, QuantizedKVLayer) for layer in cache.layers)


def test_generate_int8_greedy_equals_dense_and_low_bits_run(tiny_llama, tiny_ids):
    gen_kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    ids = tiny_ids
    dense = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), **gen_kw)
    int8 = KVCache.for_model(tiny_llama, KVQuantConfig(8, 8, 4, 16, 0))
    got = tiny_llama.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=int8, **gen_kw
    )
    assert torch.equal(got, dense)
    for form in (KVQuantConfig(4, 4, 4, 8, 4), KVQuantConfig(2, 2, 4, 8, 0)):
        cache = KVCache.for_model(tiny_llama, form)
        out = tiny_llama.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **gen_kw
        )
        assert out.shape == dense.shape and torch.equal(out[:, :16], ids)
        # the last decode call added one token to the window
        assert cache.layers[0].n_stored == form.quantized_tokens(cache.get_seq_length() - 1)


def test_cache_refuses_sliding_window_layers():
    from slimfx.models import tiny_llama

    model = tiny_llama(layer_types=["full_attention", "sliding_attention"], sliding_window=8)
    with pytest.raises(ValueError, match="layer 1 is 'sliding_attention'"):
        KVCache.for_model(model, KVQuantConfig(value_group=16))
    mixed = KVCache.for_model(model, {0: KVQuantConfig(value_group=16)})
    assert isinstance(mixed.layers[0], QuantizedKVLayer)


def test_crop_reaches_into_the_store(tiny_llama):
    """A crop past the 16-bit window (refused before) gives the stored block back to it
    (tests/kv/test_cache_crop.py checks the reads)."""
    layer = QuantizedKVLayer(KVQuantConfig(4, 4, 4, 8, 2))
    layer.update(torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16))
    layer.flush()
    assert layer.n_stored == 4 and layer.get_seq_length() == 9
    layer.crop(-3)
    assert layer.get_seq_length() == 6 and layer.n_stored == 4
    layer.crop(-3)
    assert layer.get_seq_length() == 3 and layer.n_stored == 0 and layer.store is None


def test_perplexity_decoded_through_the_models_own_cache(tiny_llama):
    """``perplexity(decode=True)`` scores the logits generate() computes: equal to the one-pass
    perplexity for a 16-bit cache, and it sees a quantized cache, which a cache-less forward
    never exercises (that one gives the dense perplexity)."""
    import slimfx
    from slimfx.eval import perplexity
    from slimfx.planning.problem import Budget

    g = torch.Generator().manual_seed(4)
    w = torch.randint(0, 256, (3, 30), generator=g)
    dense = perplexity(tiny_llama, w, progress=False)
    assert perplexity(tiny_llama, w, progress=False, decode=True) == pytest.approx(dense, rel=1e-5)
    calib = [torch.randint(0, 256, (1, 40), generator=g) for _ in range(3)]
    out = slimfx.optimize(tiny_llama, Budget(kv=0.4, context=256), calibration=calib,
                          kv_forms=[KVQuantConfig(2, 2, 8, 8)], progress=False)  # fmt: skip
    assert perplexity(out, w, progress=False) == pytest.approx(dense, rel=1e-6)
    decoded = perplexity(out, w, progress=False, decode=True)
    assert abs(decoded / dense - 1) > 1e-3
    # the same number from the logits of the model's decode steps, by hand
    nll = 0.0
    with torch.no_grad():
        for row in w:
            cache = DynamicCache()
            for t in range(w.shape[1] - 1):
                logits = out(row[None, t : t + 1], past_key_values=cache, use_cache=True).logits
                nll -= torch.log_softmax(logits[0, -1].float(), -1)[row[t + 1]].item()
        assert type(cache.layers[0]).__name__ == "QuantizedKVLayer"
    assert decoded == pytest.approx(math.exp(nll / (w.numel() - w.shape[0])), rel=1e-5)
