"""Low-rank candidates and build_problem: errors on the one output-error scale, bytes, ties."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfx.cost.calibration import CalibrationStats, collect_stats
from slimfx.cost.candidates import LOWRANK_FRACTIONS, build_problem, lowrank_ranks, reprice
from slimfx.cost.families import FAMILIES
from slimfx.cost.target import MeasuredCache, estimate_latency
from slimfx.ir.sites import LinearSite
from slimfx.numerics import factorize, reconstruct
from slimfx.numerics.lowrank import lowrank_error_curve
from slimfx.planning.configs import DenseConfig, LowRankConfig
from slimfx.planning.problem import BudgetProblem
from slimfx.planning.shapes import LinearShape

from . import llama_sites


def _site(fqn: str, in_f: int, out_f: int, tied: tuple[str, ...] = ()) -> LinearSite:
    return LinearSite(fqn, in_f, out_f, "torch.float64", False, f"{fqn}.weight", fqn, tied)


def _problem_data(out_f: int = 48, in_f: int = 32, tokens: int = 200, damp: float = 0.0):  # noqa: ANN202
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    # correlated, unevenly scaled inputs so the whitened and plain SVDs differ
    mix = torch.randn(in_f, in_f, generator=gen, dtype=torch.float64)
    mix *= torch.logspace(0, -2, in_f, dtype=torch.float64)
    X = torch.randn(tokens, in_f, generator=gen, dtype=torch.float64) @ mix
    # damp=0: the estimate must equal the error measured on X itself, exactly
    stats = CalibrationStats({"lin": X.T @ X}, {"lin": tokens}, {"lin": "lin"}, damp=damp)
    return W, X, stats


def test_rank_ladder() -> None:
    ranks = lowrank_ranks(64, 128)
    assert ranks == sorted(set(ranks)) and len(ranks) == len(LOWRANK_FRACTIONS)
    dense = 2 * 64 * 128
    fracs = [LowRankConfig(r).weight_bytes(LinearShape(64, 128)) / dense for r in ranks]
    for f, target in zip(fracs, LOWRANK_FRACTIONS):
        assert f <= target and (target - f) * dense < 2 * (64 + 128)  # the largest r below f
    assert lowrank_ranks(4, 4) == [1]  # 8 bytes·r < 16: only r = 1 saves
    assert lowrank_ranks(2, 2) == []
    assert all(r * (70 + 5) < 70 * 5 for r in lowrank_ranks(70, 5))


def test_error_equals_measured_output_error() -> None:
    W, X, stats = _problem_data()
    problem, cands = build_problem(
        [_site("lin", 32, 48)], {"lin": W}, stats, families=("lowrank",), progress=False
    )
    opts = problem.site("lin").options[1:]
    # with a Gram only the whitened ladder is offered (it dominates plain SVD)
    assert [o.decision for o in opts] == [LowRankConfig(r, "whitened") for r in lowrank_ranks(32, 48)]
    ref = ((W @ X.T) ** 2).sum()
    for o in opts:
        W_hat = reconstruct(o.decision, factorize(W, o.decision, stats.gram("lin")))
        measured = (((W - W_hat) @ X.T) ** 2).sum() / ref
        # float64 throughout; the estimate comes from eigenvalues, the measurement from X itself
        assert o.error == pytest.approx(float(measured), rel=1e-7, abs=1e-12)
    assert [c.decision for c in cands["lin"]] == [o.decision for o in opts]
    # the plain-SVD curve's errors equal the measured ones too, and are never lower
    plain = lowrank_error_curve(W, stats.gram("lin"), "svd")
    for o in opts:
        d = LowRankConfig(o.decision.rank, "svd")
        W_hat = reconstruct(d, factorize(W, d, None))
        measured = (((W - W_hat) @ X.T) ** 2).sum() / ref
        assert float(plain[d.rank]) == pytest.approx(float(measured), rel=1e-7, abs=1e-12)
        assert o.error <= float(plain[d.rank]) + 1e-12


def test_whitened_beats_plain_and_sensitivity_scales() -> None:
    W, _, stats = _problem_data()
    p1, _ = build_problem([_site("lin", 32, 48)], {"lin": W}, stats, progress=False)
    err = {o.decision.rank: o.error for o in p1.site("lin").options[1:]}
    plain = lowrank_error_curve(W, stats.gram("lin"), "svd")
    assert any(err[r] < 0.9 * float(plain[r]) for r in lowrank_ranks(32, 48))
    stats.sensitivity = {"lin": 2.5}
    p2, _ = build_problem([_site("lin", 32, 48)], {"lin": W}, stats, progress=False)
    for a, b in zip(p1.site("lin").options, p2.site("lin").options):
        assert b.error == pytest.approx(2.5 * a.error, rel=1e-12)


def test_llama_problem(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = llama_sites(tiny_llama, tiny_ids)
    stats = collect_stats(tiny_llama, sites, [tiny_ids], progress=False)
    weights = {n: p.detach() for n, p in tiny_llama.named_parameters()}
    problem, cands = build_problem(
        sites, weights, stats, target="h100", workload="prefill", progress=False
    )
    assert [s.name for s in problem.sites] == [s.fqn for s in sites]
    assert problem.target == "h100" and problem.workload == "prefill"
    for site in sites:
        so = problem.site(site.fqn)
        dense = so.options[0]
        assert isinstance(dense.decision, DenseConfig) and dense.error == 0.0
        assert so.dense_bytes == dense.bytes == 2 * site.numel
        assert so.dense_latency_s == dense.latency_s > 0
        extra = 2 * site.numel if site.tied else 0
        shape = LinearShape(site.in_features, site.out_features)
        for o in so.options[1:]:
            # candidates only where bytes are saved; a tied site also pays the dense copy
            assert o.decision.weight_bytes(shape) < 2 * site.numel
            assert o.bytes == o.decision.weight_bytes(shape) + extra
            assert 0 <= o.error <= 1 and o.flops == o.decision.flops(shape, 2048)
        assert {o.decision.method for o in so.options[1:]} == {"whitened"}
        assert len(cands[site.fqn]) == len(so.options) - 1
    head = problem.site("lm_head")
    assert any(s.tied for s in sites if s.fqn == "lm_head")
    assert all(o.bytes > head.dense_bytes for o in head.options[1:])
    again = BudgetProblem.from_json(problem.to_json())
    assert again.to_json() == problem.to_json()
    assert problem.meta["latency_sources"] == {
        "roofline": sum(len(s.options) for s in problem.sites)
    }


def test_without_calibration_only_plain_svd() -> None:
    W, _, _ = _problem_data()
    problem, _ = build_problem([_site("lin", 32, 48)], {"lin.weight": W}, None, progress=False)
    methods = {o.decision.method for o in problem.site("lin").options[1:]}
    assert methods == {"svd"} and problem.meta["calibrated"] is False


def test_deterministic_and_measured_latency(tmp_path) -> None:  # noqa: ANN001
    W, _, stats = _problem_data()
    site = _site("lin", 32, 48)
    a, _ = build_problem([site], {"lin": W}, stats, progress=False)
    b, _ = build_problem([site], {"lin": W}, stats, progress=False)
    assert a.to_json() == b.to_json()
    cache = MeasuredCache(tmp_path / "c.json")
    d = LowRankConfig(rank=lowrank_ranks(32, 48)[0], method="svd")
    cache.put(MeasuredCache.key("linear", 1, 32, 48, "torch.float64", d, "cpu"), 3e-6)
    p, _ = build_problem([site], {"lin": W}, stats, cache=cache, progress=False)
    got = {o.decision: (o.latency_s, o.source) for o in p.site("lin").options}
    assert d not in got  # with a Gram the whitened ladder alone is offered
    assert got[LowRankConfig(d.rank, "whitened")] == (3e-6, "measured")  # same kernels
    assert p.meta["latency_sources"] == {"measured": 1, "roofline": len(got) - 1}
    dense = got[DenseConfig()]
    dense_s = estimate_latency(DenseConfig(), LinearShape(32, 48), False, "cpu", "decode")
    assert dense == (dense_s, "roofline")


def test_reprice_keeps_errors_and_bytes_and_prices_again(tmp_path) -> None:  # noqa: ANN001
    """reprice: new measurements (or another workload) without new candidates — the same
    options, bytes and errors; latencies as build_problem would have priced them."""
    W, _, stats = _problem_data()
    site = _site("lin", 32, 48)
    base, _ = build_problem([site], {"lin": W}, stats, families=("lowrank", "int8"),
                            progress=False)
    cache = MeasuredCache(tmp_path / "c.json")
    for o in base.site("lin").options:
        cache.put(MeasuredCache.key("linear", 1, 32, 48, "torch.float64", o.decision, "cpu"), 1e-3)
    again = reprice(base, [site], target="cpu", cache=cache)
    direct, _ = build_problem([site], {"lin": W}, stats, families=("lowrank", "int8"),
                              cache=cache, progress=False)
    assert again.to_json() == direct.to_json()
    old, new = base.site("lin").options, again.site("lin").options
    assert [(o.decision, o.bytes, o.error) for o in old] == [
        (o.decision, o.bytes, o.error) for o in new
    ]
    assert {(o.latency_s, o.source) for o in new} == {(1e-3, "measured")}
    assert again.site("lin").dense_latency_s == 1e-3
    assert again.meta["latency_sources"] == {"measured": len(new)}
    pre = reprice(base, [site], target="cpu", workload="prefill")
    pre_direct, _ = build_problem([site], {"lin": W}, stats, families=("lowrank", "int8"),
                                  workload="prefill", progress=False)
    assert pre.to_json() == pre_direct.to_json() and pre.workload == "prefill"
    with pytest.raises(KeyError, match="no site for 1 problem site"):
        reprice(base, [_site("other", 32, 48)], target="cpu")


def test_unknown_family_lists_registered() -> None:
    W, _, stats = _problem_data()
    with pytest.raises(ValueError, match=r"unknown candidate family \['int3'\].*'lowrank'"):
        build_problem([_site("lin", 32, 48)], {"lin": W}, stats, families=("int3",))
    assert "lowrank" in FAMILIES
    with pytest.raises(KeyError, match="no weight for site 'lin'"):
        build_problem([_site("lin", 32, 48)], {}, stats, progress=False)


def test_damped_gram_is_what_candidates_estimate_against() -> None:
    """With the default 1% ridge, the estimate is the error under G + λI (λ = 1% of the mean
    diagonal), and the whitened factors are fitted to that same matrix."""
    W, X, stats = _problem_data(damp=0.01)
    G = X.T @ X
    Gd = stats.fit_gram("lin")
    lam = 0.01 * float(G.diagonal().mean())
    torch.testing.assert_close(Gd, G + lam * torch.eye(G.shape[0], dtype=G.dtype))
    problem, _ = build_problem(
        [_site("lin", 32, 48)], {"lin": W}, stats, families=("lowrank",), progress=False
    )
    for o in problem.site("lin").options[1:]:
        W_hat = reconstruct(o.decision, factorize(W, o.decision, Gd))
        E = W - W_hat
        direct = float(((E @ Gd) * E).sum() / ((W @ Gd) * W).sum())
        assert o.error == pytest.approx(direct, rel=1e-7, abs=1e-12)


def test_underdetermined_groups_are_listed() -> None:
    _, _, stats = _problem_data(tokens=20)  # 20 tokens for 32 inputs: singular Gram
    assert stats.underdetermined() == {"lin": (20, 32)}


def test_per_kind_weights_multiply_each_option_by_its_kinds_weight() -> None:
    """``kind_sensitivity`` ("probe-kind"): a quantized option's error carries the quant
    weight, a low-rank option's the low-rank weight; a kind without its own weight (and the
    site's reported sensitivity) uses the site weight."""
    W, _, stats = _problem_data(damp=0.01)
    fams = ("lowrank", "int8", "sparse24")
    base, _ = build_problem([_site("lin", 32, 48)], {"lin": W}, stats, families=fams,
                            progress=False)
    stats.sensitivity = {"lin": 3.0}
    stats.kind_sensitivity = {"lin": {"quant": 0.5, "lowrank": 7.0}}
    p, _ = build_problem([_site("lin", 32, 48)], {"lin": W}, stats, families=fams,
                         progress=False)
    want = {"dense": 0.0, "quant": 0.5, "lowrank": 7.0, "sparse24": 3.0}
    kinds = set()
    for a, b in zip(base.site("lin").options, p.site("lin").options):
        assert a.decision == b.decision
        kinds.add(b.decision.kind)
        assert b.error == pytest.approx(want[b.decision.kind] * a.error, rel=1e-12, abs=0.0)
    assert kinds == set(want)
    assert p.site("lin").sensitivity == 3.0
    # each option says the weight its error carries where it is not the site's (the report
    # divides by it to show the site's own relative error)
    for b in p.site("lin").options:
        k = b.decision.kind
        assert b.weight == (None if k in ("dense", "sparse24") else want[k])
