"""MLA conversion numerics: which RoPE pairs to keep, and the joint key/value latent.

Notation for one attention block: ``x`` (D) the block's input, ``K`` kv heads of ``d`` dims,
``H`` query heads, pair ``i`` of a head = dims ``(i, i + d/2)`` (the ``rotate_half`` layout)
rotating at ``inv_freq[i]``. ``p`` pairs are kept per kv head; the other ``d − 2p`` dims of
each key head are "nope" dims.

Partial RoPE (per kv head ``g``): score of pair ``i`` =
  ``norm``:      Σ_{h∈g} mean‖q_{h,i}‖ · mean‖k_{g,i}‖ (means over calibration tokens)
  ``norm_freq``: ``norm`` × (1 − E_Δ cos(θ_i Δ)), Δ over causal pairs of the calibration length
  ``high_freq``: θ_i (the fastest pairs).
The top ``p`` pairs keep their rotation, computed exactly from ``k_proj``'s rows.

Joint latent: ``y = M x + b`` with ``M = [W_k,nope; W_v]`` (every kv head's nope key rows, then
every value row). A block-diagonal weight ``A`` sets what error counts (``MLAConfig.objective``).
With ``S`` the input's second moment (uncentered for ``whitened``, the covariance for ``pca``)
and ``S = L Lᵀ``: ``A M L = P Σ Qᵀ``, ``W_dkv = P_rᵀ A M`` and ``W_up = A⁻¹ P_r`` — the best
rank-r ``A``-weighted reconstruction of the outputs (for ``pca`` the mean goes into the bias:
``b_up = μ_y − W_up W_dkv μ_x``). ``svd`` uses ``S = I`` and ``A`` from weight norms only.
Refinement: ``[W_up b_up] = M̃ S̃_on D̃ᵀ (D̃ S̃_nn D̃ᵀ)⁻¹`` — least squares of the original outputs
on the latent computed from the inputs the converted model sees (``~`` appends the constant 1).

Keys' bias along the nope dims is dropped: it adds ``q·b`` to every score of a query, which the
softmax cancels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from slimfx.numerics.lowrank import whiten

from .config import MLAConfig

__all__ = [
    "AttentionCalib",
    "MLAWeights",
    "rope_pair_scores",
    "select_rope_pairs",
    "fit_mla",
]


@dataclass
class AttentionCalib:
    """Calibration statistics of one attention block's input, accumulated in float64.

    ``gram``/``mean``: second moment E[x xᵀ] and mean of the inputs the original model gives.
    ``q_pair_norm`` (H, d/2) / ``k_pair_norm`` (K, d/2): mean ‖pair‖ of the pre-RoPE queries and
    keys. ``seq_len``: calibration sequence length (for ``norm_freq``). ``gram_new`` /
    ``cross``: E[x̃_new x̃_newᵀ] and E[x̃_orig x̃_newᵀ] (augmented by a constant 1) when the
    inputs seen by the converted model were recorded (sequential refinement), else ``None``.
    """

    gram: Tensor
    mean: Tensor
    q_pair_norm: Tensor
    k_pair_norm: Tensor
    tokens: int
    seq_len: int
    gram_new: Tensor | None = None
    cross: Tensor | None = None
    extra: dict = field(default_factory=dict)

    def augmented(self) -> Tensor:
        """E[x̃ x̃ᵀ] with x̃ = [x; 1]."""
        D = self.gram.shape[0]
        out = torch.empty(D + 1, D + 1, dtype=torch.float64)
        out[:D, :D] = self.gram
        out[:D, D] = self.mean
        out[D, :D] = self.mean
        out[D, D] = 1.0
        return out


@dataclass
class MLAWeights:
    """The converted block's weights (float64 until loaded into a module).

    ``rope_idx`` (K, p): kept pair indices per kv head, ascending. ``q_perm`` (H·d): row order
    of the new ``q_proj`` — per head its kept dims (first halves, then second halves), then its
    nope dims. ``w_krope``/``b_krope``: ``k_proj`` rows of the kept dims (K·2p). ``w_dkv`` (r, D),
    ``w_uk`` (K·(d−2p), r), ``w_uv`` (K·d, r), ``b_uv`` (K·d).
    """

    rope_idx: Tensor
    q_perm: Tensor
    w_krope: Tensor
    b_krope: Tensor | None
    w_dkv: Tensor
    w_uk: Tensor
    w_uv: Tensor
    b_uv: Tensor


def head_dim_split(rope_idx: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """Per kv head, the kept dims ``(K, 2p)`` (first halves then second halves) and the nope
    dims ``(K, d − 2p)`` in ascending order."""
    half = head_dim // 2
    kept = torch.cat([rope_idx, rope_idx + half], dim=1)
    nope = []
    for g in range(rope_idx.shape[0]):
        mask = torch.ones(head_dim, dtype=torch.bool)
        mask[kept[g]] = False
        nope.append(torch.nonzero(mask).flatten())
    return kept, torch.stack(nope) if nope else torch.empty(0, head_dim, dtype=torch.long)


def rope_pair_scores(
    calib: AttentionCalib, inv_freq: Tensor, num_heads: int, how: str
) -> Tensor:
    """Score of each (kv head, pair), shape (K, d/2): higher = keep the rotation."""
    K, half = calib.k_pair_norm.shape
    group = num_heads // K
    freq = inv_freq.to(torch.float64)[:half]
    if how == "high_freq":
        return freq.expand(K, half).clone()
    q = calib.q_pair_norm.to(torch.float64).reshape(K, group, half).sum(1)
    score = q * calib.k_pair_norm.to(torch.float64)
    if how == "norm":
        return score
    if how == "norm_freq":
        L = max(calib.seq_len, 2)
        delta = torch.arange(L, dtype=torch.float64)
        w = (L - delta) / (L - delta).sum()  # causal pairs at distance Δ in a window of L
        drift = 1.0 - (w[None, :] * torch.cos(freq[:, None] * delta[None, :])).sum(1)
        return score * drift[None, :]
    raise ValueError(f"unknown rope selection {how!r}")


def select_rope_pairs(scores: Tensor, pairs: int) -> Tensor:
    """The ``pairs`` best-scoring pair indices per kv head, ascending, shape (K, pairs)."""
    if pairs == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long)
    top = torch.topk(scores, pairs, dim=1).indices
    return torch.sort(top, dim=1).values


def _psd_sqrt(S: Tensor, rel_floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Symmetric square root of a PSD matrix and its inverse (eigenvalues floored)."""
    S = 0.5 * (S + S.T)
    ev, Q = torch.linalg.eigh(S)
    ev = ev.clamp_min(rel_floor * float(ev.abs().max().clamp_min(1e-300)))
    r = ev.sqrt()
    return (Q * r) @ Q.T, (Q / r) @ Q.T


