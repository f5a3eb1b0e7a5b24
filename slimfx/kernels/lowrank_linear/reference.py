"""Ground truth for ``lowrank_linear``: two plain ``F.linear`` calls.

    y = (x Vᵀ) Uᵀ + b,   U: N × r, V: r × K  (W ≈ U V, see ``slimfx.numerics``)

Semantics followed by the kernels: ``U``, ``V`` and ``bias`` are used in ``x.dtype``; the
rank-r intermediate ``h = x Vᵀ`` is rounded to ``x.dtype`` (as two separate matmuls would
store it); products accumulate in fp32; the output has ``x.dtype``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["lowrank_linear_reference"]


def lowrank_linear_reference(
    x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``x @ Vᵀ @ Uᵀ + b`` in ``x.dtype``."""
    h = F.linear(x, V.to(x.dtype))
    return F.linear(h, U.to(x.dtype), None if bias is None else bias.to(x.dtype))
