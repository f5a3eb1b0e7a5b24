"""Low-rank factorization: plain truncated SVD and activation-whitened SVD.

Plain:     W = P Σ Qᵀ,  Ŵ_r = P_r Σ_r Q_rᵀ  — minimizes ‖W − Ŵ‖_F.
Whitened:  G = XᵀX = L Lᵀ,  W L = P Σ Qᵀ,  Ŵ_r = P_r Σ_r Q_rᵀ L⁻¹  — minimizes the output
           error ‖(W − Ŵ)Xᵀ‖²_F = tr(E G Eᵀ) = ‖E L‖²_F, which equals Σ_{i>r} σ_i² exactly.

Factors are returned split evenly, U = P_r Σ_r^½ (out × r) and V = Σ_r^½ Q_rᵀ L⁻¹ (r × in),
so neither factor carries all the dynamic range (kinder to fp16/bf16 storage).

A Gram matrix that is not positive definite (dead input channels, too few tokens) gets a
damped Cholesky (G + λ·mean(diag G)·I for growing λ) and, failing that, an eigen square root
with clamped eigenvalues; ``whiten`` says which it used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.planning.configs import Decision, LowRankConfig

__all__ = [
    "whiten",
    "lowrank_factors",
    "lowrank_error_curve",
    "max_useful_rank",
]

_DAMPS = (0.0, 1e-8, 1e-6, 1e-4, 1e-2)


def whiten(gram: Tensor) -> tuple[Tensor, Tensor, str]:
    """A square root L of the Gram matrix (L Lᵀ ≈ G) and its inverse, in float64.

    Returns ``(L, L_inv, how)`` with ``how`` in {"cholesky", "damped(λ)", "eigen"}.
    The damping is added to the diagonal in place (``+ 0.0`` on the whole matrix first keeps
    the bits of ``G + λ·I``) and the identity the solve needs reuses that memory, so at most
    three n×n float64 matrices live at once (G, L, L⁻¹).
    """
    def symmetric() -> Tensor:
        G = gram.detach().to(torch.float64)
        G = G + G.T
        return G.mul_(0.5)

    G = symmetric()
    n = G.shape[0]
    scale = float(G.diagonal().mean()) if n else 0.0
    if scale <= 0:
        eye = torch.eye(n, dtype=torch.float64)
        return eye, eye, "identity (zero Gram)"
    G.add_(0.0)
    diag0 = G.diagonal().clone()
    for damp in _DAMPS:
        G.diagonal().copy_(diag0 + damp * scale)
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) == 0:
            G.zero_().diagonal().fill_(1.0)  # the identity, in G's memory
            L_inv = torch.linalg.solve_triangular(L, G, upper=False)
            if torch.isfinite(L_inv).all():
                return L, L_inv, "cholesky" if damp == 0 else f"damped({damp:g})"
            del L_inv
            G = symmetric().add_(0.0)  # rare: rebuild for the next damping
        del L
    del G
    G = symmetric()  # the undamped matrix, bit for bit (rare path)
    evals, Q = torch.linalg.eigh(G)
    evals = evals.clamp_min(1e-10 * float(evals.max().clamp_min(1e-300)))
    root = evals.sqrt()
    return Q * root, (Q / root).T, "eigen"


def _svd(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(M, full_matrices=False)


def max_useful_rank(in_features: int, out_features: int) -> int:
    """The largest rank that still saves bytes: r·(in + out) < in·out."""
    return max(0, (in_features * out_features - 1) // (in_features + out_features))


def lowrank_factors(
    weight: Tensor, rank: int, method: str = "whitened", gram: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``U`` (out × rank), ``V`` (rank × in) in the weight's dtype with U @ V ≈ W.

    ``method="whitened"`` uses ``gram`` (XᵀX); with ``gram=None`` it equals plain SVD.
    """
    out_f, in_f = weight.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} outside [1, {min(out_f, in_f)}] for a {out_f}×{in_f} weight")
    W = weight.detach().to(torch.float64)
    if method == "whitened" and gram is not None:
        L, L_inv, _ = whiten(gram)
        P, S, Qh = _svd(W @ L)
        right = Qh[:rank] @ L_inv
    elif method in ("svd", "whitened"):
        P, S, Qh = _svd(W)
        right = Qh[:rank]
    else:
        raise ValueError(f"unknown low-rank method {method!r}")
    root = S[:rank].sqrt()
    U = P[:, :rank] * root
    V = root[:, None] * right
    return U.to(weight.dtype), V.to(weight.dtype)


def lowrank_error_curve(
    weight: Tensor, gram: Tensor | None = None, method: str = "whitened"
) -> Tensor:
    """Relative output error tr(E G Eᵀ)/tr(W G Wᵀ) of the rank-r factorization for every
    r = 0 … min(out, in), from one SVD (float64, entry 0 is 1.0, last is 0.0).

    - whitened: Σ_{i>r} σ_i² / Σ σ_i² of W L (exact when the Gram was Cholesky-factorable).
    - svd with a Gram: E_r = Σ_{i>r} σ_i p_i q_iᵀ ⇒ tr(E G Eᵀ) = Σ_{i>r} σ_i² q_iᵀ G q_i.
    - no Gram: the Frobenius ratio Σ_{i>r} σ_i² / Σ σ_i².
    """
    W = weight.detach().to(torch.float64)
    if method == "whitened" and gram is not None:
        L, _, _ = whiten(gram)
        terms = torch.linalg.svdvals(W @ L) ** 2
        total = terms.sum()
    elif method in ("svd", "whitened"):
        _, S, Qh = _svd(W)
        if gram is None:
            terms = S**2
            total = terms.sum()
        else:
            G = gram.detach().to(torch.float64)
            terms = S**2 * ((Qh @ G) * Qh).sum(1)
            total = ((W @ G) * W).sum()
    else:
        raise ValueError(f"unknown low-rank method {method!r}")
    if total <= 0:
        curve = torch.ones(terms.numel() + 1, dtype=torch.float64)
        curve[-1] = 0.0
        return curve
    tail = torch.cat([terms.flip(0).cumsum(0).flip(0), terms.new_zeros(1)])
    return (tail / total).clamp_min(0.0)


def factorize_lowrank(weight: Tensor, decision: Decision, gram: Tensor | None) -> dict[str, Tensor]:
    assert isinstance(decision, LowRankConfig)
    U, V = lowrank_factors(weight, decision.rank, decision.method, gram)
    return {"U": U, "V": V}


def reconstruct_lowrank(decision: Decision, tensors: dict[str, Tensor]) -> Tensor:
    return tensors["U"] @ tensors["V"]

