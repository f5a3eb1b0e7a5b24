"""2:4 semi-structured sparsity: masks, error-compensating pruning, and the packed format.

Masks keep two of every four consecutive input columns of each row (groups are columns
[4k, 4k+4)):

- magnitude: keep the two largest |W_ij| of each group.
- wanda:     keep the two largest |W_ij|·‖x_j‖ = |W_ij|·sqrt(G_jj), G = XᵀX the input Gram
             matrix (X rows are tokens); without a Gram this is magnitude.

Compensation (SparseGPT-style optimal brain surgeon, one row-parallel sweep over the columns):
with H = G + λ·mean(diag G)·I and the upper Cholesky factor C of H⁻¹ (H⁻¹ = Cᵀ C), columns
are visited in order; zeroing w_j (all rows at once) costs w_j²/C_jj² in output error, and the
best update of the columns not yet visited is  W[:, k] −= (w_j/C_jj)·C_jk  for k > j. C_jj² is
[H_{j:, j:}⁻¹]_jj, the inverse Hessian of the columns still free, so the saliency w²/C_jj² is
OBS's w²/[H⁻¹]_jj at that step. Updates are applied lazily per block of columns.

With compensation the mask of each group of four is chosen when the sweep reaches it:
``wanda`` by the OBS saliency of the already-updated weights (for a diagonal Gram this is
Wanda's |W|²·G_jj), ``magnitude`` by |W| of the updated weights; ``fixed`` masks (computed
up front from the original weight) are available through :func:`prune24`'s ``mask``.

Packed format (``slimfx.formats``): ``values`` out × in/2 in the weight's dtype (the two
kept weights of every group, in column order); ``meta`` uint8 out × in/8: per group the two
2-bit positions (first kept in bits 0-1, second in bits 2-3), two groups per byte, the even
group in the low nibble. ``in_features`` must be a multiple of 8.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx import formats
from slimfx.formats import sparse24_unsupported
from slimfx.planning.configs import Decision, Sparse24Config

__all__ = [
    "SPARSE24_METHODS",
    "sparse24_unsupported",
    "mask24",
    "is_24",
    "prune24",
    "Pruner24",
    "pack24",
    "unpack24",
]

SPARSE24_METHODS = ("magnitude", "wanda")
_DAMP = 0.01  # λ of the damped Hessian, relative to mean(diag G) (SparseGPT's usual value)
_BLOCK = 128  # columns per lazy-update block


def _scores(weight: Tensor, method: str, gram: Tensor | None) -> Tensor:
    W = weight.detach().abs().to(torch.float32)
    if method == "magnitude" or gram is None:
        if method not in SPARSE24_METHODS:
            raise ValueError(f"unknown 2:4 mask method {method!r}; known: {SPARSE24_METHODS}")
        return W
    if method == "wanda":
        norms = gram.detach().diagonal().to(torch.float64).clamp_min(0).sqrt()
        return W * norms.to(torch.float32)[None, :]
    raise ValueError(f"unknown 2:4 mask method {method!r}; known: {SPARSE24_METHODS}")


def _keep_top2(scores: Tensor) -> Tensor:
    """Boolean mask keeping the two highest scores of every group of four columns."""
    out_f, in_f = scores.shape
    groups = scores.reshape(out_f, in_f // 4, 4)
    idx = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(out_f, in_f)


def mask24(weight: Tensor, method: str = "magnitude", gram: Tensor | None = None) -> Tensor:
    """Boolean mask (out × in), exactly two True in every group of four consecutive columns.

    ``method``: ``magnitude`` (|W|) or ``wanda`` (|W|·sqrt(diag G); magnitude without a Gram).
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(
            f"2:4 needs a 2-D weight with in_features % 4 == 0, got {tuple(weight.shape)}"
        )
    return _keep_top2(_scores(weight, method, gram))


