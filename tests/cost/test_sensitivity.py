"""Probe-based loss sensitivity (slimfx.cost.sensitivity): it ranks sites by their measured loss
change behind and outside a norm, one huge site does not zero the others, and the K-FAC error
is the exact E[(gᵀΔWx)²] when g and x are independent."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfx.cost.calibration import collect_sensitivity, collect_stats
from slimfx.cost.sensitivity import (
    FLOOR,
    KIND_PROBE,
    PROBES,
    exact_error,
    kfac_error,
    kind_weights,
    probe_deltas,
    robust_normalize,
)
from slimfx.ir.sites import LinearSite


class _NormNet(nn.Module):
    """head(rmsnorm(a(x)) + tanh(b(x))): ``a`` feeds a scale-invariant norm (four of its
    output units 30× the others, like the outlier channels of a real decoder), ``b`` does not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64, bias=False)
        self.b = nn.Linear(64, 64, bias=False)
        self.norm = nn.RMSNorm(64, elementwise_affine=False)
        self.head = nn.Linear(64, 16, bias=False)
        with torch.no_grad():
            self.a.weight[:4].mul_(30.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.a(x)) + torch.tanh(self.b(x)))


def _site(fqn: str, m: nn.Linear) -> LinearSite:
    return LinearSite(
        fqn, m.in_features, m.out_features, "torch.float32", False, f"{fqn}.weight", fqn
    )


