"""Attention steps priced for latency: every KV-cache and MLA form's ``step_work`` against its
exact cache bytes, the roofline over it (``cost.target.estimate_attention_latency``), and a
latency budget next to a KV budget (the cache read counts; a form that owns k_proj / v_proj
pays for the projections it replaces)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import slimfx
from slimfx.cost.target import TARGETS, estimate_attention_latency
from slimfx.forms.kv.config import (
    KVDecision,
    KVDenseConfig,
    KVLatentQuantConfig,
    KVLowRankConfig,
    KVQuantConfig,
)
from slimfx.forms.mla.config import MLAConfig
from slimfx.planning.problem import Budget, InfeasibleBudgetError
from slimfx.planning.shapes import AttentionShape

pytestmark = pytest.mark.usefixtures("one_thread")

SMOL = AttentionShape(576, 9, 3, 64, 64)
FORMS = [
    KVDenseConfig(),
    KVQuantConfig(4, 4, 32, 64, 0, 4),
    KVQuantConfig(2, 2, 32, 32, 16, 0),
    KVLowRankConfig(96, 192, 1, "whitened", 4),
    KVLowRankConfig(48, 96, 3, "whitened", 0),
    KVLatentQuantConfig(88, 136, 1, "whitened", 4, 64, 0, 4, "channel", 2, 48, 72),
    KVLatentQuantConfig(64, 64, 1, "whitened", 8, 32, 8, 0),
    MLAConfig(rank=144, rope_pairs=8),
    MLAConfig(rank=96, rope_pairs=4, latent_bits=8),
]
#: an H100 without launch overheads: the tiny test model's steps are otherwise all launches
H100_NO_LAUNCH = dataclasses.replace(TARGETS["h100"], launch_s=0.0)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.short())
@pytest.mark.parametrize("context", [1, 3, 4, 37, 100, 8192])
@pytest.mark.parametrize("tokens", [1, 5])
def test_a_step_reads_exactly_the_cache(form, context, tokens):
    """Floats at 16 bits plus codes and scales are the cache's exact bytes after the step."""
    w = form.step_work(SMOL, context, tokens)
    after = max(context, tokens)
    assert 2 * w.cache_floats + w.cache_ints == form.cache_bytes(SMOL, after)
    assert min(w.cache_floats, w.cache_ints, w.weight_floats, w.rebuilt) >= 0
    assert w.flops > 0 and w.launches >= 1
    assert w.weight_floats == 0 if not form.owns else w.weight_floats > 0


def test_the_dense_step_is_attention_over_the_cache():
    w = KVDenseConfig().step_work(SMOL, 1000)
    assert (w.cache_floats, w.cache_ints, w.rebuilt) == (1000 * 2 * 192, 0, 0)
    assert w.flops == 4 * 9 * 64 * 1000  # scores and weighted values, every query head
    # memory bound on an H100: twice the context, twice the time (launches aside)
    t1, t2 = (
        estimate_attention_latency(KVDenseConfig(), SMOL, H100_NO_LAUNCH, "decode", c)
        for c in (16384, 32768)
    )
    assert t2 == pytest.approx(2 * t1, rel=1e-9)
    assert t1 == pytest.approx(16384 * 2 * 192 * 2 / 3.35e12, rel=1e-9)
    # every sequence of the batch reads its own cache
    t8 = estimate_attention_latency(KVDenseConfig(), SMOL, H100_NO_LAUNCH, "decode", 16384, 8)
    assert t8 == pytest.approx(8 * t1, rel=1e-9)
    # a low-rank form reads its factors once per step, whatever the batch
    lr = KVLowRankConfig(96, 192, 1, "whitened", 0)
    w = lr.step_work(SMOL, 64)
    one, two = (estimate_attention_latency(lr, SMOL, H100_NO_LAUNCH, "decode", 64, b) for b in (1, 2))
    per_seq = (w.cache_floats + 2 * w.rebuilt) * 2 / 3.35e12
    assert two - one == pytest.approx(per_seq, rel=1e-9)


