"""slimfx.cost.family_sparse: 2:4 and combined candidates, their errors, and the filter that
offers a combined form only where it beats both of its parts at equal bytes."""

from __future__ import annotations

import pytest
import torch
from _helpers import correlated_gram, gen, lowrank_plus_noise

from slimfx.cost import FAMILIES
from slimfx.cost.families import SiteContext
from slimfx.cost.family_sparse import (
    explain_lowrank_quant,
    explain_sparse24_lowrank,
    lowrank_quant_candidates,
    sparse24_candidates,
    sparse24_lowrank_candidates,
)
from slimfx.ir.sites import LinearSite
from slimfx.numerics import factorize, reconstruct, relative_output_error
from slimfx.numerics.combo import quantize
from slimfx.numerics.lowrank import lowrank_error_curve
from slimfx.numerics.quant import dequantize
from slimfx.numerics.sparse import prune24
from slimfx.planning.configs import (
    LowRankConfig,
    LowRankQuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)
from slimfx.planning.shapes import LinearShape

# one intra-op thread for this module's many small products (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(W: torch.Tensor, gram: torch.Tensor | None) -> SiteContext:
    out_f, in_f = W.shape
    site = LinearSite("lin", in_f, out_f, "torch.float32", False, "lin.weight", "lin")
    return SiteContext(site, W, gram)


@pytest.fixture(scope="module")
def ctx() -> SiteContext:
    return _ctx(lowrank_plus_noise(96, 128), correlated_gram(128))


def test_families_are_registered() -> None:
    assert FAMILIES["sparse24"] is sparse24_candidates
    assert FAMILIES["lowrank_quant"] is lowrank_quant_candidates
    assert FAMILIES["sparse24_lowrank"] is sparse24_lowrank_candidates


# ---------------------------------------------------------------------------- sparse24


def test_sparse24_offers_three_with_a_gram_one_without(ctx: SiteContext) -> None:
    cands = sparse24_candidates(ctx)
    assert [c.decision for c in cands] == [
        Sparse24Config("magnitude", False),
        Sparse24Config("wanda", False),
        Sparse24Config("wanda", True),
    ]
    assert cands[2].error < cands[1].error < cands[0].error  # comp < Wanda < magnitude here
    plain = sparse24_candidates(_ctx(ctx.weight, None))
    assert [c.decision for c in plain] == [Sparse24Config("magnitude", False)]
    assert sparse24_candidates(_ctx(torch.randn(8, 36), None)) == []  # in % 8 ≠ 0


def test_sparse24_errors_equal_the_factorized_form(ctx: SiteContext) -> None:
    # the family forms E·G in float32 (sums in float64): measured ≤ 3e-7 relative
    for c in sparse24_candidates(ctx):
        approx = reconstruct(c.decision, factorize(ctx.weight, c.decision, ctx.gram))
        assert c.error == pytest.approx(
            relative_output_error(ctx.weight, approx, ctx.gram), rel=1e-5
        )


# ----------------------------------------------------------------------- lowrank_quant


def test_lowrank_quant_kept_candidates_beat_both_parts(ctx: SiteContext) -> None:
    W, G = ctx.weight, ctx.gram
    verdicts = explain_lowrank_quant(ctx)
    kept = [v for v in verdicts if v.kept]
    assert kept, [v.reason for v in verdicts]
    assert [v.candidate for v in kept] == lowrank_quant_candidates(ctx)
    curve = lowrank_error_curve(W, G)
    quant_refs = {  # the plain int4/int8 forms, recomputed here with the same quantizer (GPTQ)
        (b, g, s): relative_output_error(W, dequantize(quantize(W, G, b, g, s), b, g, s, 128), G)
        for b, g, s in [
            (4, 32, False),
            (4, 64, False),
            (4, 128, False),
            (8, 128, False),
            (8, None, True),
        ]
    }
    from slimfx.planning.configs import QuantConfig

    for v in kept:
        d, err = v.candidate.decision, v.candidate.error
        nbytes = d.weight_bytes(LinearShape(128, 96))
        r = nbytes // LowRankConfig(1).weight_bytes(LinearShape(128, 96))
        assert err < float(curve[min(r, 96)])
        for (b, g, s), e in quant_refs.items():
            if QuantConfig(b, g, s).weight_bytes(LinearShape(128, 96)) <= nbytes:
                assert err < e, (d.short(), b, g)
        assert v.candidate.note.startswith("beats lowrank r=")


def test_lowrank_quant_errors_equal_the_factorized_form(ctx: SiteContext) -> None:
    # the family estimates exactly what factorize produces (same quantizer, same seeds)
    for c in lowrank_quant_candidates(ctx)[:3]:
        approx = reconstruct(c.decision, factorize(ctx.weight, c.decision, ctx.gram))
        direct = relative_output_error(ctx.weight, approx, ctx.gram)
        # float32 E·G products, float64 sums and the low-rank shortcut: measured ≤ 1e-6
        assert c.error == pytest.approx(direct, rel=1e-5)


