"""Is a weight already quantized? Detect blocks that sit on a low-bit affine grid.

A weight dequantized from a block format such as GGUF Q4_1 (blocks of 32 along the input
dimension, ``w = d·q + m`` with codes ``q ∈ 0..15`` and an fp16 scale ``d`` and minimum ``m``)
is a "k-bit model in disguise": re-quantizing it is not a test of a quantizer on real weights.
For one block ``w_1..w_B`` (B = ``block``, along the last dim), with ``lo = min w``,
``span = max w − lo``, the block *fits an affine* ``bits``-*bit grid* when for some integer
``K ∈ 1..2^bits − 1`` and ``d = span / K``

    |w_i − lo − d · round((w_i − lo) / d)| ≤ tol   for every i,

i.e. every value is ``lo + d·q_i`` with an integer code ``0 ≤ q_i ≤ K``. Any offset is allowed
(the grid's lowest used code plays the role of ``m``); ``K`` below ``2^bits − 1`` covers blocks
whose largest code is unused, and the finest fitting grid (largest ``K``) is the one reported.
``tol = rel_tol · max |w|`` over the block; the default ``rel_tol = 2⁻¹⁰`` is about one fp16
ulp at the block's largest magnitude, enough for grid values that went through fp16 (``d``,
``m`` or ``w`` stored in half precision), and far below the spacing of ``2^bits`` levels (a
Gaussian block of 32 values never passes: each of its 30 free values would have to land within
≈1% of a grid step of an integer).

A constant block (``span = 0``) fits trivially (and counts as having an integer offset: any
grid that contains its value reproduces it). :func:`grid_stats` also counts blocks with at
most ``2^bits`` distinct values (exact equality, a weaker test) and blocks whose offset is an
integer multiple of the step (``lo / d`` integral): only those can come back exactly from a format
with an *integer* zero point (slimfx's, ONNX MatMulNBits'), since it represents
``w = (q − z)·s`` and needs ``lo = −z·s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GridStats", "grid_stats", "affine_grid_fraction"]


@dataclass(frozen=True)
class GridStats:
    """Block counts of one or more weights (see the module docstring).

    - ``blocks``: number of complete blocks examined (a trailing partial block is ignored).
    - ``few_distinct``: blocks with at most ``2^bits`` distinct values.
    - ``affine``: blocks that fit an affine ``bits``-bit grid within the tolerance.
    - ``integer_offset``: affine blocks whose offset ``lo`` is an integer multiple of the step.
    """

    blocks: int
    few_distinct: int
    affine: int
    integer_offset: int

    def __add__(self, other: GridStats) -> GridStats:
        return GridStats(
            self.blocks + other.blocks,
            self.few_distinct + other.few_distinct,
            self.affine + other.affine,
            self.integer_offset + other.integer_offset,
        )

    def fraction(self, field: str = "affine") -> float:
        """``field`` / ``blocks`` (0.0 when there are no blocks)."""
        return getattr(self, field) / self.blocks if self.blocks else 0.0


def _blocks(weight: Tensor, block: int) -> Tensor:
    """(n_blocks, block) float64 view of the complete ``block``-wide blocks of each row."""
    if block < 2:
        raise ValueError(f"block must be ≥ 2, got {block}")
    W = weight.detach().to(torch.float64)
    W = W.reshape(-1, W.shape[-1]) if W.dim() > 1 else W.reshape(1, -1)
    n = W.shape[1] // block
    return W[:, : n * block].reshape(-1, block)


def grid_stats(
    weight: Tensor, block: int = 32, bits: int = 4, rel_tol: float = 2.0**-10
) -> GridStats:
    """Count the ``block``-wide blocks along the last dim of ``weight`` that sit on an affine
    ``bits``-bit grid (and the weaker / stronger counts of :class:`GridStats`)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    B = _blocks(weight, block)
    if B.numel() == 0:
        return GridStats(0, 0, 0, 0)
    levels = 1 << bits
    srt = B.sort(dim=1).values
    distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(1)
    few = distinct <= levels

    lo = srt[:, :1]
    span = (srt[:, -1:] - lo).squeeze(1)
    tol = rel_tol * B.abs().amax(1)
    flat = span <= tol  # constant block (up to the tolerance): on any grid
    fits = flat.clone()
    step = torch.where(fits, torch.ones_like(span), span)  # the finest step that fits
    x = B - lo  # ≥ 0
    for K in range(levels - 1, 0, -1):  # finest grid first; only blocks not yet placed
        idx = (~fits).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        d = (span[idx] / K)[:, None]
        xi = x[idx]
        resid = (xi - d * torch.round(xi / d)).abs().amax(1)
        ok = resid <= tol[idx]
        fits[idx[ok]] = True
        step[idx[ok]] = d[ok, 0]
    ratio = lo.squeeze(1) / step
    int_off = flat | fits & ((ratio - torch.round(ratio)).abs() * step <= tol)
    return GridStats(int(B.shape[0]), int(few.sum()), int(fits.sum()), int(int_off.sum()))


def affine_grid_fraction(
    weight: Tensor, block: int = 32, bits: int = 4, rel_tol: float = 2.0**-10
) -> float:
    """Fraction of ``block``-wide blocks along the last dim that fit an affine ``bits``-bit
    grid (1.0 for a weight dequantized from GGUF Q4_1 at ``block=32, bits=4``; 0.0 for
    continuous weights)."""
    return grid_stats(weight, block, bits, rel_tol).fraction("affine")
