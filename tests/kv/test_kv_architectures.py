"""KV forms beyond Llama: q/k norms (Qwen3 per head, OLMo-2 over the width) are simulated as the
real cache holds them, low-rank caches are refused behind a q/k norm, sliding-window layers keep
their 16-bit cache with the reason in the report, and a kv budget on those models still plans."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

import slimfx
from slimfx.forms.kv.cache import KVCache
from slimfx.forms.kv.config import KVQuantConfig
from slimfx.forms.kv.simulate import SimulatedKVAttention, block_forward
from slimfx.ir.find import inspect_attention_sites
from slimfx.planning.problem import Budget

pytestmark = pytest.mark.usefixtures("one_thread")

_SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip


def _model(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "qwen3":
        cfg = tf.Qwen3Config(**_SMALL, head_dim=16)
        return tf.Qwen3ForCausalLM(cfg).eval()
    if family == "olmo2":
        return tf.Olmo2ForCausalLM(tf.Olmo2Config(**_SMALL)).eval()
    raise ValueError(family)


def _perturb_norms(model) -> None:
    """Random q/k norm weights, so that a simulation skipping them would be visibly wrong."""
    g = torch.Generator().manual_seed(9)
    for name, p in model.named_parameters():
        if "q_norm" in name or "k_norm" in name:
            p.data = 0.5 + torch.rand(p.shape, generator=g)


@pytest.mark.parametrize("family", ["qwen3", "olmo2"])
def test_qk_norm_blocks_simulate_what_the_real_cache_holds(family):
    model = _model(family)
    _perturb_norms(model)
    sites, _ = inspect_attention_sites(model)
    assert all(s.qk_norm is not None for s in sites)
    form = KVQuantConfig(4, 4, 4, 8, 0)
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(model, form)
    logits = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            r = model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.tensor([[t]]))
            logits.append(r.logits)
        got = torch.cat(logits, 1)
        dense = model(ids).logits
        mods = dict(model.named_modules())
        for s in sites:
            parent, _, child = s.fqn.rpartition(".")
            setattr(mods[parent], child, SimulatedKVAttention(mods[s.fqn], form))
        want = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    assert (got - dense).abs().max() > 1e-4  # the cache really was compressed


def test_block_forward_with_a_16bit_cache_equals_the_block_behind_qk_norms():
    model = _model("qwen3")
    _perturb_norms(model)
    attn = model.model.layers[0].self_attn
    h = torch.randn(1, 11, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(11)[None]
    cos, sin = model.model.rotary_emb(h, pos)
    from slimfx.forms.kv.config import KVDenseConfig

    mask = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want = attn(h, (cos, sin), mask)[0]
        got = block_forward(attn, h, cos, sin, KVDenseConfig())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_a_kv_budget_on_qk_norm_and_sliding_window_models_plans_with_reasons(tiny_llama):
    calib = [
        torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    out = slimfx.optimize(_model("qwen3"), Budget(kv=0.5), calibration=calib, progress=False)
    rep = slimfx.report_of(out)
    assert rep.totals["kv_ratio"] <= 0.5
    assert all(not k.owns for k in rep.kv_sites)  # no low-rank cache behind k_norm
    assert any("not linear in the hidden state" in n for n in rep.notes)
    ids = calib[0][:, :6]
    assert out.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, 11)

    from slimfx.models import tiny_llama as build

    swa = build(seed=0, layer_types=["full_attention", "sliding_attention"], sliding_window=8)
    out = slimfx.optimize(swa, Budget(kv=0.7), calibration=calib, progress=False)
    rep = slimfx.report_of(out)
    assert [k.status for k in rep.kv_sites] == ["applied", "skipped"]
    assert any("sliding-window attention (window 8)" in n for n in rep.notes)
    cache = DynamicCache(config=swa.config)
    out.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert type(cache.layers[1]).__name__ == "DynamicSlidingWindowLayer"


def _family(name: str):  # noqa: ANN202
    import transformers as tf

    torch.manual_seed(0)
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_SMALL)).eval()
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**_SMALL, sliding_window=None)).eval()
    return _model(name)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "olmo2", "mistral"])
def test_quantized_caches_read_in_place_give_the_plain_paths_tokens(family):
    """Beyond Llama: a kv budget's quantized caches, read in place at the decode steps (what
    optimize installs), give the greedy tokens of the plain path (store dequantized, sdpa) for
    a left-padded batch — q/k norms and biases included."""
    from slimfx.forms.kv.fused import FUSED_ATTENTION

    model = _family(family)
    if family in ("qwen3", "olmo2"):
        _perturb_norms(model)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (1, 48), generator=g) for _ in range(4)]
    out = slimfx.optimize(
        model, Budget(kv=0.4), calibration=calib, progress=False,
        kv_forms=[KVQuantConfig(4, 4, 16, 16, sink=2), KVQuantConfig(8, 8, 16, 16)],
    )  # fmt: skip
    assert out.config._attn_implementation == FUSED_ATTENTION
    ids = torch.randint(3, 256, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, attention_mask=mask)
    cache = DynamicCache()
    got = out.generate(ids, past_key_values=cache, **kw)
    assert sum(getattr(la, "n_stored", 0) > 0 for la in cache.layers) == 2
    assert {la.self_attn.last_decode_path for la in out.model.layers} == {"torch"}
    out.set_attn_implementation("sdpa")
    assert out.generate(ids, **kw).tolist() == got.tolist()


def test_an_infeasible_cache_budget_names_the_layers_and_reasons_that_limit_it():
    """The solver's "smallest achievable" alone does not say why: the error names the layers
    left with the 16-bit cache and each refusal's reason (which the report would have held)."""
    from slimfx.models import tiny_llama as build
    from slimfx.planning.problem import InfeasibleBudgetError

    calib = [
        torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    swa = build(seed=0, layer_types=["sliding_attention"] * 2, sliding_window=8)
    before = {k: v.clone() for k, v in swa.state_dict().items()}
    with pytest.raises(InfeasibleBudgetError) as err:
        slimfx.optimize(swa, Budget(kv=0.5, context=256), calibration=calib, progress=False)
    msg = str(err.value)
    assert err.value.limits == ("kv",)
    assert "the smallest achievable is 1.000 of dense" in msg
    assert "2 of 2 attention layer(s) can take no KV form and keep the 16-bit cache" in msg
    assert "sliding-window attention (window 8)" in msg
    assert all(torch.equal(before[k], v) for k, v in swa.state_dict().items())

    # one sliding layer (its 7 tokens are 3% of the cache at 256): infeasible below what the
    # other layer can give
    mixed = build(seed=0, layer_types=["full_attention", "sliding_attention"], sliding_window=8)
    with pytest.raises(InfeasibleBudgetError, match=r"1 of 2 attention layer\(s\) .*layers\.1"):
        slimfx.optimize(mixed, Budget(kv=0.05, context=256), calibration=calib, progress=False)
    # a weight limit that fails alone: the cache is not what limits it, nothing about it added
    with pytest.raises(InfeasibleBudgetError) as err:
        slimfx.optimize(mixed, Budget(memory=0.01, kv=0.7, context=256), calibration=calib,
                        progress=False)  # fmt: skip
    assert err.value.limits == ("memory",) and str(err.value).startswith("memory budget")
    assert "What limits the cache" not in str(err.value)


def test_soft_capped_attention_is_simulated_with_its_cap_and_refused_by_rewriting_forms(
    monkeypatch,
):
    """Gemma 2 caps its attention logits (``attn_logit_softcapping``): the cache simulation
    that prices the quantized caches applies the cap (its logits equal token-by-token decoding
    through the real cache; without the cap they do not), and the forms that rewrite the block
    (low-rank caches, MLA), whose attention has no cap, are refused with the reason."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma2Config(**_SMALL, head_dim=16, attn_logit_softcapping=0.05,
                          layer_types=["full_attention"] * 2)  # fmt: skip
    model = tf.Gemma2ForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")  # applies the cap (5.17 defaults to sdpa: no cap)
    for p in model.parameters():  # larger logits, so that the cap matters
        p.data *= 3.0
    sites, _ = inspect_attention_sites(model)
    assert [s.softcap for s in sites] == [0.05, 0.05]
    form = KVQuantConfig(4, 4, 4, 8, 0)
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(model, form)
    with torch.no_grad():
        got = torch.cat([
            model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.tensor([[t]])).logits
            for t in range(ids.shape[1])
        ], 1)  # fmt: skip
        mods = dict(model.named_modules())
        orig = {s.fqn: mods[s.fqn] for s in sites}
        for s in sites:
            parent, _, child = s.fqn.rpartition(".")
            setattr(mods[parent], child, SimulatedKVAttention(orig[s.fqn], form))
        want = model(ids, use_cache=False).logits
        import slimfx.forms.kv.simulate as sim

        monkeypatch.setattr(sim, "logit_softcap", lambda attn: None)  # without the cap
        uncapped = model(ids, use_cache=False).logits
        monkeypatch.undo()
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    assert (uncapped - want).abs().max() > 1e-2

    model = tf.Gemma2ForCausalLM(cfg).eval()
    calib = [torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(i))
             for i in range(3)]  # fmt: skip
    out = slimfx.optimize(model, Budget(kv=0.5, context=512), calibration=calib,
                          kv_forms=["default", "mla"], progress=False)  # fmt: skip
    notes = " ".join(slimfx.report_of(out).notes)
    assert "soft-capped at 0.05 (Gemma 2): the low-rank block's attention" in notes
    assert "logits soft-capped at 0.05, which the rewritten block's attention" in notes  # MLA
    assert {k.decision.get("kind") for k in slimfx.report_of(out).kv_sites} == {"kv_quant"}


def test_the_simulation_caps_only_where_the_blocks_attention_function_does():
    """transformers 5.17 runs Gemma 2 under ``sdpa`` by default, which ignores the soft-cap:
    the simulation prices what the model computes (later releases refuse sdpa with a cap)."""
    from types import SimpleNamespace

    from slimfx.forms.kv.simulate import applied_softcap

    attn = torch.nn.Module()
    attn.attn_logit_softcapping = 50.0
    for impl, cap in (("eager", 50.0), ("flex_attention", 50.0), ("sdpa", None)):
        attn.config = SimpleNamespace(_attn_implementation=impl)
        assert applied_softcap(attn) == cap, impl
    attn.attn_logit_softcapping = None
    attn.config = SimpleNamespace(_attn_implementation="eager", attn_logit_softcapping=None)
    assert applied_softcap(attn) is None


def test_the_replay_caps_only_where_the_function_it_stands_in_for_does():
    """The replay (cache-only sites) takes the block's own ``softcap`` argument, applied only
    when the model ran a function that applies it (not transformers' ``sdpa``)."""
    import transformers as tf

    from slimfx.forms.kv import replay
    from slimfx.forms.kv.config import KVDenseConfig

    model = tf.LlamaForCausalLM(tf.LlamaConfig(**_SMALL)).eval()
    mod = torch.nn.Module()
    setattr(mod, replay._FORM_ATTR, (KVDenseConfig(), (2, 16)))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 5, 16, generator=g) * 3 for h in (4, 2, 2))
    out = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        with replay.simulating(model):
            out[impl] = replay.simulated_attention(mod, q, k, v, None, softcap=0.5)[0]
            out[impl + " no cap"] = replay.simulated_attention(mod, q, k, v, None)[0]
        assert model.config._attn_implementation == impl  # restored
    torch.testing.assert_close(out["sdpa"], out["sdpa no cap"])
    assert (out["eager"] - out["eager no cap"]).abs().max() > 1e-2


