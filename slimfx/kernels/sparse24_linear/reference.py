"""Ground truth for ``sparse24_linear``: densify the 2:4 storage, then ``F.linear``.

Storage (``slimfx.formats``, which implements the packing used here): ``values`` (N × K/2) in
the weight dtype, the two kept weights of every group of four columns in column order; ``meta`` uint8 (N × K/8): per group of four, two
2-bit positions (first kept in bits 0-1, second in bits 2-3), two groups per byte (even group
in the low nibble). When K/4 is odd the last byte's high nibble is padding (meta has
ceil(K/8) columns).

Semantics followed by the kernels: the dense weight is used in ``x.dtype``; products
accumulate in fp32; output in ``x.dtype``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from slimfx import formats

__all__ = [
    "pack_sparse24",
    "unpack_positions",
    "densify_sparse24",
    "sparse24_linear_reference",
    "check_sparse24_args",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pack_sparse24(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the two largest-magnitude weights of every group of four (ties: lower column) and
    return ``(values, meta)`` in the storage format. ``weight``: N × K with K % 4 == 0."""
    N, K = weight.shape
    if K % 4:
        raise ValueError(f"in_features {K} not a multiple of 4 for 2:4")
    groups = weight.reshape(N, K // 4, 4)
    idx = groups.abs().float().topk(2, dim=-1, sorted=False).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    values, meta = formats.pack24(torch.where(keep, groups, 0).reshape(N, K))
    # a kept zero is packed at its group's lowest free position: same dense weight
    return values, meta


def unpack_positions(meta: Tensor, in_features: int) -> Tensor:
    """Column-in-group positions (N × K/4 × 2, int64) of the two kept weights."""
    cols = formats.positions24(meta, in_features).reshape(meta.shape[0], in_features // 4, 2)
    return cols % 4


def densify_sparse24(values: Tensor, meta: Tensor, in_features: int) -> Tensor:
    """The dense N × K weight (``values.dtype``) the 2:4 storage represents."""
    return formats.densify24(values, meta, in_features).to(values.dtype)


def sparse24_linear_reference(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``x @ Wᵀ + b`` with W the densified 2:4 weight, in ``x.dtype``."""
    w = densify_sparse24(values, meta, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def check_sparse24_args(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None
) -> str:
    """Empty string when the arguments follow the storage format, else what is wrong."""
    if x.dtype not in _DTYPES:
        return f"x dtype {x.dtype} unsupported (float16, bfloat16, float32)"
    if x.dim() < 1 or x.shape[-1] == 0:
        return "x has no in_features dimension"
    K = x.shape[-1]
    if K % 4:
        return f"in_features {K} not a multiple of 4 for 2:4"
    if values.dim() != 2 or not values.dtype.is_floating_point:
        return f"values must be a 2-D floating tensor, got {values.dtype} {tuple(values.shape)}"
    N = values.shape[0]
    if values.shape[1] != K // 2:
        return f"values has {values.shape[1]} columns; in_features {K} needs {K // 2}"
    want = (N, math.ceil(K / 8))
    if meta.dtype != torch.uint8 or tuple(meta.shape) != want:
        return f"meta must be uint8 {want}, got {meta.dtype} {tuple(meta.shape)}"
    if bias is not None and (not bias.dtype.is_floating_point or tuple(bias.shape) != (N,)):
        return f"bias must be floating ({N},), got {bias.dtype} {tuple(bias.shape)}"
    return ""
