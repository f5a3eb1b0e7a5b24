"""Attention sites, the low-rank fit and the low-rank rewrite with its latent cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from slimfx.forms.kv.cache import KVCache, LatentLayer
from slimfx.forms.kv.calibrate import attention_grams, capture_attention_inputs, fit_site
from slimfx.forms.kv.config import KVDenseConfig, KVLatentQuantConfig, KVLowRankConfig
from slimfx.forms.kv.lowrank import LowRankKVAttention, apply_lowrank_kv
from slimfx.forms.kv.simulate import attention_error, block_forward
from slimfx.ir.find import MHA_REASON, inspect_attention_sites

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=3, T=24, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, T), generator=g) for _ in range(n)]


def test_sites_of_tiny_llama_and_the_reasons_for_the_rest(tiny_llama):
    sites, rejected = inspect_attention_sites(tiny_llama)
    assert [s.layer_idx for s in sites] == [0, 1]
    sh = sites[1].site_shape
    assert (sh.hidden_size, sh.num_heads, sh.num_kv_heads, sh.head_dim, sh.rope_dim) == (
        64,
        4,
        2,
        16,
        16,
    )
    assert sh.sliding_window is None and not rejected
    assert sites[0].projection("k") == "model.layers.0.self_attn.k_proj"
    wrapper = nn.ModuleDict({"mha": nn.MultiheadAttention(16, 2), "llm": tiny_llama})
    _, rejected = inspect_attention_sites(wrapper)
    assert rejected == {"mha": MHA_REASON}


def test_sliding_window_layers_are_seen():
    from slimfx.models import tiny_llama

    model = tiny_llama(layer_types=["full_attention", "sliding_attention"], sliding_window=8)
    sites, _ = inspect_attention_sites(model)
    assert [s.site_shape.sliding_window for s in sites] == [None, 8]
    assert "sliding-window" in KVLowRankConfig(16, 16).check(sites[1].site_shape)


def test_dense_simulation_equals_the_hf_block_and_full_rank_is_exact(tiny_llama):
    sites, _ = inspect_attention_sites(tiny_llama)
    ins = capture_attention_inputs(tiny_llama, sites, _calib())
    grams = attention_grams(tiny_llama, sites, _calib())
    mods = dict(tiny_llama.named_modules())
    for s in sites:
        attn = mods[s.fqn]
        for hidden, cos, sin in ins[s.fqn]:
            want, _ = attn(hidden, (cos, sin), None)
            got = block_forward(attn, hidden, cos, sin, KVDenseConfig())
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert attention_error(attn, ins[s.fqn], KVDenseConfig()) == 0.0
        for method in ("whitened", "attention"):
            full = KVLowRankConfig(32, 32, 2, method)  # kv_dim 32: every dim kept
            f = fit_site(tiny_llama, s, grams[s.fqn], full)
            assert attention_error(attn, ins[s.fqn], full, f) < 1e-10  # fp32 rounding
        errs = [
            attention_error(attn, ins[s.fqn], cfg, fit_site(tiny_llama, s, grams[s.fqn], cfg))
            for cfg in (KVLowRankConfig(24, 24), KVLowRankConfig(8, 8))
        ]
        assert 0 < errs[0] < errs[1]


def test_each_fit_is_optimal_for_its_own_weighted_objective(tiny_llama):
    from slimfx.forms.kv.numerics import value_output_weight

    sites, _ = inspect_attention_sites(tiny_llama)
    s = sites[0]
    gram = attention_grams(tiny_llama, [s], _calib(4, 32))[s.fqn].double()
    mods = dict(tiny_llama.named_modules())
    W = mods[s.projection("v")].weight.detach().double()
    M = value_output_weight(mods[s.projection("o")].weight, (4, 2, 16))

    def objectives(f):
        E = W - torch.einsum(
            "gdr,grh->gdh", f["v_up"].double(), f["v_down"].double().view(1, 8, -1)
        ).reshape(32, -1)
        return float(torch.trace(E @ gram @ E.T)), float(torch.trace(M @ E @ gram @ E.T))

    fits = {
        m: fit_site(tiny_llama, s, gram, KVLowRankConfig(32, 8, 1, m))
        for m in ("whitened", "attention")
    }
    plain_w, plain_m = objectives(fits["whitened"])
    attn_w, attn_m = objectives(fits["attention"])
    # whitened minimizes ‖E L‖², attention ‖Mᵀ E L‖² (Eckart–Young on each), up to fp32 storage
    assert plain_w <= attn_w * (1 + 1e-5) and attn_m <= plain_m * (1 + 1e-5)
    assert attn_m < 0.99 * plain_m  # and the weighting changes the answer


def _rewrite(model, form):
    sites, _ = inspect_attention_sites(model)
    grams = attention_grams(model, sites, _calib())
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], form) for s in sites}
    apply_lowrank_kv(model, sites, {s.fqn: form for s in sites}, factors)
    return sites


@pytest.mark.parametrize(
    "form",
    [
        KVLowRankConfig(32, 32, 2),
        KVLatentQuantConfig(32, 32, 2, "attention", 8, 8, 2),
        KVLatentQuantConfig(32, 32, 2, "attention", 8, 4, 2, axis="channel"),
        KVLowRankConfig(32, 32, 2, sink=2),
    ],
)
def test_full_rank_rewrite_generates_the_dense_tokens(tiny_llama, tiny_ids, form):
    ids = tiny_ids
    kw = dict(
        max_new_tokens=10, min_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    dense = tiny_llama.generate(ids, **kw)
    with torch.no_grad():
        dense_logits = tiny_llama(ids, use_cache=False).logits
    sites = _rewrite(tiny_llama, form)
    assert all(
        isinstance(m, LowRankKVAttention)
        for n, m in tiny_llama.named_modules()
        if n in {s.fqn for s in sites}
    )
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_llama(ids, use_cache=False).logits, dense_logits, atol=1e-4, rtol=1e-4
        )
    cache = KVCache.for_model(tiny_llama, form)
    got = tiny_llama.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(got, dense)
    if form.kind == "kv_lowrank":  # batch 2 × 2 layers × fp32 (twice the 16-bit reference)
        n = cache.get_seq_length()
        assert cache.nbytes() == 2 * 2 * 2 * form.cache_bytes(sites[0].site_shape, n)


def test_low_rank_generate_holds_the_latent_and_needs_the_kv_cache(tiny_llama, tiny_ids):
    form = KVLowRankConfig(16, 16, 1)
    sites = _rewrite(tiny_llama, form)
    ids = tiny_ids[:1]
    cache = KVCache.for_model(tiny_llama, form)
    out = tiny_llama.generate(
        ids, past_key_values=cache, max_new_tokens=5, min_new_tokens=5, do_sample=False
    )
    assert out.shape == (1, 21)
    layer = cache.layers[0]
    assert isinstance(layer, LatentLayer) and layer.keys.shape == (1, 1, 20, 16)
    assert torch.equal(layer.positions, torch.arange(20)[None])
    # fp32 run: twice the reference (16-bit) bytes
    assert layer.nbytes() == 2 * form.cache_bytes(sites[0].site_shape, 20)
    with pytest.raises(TypeError, match="needs slimfx's KVCache"):
        tiny_llama.generate(ids, past_key_values=DynamicCache(), max_new_tokens=2)


def test_a_refused_rewrite_leaves_the_model_unchanged(tiny_llama):
    sites, _ = inspect_attention_sites(tiny_llama)
    before = [type(m) for m in tiny_llama.modules()]
    grams = attention_grams(tiny_llama, sites, _calib())
    good = KVLowRankConfig(16, 16)
    factors = {s.fqn: fit_site(tiny_llama, s, grams[s.fqn], good) for s in sites}
    forms = {sites[0].fqn: good, sites[1].fqn: KVLowRankConfig(16, 16, groups=3)}
    with pytest.raises(ValueError, match="3 head groups do not divide num_kv_heads=2"):
        apply_lowrank_kv(tiny_llama, sites, forms, factors)
    assert [type(m) for m in tiny_llama.modules()] == before


def test_sink_tokens_of_the_low_rank_cache(tiny_llama):
    sites, _ = inspect_attention_sites(tiny_llama)
    s = sites[0]
    calib = _calib(2, 20)
    ins = capture_attention_inputs(tiny_llama, [s], calib)
    gram = attention_grams(tiny_llama, [s], calib)[s.fqn]
    attn = dict(tiny_llama.named_modules())[s.fqn]
    errs = []
    for sink in (0, 4, 20):  # 20: every token of the calibration windows is a sink
        cfg = KVLowRankConfig(8, 8, 1, "attention", sink=sink)
        errs.append(attention_error(attn, ins[s.fqn], cfg, fit_site(tiny_llama, s, gram, cfg)))
    assert errs[0] > errs[1] > 0 and errs[2] < 1e-12
    lq = KVLatentQuantConfig(8, 8, 1, "attention", bits=4, group=8, residual=2, sink=20)
    f = fit_site(tiny_llama, s, gram, lq)
    assert attention_error(attn, ins[s.fqn], lq, f) < 1e-12
    # bytes: 3 sink tokens' exact K/V at 2·2·16·2 B, 10 latent tokens at 2·16 B
    assert KVLowRankConfig(8, 8, sink=3).cache_bytes(s.site_shape, 10) == 3 * 128 + 10 * 32


def test_fisher_weighting_of_the_block_error(tiny_llama):
    from slimfx.forms.kv.config import KVQuantConfig

    sites, _ = inspect_attention_sites(tiny_llama)
    s = sites[1]
    ins = capture_attention_inputs(tiny_llama, [s], _calib(2, 20))[s.fqn]
    attn = dict(tiny_llama.named_modules())[s.fqn]
    cfg = KVQuantConfig(2, 2, 4, 8, 0)
    plain = attention_error(attn, ins, cfg)
    assert plain > 0
    assert attention_error(attn, ins, cfg, fisher=torch.full((64,), 3.0)) == pytest.approx(plain)
    one = torch.zeros(64)
    one[5] = 1.0  # only output channel 5 counts
    with torch.no_grad():
        y = [block_forward(attn, h, c, si, KVDenseConfig())[..., 5] for h, c, si in ins]
        yc = [block_forward(attn, h, c, si, cfg)[..., 5] for h, c, si in ins]
    want = sum(float(((b - a) ** 2).sum()) for a, b in zip(y, yc)) / sum(
        float((a**2).sum()) for a in y
    )
    assert attention_error(attn, ins, cfg, fisher=one) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    "form",
    [
        KVLowRankConfig(16, 8, 2),
        KVLatentQuantConfig(16, 16, 1, "attention", 4, 8, 3),
        KVLatentQuantConfig(16, 16, 2, "whitened", 2, 4, 2, axis="channel"),
        KVLowRankConfig(8, 16, 1, sink=2),
        KVLatentQuantConfig(16, 16, 1, "attention", 4, 4, 1, sink=3, axis="channel"),
        KVLatentQuantConfig(
            16, 16, 2, "whitened", 4, 4, 2, sink=2, axis="channel", low_bits=2, key_low=8,
            value_low=8,
        ),
    ],
)
def test_rewritten_model_decoding_equals_the_one_pass_simulation(form):
    from slimfx.forms.kv.simulate import SimulatedKVAttention
    from slimfx.models import tiny_llama

    sim, rew = (tiny_llama(seed=0, max_position_embeddings=128, pad_token_id=None) for _ in "ab")
    sites, _ = inspect_attention_sites(sim)
    grams = attention_grams(sim, sites, _calib())
    factors = {s.fqn: fit_site(sim, s, grams[s.fqn], form) for s in sites}
    mods = dict(sim.named_modules())
    for s in sites:
        parent, _, child = s.fqn.rpartition(".")
        setattr(mods[parent], child, SimulatedKVAttention(mods[s.fqn], form, factors[s.fqn]))
    apply_lowrank_kv(rew, sites, {s.fqn: form for s in sites}, factors)
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(4))
    cache = KVCache.for_model(rew, form)
    with torch.no_grad():
        want = sim(ids, use_cache=False).logits
        got = torch.cat(
            [
                rew(
                    ids[:, t : t + 1],
                    past_key_values=cache,
                    use_cache=True,
                    position_ids=torch.tensor([[t]]),
                ).logits
                for t in range(ids.shape[1])
            ],
            dim=1,
        )
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)  # fp32, another order
    with torch.no_grad():  # the rewritten model without a cache: the same sinks, all exact
        nocache = rew(ids, use_cache=False).logits
    if form.kind == "kv_lowrank":
        torch.testing.assert_close(nocache, want, atol=2e-5, rtol=1e-4)
    if form.sink:  # the sink tokens' exact K/V are held
        layer = cache.layers[0]
        assert layer.sink_keys.shape == (1, 2, form.sink, 16)
        if form.kind == "kv_lowrank":  # all floats: fp32 is twice the 16-bit reference bytes
            assert layer.nbytes() == 2 * form.cache_bytes(sites[0].site_shape, ids.shape[1])


def test_a_nope_layer_rewritten_at_full_rank_keeps_its_logits():
    """SmolLM3's no-RoPE layers (``use_rope=False``): the low-rank block and the simulation
    rotate nothing there (both rotated every layer: the block then computed another attention)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.SmolLM3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layers=[1, 0],
    )  # fmt: skip
    model = tf.SmolLM3ForCausalLM(cfg).eval()
    ids = torch.randint(3, 256, (1, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    sites, _ = inspect_attention_sites(model)
    assert [s.rope_dim for s in sites] == [16, 0]
    _rewrite(model, KVLowRankConfig(32, 32, 2))
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
        cache = KVCache.for_model(model, KVLowRankConfig(32, 32, 2))
        steps = torch.cat([model(ids[:, t : t + 1], past_key_values=cache).logits
                           for t in range(ids.shape[1])], 1)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["stablelm qk_layernorm", "smollm3 nope", "llama training"])
def test_blocks_the_simulation_reproduces_are_not_flagged(variant):
    """The check that makes a block cache-only passes blocks the reimplementation reproduces:
    per-head q/k layernorms (StableLM), NoPE layers, a model left in training mode with
    attention dropout (the check copies the block in eval mode); the probe is unpadded."""
    import transformers as tf

    from slimfx.forms.kv.calibrate import simulation_mismatch

    small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    if variant.startswith("stablelm"):
        model = tf.StableLmForCausalLM(tf.StableLmConfig(**small, qk_layernorm=True))
    elif variant.startswith("smollm3"):
        model = tf.SmolLM3ForCausalLM(tf.SmolLM3Config(
            **small, pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layers=[1, 0]))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**small, attention_dropout=0.5))
    assert model.training  # as built: the check must not depend on it
    sites, _ = inspect_attention_sites(model)
    diff = simulation_mismatch(model, sites)
    assert len(diff) == 2 and max(diff.values()) < 1e-6
    assert model.training