def test_fused_and_reference_runtimes_price_a_quantized_cache_differently():
    """An H100 decode step reads the int4 store in place (fewer bytes than 16-bit); PyTorch on
    a CPU dequantizes it first (more bytes than 16-bit); a prefill step never runs fused."""
    q = KVQuantConfig(4, 4, 32, 64, 0, 4)
    dense, quant = (
        estimate_attention_latency(f, SMOL, H100_NO_LAUNCH, "decode", 32768, batch=8)
        for f in (KVDenseConfig(), q)
    )
    assert quant < 0.35 * dense  # about 4.5 of 16 bits
    cpu = [estimate_attention_latency(f, SMOL, "cpu", "decode", 32768) for f in (KVDenseConfig(), q)]
    assert cpu[1] > cpu[0]
    w = q.step_work(SMOL, 32768)
    assert w.dequantizes and w.fused and w.rebuilt == q.quantized_tokens(32768) * 2 * 192
    pre = [
        estimate_attention_latency(f, SMOL, H100_NO_LAUNCH, "prefill", 32768)
        for f in (KVDenseConfig(), q)
    ]
    assert pre[1] > pre[0]


def test_low_rank_steps_pay_the_rebuild_and_their_projections():
    lr = KVLowRankConfig(96, 192, 1, "whitened", 0)
    w = lr.step_work(SMOL, 4096)
    assert w.cache_floats == 4096 * 288 and w.weight_floats == 288 * (576 + 192)
    cos_sin = 2 * 4096 * 64  # cos and sin of every cached position
    assert w.rebuilt == 4096 * 192 + cos_sin  # keys rebuilt; one-token steps keep values latent
    assert lr.step_work(SMOL, 4096, 2).rebuilt == 2 * 4096 * 192 + cos_sin
    # ONNX Runtime runs the branch-free step graph: one-token steps absorb the values too (an
    # If on the call length), and with sinks the original k/v projections run on every step
    s4 = KVLowRankConfig(96, 192, 1, "whitened", 4)
    b = s4.step_work(SMOL, 4096, branchless=True)
    assert b.rebuilt == 4096 * 192 + cos_sin
    assert s4.step_work(SMOL, 4096, 2, branchless=True).rebuilt == 2 * 4096 * 192 + cos_sin
    assert b.weight_floats == s4.step_work(SMOL, 4096).weight_floats + 2 * 576 * 192
    ort, cpu = (estimate_attention_latency(s4, SMOL, t, "decode", 4096) for t in ("ort-cpu", "cpu"))
    assert ort > cpu
    # the rebuild is 2·C·rank·width FLOPs on top of the attention
    assert w.flops > 2 * 4096 * 96 * 192 + 2 * 9 * 64 * 4096
    # no fused kernel: the same bytes on every target, and slower than 16-bit at long context
    cpu = [estimate_attention_latency(f, SMOL, "cpu", "decode", 8192) for f in (KVDenseConfig(), lr)]
    assert cpu[1] > cpu[0]
    # the quantized latent reads fewer bytes but dequantizes the store first
    lq = KVLatentQuantConfig(96, 192, 1, "whitened", 4, 64, 0, 0, "channel")
    wq = lq.step_work(SMOL, 4096)
    assert wq.cache_floats < w.cache_floats and wq.dequantizes and not wq.fused
    assert wq.rebuilt == w.rebuilt + lq.quantized_tokens(4096) * 288


