"""Ground truth for ``quant_linear``: dequantize the stored codes, then ``F.linear``.

    y = x @ deq(W)ᵀ + b,   deq(W)[n, k] = (q[n, k] − z[n, k // G]) · s[n, k // G]

Storage (see ``slimfx.numerics``): ``qweight`` uint8, int4 packed two per byte (column ``k`` in
byte ``k // 2``, low nibble for even ``k``), int8 one per byte; ``scales`` (N × n_groups) in the
weight dtype; ``zeros`` uint8 (N × n_groups) or ``None`` for symmetric codes (offset 8 for int4,
128 for int8). ``group_size=None`` means per-channel (one group per row).

Semantics fixed here and followed by the kernels: the dequantized weight is computed in fp32
and rounded to ``x.dtype``; the product accumulates in fp32 (what CPU ``F.linear`` does for
half types) and the output has ``x.dtype``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "pack_int4",
    "unpack_int4",
    "unpack_codes",
    "dequantize",
    "quant_linear_reference",
    "symmetric_offset",
    "n_groups",
]


def symmetric_offset(bits: int) -> int:
    """The implicit zero point of symmetric codes: 8 for int4, 128 for int8."""
    return 1 << (bits - 1)


def n_groups(in_features: int, group_size: int | None) -> int:
    """Number of scale groups per row (1 when per-channel)."""
    return 1 if group_size is None else math.ceil(in_features / group_size)


def pack_int4(q: Tensor) -> Tensor:
    """Pack int4 codes (… × K, values 0..15, any integer dtype) two per byte, ONNX MatMulNBits
    order: column ``k`` in byte ``k // 2``, low nibble for even ``k``. Odd ``K`` pads a zero
    high nibble. Returns uint8 (… × ceil(K/2))."""
    if q.dtype.is_floating_point:
        raise TypeError(f"int4 codes must be an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    q = q.to(torch.uint8)
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    lo, hi = q[..., 0::2], q[..., 1::2]
    return (lo | (hi << 4)).contiguous()


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 (… × ceil(K/2)) → codes uint8 (… × K)."""
    lo = packed & 0x0F
    hi = packed >> 4
    q = torch.stack((lo, hi), dim=-1).flatten(-2)
    return q[..., :in_features].contiguous()


def unpack_codes(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """Integer codes (N × K, uint8) from the stored ``qweight``."""
    if bits == 4:
        return unpack_int4(qweight, in_features)
    if bits == 8:
        return qweight[:, :in_features]
    raise ValueError(f"bits {bits} unsupported (4 or 8)")


def dequantize(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int | None,
    in_features: int,
) -> Tensor:
    """Dense fp32 weight (N × K): ``(q − z) · s`` group by group."""
    q = unpack_codes(qweight, bits, in_features).to(torch.float32)
    G = in_features if group_size is None else group_size
    col_group = torch.arange(in_features, device=q.device) // G  # group of each column
    s = scales.to(torch.float32)[:, col_group]
    if zeros is None:
        z = torch.full_like(s, float(symmetric_offset(bits)))
    else:
        z = zeros.to(torch.float32)[:, col_group]
    return (q - z) * s


def quant_linear_reference(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None = None,
    bias: Tensor | None = None,
    bits: int = 4,
    group_size: int | None = 128,
) -> Tensor:
    """``x @ deq(W)ᵀ + b`` in ``x.dtype`` (the weight is dequantized in fp32, then rounded)."""
    w = dequantize(qweight, scales, zeros, bits, group_size, x.shape[-1]).to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w, b)
