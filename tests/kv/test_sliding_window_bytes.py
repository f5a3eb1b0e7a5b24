"""A sliding-window layer's 16-bit cache holds its window, not the context: priced so (bytes at
a context, the steady rate, a step's reads), so a budget on the cache of a model that mixes
sliding and global layers (Gemma 2/3, gpt-oss, Mistral v0.1) counts the cache it really holds —
it had counted every sliding layer at the full context (5.6× the real dense cache below)."""

from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.forms.kv.config import KVDenseConfig
from slimfx.planning.problem import Budget
from slimfx.planning.shapes import AttentionShape

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 64
SLIDING = AttentionShape(64, 4, 2, 16, 16, sliding_window=WINDOW)
GLOBAL = AttentionShape(64, 4, 2, 16, 16)


def test_a_sliding_layer_holds_its_window():
    assert [SLIDING.held_tokens(n) for n in (1, 10, 63, 64, 65, 4096)] == [1, 10, 63, 63, 63, 63]
    assert [GLOBAL.held_tokens(n) for n in (10, 4096)] == [10, 4096]
    d = KVDenseConfig()
    assert d.cache_bytes(SLIDING, 4096) == 63 * 128 and d.cache_bytes(GLOBAL, 4096) == 4096 * 128
    assert d.steady_bytes_per_token(SLIDING) == 0.0 and d.steady_bytes_per_token(GLOBAL) == 128
    assert d.bytes_per_token(SLIDING, 4096) == pytest.approx(63 * 128 / 4096)
    # a step reads the window (and its own token), not the context
    assert d.step_work(SLIDING, 4096).cache_floats == 64 * 2 * 32
    assert d.step_work(GLOBAL, 4096).cache_floats == 4096 * 2 * 32
    assert d.step_work(SLIDING, 30, tokens=8).cache_floats == 30 * 2 * 32


def _gemma3():
    import transformers as tf

    cfg = tf.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
        max_position_embeddings=2048, sliding_window_pattern=6,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.Gemma3ForCausalLM(cfg).eval()


def test_a_budget_on_a_model_with_sliding_layers_counts_the_cache_they_hold():
    pytest.importorskip("transformers", minversion="4.50")
    model = _gemma3()
    assert model.config.layer_types.count("sliding_attention") == 5
    calib = [torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(i))
             for i in range(3)]  # fmt: skip
    C = 1000
    out = slimfx.optimize(model, Budget(kv=0.5, context=C), calibration=calib, progress=False)
    rep = slimfx.report_of(out)
    assert rep.totals["kv_cache_bytes_before"] == (5 * (WINDOW - 1) + C) * 128
    assert rep.totals["kv_cache_bytes_after"] <= 0.5 * rep.totals["kv_cache_bytes_before"]
    chosen = [k.chosen for k in rep.kv_sites]
    assert chosen[:5] == ["kv dense"] * 5 and chosen[5] != "kv dense"  # only the global layer
    # the model's own cache at C tokens: each sliding layer holds WINDOW - 1 tokens
    ids = torch.randint(0, 256, (1, C - 1), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cache = out(ids, use_cache=True).past_key_values
        out(ids[:, -1:], past_key_values=cache, use_cache=True)
    held = [layer.keys.shape[2] for layer in cache.layers[:5]]
    assert held == [WINDOW - 1] * 5
    for k, n in zip(rep.kv_sites[:5], held):
        assert k.cache_bytes_after == k.cache_bytes_before == n * 128


def _gemma2():
    import transformers as tf

    cfg = tf.Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
        max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.Gemma2ForCausalLM(cfg).eval()


def test_the_explicit_cache_keeps_a_sliding_layers_window_and_softcap_is_not_fused():
    """KVCache.for_model gave a 16-bit sliding layer a full DynamicLayer (223 tokens held
    where the model's own cache holds 15); Gemma 2's soft-cap: the report advised
    use_fused_decode, after which every prefill failed (sdpa has no softcap) — it is refused."""
    from slimfx.forms.kv.cache import KVCache
    from slimfx.forms.kv.fused import use_fused_decode

    calib = [torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(i))
             for i in range(3)]  # fmt: skip
    model = _gemma2()
    out = slimfx.optimize(model, Budget(kv=0.5, context=512), calibration=calib, progress=False)
    assert [k.chosen for k in slimfx.report_of(out).kv_sites][0] == "kv dense"
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(9))
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    own = out.generate(prompt, **kw)
    explicit = out.generate(prompt, past_key_values=KVCache.for_model(out), **kw)
    assert torch.equal(own.sequences, explicit.sequences)
    held = [ly.keys.shape[2] for ly in explicit.past_key_values.layers[:1]]
    assert held == [own.past_key_values.layers[0].keys.shape[2]] == [15]
    note = next(n for n in slimfx.report_of(out).notes if "dequantize their whole" in n)
    assert "soft-capped at 50" in note and "use_fused_decode(model)" not in note
    with pytest.raises(ValueError, match="soft-capped at 50, which sdpa does not apply"):
        use_fused_decode(out)
    assert torch.equal(out.generate(prompt, **kw).sequences, own.sequences)  # unchanged
