"""A sliding window that reaches ``max_position_embeddings`` never drops a token (Phi-3-128k:
262144 over 131072 positions): its layers are full-attention sites. They are priced at the
context and take compressed caches, and the compressed layer replaces the sliding cache layer
transformers builds from the raw config (dynamic and static), for KV forms and MLA's int8
latent alike. Before, such layers counted as sliding: no compressed cache was offered."""

from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.forms.kv.apply import plain_layer_kind
from slimfx.forms.kv.cache import KVCache, LatentLayer, QuantizedKVLayer
from slimfx.forms.kv.config import KVLowRankConfig
from slimfx.ir.find import inspect_attention_sites, unbound_window
from slimfx.planning.problem import Budget

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=128, vocab_size=256, pad_token_id=0, eos_token_id=1,
          bos_token_id=2)  # fmt: skip


def _mistral(window: int, positions: int = 256):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(**KW, sliding_window=window, max_position_embeddings=positions)
    return MistralForCausalLM(cfg).eval()


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(**KW, sliding_window=262144, max_position_embeddings=131072)
    return Phi3ForCausalLM(cfg).eval()


def _calib():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (2, 48), generator=gen) for _ in range(3)]


def _prompt():
    return torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(5))


def _generate(model, **kw):
    with torch.no_grad():
        return model.generate(_prompt(), max_new_tokens=8, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, **kw)  # fmt: skip


def test_a_window_past_the_positions_is_full_attention():
    assert unbound_window(_phi3().config) == 262144
    assert [s.sliding_window for s in inspect_attention_sites(_phi3())[0]] == [None, None]
    assert [s.sliding_window for s in inspect_attention_sites(_mistral(256))[0]] == [None, None]
    # one position short of the window: the window binds, the layers stay sliding
    short = _mistral(255)
    assert unbound_window(short.config) is None
    assert [s.sliding_window for s in inspect_attention_sites(short)[0]] == [255, 255]


def test_plain_layer_kind():
    from transformers.cache_utils import (
        DynamicLayer,
        DynamicSlidingWindowLayer,
        StaticLayer,
        StaticSlidingWindowLayer,
    )

    unbound, bound = _mistral(256).config, _mistral(64).config
    assert plain_layer_kind(DynamicLayer(), bound) == "dynamic"
    assert plain_layer_kind(StaticLayer(16), None) == "static"
    assert plain_layer_kind(DynamicSlidingWindowLayer(256), unbound) == "dynamic"
    assert plain_layer_kind(StaticSlidingWindowLayer(16, 256), unbound) == "static"
    assert plain_layer_kind(DynamicSlidingWindowLayer(64), bound) is None
    assert plain_layer_kind(StaticSlidingWindowLayer(16, 64), bound) is None
    assert plain_layer_kind(QuantizedKVLayer.__new__(QuantizedKVLayer), unbound) is None


def test_phi3_128k_takes_a_compressed_cache_in_its_own_sliding_cache():
    """Phi-3's fused qkv makes its sites cache-only: a quantized cache. generate()'s default
    cache (transformers builds sliding layers from the config) gets the quantized layers, and
    generates what slimfx's own KVCache does; the report says why the layers count as full."""
    model = _phi3()
    C = 4096
    out = slimfx.optimize(model, Budget(kv=0.3, context=C), calibration=_calib(), progress=False)
    rep = slimfx.report_of(out)
    assert rep.totals["kv_cache_bytes_before"] == 2 * C * 128  # the full context, both layers
    assert rep.totals["kv_cache_bytes_after"] <= 0.3 * rep.totals["kv_cache_bytes_before"]
    assert all(k.chosen.startswith("kv int") for k in rep.kv_sites)
    assert any("sliding_window=262144 reaches max_position_embeddings=131072" in n
               for n in rep.notes)  # fmt: skip
    default = _generate(out)
    assert all(type(ly) is QuantizedKVLayer for ly in default.past_key_values.layers)
    own = _generate(out, past_key_values=KVCache.for_model(out))
    assert torch.equal(default.sequences, own.sequences)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_low_rank_cache_replaces_the_sliding_layers(cache_implementation):
    model = _mistral(256)
    out = slimfx.optimize(model, Budget(kv=0.3, context=256), calibration=_calib(),
                          kv_forms=[KVLowRankConfig(key_rank=8, value_rank=8, sink=4)],
                          progress=False)  # fmt: skip
    assert all("lowrank" in k.chosen for k in slimfx.report_of(out).kv_sites)
    got = _generate(out, cache_implementation=cache_implementation)
    if cache_implementation is None:
        assert all(isinstance(ly, LatentLayer) for ly in got.past_key_values.layers)
    else:
        assert not any("Sliding" in type(ly).__name__ for ly in got.past_key_values.layers)
    own = _generate(out, past_key_values=KVCache.for_model(out))
    assert torch.equal(got.sequences, own.sequences)


def test_a_bound_window_still_refuses_compressed_caches():
    from slimfx.planning.problem import InfeasibleBudgetError

    with pytest.raises(InfeasibleBudgetError, match=r"sliding-window attention \(window 32\)"):
        slimfx.optimize(_mistral(32), Budget(kv=0.5, context=4096), calibration=_calib(),
                        progress=False)  # fmt: skip


def test_an_int8_latent_mla_block_holds_codes_in_a_sliding_layer():
    from transformers import DynamicCache

    from slimfx.forms.mla.cache import MLALatentCache, MLALatentLayer
    from slimfx.forms.mla.config import MLAConfig
    from slimfx.forms.mla.convert import convert_model

    model = _mistral(256)
    convert_model(model, MLAConfig(rank=20, rope_pairs=2, method="pca", latent_bits=8),
                  [b[:1] for b in _calib()])  # fmt: skip
    cache = DynamicCache(config=model.config)
    assert all("Sliding" in type(ly).__name__ for ly in cache.layers)
    got = _generate(model, past_key_values=cache)
    assert all(type(ly) is MLALatentLayer and ly.latent_bits == 8 for ly in cache.layers)
    explicit = _generate(model, past_key_values=MLALatentCache(2, latent_bits=8))
    assert torch.equal(got.sequences, explicit.sequences)