def _distortion_setup(net: nn.Module):
    """Calibration inputs, the dense outputs, and a loss whose gradient is a pseudo-gradient
    z ~ N(0, I) of the distortion ½‖f − f_dense‖² (its Hessian in output space is I; its own
    gradient vanishes at the dense model)."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(256, 64, generator=gen) for _ in range(4)]
    with torch.no_grad():
        ref = [net(x) for x in xs]
    zgen = torch.Generator().manual_seed(2)

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = m(x)
        return (torch.randn(out.shape, generator=zgen) * out).sum(-1).mean()

    def distortion() -> float:
        with torch.no_grad():
            return sum(
                0.5 * float((net(x) - r).square().sum(-1).mean()) for x, r in zip(xs, ref)
            ) / len(xs)

    return xs, loss_fn, distortion


def test_weighting_ranks_sites_by_their_measured_loss_change() -> None:
    net = _NormNet()
    xs, loss_fn, distortion = _distortion_setup(net)
    sites = [_site(n, getattr(net, n)) for n in ("a", "b", "head")]
    stats, rec = collect_sensitivity(net, sites, xs, loss_fn=loss_fn, progress=False)
    assert stats.estimator == "probe"
    assert all(p.grad is None for p in net.parameters())
    for probe in PROBES:
        measured, predicted = {}, {}
        for s in sites:
            m = getattr(net, s.fqn)
            W = m.weight.detach().clone()
            with torch.no_grad():  # the test measures the loss change of the compressed site
                m.weight.copy_(W - rec.deltas[s.fqn][probe])
                measured[s.fqn] = distortion()
                m.weight.copy_(W)
            tokens = stats.tokens[stats.group_of(s.fqn)]
            rel = rec.predicted(s.fqn, stats.fit_gram(s.fqn), tokens)[probe]["rel"]
            # what the solver sums: weight · relative error (× the scale, in loss units)
            predicted[s.fqn] = stats.sensitivity_of(s.fqn) * stats.sensitivity_scale * rel
        assert sorted(measured, key=measured.get) == sorted(predicted, key=predicted.get), (
            probe, measured, predicted)
    # int4 is a small perturbation: the exact second-order estimate is within 15% of the
    # measured change (the Hessian is sampled from 1024 pseudo-gradients)
    for s in sites:
        m = getattr(net, s.fqn)
        W = m.weight.detach().clone()
        with torch.no_grad():
            m.weight.copy_(W - rec.deltas[s.fqn]["int4_g128"])
            got = distortion()
            m.weight.copy_(W)
        tokens = stats.tokens[stats.group_of(s.fqn)]
        est = rec.predicted(s.fqn, stats.fit_gram(s.fqn), tokens)["int4_g128"]["probe"]
        assert est == pytest.approx(got, rel=0.15)


def test_one_huge_site_does_not_zero_the_others() -> None:
    raw = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 1e9, "e": 1e-6}
    w, scale = robust_normalize(raw)
    assert scale == 2.0  # the median
    assert (w["a"], w["b"], w["c"]) == (0.5, 1.0, 2.0)
    assert w["d"] == 5e8 and w["e"] == FLOOR  # raised to the floor, not ≈0

    # end to end: the head's loss scaled by 1e4 makes it a huge site; the mean-normalized
    # Fisher product pushes a and b to ≈0, the median-normalized probe weight keeps them
    net = _NormNet()
    xs, base_loss, _ = _distortion_setup(net)

    def loud(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base_loss(m, x) + 1e4 * m.head(x.new_ones(1, 64)).sum()  # only head's out grows

    sites = [_site(n, getattr(net, n)) for n in ("a", "b", "head")]
    fisher = collect_stats(net, sites, xs, fisher=True, loss_fn=loud, progress=False).sensitivity
    probe = collect_sensitivity(net, sites, xs, loss_fn=loud, progress=False)[0].sensitivity
    assert fisher["head"] > 2.9 and max(fisher["a"], fisher["b"]) < 1e-4
    assert probe["head"] > 1e3 and min(probe["a"], probe["b"]) >= FLOOR
    assert max(probe["a"], probe["b"]) == 1.0  # median of three: one of them


def test_kfac_error_is_exact_under_the_kronecker_assumption() -> None:
    gen = torch.Generator().manual_seed(0)
    dW = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    X = torch.randn(40, 5, generator=gen, dtype=torch.float64) @ torch.randn(
        5, 5, generator=gen, dtype=torch.float64)
    G = torch.randn(30, 6, generator=gen, dtype=torch.float64) @ torch.randn(
        6, 6, generator=gen, dtype=torch.float64)
    # every (x, g) pair: x and g independent, so E[(gᵀΔWx)²] factorizes exactly
    xs = X.repeat(G.shape[0], 1)
    gs = G.repeat_interleave(X.shape[0], 0)
    direct = exact_error(dW, xs, gs)
    sx, sg = X.T @ X / X.shape[0], G.T @ G / G.shape[0]
    assert kfac_error(dW, sx, sg) == pytest.approx(direct, rel=1e-10)
    # the diagonal form equals the full one for a diagonal Σg
    d = sg.diagonal()
    assert kfac_error(dW, sx, d) == pytest.approx(kfac_error(dW, sx, torch.diag(d)), rel=1e-12)


def test_probe_deltas_are_the_two_probe_compressions() -> None:
    W = torch.randn(48, 256)
    d = probe_deltas(W)
    assert set(d) == set(PROBES)
    r = int(0.25 * 48 * 256 // (48 + 256))
    kept = (W - d["lowrank_0.25"]).double()  # fp32 reconstruction: rank up to 1e-4 rounding
    assert int(torch.linalg.matrix_rank(kept, rtol=1e-4)) == r
    # int4 RTN g128: relative weight error at the usual level of 4-bit rounding
    rel = float(d["int4_g128"].square().sum() / W.square().sum())
    assert 1e-3 < rel < 2e-2


def test_unknown_estimator_is_rejected() -> None:
    net = _NormNet()
    with pytest.raises(ValueError, match="unknown sensitivity estimator 'hessian'"):
        collect_stats(net, [_site("a", net.a)], [torch.randn(4, 64)], fisher=True,
                      estimator="hessian", loss_fn=lambda m, x: m(x).sum(), progress=False)


def test_measured_estimator_agrees_with_the_second_order_one_and_leaves_the_model() -> None:
    """estimator="measured" runs each probe through the model (KL to dense); for these small
    perturbations it must agree with the gradient-based second-order estimate: same scale
    (KL ≈ ½ δᵀFδ) within 25% (empirical vs true Fisher, 128 tokens), same sites singled out."""
    from slimfx.api import find_sites
    from slimfx.models import tiny_llama

    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 256, (1, 32), generator=g) for _ in range(4)]
    sites = [s for s in find_sites(model, ((), {"input_ids": ids[0], "use_cache": False}))[0]
             if not s.tied]
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    meas = collect_stats(model, sites, ids, fisher=True, estimator="measured", progress=False)
    probe = collect_stats(model, sites, ids, fisher=True, estimator="probe", progress=False)
    assert all(torch.equal(snap[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    assert meas.estimator == "measured" and min(meas.sensitivity.values()) >= FLOOR
    assert meas.sensitivity_scale == pytest.approx(probe.sensitivity_scale, rel=0.25)
    # both single out the same four sites (v/o projections, ≥ 5× the median) and floor the
    # same ones (q/k: attention over 32 random tokens barely depends on them)
    for w in (meas.sensitivity, probe.sensitivity):
        assert {k for k, v in w.items() if v > 5} == {
            f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "vo"}
        assert {k for k, v in w.items() if v == FLOOR} == {
            f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qk"}
    with pytest.raises(ValueError, match="with loss_fn use estimator='probe'"):
        collect_stats(model, sites, ids, fisher=True, estimator="measured",
                      loss_fn=lambda m, b: m(input_ids=b).logits.sum(), progress=False)


def test_kind_weights_use_each_kinds_own_probe_in_one_unit() -> None:
    ratios = {"a": {"int4_g128": 2.0, "lowrank_0.25": 8.0}, "b": {"int4_g128": 1.0},
              "c": {"int4_g128": 1e-6, "lowrank_0.25": 1e-6}}
    w = kind_weights(ratios, scale=2.0)
    assert w["a"] == {"quant": 1.0, "lowrank": 4.0}  # both over the one scale: comparable
    assert w["b"] == {"quant": 0.5, "lowrank": 0.5}  # no low-rank probe: the combined weight
    assert w["c"] == {"quant": FLOOR, "lowrank": FLOOR}


def test_probe_kind_estimator_weights_are_the_probe_ratios_over_the_site_scale() -> None:
    net = _NormNet()
    xs, loss_fn, _ = _distortion_setup(net)
    sites = [_site(n, getattr(net, n)) for n in ("a", "b", "head")]
    stats, rec = collect_sensitivity(net, sites, xs, loss_fn=loss_fn, estimator="probe-kind",
                                     progress=False)
    xs, loss_fn, _ = _distortion_setup(net)  # the same pseudo-gradients again
    plain, _ = collect_sensitivity(net, sites, xs, loss_fn=loss_fn, progress=False)
    assert stats.estimator == "probe-kind"
    # site weights and scale are the "probe" estimator's
    assert stats.sensitivity == pytest.approx(plain.sensitivity, rel=1e-9)
    assert stats.sensitivity_scale == pytest.approx(plain.sensitivity_scale, rel=1e-9)
    for s in sites:
        tokens = stats.tokens[stats.group_of(s.fqn)]
        pred = rec.predicted(s.fqn, stats.fit_gram(s.fqn), tokens, kfac=False)
        for kind, probe in KIND_PROBE.items():
            want = max(FLOOR, pred[probe]["probe"] / pred[probe]["rel"] / stats.sensitivity_scale)
            assert stats.sensitivity_for(s.fqn, kind) == pytest.approx(want, rel=1e-9)
        assert stats.sensitivity_for(s.fqn, "sparse24") == stats.sensitivity_of(s.fqn)
    # the geometric mean of the two kinds' weights is the site weight (none at the floor here)
    for s in sites:
        kw = stats.kind_sensitivity[s.fqn]
        assert (kw["quant"] * kw["lowrank"]) ** 0.5 == pytest.approx(
            stats.sensitivity[s.fqn], rel=1e-9)


def test_geo_estimator_is_the_geometric_mean_of_fisher_and_probe() -> None:
    net = _NormNet()
    xs, loss_fn, _ = _distortion_setup(net)
    sites = [_site(n, getattr(net, n)) for n in ("a", "b", "head")]
    geo, _ = collect_sensitivity(net, sites, xs, loss_fn=loss_fn, estimator="geo",
                                 progress=False)
    xs, loss_fn, _ = _distortion_setup(net)  # the same pseudo-gradients in each pass
    fisher = collect_stats(net, sites, xs, fisher=True, loss_fn=loss_fn, progress=False)
    xs, loss_fn, _ = _distortion_setup(net)
    probe, _ = collect_sensitivity(net, sites, xs, loss_fn=loss_fn, progress=False)
    raw = {k: (fisher.sensitivity[k] * probe.sensitivity[k]) ** 0.5 for k in geo.sensitivity}
    want, _ = robust_normalize(raw)
    assert geo.sensitivity == pytest.approx(want, rel=1e-6)
    assert geo.estimator == "geo" and geo.kind_sensitivity is None