def _inverse_cholesky(gram: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor C of (G + λI)⁻¹ (float64) and the mask of dead columns."""
    H = gram.detach().to(torch.float64).clone()
    H = 0.5 * (H + H.T)
    dead = H.diagonal() <= 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H.diagonal()[dead] = 1.0
    eye = torch.eye(n, dtype=torch.float64)
    scale = float(H.diagonal().mean())
    for damp in (_DAMP, 0.1, 1.0):
        L, info = torch.linalg.cholesky_ex(H + damp * scale * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            C, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(C).all():
                return C, dead
    raise ValueError("the Gram matrix is too ill-conditioned for 2:4 compensation")


def _sweep(W: Tensor, C: Tensor, method: str, fixed: Tensor | None) -> Tensor:
    """The compensated sweep on ``W`` (fp32, modified in place) with ``C`` (fp32 upper
    Cholesky factor of the damped H⁻¹); returns the pruned weight."""
    out_f, in_f = W.shape
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    inv_d2 = C.diagonal().square().reciprocal()
    for b0 in range(0, in_f, _BLOCK):
        b1 = min(b0 + _BLOCK, in_f)
        Wb = W[:, b0:b1].clone()
        Cb = C[b0:b1, b0:b1]
        Err = torch.zeros_like(Wb)
        for g in range(0, b1 - b0, 4):
            T = Wb[:, g : g + 4]  # the group, as updated by every earlier column
            if fixed is not None:
                keep = fixed[:, b0 + g : b0 + g + 4]
            elif method == "wanda":  # OBS saliency w²/[H⁻¹]_jj
                keep = _keep_top2(T.square() * inv_d2[b0 + g : b0 + g + 4])
            else:
                keep = _keep_top2(T.abs())
            mask[:, b0 + g : b0 + g + 4] = keep
            drop = (~keep).to(T.dtype)
            Cg = Cb[g : g + 4, g : g + 4]
            E4 = Err[:, g : g + 4]
            for j in range(4):  # sequential inside the group of four …
                e = T[:, j] * drop[:, j] / Cg[j, j]
                E4[:, j] = e
                if j < 3:
                    T[:, j + 1 :] -= e[:, None] * Cg[j, j + 1 :]
            T.mul_(keep)
            # … then one rank-4 update of the rest of the block
            if g + 4 < b1 - b0:
                Wb[:, g + 4 :] -= E4 @ Cb[g : g + 4, g + 4 :]
        W[:, b0:b1] = Wb
        if b1 < in_f:
            W[:, b1:] -= Err @ C[b0:b1, b1:]
    return W.mul_(mask)


class Pruner24:
    """2:4 pruning with one method and one Gram, reusable over many weights of the same
    input: the damped inverse-Hessian Cholesky factor is computed once (S+L alternations and
    the cost model prune many matrices against one Gram)."""

    def __init__(self, method: str = "wanda", gram: Tensor | None = None, compensate: bool = True):
        if method not in SPARSE24_METHODS:
            raise ValueError(f"unknown 2:4 mask method {method!r}; known: {SPARSE24_METHODS}")
        self.method, self.gram = method, gram
        self.compensate = bool(compensate and gram is not None)
        self._C: Tensor | None = None
        self._dead: Tensor | None = None

    def _factor(self, n: int) -> tuple[Tensor, Tensor]:
        if self._C is None:
            assert self.gram is not None
            C64, self._dead = _inverse_cholesky(self.gram, n)
            self._C = C64.to(torch.float32)
        assert self._dead is not None
        return self._C, self._dead

    def __call__(self, weight: Tensor, mask: Tensor | None = None) -> Tensor:
        """The pruned weight (weight's dtype); ``mask`` fixes the kept positions."""
        if weight.dim() != 2 or weight.shape[1] % 4:
            raise ValueError(
                f"2:4 needs a 2-D weight with in_features % 4 == 0, got {tuple(weight.shape)}"
            )
        if mask is not None:
            if mask.shape != weight.shape or not is_24(mask):
                raise ValueError("mask must have the weight's shape and keep 2 of every 4 columns")
            mask = mask.to(torch.bool)
        if not self.compensate:
            if mask is None:
                mask = mask24(weight, self.method, self.gram)
            return torch.where(mask, weight.detach(), torch.zeros_like(weight))
        C, dead = self._factor(weight.shape[1])
        W = weight.detach().to(torch.float32).clone()
        W[:, dead] = 0.0  # a dead input never reaches the output: its weight is free to drop
        return _sweep(W, C, self.method, mask).to(weight.dtype)


def prune24(
    weight: Tensor,
    method: str = "magnitude",
    gram: Tensor | None = None,
    compensate: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """The 2:4-pruned weight (out × in, weight's dtype, zeros where pruned).

    Without ``compensate`` the kept weights are unchanged (mask from :func:`mask24`, or the
    given ``mask``). With ``compensate`` and a Gram the kept weights absorb the pruning error
    (SparseGPT sweep); the mask is chosen during the sweep (see the module docstring) unless
    ``mask`` fixes it. Compensation without a Gram (identity) changes nothing.
    """
    return Pruner24(method, gram, compensate)(weight, mask)


def is_24(mask: Tensor) -> bool:
    """True when ``mask`` (out × in, bool) keeps exactly two of every four columns."""
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def pack24(weight_pruned: Tensor) -> dict[str, Tensor]:
    """Pack a weight with at most two nonzeros per group of four into ``values`` / ``meta``
    (``slimfx.formats``). Groups with fewer than two nonzeros keep zeros at their lowest free
    positions."""
    reason = sparse24_unsupported(weight_pruned.shape[1])
    if reason:
        raise ValueError(reason)
    values, meta = formats.pack24(weight_pruned)
    return {"values": values, "meta": meta}


def unpack24(values: Tensor, meta: Tensor, in_features: int) -> Tensor:
    """The dense (out × in) weight of packed ``values`` / ``meta`` (inverse of :func:`pack24`),
    in the values' dtype."""
    return formats.densify24(values, meta, in_features).to(values.dtype)


def factorize_sparse24(
    weight: Tensor, decision: Decision, gram: Tensor | None
) -> dict[str, Tensor]:
    """The ``sparse24`` form's tensors: prune two of every four (compensated or not), pack."""
    assert isinstance(decision, Sparse24Config)
    reason = sparse24_unsupported(weight.shape[1])
    if reason:
        raise ValueError(reason)
    return pack24(prune24(weight, decision.mask, gram, decision.compensate))


def reconstruct_sparse24(decision: Decision, tensors: dict[str, Tensor]) -> Tensor:
    """The dense 2:4 weight the ``sparse24`` form's tensors represent."""
    values = tensors["values"]
    return unpack24(values, tensors["meta"], 2 * values.shape[1])
