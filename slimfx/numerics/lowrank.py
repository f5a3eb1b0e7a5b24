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


def whiten(gram: Tensor, inverse: bool = True) -> tuple[Tensor, Tensor | None, str]:
    """A square root L of the Gram matrix (L Lᵀ ≈ G) and its inverse, in float64.

    Returns ``(L, L_inv, how)`` with ``how`` in {"cholesky", "damped(λ)", "eigen"};
    ``inverse=False`` skips the inverse (``L_inv`` is ``None``; the triangular solve is most
    of the cost) — L is the same either way.
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
        if int(info) == 0 and not inverse:
            return L, None, "cholesky" if damp == 0 else f"damped({damp:g})"
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
    return Q * root, (Q / root).T if inverse else None, "eigen"


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


def _gram_of_rows(M: Tensor) -> Tensor:
    """``M Mᵀ`` or ``Mᵀ M``, whichever is smaller: its eigenvalues are the squared singular
    values of ``M`` (the rest are zero)."""
    return M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M


def _descending(evals: Tensor) -> Tensor:
    """Ascending eigenvalues (``eigh``'s order) flipped, rounding negatives to 0."""
    return evals.flip(0).clamp_min(0.0)


def lowrank_error_curve(
    weight: Tensor, gram: Tensor | None = None, method: str = "whitened"
) -> Tensor:
    """Relative output error tr(E G Eᵀ)/tr(W G Wᵀ) of the rank-r factorization for every
    r = 0 … min(out, in) (float64, entry 0 is 1.0, last is 0.0).

    - whitened: Σ_{i>r} σ_i² / Σ σ_i² of W L (exact when the Gram was Cholesky-factorable);
      σ_i² are the eigenvalues of W G Wᵀ when out ≤ in (no Cholesky at all), else of
      (W L)ᵀ(W L).
    - svd with a Gram: E_r = Σ_{i>r} σ_i p_i q_iᵀ ⇒ tr(E G Eᵀ) = Σ_{i>r} σ_i² q_iᵀ G q_i;
      with out ≤ in the singular vectors come from ``eigh(W Wᵀ)`` and σ_i² q_iᵀ G q_i =
      p_iᵀ (W G Wᵀ) p_i, otherwise from ``eigh(Wᵀ W)``.
    - no Gram: the Frobenius ratio Σ_{i>r} σ_i² / Σ σ_i².

    Eigen-decompositions of the smaller product replace SVDs: the same numbers to rounding
    (singular values below ~1e-8·σ_max lose relative precision, their terms do not matter),
    several times faster on CPU; no factor is formed (the chosen rank is fitted at apply).
    """
    W = weight.detach().to(torch.float64)
    rank_max = min(W.shape)
    if method == "whitened" and gram is not None and W.shape[0] <= W.shape[1]:
        # σ_i² of W L are the eigenvalues of W L Lᵀ Wᵀ = W G Wᵀ: no square root needed (for
        # a PSD G that Cholesky refuses this is still the whitened optimum's tail; whiten's
        # damping is a workaround for the factors)
        G = gram.detach().to(torch.float64)
        terms = _descending(torch.linalg.eigvalsh((W @ G) @ W.T))
        del G
        total = terms.sum()
    elif method == "whitened" and gram is not None:
        L, _, _ = whiten(gram, inverse=False)
        terms = _descending(torch.linalg.eigvalsh(_gram_of_rows(W @ L)))
        del L
        total = terms.sum()
    elif method in ("svd", "whitened"):
        if gram is None:
            terms = _descending(torch.linalg.eigvalsh(_gram_of_rows(W)))
            total = terms.sum()
        else:
            G = gram.detach().to(torch.float64)
            if W.shape[0] <= W.shape[1]:
                _, P = torch.linalg.eigh(W @ W.T)
                P = P.flip(1)
                WGWt = (W @ G) @ W.T
                terms = ((WGWt @ P) * P).sum(0)
                total = WGWt.diagonal().sum()
            else:
                evals, Q = torch.linalg.eigh(W.T @ W)
                Q = Q.flip(1)
                terms = _descending(evals) * ((G @ Q) * Q).sum(0)
                total = ((W @ G) * W).sum()
    else:
        raise ValueError(f"unknown low-rank method {method!r}")
    terms = terms[:rank_max]
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

