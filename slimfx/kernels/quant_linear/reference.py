"""Ground truth for ``quant_linear``: dequantize the stored codes, then ``F.linear``.

    y = x @ deq(W)ᵀ + b,   deq(W)[n, k] = (q[n, k] − z[n, k // G]) · s[n, k // G]

Storage (``slimfx.formats``, which implements the unpacking used here): ``qweight`` uint8,
int4 packed two per byte (column ``k`` in byte ``k // 2``, low nibble for even ``k``), int8 one
per byte; ``scales`` (N × n_groups) in the
weight dtype; ``zeros`` uint8 (N × n_groups) or ``None`` for symmetric codes (offset 8 for int4,
128 for int8). ``group_size=None`` means per-channel (one group per row).

Semantics fixed here and followed by the kernels: the dequantized weight is computed in fp32
and rounded to ``x.dtype``; the product accumulates in fp32 (what CPU ``F.linear`` does for
half types) and the output has ``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimfx import formats
from slimfx.formats import n_groups, symmetric_offset

__all__ = [
    "pack_int4",
    "unpack_int4",
    "unpack_codes",
    "dequantize",
    "quant_linear_reference",
    "symmetric_offset",
    "n_groups",
]


def pack_int4(q: Tensor) -> Tensor:
    """Pack int4 codes (… × K, values 0..15, any integer dtype) two per byte, ONNX MatMulNBits
    order (``slimfx.formats``): column ``k`` in byte ``k // 2``, low nibble for even ``k``. Odd
    ``K`` pads a zero high nibble. Returns uint8 (… × ceil(K/2))."""
    if q.dtype.is_floating_point:
        raise TypeError(f"int4 codes must be an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    return formats.pack_codes(q.to(torch.uint8), 4)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 (… × ceil(K/2)) → codes uint8 (… × K)."""
    return formats.unpack_codes(packed, 4, in_features).contiguous()


def unpack_codes(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """Integer codes (N × K, uint8) from the stored ``qweight``."""
    if bits not in formats.RUNTIME_BITS:
        raise ValueError(f"bits {bits} unsupported (4 or 8)")
    return formats.unpack_codes(qweight, bits, in_features)


def dequantize(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int | None,
    in_features: int,
) -> Tensor:
    """Dense fp32 weight (N × K): ``(q − z) · s`` group by group."""
    if bits not in formats.RUNTIME_BITS:
        raise ValueError(f"bits {bits} unsupported (4 or 8)")
    return formats.dequantize(qweight, scales, zeros, bits, group_size, in_features)


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