def test_partial_rotary_blocks_take_a_low_rank_cache():
    """StableLM rotates 4 of each head's 16 dims: the low-rank cache rebuilds the keys before
    RoPE and rotates those 4 as the block does, so the full-rank rewrite generates the model's
    tokens and logits on a left-padded batch, and a kv budget plans low-rank caches there
    (before, the planner refused them as "partial RoPE")."""
    import transformers as tf

    from slimfx.forms.kv.calibrate import attention_grams, fit_site
    from slimfx.forms.kv.config import KVLowRankConfig
    from slimfx.forms.kv.lowrank import apply_lowrank_kv

    def build():  # noqa: ANN202
        torch.manual_seed(0)
        cfg = tf.StableLmConfig(**_SMALL, partial_rotary_factor=0.25, pad_token_id=0)
        return tf.StableLmForCausalLM(cfg).eval()

    model, ref = build(), build()
    sites, _ = inspect_attention_sites(model)
    assert [s.rope_dim for s in sites] == [4, 4]
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(3, 256, (1, 40), generator=g) for _ in range(3)]
    full = KVLowRankConfig(32, 32, 1, sink=2)  # every k/v dim: the block itself
    grams = attention_grams(model, sites, calib)
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], full) for s in sites}
    apply_lowrank_kv(model, sites, {s.fqn: full for s in sites}, factors)
    ids = torch.randint(3, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, attention_mask=mask,
              output_logits=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        got = model.generate(ids, past_key_values=KVCache.for_model(model, full), **kw)
        want = ref.generate(ids, **kw)
    assert got.sequences.tolist() == want.sequences.tolist()
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4,
                               rtol=1e-4)  # fmt: skip
    out = slimfx.optimize(build(), Budget(kv=0.5), calibration=calib, progress=False,
                          kv_forms=[KVLowRankConfig(12, 12, 1)])  # fmt: skip
    rep = slimfx.report_of(out)
    assert [(k.status, bool(k.owns)) for k in rep.kv_sites] == [("applied", True)] * 2
    assert out.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False).shape == (2, 14)