def test_mla_decode_attends_over_the_latent():
    m = MLAConfig(rank=144, rope_pairs=8)
    w = m.step_work(SMOL, 4096)
    n2 = 2 * 3 * 8
    assert w.cache_floats == 4096 * (144 + n2) and w.fused
    assert w.rebuilt == 0  # the heads are rows of one product over the cache: no key row built
    assert m.step_work(SMOL, 4096, 7).rebuilt == 4096 * 2 * 192  # prefill rebuilds K and V
    # an int8 latent is dequantized whole by the cache layer: not read in place
    m8 = MLAConfig(rank=144, rope_pairs=8, latent_bits=8)
    w8 = m8.step_work(SMOL, 4096)
    assert not w8.fused and w8.dequantizes and w8.rebuilt == 4096 * 144
    fused = estimate_attention_latency(m, SMOL, H100_NO_LAUNCH, "decode", 32768, batch=8)
    dense = estimate_attention_latency(KVDenseConfig(), SMOL, H100_NO_LAUNCH, "decode", 32768, 8)
    assert fused < dense * (144 + n2) / 384 * 1.05  # bandwidth bound over the latent


def test_a_form_without_step_work_is_not_priced():
    @dataclasses.dataclass(frozen=True)
    class Unpriced(KVDecision):
        pass

    with pytest.raises(NotImplementedError, match="Unpriced does not define step_work"):
        estimate_attention_latency(Unpriced(), SMOL, "cpu", "decode", 16)
    with pytest.raises(ValueError, match="context must be a positive int"):
        KVDenseConfig().step_work(SMOL, 0)


def test_a_latency_budget_with_a_kv_budget_needs_a_context():
    with pytest.raises(ValueError, match=r"give context="):
        Budget(latency=0.5, kv=0.5)
    Budget(latency=0.5, kv=0.5, context=4096, batch=8)  # the batch the steps read for


def _calib(n: int = 4, T: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (1, T), generator=g) for _ in range(n)]


FORMS_TINY = [KVDenseConfig(), KVQuantConfig(4, 4, 8, 16, 0, 0), KVLowRankConfig(16, 24, 1, "whitened", 0)]


def test_a_latency_budget_buys_a_fused_cache_at_long_context(tiny_llama):
    """On an H100 at 32k tokens the attention steps dominate the tiny model's decode: a latency
    budget alone (kv=1.0 limits no bytes) makes the solver quantize the cache; on a CPU,
    where the quantized cache is dequantized before attention, the same budget is infeasible."""
    b = Budget(latency=0.6, kv=1.0, context=32768)
    out = slimfx.optimize(
        tiny_llama, b, calibration=_calib(), kv_forms=FORMS_TINY, progress=False,
        target=H100_NO_LAUNCH,
    )  # fmt: skip
    rep = slimfx.report_of(out)
    assert [k.chosen for k in rep.kv_sites] == ["kv int4 gk8 gv16 r0"] * 2
    assert rep.totals["est_latency_ratio"] <= 0.6
    for k in rep.kv_sites:
        assert k.latency_after_s < 0.5 * k.latency_before_s
    table = rep.to_markdown().split("## KV cache")[1]
    assert "| latency |" in table and "| ×0.4" in table
    with pytest.raises(InfeasibleBudgetError, match=r"latency budget 0.600 .* is infeasible"):
        slimfx.optimize(tiny_llama, b, calibration=_calib(), kv_forms=FORMS_TINY, progress=False)