def _weighting(
    cfg: MLAConfig,
    w_knope: list[Tensor],
    w_v: list[Tensor],
    wq_nope: list[list[Tensor]],
    wo: list[list[Tensor]],
    second_moment: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Block-diagonal ``A`` and ``A⁻¹`` over the outputs [k_nope of every head; v of every head].

    ``second_moment=None`` means weight-only (``svd``): keys scaled so ‖A_k W_k‖_F = ‖W_v‖_F."""
    blocks_k, blocks_v, inv_k, inv_v = [], [], [], []
    use_attention = cfg.objective == "attention" and second_moment is not None
    for g in range(len(w_v)):
        nk, nv = w_knope[g].shape[0], w_v[g].shape[0]
        if use_attention:
            qg = sum(W @ second_moment @ W.T for W in wq_nope[g]) if nk else torch.zeros(0, 0)
            og = sum(W.T @ W for W in wo[g])
            ak, ak_inv = _psd_sqrt(qg) if nk else (qg, qg)
            av, av_inv = _psd_sqrt(og)
        else:
            ak = ak_inv = torch.eye(nk, dtype=torch.float64)
            av = av_inv = torch.eye(nv, dtype=torch.float64)
        blocks_k.append(ak)
        inv_k.append(ak_inv)
        blocks_v.append(av)
        inv_v.append(av_inv)
    A = torch.block_diag(*blocks_k, *blocks_v)
    A_inv = torch.block_diag(*inv_k, *inv_v)
    # norm balancing: the key blocks carry as much weighted energy as the value blocks
    nk_total = sum(w.shape[0] for w in w_knope)
    if nk_total:
        M_k = torch.cat(w_knope)
        M_v = torch.cat(w_v)
        Ak, Av = A[:nk_total, :nk_total], A[nk_total:, nk_total:]
        if second_moment is None:
            ek, ev = (Ak @ M_k).square().sum(), (Av @ M_v).square().sum()
        else:
            ek = torch.trace(Ak @ M_k @ second_moment @ M_k.T @ Ak.T)
            ev = torch.trace(Av @ M_v @ second_moment @ M_v.T @ Av.T)
        alpha = float((ev / ek.clamp_min(1e-300)).sqrt())
        A[:nk_total, :nk_total] *= alpha
        A_inv[:nk_total, :nk_total] /= alpha
    return A, A_inv


def fit_mla(
    cfg: MLAConfig,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    bk: Tensor | None,
    bv: Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    inv_freq: Tensor,
    calib: AttentionCalib | None,
) -> MLAWeights:
    """Fit the converted block's weights (see the module docstring).

    ``wq`` (H·d, D), ``wk``/``wv`` (K·d, D), ``wo`` (D, H·d) are the original projections.
    ``calib`` may be ``None`` only for ``method="svd"`` with ``rope_select="high_freq"`` and
    ``refine=False`` (nothing data-dependent).
    """
    H, K = num_heads, num_kv_heads
    d = wk.shape[0] // K
    D = wk.shape[1]
    half, p, r = d // 2, cfg.rope_pairs, cfg.rank
    group = H // K
    needs_data = cfg.method != "svd" or cfg.rope_select != "high_freq" or cfg.refine
    if calib is None and needs_data:
        raise ValueError(f"{cfg.short()} needs calibration statistics")
    f64 = torch.float64
    wq, wk, wv, wo = (t.detach().to(f64) for t in (wq, wk, wv, wo))
    bk = None if bk is None else bk.detach().to(f64)
    bv = torch.zeros(K * d, dtype=f64) if bv is None else bv.detach().to(f64)

    if cfg.rope_select == "high_freq":
        scores = inv_freq.to(f64)[:half].expand(K, half)
    else:
        scores = rope_pair_scores(calib, inv_freq, H, cfg.rope_select)  # type: ignore[arg-type]
    rope_idx = select_rope_pairs(scores, p)
    kept, nope = head_dim_split(rope_idx, d)

    q_perm = torch.cat(
        [h * d + torch.cat([kept[h // group], nope[h // group]]) for h in range(H)]
    )
    krope_rows = torch.cat([g * d + kept[g] for g in range(K)]) if p else torch.empty(0).long()
    w_krope = wk[krope_rows]
    b_krope = None if bk is None else bk[krope_rows]

    w_knope = [wk[g * d + nope[g]] for g in range(K)]
    b_knope = [
        torch.zeros(d - 2 * p, dtype=f64) if bk is None else bk[g * d + nope[g]] for g in range(K)
    ]
    w_vs = [wv[g * d : (g + 1) * d] for g in range(K)]
    wq_nope = [[wq[h * d + nope[g]] for h in range(g * group, (g + 1) * group)] for g in range(K)]
    wo_heads = [[wo[:, h * d : (h + 1) * d] for h in range(g * group, (g + 1) * group)]
                for g in range(K)]
    M = torch.cat(w_knope + w_vs)
    b = torch.cat(b_knope + [bv])
    n_k = K * (d - 2 * p)

    if cfg.method == "svd":
        second, L = None, None
    else:
        assert calib is not None
        second = calib.gram.to(f64)
        if cfg.method == "pca":
            mu = calib.mean.to(f64)
            second = second - torch.outer(mu, mu)
        L, _, _ = whiten(second)
    A, A_inv = _weighting(cfg, w_knope, w_vs, wq_nope, wo_heads,
                          None if second is None else calib.gram.to(f64))  # type: ignore[union-attr]
    target = A @ M if L is None else A @ M @ L
    P, _, _ = torch.linalg.svd(target, full_matrices=False)
    if r > P.shape[1]:
        raise ValueError(f"rank {r} exceeds the full latent rank {P.shape[1]}")
    P_r = P[:, :r]
    w_dkv = P_r.T @ A @ M
    w_up = A_inv @ P_r
    if cfg.method == "pca":
        mu_y = M @ calib.mean.to(f64) + b  # type: ignore[union-attr]
        b_up = mu_y - w_up @ (w_dkv @ calib.mean.to(f64))  # type: ignore[union-attr]
    else:
        b_up = w_up @ (P_r.T @ (A @ b))

    if cfg.refine:
        assert calib is not None
        S_nn = calib.gram_new if calib.gram_new is not None else calib.augmented()
        S_on = calib.cross if calib.cross is not None else calib.augmented()
        Dt = torch.zeros(r + 1, D + 1, dtype=f64)
        Dt[:r, :D] = w_dkv
        Dt[r, D] = 1.0
        Mt = torch.cat([M, b[:, None]], dim=1)
        lhs = Dt @ S_nn @ Dt.T
        rhs = Mt @ S_on @ Dt.T
        lhs = lhs + 1e-9 * float(lhs.diagonal().mean()) * torch.eye(r + 1, dtype=f64)
        sol = torch.linalg.solve(lhs, rhs.T).T
        w_up, b_up = sol[:, :r], sol[:, r]

    return MLAWeights(
        rope_idx=rope_idx,
        q_perm=q_perm,
        w_krope=w_krope,
        b_krope=b_krope,
        w_dkv=w_dkv,
        w_uk=w_up[:n_k],
        w_uv=w_up[n_k:],
        b_uv=b_up[n_k:],
    )

