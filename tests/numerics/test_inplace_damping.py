"""The whitening and GPTQ factors add their damping to the diagonal in place (fewer n×n
float64 temporaries); they must give the bits of the plain ``G + λ·I`` formulas, signed zeros
and fallback paths included."""

from __future__ import annotations

import pytest
import torch

from slimfx.numerics import lowrank, quant


def _plain_whiten(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    G = gram.detach().to(torch.float64)
    G = 0.5 * (G + G.T)
    n = G.shape[0]
    scale = float(G.diagonal().mean())
    eye = torch.eye(n, dtype=torch.float64)
    for damp in lowrank._DAMPS:
        L, info = torch.linalg.cholesky_ex(G + damp * scale * eye)
        if int(info) == 0:
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
            if torch.isfinite(L_inv).all():
                return L, L_inv, "cholesky" if damp == 0 else f"damped({damp:g})"
    evals, Q = torch.linalg.eigh(G)
    evals = evals.clamp_min(1e-10 * float(evals.max().clamp_min(1e-300)))
    root = evals.sqrt()
    return Q * root, (Q / root).T, "eigen"


def _plain_gptq_u(gram: torch.Tensor, damp: float) -> torch.Tensor:
    H = gram.detach().to(dtype=torch.float64).clone()
    H = 0.5 * (H + H.T)
    dead = H.diagonal() <= 0
    if dead.any():
        H[dead, dead] = 1.0
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype)
    mean_diag = float(H.diagonal().mean())
    flipped = H.flip(0, 1)
    for growth in quant._DAMP_GROWTH:
        L, info = torch.linalg.cholesky_ex(flipped + (damp * growth) * mean_diag * eye)
        if int(info) != 0:
            continue
        U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
        if torch.isfinite(U).all():
            return U.to(torch.float32)
    raise AssertionError("reference failed")


def _grams() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 48, generator=g)
    full = X.T @ X
    low = X[:20].T @ X[:20]  # rank 20 < 48: needs damping
    dead = X.clone()
    dead[:, 5] = 0.0  # a dead channel: its row/column are ±0.0 products
    dead[:, 7] = -dead[:, 7].abs()
    dz = dead.T @ dead
    dz[5, 9] = dz[9, 5] = -0.0  # explicit negative zeros off the diagonal
    Q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    d = torch.ones(48)
    d[0] = -10.0  # one negative eigenvalue no damping of 1e-2·mean(diag) lifts: eigen path
    indefinite = (Q * d) @ Q.T
    return {"full": full, "low-rank": low, "dead + -0.0": dz, "float64": full.double(),
            "indefinite": indefinite}


@pytest.mark.parametrize("name", list(_grams()))
def test_whiten_is_bit_identical_to_the_plain_formula(name: str) -> None:
    gram = _grams()[name]
    before = gram.clone()
    L, L_inv, how = lowrank.whiten(gram)
    L0, L0_inv, how0 = _plain_whiten(gram)
    assert how == how0
    assert torch.equal(L, L0) and torch.equal(L_inv, L0_inv)
    assert torch.equal(L.view(torch.int64), L0.view(torch.int64))  # signed zeros too
    assert torch.equal(gram, before)  # the caller's Gram is not touched
    if name == "indefinite":
        assert how == "eigen"
    if name == "low-rank":
        assert how.startswith("damped")


@pytest.mark.parametrize("name", ["full", "low-rank", "dead + -0.0", "float64"])
def test_gptq_factor_is_bit_identical_to_the_plain_formula(name: str) -> None:
    gram = _grams()[name]
    before = gram.clone()
    quant._FACTOR_CACHE.clear()
    U = quant._gptq_factor(gram, 0.01, torch.device("cpu"))
    U0 = _plain_gptq_u(gram, 0.01)
    assert torch.equal(U.view(torch.int32), U0.view(torch.int32))
    assert torch.equal(gram, before)


def _wide_grams() -> dict[str, torch.Tensor]:
    """Sizes past the vectorized reductions' chunks (the damping's mean of the diagonal is
    summed in the strided diagonal's order), a dead channel, and a matrix the first damping
    does not make positive definite (the rebuilt-matrix path)."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for n in (777, 1536):
        X = torch.randn(n + 100, n, generator=g)
        X[:, 3] = 0.0
        out[f"{n} + dead"] = X.T @ X
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    d = torch.ones(300, dtype=torch.float64)
    d[0] = -0.05  # λ = 1e-2·mean(diag) ≈ 0.01 does not lift it, 10× that does
    out["needs 10x damping"] = (Q * d) @ Q.T
    return out


@pytest.mark.parametrize("name", list(_wide_grams()))
def test_gptq_factor_in_place_matches_the_plain_formula_at_width(name: str) -> None:
    gram = _wide_grams()[name]
    before = gram.clone()
    quant._FACTOR_CACHE.clear()
    U, ridge = quant._gptq_factor_and_ridge(gram, 0.01, torch.device("cpu"))
    U0 = _plain_gptq_u(gram, 0.01)
    assert torch.equal(U.view(torch.int32), U0.view(torch.int32))
    assert U.stride() == U0.stride()  # the GPTQ loop's slices and products see the same layout
    assert torch.equal(gram, before)
    mean = float(gram.double().diagonal().clamp_min(0).mean())  # (dead → 1 moves it by 1/n)
    if name == "needs 10x damping":
        assert ridge == pytest.approx(0.1 * mean, rel=1e-9)
    else:
        assert ridge == pytest.approx(0.01 * mean, rel=1e-2)