def test_an_owning_form_pays_for_the_projections_it_replaces(tiny_llama):
    """The low-rank cache covers k_proj and v_proj: their dense time stays in the report's
    'before', and the chosen option's time includes the factors it runs instead (before this
    was priced, choosing it made the two projections' time vanish)."""
    forms = [KVDenseConfig(), KVLowRankConfig(16, 24, 1, "whitened", 0)]
    out = slimfx.optimize(
        tiny_llama, Budget(kv=0.7, context=64), calibration=_calib(), kv_forms=forms,
        progress=False,
    )  # fmt: skip
    rep = slimfx.report_of(out)
    kv0 = rep.kv_sites[0]
    assert kv0.chosen.startswith("kv lowrank") and kv0.owns
    owned = [s for s in rep.sites if s.fqn in kv0.owns]
    assert all(s.latency_before_s > 0 and s.latency_after_s == 0 for s in owned)
    shape = AttentionShape(64, 4, 2, 16, 16, layer_idx=0)
    lr = forms[1]
    want = estimate_attention_latency(lr, shape, "cpu", "decode", 64)
    assert kv0.latency_after_s == pytest.approx(want, rel=1e-12)
    w = lr.step_work(shape, 64)
    assert kv0.latency_after_s >= w.weight_floats * 4 / TARGETS["cpu"].bandwidth_Bps
    lat0 = sum(s.latency_before_s for s in [*rep.sites, *rep.kv_sites])
    lat1 = sum(s.latency_after_s for s in [*rep.sites, *rep.kv_sites])
    assert rep.totals["est_latency_ratio"] == pytest.approx(lat1 / lat0, abs=1e-4)
    assert [c["latency_s"] > 0 for c in kv0.candidates] == [True, True]
    # replaying the plan prices the attention steps again, as the solve did
    plan = slimfx.Plan.from_dict(rep.meta["plan"])
    again = slimfx.report_of(slimfx.optimize(
        tiny_llama, Budget(kv=0.7, context=64), plan=plan, calibration=_calib(), progress=False
    ))  # fmt: skip
    assert again.kv_sites[0].latency_after_s == pytest.approx(kv0.latency_after_s, rel=1e-12)
    assert again.kv_sites[0].latency_before_s == pytest.approx(kv0.latency_before_s, rel=1e-12)
    assert [s.latency_before_s for s in again.sites if s.fqn in kv0.owns] == pytest.approx(
        [s.latency_before_s for s in owned], rel=1e-12
    )


def test_without_a_context_the_cache_read_is_not_priced_and_a_note_says_so(tiny_llama):
    forms = [KVDenseConfig(), KVLowRankConfig(16, 24, 1, "whitened", 0)]
    out = slimfx.optimize(
        tiny_llama, Budget(kv=0.7), calibration=_calib(), kv_forms=forms, progress=False
    )
    rep = slimfx.report_of(out)
    assert any("cache read is not priced" in n for n in rep.notes)
    kv0 = rep.kv_sites[0]
    shape = AttentionShape(64, 4, 2, 16, 16, layer_idx=0)
    assert kv0.latency_after_s == pytest.approx(
        estimate_attention_latency(forms[1], shape, "cpu", "decode", 1), rel=1e-12
    )


def test_reprice_prices_attention_sites_for_another_target(tiny_llama):
    """cost.candidates.reprice of a problem with attention sites (it raised KeyError on them):
    the attention options are priced for the new target at the problem's context and batch,
    as the solve prices them; the linear sites keep their shapes and kinds."""
    from slimfx.cost.candidates import reprice
    from slimfx.stages import plan_model

    b = Budget(latency=1.0, kv=1.0, context=512, batch=4)
    pl = plan_model(tiny_llama, b, calibration=_calib(), kv_forms=FORMS_TINY, progress=False)
    assert pl.problem.meta["kv_context"] == 512 and pl.problem.meta["kv_batch"] == 4
    on_h100 = plan_model(
        tiny_llama, b, calibration=_calib(), kv_forms=FORMS_TINY, progress=False, target="h100"
    )
    again = reprice(pl.problem, pl.sites, target="h100")
    for so in again.sites:
        want = on_h100.problem.site(so.name)
        assert so.kind == want.kind and so.shape == want.shape
        assert [o.latency_s for o in so.options] == pytest.approx(
            [o.latency_s for o in want.options], rel=1e-12
        )
    att = again.site("model.layers.0.self_attn")
    dense = estimate_attention_latency(KVDenseConfig(), att.shape, "h100", "decode", 512, 4)
    assert att.dense_latency_s == pytest.approx(dense, rel=1e-12)
