"""MLA conversion numerics: which RoPE pairs to keep, and the joint key/value latent.

Notation for one attention block: ``x`` (D) the block's input, ``K`` kv heads of ``d`` dims,
``H`` query heads (group ``g(h) = h // (H/K)``), pair ``i`` of a head = dims ``(i, i + d/2)``
(the ``rotate_half`` layout) rotating at ``inv_freq[i]``.

Partial RoPE over a shared key space. RoPE at frequency ``i`` rotates the K kv heads' pairs by
the same angle, so it commutes with any orthogonal mixing ``U_i`` (K×K) of those pairs across
heads. The K·d key dims become K·d/2 entries ``(i, j)``: component ``j`` of frequency ``i``
(``rope_mix="none"``: ``U_i = I``, component j = kv head j; ``"pca"``, RoRoPE-style: ``U_i`` =
eigenvectors of the keys' K×K second moment at that frequency, so a frequency's positional
energy concentrates in its first components). The ``K·p`` best entries keep their rotation
(cached exactly, one RoPE key shared by all query heads); the rest lose it and enter the latent.
Query head h reads entry (i, j) with weight ``U_i[j, g(h)]`` on its own pair i, so at full rank
with every entry kept the block is unchanged. Entry scores:
  ``norm``:      mean‖q_pair‖·‖k_pair‖ summed over the group's query heads (means over
                 calibration tokens; with mixing, the RMS norms of the mixed components)
  ``norm_freq``: ``norm`` × (1 − E_Δ cos(θ_i Δ)), Δ over causal pairs of the calibration length
  ``high_freq``: θ_i (the fastest pairs).

Joint latent: ``y = M x + b`` with ``M = [W_k,nope; W_v]`` (the mixed key rows of the dropped
entries, then every value row). A block-diagonal weight ``A`` sets what error counts
(``MLAConfig.objective``).
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

__all__ = ["AttentionCalib", "MLAWeights", "entry_scores", "key_space", "fit_mla"]


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
    rot_mean: Tensor | None = None
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

    Key space: the K·d key dims of all kv heads mixed by an orthogonal ``T`` that maps each
    frequency's K pairs onto K pairs of the same frequency (``k' = T k``; ``T`` a permutation
    without mixing). Columns: the ``N`` kept entries' first halves, their second halves, then
    the ``K·d − 2N`` nope dims. ``rope_freq`` (N): frequency index of each kept entry.
    ``q_mix`` (H, K·d, d): query head h of group g reads the key space with ``T_g F_h q_h``
    (``T_g`` = ``T``'s columns of kv head g; ``F_h`` = I, or on the dropped rows the head's mean
    rotation per pair with ``rope_fold``). ``w_krope``/``b_krope`` (2N rows),
    ``w_dkv`` (r, D), ``w_uk`` (K·d − 2N, r), ``w_uv`` (K·d, r), ``b_uv`` (K·d).
    """

    rope_freq: Tensor
    q_mix: Tensor
    w_krope: Tensor
    b_krope: Tensor | None
    w_dkv: Tensor
    w_uk: Tensor
    w_uv: Tensor
    b_uv: Tensor


def _drift(freq: Tensor, seq_len: int) -> Tensor:
    """1 − E cos(θΔ) over the causal pairs of a window of ``seq_len`` tokens, per frequency."""
    L = max(seq_len, 2)
    delta = torch.arange(L, dtype=torch.float64)
    w = (L - delta) / (L - delta).sum()
    return 1.0 - (w[None, :] * torch.cos(freq[:, None] * delta[None, :])).sum(1)


