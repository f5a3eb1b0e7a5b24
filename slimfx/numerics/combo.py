"""Combined forms: a quantized or 2:4-sparse core plus a low-rank correction.

All three minimize (or measure) the activation-aware error tr(E G Eᵀ), G = XᵀX, through the
whitened low-rank fit of ``slimfx.numerics.lowrank`` (SVD of R·L with L Lᵀ = G):

- LoRC (ZeroQuant-V2):  Q = Q(W),  U·V = best rank-r fit of the residual R = W − deq(Q).
- LQ-LoRA:  alternate  L_t = lowrank(W − deq(Q_{t−1})),  Q_t = Q(W − L_t),  starting from
  Q_0 = Q(W) (so the first pair (Q_0, L_1) *is* LoRC), and keep the pair with the lowest
  error; hence LQ-LoRA ≤ LoRC by construction. The later low-rank steps use a seeded randomized
  range finder on R·L (block power iterations) instead of a full SVD: each costs
  O(out·in·r) instead of O(out·in·min(out, in)), the first (LoRC) fit stays exact.
- S+L (sparse plus low-rank):  alternate  L_t = lowrank(W − S_{t−1}),  S_t = prune24(W − L_t)
  starting from S_0 = prune24(W), keep the best pair (so S+L ≤ 2:4 + the rank-r fit of its
  residual ≤ 2:4 alone). With a Gram the pruning is error-compensating (SparseGPT sweep,
  its inverse-Hessian factor computed once per call).

The alternations stop early once a whole round (low-rank step + core step) fails to lower the
best error by a relative 1e-4.

The quantized core is GPTQ when a Gram is given (RTN without one; GPTQ with an identity Gram
is RTN). Measured on SmolLM2-135M layer 5 (int4 g64, 8×256 calibration tokens), relative
output errors: q_proj LoRC r=8 RTN 1.52e-3 vs GPTQ 1.01e-3, down_proj r=32 RTN 4.65e-3 vs GPTQ
2.29e-3; GPTQ + LoRC also beats RTN-based LQ-LoRA everywhere there. ``quantizer="rtn"`` keeps
the plain variant for comparison.

Error bookkeeping is cheap: with E_q = W − deq(Q) fixed, tr((E_q − UV) G (E_q − UV)ᵀ) =
tr(E_q G E_qᵀ) − 2·Σ (E_q ∘ U(VG)) + Σ (UᵀU ∘ V G Vᵀ), so only a new Q costs an out·in²
product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.numerics.lowrank import lowrank_factors, whiten
from slimfx.numerics.quant import dequantize, quantize_gptq, quantize_rtn
from slimfx.numerics.sparse import Pruner24, pack24, sparse24_unsupported, unpack24
from slimfx.planning.configs import Decision, LowRankQuantConfig, Sparse24LowRankConfig

__all__ = [
    "default_quantizer",
    "quantize",
    "lorc",
    "lqlora",
    "sparse_plus_lowrank",
    "whitened_svd",
    "split_factors",
    "OutputError",
]

_POWER_ITERS = 4  # block power iterations of the randomized range finder
_OVERSAMPLE = 8  # extra columns of the random test matrix
_SEED = 0  # fixed: the same weight gives the same factors in the cost model and the pass
_TOL = 1e-4  # stop alternating once the best error improves by less than this (relative)


class OutputError:
    """tr(E G Eᵀ) / tr(W G Wᵀ) for many E, with the low-rank shortcut above.

    The out·in² product E·G runs in float32 (4× cheaper than float64 on CPU) and every sum in
    float64: measured ≤ 3e-7 relative to the all-float64 value on SmolLM2 layers.
    """

    def __init__(self, weight: Tensor, gram: Tensor | None) -> None:
        self.G = None if gram is None else gram.detach().to(torch.float64)
        self.G32 = None if gram is None else self.G.to(torch.float32)
        self.den = self.sq(weight.detach())

    def sq(self, E: Tensor) -> float:
        """tr(E G Eᵀ) (``E`` any float dtype)."""
        E64 = E.detach().to(torch.float64)
        if self.G32 is None:
            return float((E64 * E64).sum())
        EG = E.detach().to(torch.float32) @ self.G32
        return float((EG.to(torch.float64) * E64).sum())

    def with_lowrank(self, E_sq: float, E: Tensor, U: Tensor, V: Tensor) -> float:
        """tr((E − UV) G (E − UV)ᵀ) given ``E_sq`` = tr(E G Eᵀ)."""
        U64, V64 = U.to(torch.float64), V.to(torch.float64)
        VG = V64 if self.G is None else V64 @ self.G
        cross = float((E.to(torch.float64) * (U64 @ VG)).sum())
        lr = float(((U64.T @ U64) * (VG @ V64.T)).sum())
        return max(E_sq - 2.0 * cross + lr, 0.0)

    def rel(self, num: float) -> float:
        """``num`` relative to tr(W G Wᵀ)."""
        return num / self.den if self.den > 0 else float(num > 0)


class _Whitened:
    """The whitening L (L Lᵀ = G) computed once, and low-rank fits in whitened space."""

    def __init__(self, gram: Tensor | None) -> None:
        if gram is None:
            self.L = self.L_inv = None
        else:
            self.L, self.L_inv, _ = whiten(gram)

    def _to(self, R: Tensor) -> Tensor:
        R = R.detach().to(torch.float64)
        return R if self.L is None else R @ self.L

    def _back(self, right: Tensor) -> Tensor:
        return right if self.L_inv is None else right @ self.L_inv

    def svd(self, R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Full whitened SVD ``(P, S, right)``: R ≈ Σ_i P_i S_i right_i (exact for all ranks)."""
        P, S, Qh = torch.linalg.svd(self._to(R), full_matrices=False)
        return P, S, self._back(Qh)

    def randomized(self, R: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``rank`` whitened SVD by a seeded randomized range finder."""
        M = self._to(R)
        k = min(rank + _OVERSAMPLE, *M.shape)
        gen = torch.Generator().manual_seed(_SEED)
        Y = M @ torch.randn(M.shape[1], k, dtype=M.dtype, generator=gen)
        for _ in range(_POWER_ITERS):
            Y = torch.linalg.qr(Y).Q
            Y = M @ (M.T @ Y)
        Qb = torch.linalg.qr(Y).Q
        Pb, S, Qh = torch.linalg.svd(Qb.T @ M, full_matrices=False)
        return (Qb @ Pb)[:, :rank], S[:rank], self._back(Qh[:rank])


def split_factors(
    P: Tensor, S: Tensor, right: Tensor, rank: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """U = P_r S_r^½, V = S_r^½ right_r (the same even split as ``lowrank_factors``)."""
    root = S[:rank].sqrt()
    return (P[:, :rank] * root).to(dtype), (root[:, None] * right[:rank]).to(dtype)


def whitened_svd(residual: Tensor, gram: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The whitened SVD of ``residual`` (what ``lowrank_factors`` truncates): ``(P, S, right)``
    with the rank-r fit U = P_r S_r^½, V = S_r^½ right_r. One call serves every rank."""
    return _Whitened(gram).svd(residual)


def default_quantizer(gram: Tensor | None) -> str:
    """The quantizer the combined forms use: ``gptq`` with a Gram, ``rtn`` without."""
    return "rtn" if gram is None else "gptq"


def quantize(
    weight: Tensor,
    gram: Tensor | None,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    quantizer: str | None = None,
) -> dict[str, Tensor]:
    """The quantized core's tensors (``quantizer`` None: :func:`default_quantizer`)."""
    quantizer = quantizer or default_quantizer(gram)
    if quantizer == "rtn":
        return quantize_rtn(weight, bits, group_size, symmetric)
    if quantizer == "gptq":
        return quantize_gptq(weight, gram, bits, group_size, symmetric)
    raise ValueError(f"unknown quantizer {quantizer!r}; known: ('rtn', 'gptq')")


def _deq(
    q: dict[str, Tensor], bits: int, group_size: int | None, symmetric: bool, n: int
) -> Tensor:
    return dequantize(q, bits, group_size, symmetric, n).to(torch.float32)


def lorc(
    weight: Tensor,
    gram: Tensor | None,
    rank: int,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    quantizer: str | None = None,
) -> dict[str, Tensor]:
    """LoRC: quantize ``weight`` (GPTQ with a Gram, else RTN), then fit the residual with the
    whitened rank-``rank`` factorization (``lowrank_factors``). Returns the quant tensors plus
    ``U`` (out × r), ``V`` (r × in) in the weight's dtype: W ≈ deq(Q) + U @ V."""
    q = quantize(weight, gram, bits, group_size, symmetric, quantizer)
    R = weight.detach().to(torch.float32) - _deq(q, bits, group_size, symmetric, weight.shape[1])
    U, V = lowrank_factors(R, rank, "whitened", gram)
    return {**q, "U": U.to(weight.dtype), "V": V.to(weight.dtype)}


def lqlora(
    weight: Tensor,
    gram: Tensor | None,
    rank: int,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    iters: int = 5,
    quantizer: str | None = None,
    init: tuple[dict[str, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """LQ-LoRA: alternate L = lowrank(W − deq(Q)) and Q = quant(W − L) for up to ``iters``
    low-rank steps, starting from Q = quant(W); return the pair with the lowest activation-aware
    error (in the stored dtypes). ``init`` = (Q_0 tensors, exact LoRC (U, V)) when already known
    (the cost model gets them for every rank from one quantization and one SVD)."""
    if iters < 1:
        raise ValueError(f"iters must be ≥ 1, got {iters}")
    n = weight.shape[1]
    W = weight.detach().to(torch.float32)
    metric = OutputError(W, gram)
    if init is None:
        q = quantize(weight, gram, bits, group_size, symmetric, quantizer)
        E = W - _deq(q, bits, group_size, symmetric, n)
        U, V = lowrank_factors(E, rank, "whitened", gram)
    else:
        q, (U, V) = init
        E = W - _deq(q, bits, group_size, symmetric, n)
    U, V = U.to(weight.dtype), V.to(weight.dtype)
    E_sq = metric.sq(E)
    best_err = metric.with_lowrank(E_sq, E, U, V)
    best = (q, U, V)
    wh: _Whitened | None = None
    for t in range(1, iters + 1):
        prev = best_err
        if t > 1:  # low-rank step on the current quantization residual
            wh = wh or _Whitened(gram)
            U, V = split_factors(*wh.randomized(E, rank), rank, weight.dtype)
            err = metric.with_lowrank(E_sq, E, U, V)
            if err < best_err:
                best_err, best = err, (q, U, V)
        # quantization step: Q = quant(W − L)
        L = U.to(torch.float32) @ V.to(torch.float32)
        q = quantize((W - L).to(weight.dtype), gram, bits, group_size, symmetric, quantizer)
        E = W - _deq(q, bits, group_size, symmetric, n)
        E_sq = metric.sq(E)
        err = metric.with_lowrank(E_sq, E, U, V)
        if err < best_err:
            best_err, best = err, (q, U, V)
        if t > 1 and prev - best_err <= _TOL * max(prev, 1e-300):
            break
    q, U, V = best
    return {**q, "U": U, "V": V}


def sparse_plus_lowrank(
    weight: Tensor,
    gram: Tensor | None,
    rank: int,
    mask: str = "wanda",
    iters: int = 5,
    init: tuple[Tensor, tuple[Tensor, Tensor]] | None = None,
    pruner: Pruner24 | None = None,
) -> dict[str, Tensor]:
    """S + L: alternate L = lowrank(W − S) and S = prune24(W − L) (error-compensating when a
    Gram is given) for up to ``iters`` low-rank steps from S = prune24(W); return the packed
    2:4 tensors plus ``U``, ``V`` of the best pair. ``init`` = (S_0, exact (U_1, V_1)) and
    ``pruner`` (a :class:`Pruner24` for this Gram and ``mask``) may be shared by callers that
    try several ranks."""
    if iters < 1:
        raise ValueError(f"iters must be ≥ 1, got {iters}")
    reason = sparse24_unsupported(weight.shape[1])
    if reason:
        raise ValueError(reason)
    W = weight.detach().to(torch.float32)
    metric = OutputError(W, gram)
    pruner = pruner or Pruner24(mask, gram, compensate=gram is not None)
    if init is None:
        S = pruner(weight)
        E = W - S.to(torch.float32)
        U, V = lowrank_factors(E, rank, "whitened", gram)
    else:
        S, (U, V) = init
        E = W - S.to(torch.float32)
    U, V = U.to(weight.dtype), V.to(weight.dtype)
    E_sq = metric.sq(E)
    best_err = metric.with_lowrank(E_sq, E, U, V)
    best = (S, U, V)
    wh: _Whitened | None = None
    for t in range(1, iters + 1):
        prev = best_err
        if t > 1:  # low-rank step on the current pruning residual
            wh = wh or _Whitened(gram)
            U, V = split_factors(*wh.randomized(E, rank), rank, weight.dtype)
            err = metric.with_lowrank(E_sq, E, U, V)
            if err < best_err:
                best_err, best = err, (S, U, V)
        L = U.to(torch.float32) @ V.to(torch.float32)
        S = pruner((W - L).to(weight.dtype))
        E = W - S.to(torch.float32)
        E_sq = metric.sq(E)
        err = metric.with_lowrank(E_sq, E, U, V)
        if err < best_err:
            best_err, best = err, (S, U, V)
        if t > 1 and prev - best_err <= _TOL * max(prev, 1e-300):
            break
    S, U, V = best
    return {**pack24(S.to(weight.dtype)), "U": U, "V": V}


def factorize_lowrank_quant(
    weight: Tensor, decision: Decision, gram: Tensor | None
) -> dict[str, Tensor]:
    """The ``lowrank_quant`` form's tensors (LoRC or LQ-LoRA)."""
    assert isinstance(decision, LowRankQuantConfig)
    d = decision
    if d.method == "lorc":
        return lorc(weight, gram, d.rank, d.bits, d.group_size, d.symmetric)
    if d.method == "lqlora":
        return lqlora(weight, gram, d.rank, d.bits, d.group_size, d.symmetric)
    raise ValueError(f"unknown lowrank_quant method {d.method!r}")


def reconstruct_lowrank_quant(decision: Decision, tensors: dict[str, Tensor]) -> Tensor:
    assert isinstance(decision, LowRankQuantConfig)
    d = decision
    V = tensors["V"]
    W = dequantize(tensors, d.bits, d.group_size, d.symmetric, V.shape[1]).to(torch.float32)
    return (W + tensors["U"].to(torch.float32) @ V.to(torch.float32)).to(V.dtype)


def factorize_sparse24_lowrank(
    weight: Tensor, decision: Decision, gram: Tensor | None
) -> dict[str, Tensor]:
    """The ``sparse24_lowrank`` form's tensors (S + L)."""
    assert isinstance(decision, Sparse24LowRankConfig)
    return sparse_plus_lowrank(weight, gram, decision.rank, decision.mask)


def reconstruct_sparse24_lowrank(decision: Decision, tensors: dict[str, Tensor]) -> Tensor:
    values, U, V = tensors["values"], tensors["U"], tensors["V"]
    S = unpack24(values, tensors["meta"], V.shape[1]).to(torch.float32)
    return (S + U.to(torch.float32) @ V.to(torch.float32)).to(V.dtype)