def test_lowrank_quant_ladder_and_lqlora_pairs(ctx: SiteContext) -> None:
    verdicts = explain_lowrank_quant(ctx)
    lorc = [v.candidate.decision for v in verdicts if v.candidate.decision.method == "lorc"]
    # in=128: both group sizes; ranks 8/16/32 (rank 64 adds 28672 B > the 24576 B of dense)
    assert lorc == [
        LowRankQuantConfig(r, 4, g, False, "lorc") for g in (128, 64) for r in (8, 16, 32)
    ]
    by_dec = {v.candidate.decision: v for v in verdicts}
    tried = [v.candidate.decision for v in verdicts if v.candidate.decision.method == "lqlora"]
    assert tried == [
        LowRankQuantConfig(32, 4, g, False, "lqlora")
        for g in (128, 64)
        if by_dec[LowRankQuantConfig(32, 4, g, False, "lorc")].kept
    ]
    for v in verdicts:
        d = v.candidate.decision
        if d.method == "lqlora":  # tried only at r ∈ {32, 64} where LoRC was kept
            base = by_dec[LowRankQuantConfig(d.rank, 4, d.group_size, False, "lorc")]
            assert base.kept and d.rank in (32, 64)
            assert v.kept == (v.candidate.error < base.candidate.error)


def test_lowrank_quant_skips_groups_that_do_not_divide() -> None:
    # 96 = 1.5 × 64: no int4 g64/g128 form fits
    ctx = _ctx(lowrank_plus_noise(16, 96), correlated_gram(96))
    assert explain_lowrank_quant(ctx) == []


# ---------------------------------------------------------------- the filter drops combos


def test_filter_drops_combos_on_an_exactly_low_rank_weight() -> None:
    # W of rank 6: plain low-rank at any rank ≥ 6 is exact, and every combined form here has
    # the bytes of rank ≥ 6, so no combination can beat it
    g = gen(2)
    W = torch.randn(48, 6, generator=g) @ torch.randn(6, 64, generator=g)
    ctx = _ctx(W, correlated_gram(64))
    lq, sl = explain_lowrank_quant(ctx), explain_sparse24_lowrank(ctx)
    assert lq and sl
    for v in lq + sl:
        assert not v.kept
        assert "lowrank r=" in v.reason and "alone is as good" in v.reason
    assert lowrank_quant_candidates(ctx) == sparse24_lowrank_candidates(ctx) == []


def test_filter_drops_lorc_that_int4_g32_alone_beats() -> None:
    # W already on an int4 g32 grid (integer zero points): int4 g32 alone is exact (error 0),
    # and every g64 / g128 + rank-r form has at least its bytes
    W = lowrank_plus_noise(64, 128)
    W = dequantize(quantize(W, None, 4, 32, False, "rtn"), 4, 32, False, 128)
    ctx = _ctx(W, correlated_gram(128))
    verdicts = explain_lowrank_quant(ctx)
    assert verdicts and not any(v.kept for v in verdicts)
    assert all("int4 g32 asym gptq alone is as good" in v.reason for v in verdicts)


# ------------------------------------------------------------------- sparse24_lowrank


def test_sparse24_lowrank_beats_both_parts(ctx: SiteContext) -> None:
    W, G = ctx.weight, ctx.gram
    verdicts = explain_sparse24_lowrank(ctx)
    # rank 32 would store 13824 + 14336 B > the 24576 B of dense at 96×128
    assert [v.candidate.decision for v in verdicts] == [
        Sparse24LowRankConfig(r, "wanda") for r in (8, 16)
    ]
    curve = lowrank_error_curve(W, G)
    best_24 = relative_output_error(W, prune24(W, "wanda", G, True), G)
    for v in verdicts:
        assert v.kept, v.reason  # measured: S+L r=8 0.018, r=16 0.0096 vs 2:4+comp 0.047
        nbytes = v.candidate.decision.weight_bytes(LinearShape(128, 96))
        assert v.candidate.error < best_24
        assert v.candidate.error < float(curve[min(nbytes // (2 * (128 + 96)), 96)])
    c = sparse24_lowrank_candidates(ctx)[0]
    approx = reconstruct(c.decision, factorize(W, c.decision, G))
    assert c.error == pytest.approx(relative_output_error(W, approx, G), rel=1e-5)


def test_sparse24_lowrank_without_gram_uses_magnitude() -> None:
    ctx = _ctx(lowrank_plus_noise(32, 64), None)
    verdicts = explain_sparse24_lowrank(ctx)
    assert {v.candidate.decision.mask for v in verdicts} == {"magnitude"}
    assert explain_sparse24_lowrank(_ctx(torch.randn(8, 36), None)) == []
