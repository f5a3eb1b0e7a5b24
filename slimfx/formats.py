"""Storage formats: how integer codes and 2:4 sparse weights are laid out in bytes.

The one definition of each format, used by ``slimfx.numerics`` (which writes them), the
``slimfx.ir`` ops (which read them), the kernels' references and the ONNX translation. A leaf:
imports nothing from slimfx, and every layer may import it. The byte counts here are the ones
``slimfx.planning.configs`` prices (``tests/test_formats.py`` checks priced == stored).

Integer codes (weight ``out × in``, codes in ``[0, 2^bits − 1]``, uint8 storage):

- each row is a little-endian bit stream: code ``j`` occupies bits ``[bits·j, bits·(j+1))``, so
  a row takes :func:`packed_width` ``= ceil(bits·in / 8)`` bytes. For 4 bits this is ONNX
  MatMulNBits' order (column ``j`` in byte ``j // 2``, low nibble for even ``j``); 8 bits is
  one code per byte; 2 bits four per byte; 3 bits eight codes per three bytes.
- ``scales`` (out × n_groups) floating; ``zeros`` uint8 (out × n_groups), one integer zero point
  per group, or absent for symmetric codes, whose zero point is 2^(bits−1) (8 for int4, 128
  for int8). Group ``g`` covers columns ``[g·G, (g+1)·G)``; per-channel means ``G = in``.
- dequantized ``w = (q − z) · s``, formed in fp32.

2:4 sparsity (``in`` a multiple of 4):

- ``values`` (out × in/2), floating: the two kept weights of every group of four columns, in
  column order;
- ``meta`` uint8 (out × ceil(in/8)): per group two 2-bit positions (first kept in bits 0-1,
  second in bits 2-3), two groups per byte, the even group in the low nibble (when in/4 is
  odd the last byte's high nibble is padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CODE_BITS",
    "RUNTIME_BITS",
    "packed_width",
    "codes_per_chunk",
    "pack_codes",
    "unpack_codes",
    "symmetric_offset",
    "n_groups",
    "centered_codes",
    "dequantize",
    "meta_width",
    "sparse24_unsupported",
    "pack24",
    "positions24",
    "densify24",
]

#: bit widths with a packed code format (what ``QuantConfig`` accepts).
CODE_BITS: tuple[int, ...] = (2, 3, 4, 8)
#: bit widths the runtime ops, the Triton kernels and MatMulNBits run.
RUNTIME_BITS: tuple[int, ...] = (4, 8)


def _check_bits(bits: int) -> None:
    if bits not in CODE_BITS:
        raise ValueError(f"bits must be one of {CODE_BITS}, got {bits}")


def packed_width(bits: int, in_features: int) -> int:
    """Bytes one row of ``in_features`` codes takes: ``ceil(bits · in / 8)``."""
    _check_bits(bits)
    return math.ceil(bits * in_features / 8)


def codes_per_chunk(bits: int) -> int:
    """The fewest codes that fill whole bytes: 1 for 8 bits, 2 for 4, 4 for 2, 8 for 3."""
    _check_bits(bits)
    return 8 // math.gcd(8, bits)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (… × in, values ``< 2^bits``) → uint8 (… × :func:`packed_width`)."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"{bits}-bit codes must lie in [0, {(1 << bits) - 1}]")
    K = codes.shape[-1]
    if bits == 8:
        return codes.contiguous()
    if bits == 4:
        c = F.pad(codes, (0, K % 2)) if K % 2 else codes
        return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()
    n = codes_per_chunk(bits)
    lead = codes.shape[:-1]
    c = F.pad(codes, (0, (-K) % n)).to(torch.int64).reshape(*lead, -1, n)
    word = (c << (torch.arange(n, device=codes.device) * bits)).sum(-1)  # disjoint bits
    nbytes = n * bits // 8
    out = (word[..., None] >> (torch.arange(nbytes, device=codes.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(*lead, -1)[..., : packed_width(bits, K)].contiguous()


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 (… × packed width) → uint8 codes (… × in)."""
    _check_bits(bits)
    if bits == 8:
        return packed[..., :in_features]
    if 8 % bits == 0:  # whole codes per byte (int2, int4): code i of a byte at bits·i
        mask = (1 << bits) - 1
        parts = [(packed >> (bits * i)) & mask for i in range(8 // bits)]
        return torch.stack(parts, dim=-1).flatten(-2)[..., :in_features]
    n = codes_per_chunk(bits)
    nbytes = n * bits // 8
    chunks = math.ceil(in_features / n)
    lead = packed.shape[:-1]
    b = F.pad(packed, (0, chunks * nbytes - packed.shape[-1])).to(torch.int64)
    b = b.reshape(*lead, chunks, nbytes)
    word = (b << (torch.arange(nbytes, device=packed.device) * 8)).sum(-1)
    q = (word[..., None] >> (torch.arange(n, device=packed.device) * bits)) & ((1 << bits) - 1)
    return q.reshape(*lead, chunks * n)[..., :in_features].to(torch.uint8)


def symmetric_offset(bits: int) -> int:
    """The implicit zero point of symmetric codes: 2^(bits−1) (8 for int4, 128 for int8)."""
    return 1 << (bits - 1)


def n_groups(in_features: int, group_size: int | None) -> int:
    """Scale groups per row (1 when per-channel, ``group_size=None``)."""
    return 1 if group_size is None else math.ceil(in_features / group_size)


def centered_codes(
    qweight: Tensor, zeros: Tensor | None, bits: int, group_size: int | None, in_features: int
) -> tuple[Tensor, Tensor]:
    """``(q − z)`` in fp32 (out × in) and the group index of every column (``zeros=None``:
    symmetric, z = 2^(bits−1))."""
    q = unpack_codes(qweight, bits, in_features).to(torch.float32)
    G = in_features if group_size is None else group_size
    col_group = torch.arange(in_features, device=q.device) // G
    if zeros is None:
        return q - float(symmetric_offset(bits)), col_group
    return q - zeros.to(torch.float32)[:, col_group], col_group


def dequantize(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int | None,
    in_features: int,
) -> Tensor:
    """The fp32 dense weight (out × in) ``(q − z) · s`` the stored codes represent."""
    centered, col_group = centered_codes(qweight, zeros, bits, group_size, in_features)
    return centered * scales.to(torch.float32)[:, col_group]


# --------------------------------------------------------------------------- 2:4


def meta_width(in_features: int) -> int:
    """Bytes of 2:4 metadata per row: two 4-column groups per byte, ``ceil(in / 8)``."""
    return math.ceil(in_features / 8)


def sparse24_unsupported(in_features: int) -> str | None:
    """Why slimfx's 2:4 forms cannot take ``in_features`` inputs, or ``None`` when they can
    (the ops and modules need whole metadata bytes: a multiple of 8)."""
    if in_features % 8:
        return (
            f"in_features {in_features} is not a multiple of 8 (2:4 metadata packs two groups "
            "of four columns per byte)"
        )
    return None


def pack24(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(values, meta)`` of a weight (out × in, in % 4 == 0) with at most two nonzeros in
    every group of four; a group with fewer keeps zeros at its lowest free positions."""
    out_f, in_f = weight.shape
    if in_f % 4:
        raise ValueError(f"2:4 needs in_features % 4 == 0, got {in_f}")
    groups = weight.detach().reshape(out_f, in_f // 4, 4)
    nz = groups != 0
    if bool((nz.sum(-1) > 2).any()):
        raise ValueError("weight is not 2:4 sparse: some group of four has more than two nonzeros")
    # rank positions: nonzeros first, then lower positions first; keep the best two, sorted
    pos = torch.arange(4, device=weight.device)
    key = nz.to(torch.int64) * 8 + (3 - pos)
    idx = key.topk(2, dim=-1).indices.sort(dim=-1).values  # out × in/4 × 2, ascending
    values = groups.gather(-1, idx).reshape(out_f, in_f // 2)
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # out × in/4
    if nib.shape[1] % 2:
        nib = F.pad(nib, (0, 1))
    meta = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def positions24(meta: Tensor, in_features: int) -> Tensor:
    """Column indices (out × in/2, int64) of the kept weights, in ``values`` order."""
    m = meta.to(torch.int64)
    nib = torch.stack((m & 0x0F, m >> 4), dim=-1).flatten(-2)[:, : in_features // 4]
    pos = torch.stack((nib & 0x3, (nib >> 2) & 0x3), dim=-1)  # out × in/4 × 2
    base = torch.arange(0, in_features, 4, device=meta.device)[None, :, None]
    return (pos + base).reshape(meta.shape[0], in_features // 2)


def densify24(values: Tensor, meta: Tensor, in_features: int) -> Tensor:
    """The dense fp32 weight (out × in) of 2:4 ``values`` / ``meta``."""
    out_f = values.shape[0]
    if values.shape[-1] * 2 != in_features or meta.shape[-1] != meta_width(in_features):
        raise ValueError(
            f"values {tuple(values.shape)} / meta {tuple(meta.shape)} do not fit "
            f"in_features={in_features}"
        )
    dense = torch.zeros(out_f, in_features, dtype=torch.float32, device=values.device)
    return dense.scatter_(1, positions24(meta, in_features), values.to(torch.float32))
