"""The KV cache under the budget: Budget(kv=, total_bytes=, context=, batch=) checks, the solver's
joint weights + cache rows, and optimize() choosing KV forms per layer that generate() uses."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

import slimfx
from slimfx.forms.kv.cache import KVCache, LatentLayer, QuantizedKVLayer, kv_forms_of
from slimfx.forms.kv.config import KVDenseConfig, KVLowRankConfig, KVQuantConfig
from slimfx.planning.configs import DenseConfig, QuantConfig
from slimfx.planning.problem import (
    Budget,
    BudgetProblem,
    InfeasibleBudgetError,
    Option,
    SiteOptions,
)
from slimfx.planning.shapes import (
    KV_BYTES_PER_TOKEN,
    KV_CACHE_BYTES,
    TOTAL_BYTES,
    WEIGHT_BYTES,
    AttentionShape,
)
from slimfx.planning.solve import solve

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n: int = 5, T: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (1, T), generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------ Budget


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"kv": 0}, r"kv budget is a fraction in \(0, 1\]"),
        ({"total_bytes": 1e6}, r"give context="),
        ({"total_bytes": 0.5, "context": 8}, r"total_bytes is a byte count"),
        ({"context": 4096}, r"need kv= or total_bytes="),
        ({"kv": 0.5, "batch": 4}, r"batch= scales the cache in total_bytes= only, and the attention steps of a latency"),
        ({"kv": 0.5, "context": 0}, r"Budget.context is a number of tokens"),
        ({"total_bytes": 1e6, "context": 8, "batch": True}, r"Budget.batch"),
    ],
)
def test_bad_cache_budgets_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Budget(**kw)


def test_budget_dict_carries_the_cache_fields():
    b = Budget(memory=0.3, total_bytes=5e6, context=8192, batch=16)
    assert b.prices_cache and not Budget(memory=0.3).prices_cache
    assert b.to_dict() == {
        "memory": 0.3, "bits": None, "latency": None, "max_error": None,
        "total_bytes": 5e6, "context": 8192, "batch": 16,
    }  # fmt: skip


# ------------------------------------------------------------------------------ solver

_SHAPE = AttentionShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, rope_dim=16)


def _joint_problem(context: int | None) -> BudgetProblem:
    """One linear site (dense 8 kB, int4 2 kB) and one attention site (16-bit, int4 cache)."""
    from slimfx.forms.kv.candidates import kv_costs

    lin = SiteOptions(
        "lin",
        [Option(DenseConfig(), 8000, 0.0), Option(QuantConfig(4, 32), 2000, 1.0)],
        8000,
    )
    kv_opts = []
    for form, err in ((KVDenseConfig(), 0.0), (KVQuantConfig(4, 4, 16, 16), 0.5)):
        c = kv_costs(form, _SHAPE, context)
        kv_opts.append(Option(form, c[WEIGHT_BYTES], err, costs=c))
    att = SiteOptions(
        "att", kv_opts, 0, kind="attention", shape=_SHAPE,
        dense_costs=kv_costs(KVDenseConfig(), _SHAPE, context),
    )  # fmt: skip
    return BudgetProblem([lin, att], meta={"kv_context": context})


def test_total_bytes_trades_weights_against_the_cache():
    p = _joint_problem(context=100)
    dense_cache = KVDenseConfig().cache_bytes(_SHAPE, 100)  # 128 B/token × 100
    assert p.dense_costs[KV_CACHE_BYTES] == dense_cache == 12800
    # batch 1: compressing the weights (error 1.0) or the cache (0.5): the cache is cheaper
    s = solve(p, Budget(total_bytes=8000 + dense_cache - 6000, context=100))
    assert isinstance(s.decision("att"), KVQuantConfig) and isinstance(
        s.decision("lin"), DenseConfig
    )
    assert s.costs[TOTAL_BYTES] <= 8000 + dense_cache - 6000
    # batch 4: the cache dominates; both must shrink
    total = 2000 + 4 * KVQuantConfig(4, 4, 16, 16).cache_bytes(_SHAPE, 100)
    s4 = solve(p, Budget(total_bytes=total, context=100, batch=4))
    assert s4.costs[TOTAL_BYTES] == total
    assert isinstance(s4.decision("lin"), QuantConfig)
    with pytest.raises(
        InfeasibleBudgetError, match=r"total budget .* is infeasible.*smallest achievable"
    ):
        solve(p, Budget(total_bytes=total - 1, context=100, batch=4))


def test_kv_fraction_at_a_context_counts_the_exact_cache():
    p = _joint_problem(context=40)  # sinks/blocks: the 16-bit tail is a visible share at 40 tokens
    q = KVQuantConfig(4, 4, 16, 16)
    frac = q.cache_bytes(_SHAPE, 40) / KVDenseConfig().cache_bytes(_SHAPE, 40)
    assert isinstance(solve(p, Budget(kv=frac, context=40)).decision("att"), KVQuantConfig)
    with pytest.raises(InfeasibleBudgetError, match=r"kv budget .* per sequence at 40 tokens"):
        solve(p, Budget(kv=frac * 0.99, context=40))
    with pytest.raises(
        ValueError, match=r"priced at context=40 but the budget counts it at context=None"
    ):
        solve(p, Budget(kv=0.5))
    steady = _joint_problem(context=None)
    assert steady.dense_costs[KV_BYTES_PER_TOKEN] == 128
    s = solve(steady, Budget(kv=0.5))
    assert s.costs[KV_BYTES_PER_TOKEN] == q.steady_bytes_per_token(_SHAPE) == 2 * (12 + 12)


# ------------------------------------------------------------------------------ optimize


def test_optimize_with_a_kv_budget_compresses_every_layer_and_generate_uses_it(tiny_llama):
    out = slimfx.optimize(tiny_llama, Budget(kv=0.35), calibration=_calib(), progress=False)
    rep = slimfx.report_of(out)
    assert rep.totals["kv_ratio"] <= 0.35 and rep.totals["kv_compressed"] == 2
    forms = kv_forms_of(out)
    assert sorted(forms) == [0, 1] and all(isinstance(f, KVQuantConfig) for f in forms.values())
    assert "## KV cache" in rep.to_markdown() and "KV cache 256 →" in str(rep)
    # generate() with its own cache, and with a DynamicCache the caller passes: compressed layers
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache()
    g = out.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=cache)
    assert g.shape[1] == 49 and all(isinstance(layer, QuantizedKVLayer) for layer in cache.layers)
    assert out.generate(ids, max_new_tokens=40, do_sample=False).tolist() == g.tolist()
    # the user's model keeps its 16-bit cache
    assert kv_forms_of(tiny_llama) == {}
    assert tiny_llama.config._attn_implementation == "sdpa"  # and its attention function
    # a cache that already holds 16-bit tokens cannot be compressed after the fact
    full = DynamicCache()
    tiny_llama(ids, past_key_values=full, use_cache=True)
    with pytest.raises(TypeError, match=r"already holds 16-bit tokens"):
        out(ids, past_key_values=full, use_cache=True)


def test_quantized_caches_are_read_in_place_after_optimize_and_load(tiny_llama, tmp_path):
    """optimize installs the in-place decode step (a note says so), its greedy tokens equal the
    plain path's (the model switched back to sdpa), and load installs it again."""
    from slimfx.forms.kv.fused import FUSED_ATTENTION

    out = slimfx.optimize(tiny_llama, Budget(kv=0.35), calibration=_calib(), progress=False)
    rep = slimfx.report_of(out)
    assert any("read their store in place" in n for n in rep.notes), rep.notes
    assert {k.decode_step for k in rep.kv_sites} == {"store read in place"}
    assert "| decode step |" in rep.to_markdown() and "| store read in place |" in rep.to_markdown()
    assert out.config._attn_implementation == FUSED_ATTENTION
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row: the torch op applies the mask
    kw = dict(max_new_tokens=140, do_sample=False, attention_mask=mask)  # gk128 fills a block
    cache = DynamicCache()
    got = out.generate(ids, past_key_values=cache, **kw)
    assert all(la.n_stored > 0 for la in cache.layers)
    paths = {la.self_attn.last_decode_path for la in out.model.layers}
    assert paths == {"torch"}
    # transformers' static cache (upgraded by the form's hook) reads in place too: same tokens
    out.model.layers[0].self_attn.last_decode_path = None
    assert out.generate(ids, cache_implementation="static", **kw).tolist() == got.tolist()
    assert out.model.layers[0].self_attn.last_decode_path == "torch"
    slimfx.save(out, tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    assert back.config._attn_implementation == FUSED_ATTENTION
    assert back.generate(ids, **kw).tolist() == got.tolist()
    out.set_attn_implementation("sdpa")  # the plain path: update dequantizes the store
    assert out.generate(ids, **kw).tolist() == got.tolist()
    assert {la.self_attn.last_decode_path for la in out.model.layers} == {"torch"}  # unchanged
    # use_fused_decode on an optimized model: the installation optimize made, kernel choice set
    from slimfx.forms.kv.fused import use_fused_decode

    with pytest.raises(ValueError, match="set it back to 'sdpa' first"):
        use_fused_decode(_bare_fused(tiny_llama))  # the function set by hand, no hooks
    h = use_fused_decode(back, kernel=False)
    assert use_fused_decode(back) is h and back.config._attn_implementation == FUSED_ATTENTION
    h.undo()
    assert back.config._attn_implementation == "sdpa"
    assert back.generate(ids, **kw).tolist() == got.tolist()


def test_optimize_for_torch_compile_installs_the_in_place_step(tiny_llama):
    """backend="compile": the static cache's layers read in place under torch.compile (an
    opaque op), so optimize installs the step there too."""
    from slimfx.forms.kv.fused import FUSED_ATTENTION

    out = slimfx.optimize(
        tiny_llama, Budget(kv=0.35), calibration=_calib(), backend="compile", progress=False
    )
    rep = slimfx.report_of(out)
    assert out.config._attn_implementation == FUSED_ATTENTION
    assert any("static caches on the CPU too, compiled or not" in n for n in rep.notes), rep.notes
    assert {k.decode_step for k in rep.kv_sites} == {"store read in place"}


def _bare_fused(model):  # noqa: ANN001, ANN202
    """``model`` switched to the fused attention function by hand, without the hooks."""
    from slimfx.forms.kv.fused import FUSED_ATTENTION, _register

    _register()
    model.set_attn_implementation(FUSED_ATTENTION)
    return model


def test_lowrank_kv_owns_its_projections_saves_loads_and_replays(tiny_llama, tmp_path):
    calib = _calib()
    forms = [KVDenseConfig(), KVLowRankConfig(16, 24, 1, "whitened", 0)]
    out = slimfx.optimize(
        tiny_llama, Budget(kv=0.7), calibration=calib, kv_forms=forms, progress=False
    )
    rep = slimfx.report_of(out)
    plan = slimfx.Plan.from_dict(rep.meta["plan"])
    k0 = "model.layers.0.self_attn.k_proj"
    assert plan.owned_by[k0] == "model.layers.0.self_attn"
    assert rep.site(k0).chosen == "owned by model.layers.0.self_attn"
    kv0 = rep.kv_sites[0]
    assert kv0.owns == [k0, "model.layers.0.self_attn.v_proj"]
    assert kv0.weight_bytes_after == 2 * 40 * (64 + 32)  # k/v down + up factors, 16-bit
    assert kv0.kv_bytes_per_token_after == 2 * 40
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    cache = DynamicCache()
    g = out.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert all(isinstance(layer, LatentLayer) for layer in cache.layers)
    # save → load: same logits, the same cache forms, generate() again; loading runs no probe
    # call on the skeleton, whose weights are not loaded yet (a NaN there refused the load)
    slimfx.save(out, tmp_path / "m")
    import slimfx.forms.kv.calibrate as calibrate

    def no_probe(*a):  # noqa: ANN002, ANN202
        raise AssertionError("probe call during load")

    orig, calibrate.simulation_mismatch = calibrate.simulation_mismatch, no_probe
    try:
        back = slimfx.load(tmp_path / "m")
    finally:
        calibrate.simulation_mismatch = orig
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out(ids).logits, rtol=0, atol=0)
    assert kv_forms_of(back) == kv_forms_of(out)
    assert back.generate(ids, max_new_tokens=10, do_sample=False).tolist() == g.tolist()
    # replaying the plan with the same calibration reproduces the model
    again = slimfx.optimize(tiny_llama, plan=plan, calibration=calib, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, out(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_weights_and_cache_budget_with_low_rank_caches_saves_and_loads(tiny_llama, tmp_path):
    """The q/o projections are rewritten too: loading finds the attention sites before it
    rewrites the linears, as optimize did (after, the blocks were no sites: the load failed
    with "KV decisions name [...] which are not attention sites")."""
    forms = [KVDenseConfig(), KVLowRankConfig(16, 24, 1, "whitened", sink=2)]
    out = slimfx.optimize(tiny_llama, Budget(memory=0.5, kv=0.7), calibration=_calib(),
                          kv_forms=forms, progress=False)  # fmt: skip
    rep = slimfx.report_of(out)
    assert any(k.owns for k in rep.kv_sites)
    assert any(s.chosen != "dense" and s.fqn.endswith(("q_proj", "o_proj")) for s in rep.sites)
    slimfx.save(out, tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out(ids).logits, rtol=0, atol=0)
    assert kv_forms_of(back) == kv_forms_of(out)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert back.generate(ids, **kw).tolist() == out.generate(ids, **kw).tolist()


def test_full_rank_lowrank_kv_equals_dense(tiny_llama):
    from slimfx.forms.kv.apply import apply_kv_plan
    from slimfx.forms.kv.calibrate import attention_grams
    from slimfx.ir.find import inspect_attention_sites

    sites, _ = inspect_attention_sites(tiny_llama)
    grams = attention_grams(tiny_llama, sites, _calib())
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = tiny_llama(ids).logits
    full = KVLowRankConfig(32, 32, 1, "whitened", 0)
    apply_kv_plan(tiny_llama, {s.fqn: full for s in sites}, sites, grams)
    with torch.no_grad():
        got = tiny_llama(ids, past_key_values=KVCache.for_model(tiny_llama)).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_a_kv_budget_without_calibration_or_attention_is_refused(tiny_llama, tiny_mlp):
    with pytest.raises(ValueError, match=r"no attention site"):
        slimfx.optimize(tiny_mlp, Budget(kv=0.5), calibration=[torch.randn(4, 16)], progress=False)
    with pytest.raises(ValueError, match=r"a kv budget .* is infeasible|kv budget"):
        slimfx.optimize(tiny_llama, Budget(kv=0.01), calibration=_calib(2), progress=False)


def test_calibration_windows_too_short_to_read_the_store_are_refused(tiny_llama):
    """Windows of 5 tokens with 4 sink tokens: no query reads a token a quantized cache stores,
    so its error would be 0 and the smallest cache (int2) would win blind — refused by name,
    the model unchanged; 6 tokens measure it."""
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    forms = [KVDenseConfig(), KVQuantConfig(2, 2, 32, 16, 0, 4)]
    with pytest.raises(ValueError, match=r"calibration windows of 5 tokens at most are too "
                       r"short to measure kv int2 .*calibrate on longer windows"):  # fmt: skip
        slimfx.optimize(tiny_llama, Budget(kv=0.5), calibration=_calib(2, T=5), kv_forms=forms,
                        progress=False)  # fmt: skip
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())
    out = slimfx.optimize(tiny_llama, Budget(kv=0.5), calibration=_calib(2, T=6), kv_forms=forms,
                          progress=False)  # fmt: skip
    assert all(k.est_error > 0 for k in slimfx.report_of(out).kv_sites)


def test_the_report_lists_each_layers_cache_and_notes_what_it_did_not_price(tiny_llama):
    """The short table names each chosen cache form with its layers; the markdown gives each
    layer's cache at the context; a context beyond the model's positions is noted, and so are
    kv_forms under a budget that does not count the cache."""
    forms = [KVDenseConfig(), KVQuantConfig(4, 4, 32, 16, 0, 4)]
    ctx = 4 * tiny_llama.config.max_position_embeddings
    out = slimfx.optimize(tiny_llama, Budget(kv=0.5, context=ctx), calibration=_calib(2),
                          kv_forms=forms, progress=False)  # fmt: skip
    rep = slimfx.report_of(out)
    per = rep.kv_sites[0].kv_bytes_per_token_after
    assert f"KV cache {forms[1].short()}: 2 layer(s) [0, 1], {per:.1f} B/token each" in str(rep)
    assert f"| cache @ {ctx} tokens |" in rep.to_markdown()
    assert any(f"context={ctx} exceeds the model's max_position_embeddings" in n for n in rep.notes)
    mem = slimfx.optimize(tiny_llama, Budget(memory=0.5), calibration=_calib(2),
                          kv_forms=["mla", forms[1]], progress=False)  # fmt: skip
    why = f"kv_forms [mla, {forms[1].short()}] not offered: this budget does not count the KV"
    assert any(why in n for n in slimfx.report_of(mem).notes)


@pytest.mark.slow
def test_static_cache_under_torch_compile_equals_eager(tiny_llama):
    """generate() with transformers' StaticCache: the pre-hook puts the static quantized layer
    in it, and a compiled forward gives the eager tokens (≈2 min on a 2-core CPU). With sink
    tokens, as every default candidate keeps: inductor failed on the sink reads' index
    arithmetic ("vr must not be None") before the read indices became constant tensors."""
    from transformers.cache_utils import StaticCache

    from slimfx.forms.kv.static_cache import StaticQuantizedKVLayer

    forms = [KVDenseConfig(), KVQuantConfig(4, 4, 8, 16, 0, 4)]
    out = slimfx.optimize(
        tiny_llama, Budget(kv=0.45), calibration=_calib(4), kv_forms=forms, progress=False
    )
    ids = _calib(1)[0][:, :9]
    eager = StaticCache(config=out.config, max_cache_len=64)
    want = out.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=eager)
    assert all(isinstance(layer, StaticQuantizedKVLayer) for layer in eager.layers)
    assert want.tolist() == out.generate(ids, max_new_tokens=20, do_sample=False).tolist()
    out.forward = torch.compile(out.forward)
    cache = StaticCache(config=out.config, max_cache_len=64)
    got = out.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=cache)
    assert got.tolist() == want.tolist()