def entry_scores(
    cfg: MLAConfig, wq: Tensor, wk: Tensor, gram: Tensor | None, calib: AttentionCalib | None,
    inv_freq: Tensor, H: int, K: int,
) -> tuple[Tensor, Tensor]:
    """``(U, score)``: per frequency ``i`` the K×K map ``U[i]`` whose rows are the entries'
    components (the identity without mixing) and the score of each entry ``(i, j)``,
    ``score[i, j]`` (``cfg.rope_select``'s rule; see :func:`key_space`)."""
    d = wk.shape[0] // K
    half = d // 2
    group = H // K
    freq = inv_freq.to(torch.float64)[:half]
    f64 = torch.float64
    U = torch.eye(K, dtype=f64).expand(half, K, K).clone()  # U[i]: rows = components
    if cfg.rope_mix == "pca":
        assert gram is not None
        for i in range(half):
            rows_a = torch.arange(K) * d + i
            wa, wb = wk[rows_a], wk[rows_a + half]
            C = wa @ gram @ wa.T + wb @ gram @ wb.T
            _, vecs = torch.linalg.eigh(0.5 * (C + C.T))
            U[i] = vecs.flip(1).T
    # scores per entry (i, j)
    if cfg.rope_select == "high_freq":
        score = freq[:, None].expand(half, K).clone()
    elif cfg.rope_mix == "none" and calib is not None:
        qn = calib.q_pair_norm.to(f64).reshape(K, group, half).sum(1)  # (K, half)
        score = (qn * calib.k_pair_norm.to(f64)).T  # (half, K)
    else:  # RMS norms of mixed components, from the Gram
        assert gram is not None
        score = torch.empty(half, K, dtype=f64)
        for i in range(half):
            rows_a = torch.arange(K) * d + i
            ka = U[i] @ wk[rows_a]
            kb = U[i] @ wk[rows_a + half]
            k_e = (ka @ gram * ka).sum(1) + (kb @ gram * kb).sum(1)
            q_h = torch.stack([
                (wq[h * d + i] @ gram @ wq[h * d + i]) + (wq[h * d + i + half] @ gram
                                                          @ wq[h * d + i + half])
                for h in range(H)
            ])
            q_e = (U[i][:, torch.arange(H) // group].square() * q_h[None, :]).sum(1)
            score[i] = (q_e.clamp_min(0) * k_e.clamp_min(0)).sqrt()
    if cfg.rope_select == "norm_freq":
        score = score * _drift(freq, calib.seq_len if calib is not None else 2)[:, None]
    elif cfg.rope_select == "norm_attn":
        if calib is None or calib.rot_mean is None:
            raise ValueError("rope_select='norm_attn' needs the calibrated attention distances")
        spread = 1.0 - calib.rot_mean.to(f64).square().sum(-1)  # (H, half)
        if cfg.rope_mix == "none":
            score = score * spread.reshape(K, group, half).mean(1).T
        else:
            score = score * spread.mean(0)[:, None]
    return U, score


def key_space(
    cfg: MLAConfig, wq: Tensor, wk: Tensor, gram: Tensor | None, calib: AttentionCalib | None,
    inv_freq: Tensor, H: int, K: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(T, rope_freq, kept_rows)``: the orthogonal key-space map (K·d × K·d, rows ordered
    kept-a, kept-b, nope), the kept entries' frequencies and, for tests, which rows are kept.

    Entries are (frequency i, component j): without mixing component j is kv head j; with
    ``rope_mix="pca"`` the components are the eigenvectors of the keys' per-frequency K×K
    second moment (RoRoPE-style: RoPE commutes with mixing heads at one frequency, so the
    positional energy of a frequency concentrates in its first components). The ``K·p`` entries
    with the best score keep their rotation; ``cfg.rope_kept`` names them instead (entry
    ``i·K + j``: one choice shared by several layers, ``MLAConfig(rope_share=True)``)."""
    d = wk.shape[0] // K
    half = d // 2
    U, score = entry_scores(cfg, wq, wk, gram, calib, inv_freq, H, K)
    if cfg.rope_kept is not None:
        kept = torch.tensor(sorted(cfg.rope_kept), dtype=torch.long)
    elif cfg.rope_select == "per_frequency":  # the first component of the fastest frequencies
        kept = torch.arange(cfg.rope_entries(K, d)) * K
    else:
        order = torch.argsort(score.flatten(), descending=True, stable=True)
        kept = torch.sort(order[: K * cfg.rope_pairs]).values
    n_keep = int(kept.numel())
    kept_set = set(kept.tolist())
    dropped = [e for e in range(half * K) if e not in kept_set]
    T = torch.zeros(K * d, K * d, dtype=torch.float64)

    def fill(row: int, entry: int, part: int) -> None:
        i, j = divmod(entry, K)
        T[row, torch.arange(K) * d + i + part * half] = U[i][j]

    for n, e in enumerate(kept.tolist()):
        fill(n, e, 0)
        fill(n_keep + n, e, 1)
    for n, e in enumerate(dropped):
        fill(2 * n_keep + 2 * n, e, 0)
        fill(2 * n_keep + 2 * n + 1, e, 1)
    rope_freq = kept // K
    return T, rope_freq, kept


def _psd_sqrt(S: Tensor, rel_floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Symmetric square root of a PSD matrix and its inverse (eigenvalues floored)."""
    S = 0.5 * (S + S.T)
    ev, Q = torch.linalg.eigh(S)
    ev = ev.clamp_min(rel_floor * float(ev.abs().max().clamp_min(1e-300)))
    r = ev.sqrt()
    return (Q * r) @ Q.T, (Q / r) @ Q.T


def _weighting(
    cfg: MLAConfig, w_knope: Tensor, w_v: Tensor, q_nope: list[Tensor], wo: Tensor, K: int,
    gram: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Block-diagonal ``A`` and ``A⁻¹`` over the outputs [k_nope; v of every kv head].

    ``attention``: the nope-key block is the square root of Σ_h Q_h G Q_hᵀ (``Q_h`` = head h's
    query rows on the nope key space), value block g the square root of Σ_{h∈g} W_o,hᵀ W_o,h.
    Then keys are scaled so both blocks carry the same energy (norm balancing); ``gram=None``
    (``svd``) balances the weights' Frobenius norms instead."""
    f64 = torch.float64
    nk, d = w_knope.shape[0], w_v.shape[0] // K
    H = len(q_nope)
    G = H // K
    if cfg.objective == "attention" and gram is not None:
        ak, ak_inv = _psd_sqrt(sum(Q @ gram @ Q.T for Q in q_nope)) if nk else (
            torch.zeros(0, 0, dtype=f64),) * 2
        vb, vb_inv = [], []
        for g in range(K):
            heads = [wo[:, h * d:(h + 1) * d] for h in range(g * G, (g + 1) * G)]
            av, av_inv = _psd_sqrt(sum(W.T @ W for W in heads))
            vb.append(av)
            vb_inv.append(av_inv)
        A, A_inv = torch.block_diag(ak, *vb), torch.block_diag(ak_inv, *vb_inv)
    else:
        A = torch.eye(nk + w_v.shape[0], dtype=f64)
        A_inv = A.clone()
    if nk:
        Ak, Av = A[:nk, :nk], A[nk:, nk:]
        if gram is None:
            ek, ev = (Ak @ w_knope).square().sum(), (Av @ w_v).square().sum()
        else:
            ek = torch.trace(Ak @ w_knope @ gram @ w_knope.T @ Ak.T)
            ev = torch.trace(Av @ w_v @ gram @ w_v.T @ Av.T)
        alpha = float((ev / ek.clamp_min(1e-300)).sqrt())
        A[:nk, :nk] *= alpha
        A_inv[:nk, :nk] /= alpha
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
    ``calib`` may be ``None`` only for ``method="svd"``, ``rope_select="high_freq"``,
    ``rope_mix="none"`` and ``refine=False`` (nothing data-dependent).
    """
    H, K = num_heads, num_kv_heads
    d = wk.shape[0] // K
    D = wk.shape[1]
    r, G = cfg.rank, H // K
    if calib is None and cfg.needs_data:
        raise ValueError(f"{cfg.short()} needs calibration statistics")
    f64 = torch.float64
    wq, wk, wv, wo = (t.detach().to(f64) for t in (wq, wk, wv, wo))
    bk = None if bk is None else bk.detach().to(f64)
    bv = torch.zeros(K * d, dtype=f64) if bv is None else bv.detach().to(f64)
    gram = None if calib is None else calib.gram.to(f64)

    T, rope_freq, _ = key_space(cfg, wq, wk, gram, calib, inv_freq, H, K)
    n2 = 2 * rope_freq.numel()
    wk_mixed = T @ wk
    w_krope = wk_mixed[:n2]
    b_krope = None if bk is None else (T @ bk)[:n2]
    w_knope = wk_mixed[n2:]
    b_knope = torch.zeros(K * d - n2, dtype=f64) if bk is None else (T @ bk)[n2:]
    q_mix = torch.stack([T[:, (h // G) * d:(h // G + 1) * d].clone() for h in range(H)])
    if cfg.rope_fold:
        if calib is None or calib.rot_mean is None:
            raise ValueError("rope_fold needs the calibrated attention distances")
        half = d // 2
        idx = torch.arange(half)
        for h in range(H):
            C, S = calib.rot_mean[h, :, 0].to(f64), calib.rot_mean[h, :, 1].to(f64)
            F = torch.zeros(d, d, dtype=f64)  # q̃_a = C q_a − S q_b, q̃_b = S q_a + C q_b
            F[idx, idx], F[idx, idx + half] = C, -S
            F[idx + half, idx], F[idx + half, idx + half] = S, C
            q_mix[h, n2:] = q_mix[h, n2:] @ F
    q_nope = [q_mix[h, n2:] @ wq[h * d:(h + 1) * d] for h in range(H)]
    M = torch.cat([w_knope, wv])
    b = torch.cat([b_knope, bv])
    n_k = w_knope.shape[0]

    if cfg.method == "svd":
        second, L = None, None
    else:
        assert calib is not None
        second = gram
        if cfg.method == "pca":
            mu = calib.mean.to(f64)
            second = second - torch.outer(mu, mu)
        L, _, _ = whiten(second)
    A, A_inv = _weighting(cfg, w_knope, wv, q_nope, wo, K, gram if cfg.method != "svd" else None)
    target = A @ M if L is None else A @ M @ L
    P, _, _ = torch.linalg.svd(target, full_matrices=False)
    if r > P.shape[1]:
        raise ValueError(f"rank {r} exceeds the full latent rank {P.shape[1]}")
    P_r = P[:, :r]
    w_dkv = P_r.T @ A @ M
    w_up = A_inv @ P_r
    if cfg.method == "pca":
        mu_x = calib.mean.to(f64)  # type: ignore[union-attr]
        b_up = (M @ mu_x + b) - w_up @ (w_dkv @ mu_x)
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
        lhs = lhs + 1e-9 * float(lhs.diagonal().mean()) * torch.eye(r + 1, dtype=f64)
        sol = torch.linalg.solve(lhs, (Mt @ S_on @ Dt.T).T).T
        w_up, b_up = sol[:, :r], sol[:, r]

    return MLAWeights(
        rope_freq=rope_freq,
        q_mix=q_mix,
        w_krope=w_krope,
        b_krope=b_krope,
        w_dkv=w_dkv,
        w_uk=w_up[:n_k],
        w_uv=w_up[n_k:],
        b_uv=b_up[n_k:],
    )
