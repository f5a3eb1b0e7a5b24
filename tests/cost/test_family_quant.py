"""slimfx.cost.family_quant: which quantized candidates a site gets, and their errors."""

from __future__ import annotations

import pytest
import torch

from slimfx.cost import FAMILIES
from slimfx.cost.families import SiteContext
from slimfx.ir.sites import LinearSite
from slimfx.numerics import factorize, reconstruct, relative_output_error
from slimfx.planning.configs import QuantConfig
from slimfx.planning.shapes import LinearShape


def _ctx(out_f: int, in_f: int, gram: bool, seed: int = 0) -> SiteContext:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    G = None
    if gram:  # correlated inputs: rank-8 signal plus noise
        X = torch.randn(512, 8, generator=g) @ torch.randn(8, in_f, generator=g)
        X = X + 0.05 * torch.randn(512, in_f, generator=g)
        G = (X.T @ X).to(torch.float64)
    site = LinearSite("lin", in_f, out_f, "torch.float32", False, "lin.weight", "lin")
    return SiteContext(site, W, G)


def test_families_are_registered() -> None:
    assert {"int8", "int4", "int4_gptq"} <= set(FAMILIES)


@pytest.mark.parametrize("family", ["int8", "int4", "int4_gptq"])
@pytest.mark.parametrize("gram", [True, False])
def test_errors_equal_relative_output_error_recomputed(family: str, gram: bool) -> None:
    ctx = _ctx(24, 128, gram)
    cands = FAMILIES[family](ctx)
    if family == "int4_gptq" and not gram:
        assert cands == []  # GPTQ needs a Gram matrix
        return
    assert cands
    for c in cands:
        approx = reconstruct(c.decision, factorize(ctx.weight, c.decision, ctx.gram))
        direct = relative_output_error(ctx.weight, approx, ctx.gram)
        # the family multiplies in float32 (sums in float64): measured ≤ 2e-7 relative
        assert c.error == pytest.approx(direct, rel=1e-5)
        assert 0 < c.error < 0.05  # int4/int8 on Gaussian weights: a few percent at most


def test_offered_configs_at_in_features_128() -> None:
    ctx = _ctx(16, 128, gram=True)
    got = {f: [c.decision for c in FAMILIES[f](ctx)] for f in ("int8", "int4", "int4_gptq")}
    assert got["int8"] == [QuantConfig(8, None, True), QuantConfig(8, 128, False)]
    assert got["int4"] == [
        QuantConfig(4, 32, False),
        QuantConfig(4, 64, False),
        QuantConfig(4, 128, False),
        QuantConfig(4, 128, True),
    ]
    assert got["int4_gptq"] == [QuantConfig(4, g, False, "gptq") for g in (32, 64, 128)]


def test_only_group_sizes_that_divide_in_features() -> None:
    ctx = _ctx(8, 96, gram=True)  # 96 = 3·32: g32 only
    assert [c.decision for c in FAMILIES["int4"](ctx)] == [QuantConfig(4, 32, False)]
    assert [c.decision for c in FAMILIES["int8"](ctx)] == [QuantConfig(8, None, True)]
    assert [c.decision.group_size for c in FAMILIES["int4_gptq"](ctx)] == [32]
    odd = _ctx(8, 33, gram=True)  # odd: no int4 at all, int8 per-channel only
    assert FAMILIES["int4"](odd) == [] and FAMILIES["int4_gptq"](odd) == []
    assert [c.decision for c in FAMILIES["int8"](odd)] == [QuantConfig(8, None, True)]


def test_gptq_candidates_beat_rtn_at_each_group_size() -> None:
    ctx = _ctx(32, 128, gram=True, seed=3)
    rtn = {
        c.decision.group_size: c.error for c in FAMILIES["int4"](ctx) if not c.decision.symmetric
    }
    gptq = {c.decision.group_size: c.error for c in FAMILIES["int4_gptq"](ctx)}
    for g, e in gptq.items():
        assert e < rtn[g] / 4  # correlated inputs: measured ≈ 20× lower, 4× stated margin


def test_smaller_groups_cost_more_bytes_and_err_less() -> None:
    ctx = _ctx(32, 128, gram=False, seed=4)
    asym = [c for c in FAMILIES["int4"](ctx) if not c.decision.symmetric]
    by_g = sorted(asym, key=lambda c: c.decision.group_size)
    errs = [c.error for c in by_g]
    nbytes = [c.decision.weight_bytes(LinearShape(128, 32)) for c in by_g]
    assert errs == sorted(errs) and nbytes == sorted(nbytes, reverse=True)


def test_int4_leaves_out_the_rtn_layouts_gptq_offers_better() -> None:
    """Next to int4_gptq (with a Gram) the int4 family keeps only the layout GPTQ does not
    fit (symmetric g128); alone, or without a Gram, it offers every RTN layout."""
    import dataclasses

    both = dataclasses.replace(_ctx(16, 128, gram=True, seed=3), families=("int4", "int4_gptq"))
    assert [c.decision for c in FAMILIES["int4"](both)] == [QuantConfig(4, 128, True)]
    alone = dataclasses.replace(both, families=("int4",), shared={})
    assert len(FAMILIES["int4"](alone)) == 4
    no_gram = dataclasses.replace(both, gram=None, shared={})
    assert len(FAMILIES["int4"](no_gram)) == 4
    # what is left out is priced worse by GPTQ at the same layout, every time
    rtn = {c.decision.group_size: c.error for c in FAMILIES["int4"](alone)
           if not c.decision.symmetric}
    for c in FAMILIES["int4_gptq"](both):
        assert c.error < rtn[c.decision.group_size]