def test_weights_grown_by_a_cache_form_are_noted(tiny_llama):
    forms = [KVDenseConfig(), KVLowRankConfig(16, 24, 1, "whitened", sink=2)]
    out = slimfx.optimize(
        tiny_llama, Budget(kv=0.7), calibration=_calib(3), kv_forms=forms, progress=False
    )
    rep = slimfx.report_of(out)
    assert rep.totals["bytes_ratio"] > 1  # the sinks' exact K/V keep the original k/v
    assert any("add" in n and "memory=1.0" in n for n in rep.notes)
    capped = slimfx.optimize(
        tiny_llama, Budget(memory=1.0, kv=0.7), calibration=_calib(3), kv_forms=forms,
        progress=False,
    )  # fmt: skip
    assert slimfx.report_of(capped).totals["bytes_ratio"] <= 1.0  # other linears pay for it


def test_a_mixed_width_latent_is_chosen_generates_with_its_two_stores_and_saves(
    tiny_llama, tmp_path
):
    from slimfx.forms.kv.cache import QuantizedLatentLayer
    from slimfx.forms.kv.config import KVLatentQuantConfig

    mixed = KVLatentQuantConfig(16, 24, 1, "whitened", 4, 8, 0, 0, "channel", 2, 8, 8)
    out = slimfx.optimize(
        tiny_llama, Budget(kv=0.3), calibration=_calib(), kv_forms=[KVDenseConfig(), mixed],
        progress=False,
    )  # fmt: skip
    rep = slimfx.report_of(out)
    assert {k.decision["low_bits"] for k in rep.kv_sites} == {2}
    # keys: 8 channels × 4 bits + 8 × 2; values 16 × 4 + 8 × 2; (scale, min) per 8 tokens
    assert rep.kv_sites[0].kv_bytes_per_token_after == (8 * 4 + 8 * 2 + 16 * 4 + 8 * 2) // 8 + 20
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    cache = DynamicCache()
    g = out.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    layer = cache.layers[0]
    assert isinstance(layer, QuantizedLatentLayer) and layer.n_stored == 16
    assert {n for n in layer.store if n.endswith("_codes")} == {
        "k_codes", "k_tail_codes", "v_codes", "v_tail_codes"
    }  # fmt: skip
    slimfx.save(out, tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    assert kv_forms_of(back) == kv_forms_of(out)
    assert back.generate(ids, max_new_tokens=12, do_sample=False).tolist() == g.tolist()
