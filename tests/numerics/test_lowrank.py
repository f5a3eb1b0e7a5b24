"""slimfx.numerics.lowrank: error curves against directly measured output errors, whitening
fallbacks, and exact reconstruction at full rank."""

from __future__ import annotations

import pytest
import torch

from slimfx.numerics import factorize, reconstruct, relative_output_error
from slimfx.numerics.lowrank import lowrank_error_curve, lowrank_factors, max_useful_rank, whiten
from slimfx.planning.configs import LowRankConfig
from slimfx.planning.shapes import LinearShape

OUT, IN, TOKENS = 24, 40, 300
RANKS = (1, 3, 8, 16, 24)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine, 2-thread LAPACK calls (SVD) were
    measured 250× slower than 1-thread ones. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 weight (OUT × IN) and correlated inputs X (TOKENS × IN): the input
    channels have very different scales, so whitening has something to do."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    mix = torch.randn(IN, IN, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -2, IN, dtype=torch.float64)
    X = torch.randn(TOKENS, IN, generator=g, dtype=torch.float64) @ (mix * scale)
    return W, X


def _measured(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """‖(W − Ŵ)Xᵀ‖²_F / ‖W Xᵀ‖²_F straight from the data, no Gram matrix."""
    return float(((W - W_hat) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_error_curve_equals_measured_output_error(method: str) -> None:
    W, X = _data()
    G = X.T @ X
    curve = lowrank_error_curve(W, G, method)
    assert curve.shape == (min(OUT, IN) + 1,)
    assert curve[0].item() == pytest.approx(1.0) and curve[-1].item() == pytest.approx(
        0.0, abs=1e-12
    )
    for r in RANKS:
        U, V = lowrank_factors(W, r, method, G)
        assert U.shape == (OUT, r) and V.shape == (r, IN)
        measured = _measured(W, U @ V, X)
        # float64 end to end: agreement to SVD round-off; 1e-9 absolute covers the r=24 zero.
        assert curve[r].item() == pytest.approx(measured, rel=1e-7, abs=1e-9), r
        assert relative_output_error(W, U @ V, G) == pytest.approx(measured, rel=1e-7, abs=1e-9)


def test_plain_svd_without_gram_is_frobenius_ratio() -> None:
    W, _ = _data(1)
    curve = lowrank_error_curve(W, None, "svd")
    for r in RANKS:
        U, V = lowrank_factors(W, r, "svd")
        frob = float((W - U @ V).pow(2).sum() / W.pow(2).sum())
        assert curve[r].item() == pytest.approx(frob, rel=1e-7, abs=1e-9)


def test_whitened_error_never_above_plain() -> None:
    W, X = _data(2)
    G = X.T @ X
    whitened = lowrank_error_curve(W, G, "whitened")
    plain = lowrank_error_curve(W, G, "svd")
    # Whitened SVD minimizes exactly this error at every rank; 1e-12 absorbs round-off.
    assert torch.all(whitened <= plain + 1e-12)
    assert torch.any(whitened[1:-1] < 0.9 * plain[1:-1])  # and actually helps on this data


def test_whiten_singular_gram_uses_damped_cholesky() -> None:
    W, X = _data(3)
    X[:, 5] = 0.0  # a dead input channel: row/column 5 of the Gram is exactly zero
    G = X.T @ X
    assert int(torch.linalg.cholesky_ex(G).info) != 0  # plain Cholesky does fail
    L, L_inv, how = whiten(G)
    assert how.startswith("damped("), how
    assert torch.isfinite(L).all() and torch.isfinite(L_inv).all()
    torch.testing.assert_close(L @ L_inv, torch.eye(IN, dtype=torch.float64), atol=1e-8, rtol=0)
    damp = float(how[len("damped(") : -1]) * float(G.diagonal().mean())
    torch.testing.assert_close(L @ L.T, G + damp * torch.eye(IN, dtype=torch.float64))
    U, V = lowrank_factors(W, 8, "whitened", G)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    # the damping is tiny, so the whitened factors still beat plain SVD on this data
    assert relative_output_error(W, U @ V, G) <= lowrank_error_curve(W, G, "svd")[8].item()


def test_whiten_indefinite_gram_uses_clamped_eigen_root() -> None:
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=torch.float64))
    evals = torch.linspace(3.0, 0.5, IN, dtype=torch.float64)
    evals[-3:] = -5.0  # strongly negative: no damping up to 1e-2·mean(diag) repairs it
    G = (Q * evals) @ Q.T
    L, L_inv, how = whiten(G)
    assert how == "eigen"
    assert torch.isfinite(L).all() and torch.isfinite(L_inv).all()
    clamped = evals.clamp_min(1e-10 * float(evals.max()))
    torch.testing.assert_close(L @ L.T, (Q * clamped) @ Q.T)  # the positive part of G
    W, _ = _data(4)
    U, V = lowrank_factors(W, 8, "whitened", G)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()


@pytest.mark.parametrize("method", ["svd", "whitened"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_rank_product_reproduces_weight(method: str, dtype: torch.dtype) -> None:
    W, X = _data(5)
    W = W.to(dtype)
    r = min(OUT, IN)
    tensors = factorize(W, LowRankConfig(rank=r, method=method), X.T @ X)
    assert tensors["U"].dtype == dtype and tensors["V"].dtype == dtype
    W_hat = reconstruct(LowRankConfig(rank=r, method=method), tensors)
    # float64: SVD round-off times cond(L) of the whitening; float32: factors rounded from
    # float64 (≈1e-7 relative each) and summed over r=24 terms.
    tol = 1e-8 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(W_hat, W, atol=tol * float(W.abs().max()), rtol=0)


def test_rank_outside_range_is_an_error() -> None:
    W, _ = _data(6)
    with pytest.raises(ValueError, match="outside"):
        lowrank_factors(W, min(OUT, IN) + 1, "svd")
    with pytest.raises(ValueError, match="NaN"):
        factorize(W.clone().fill_(float("nan")), LowRankConfig(rank=2))


def test_max_useful_rank_is_the_byte_break_even() -> None:
    for i, o in [(16, 32), (32, 32), (64, 256), (7, 3)]:
        r = max_useful_rank(i, o)
        assert LowRankConfig(r).weight_bytes(LinearShape(i, o)) < 2 * i * o if r else True
        assert LowRankConfig(r + 1).weight_bytes(LinearShape(i, o)) >= 2 * i * o
