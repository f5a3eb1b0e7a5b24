"""Torch ground truth of decode attention over a KIVI-style quantized KV cache.

Storage (the layout ``slimfx.forms.kv`` writes; per sequence ``b`` and kv head ``h``):

- store of ``Ns`` tokens (``Ns`` a multiple of ``key_group``):
  ``k_codes`` / ``v_codes`` uint8 ``(B, Hkv, Ns, D·bits/8)``, ``8/bits`` codes per byte, code
  ``i`` of a byte at bits ``bits·i``; ``k_scale`` / ``k_min`` float16 ``(B, Hkv, Ns/key_group,
  D)`` (one per channel per block of tokens); ``v_scale`` / ``v_min`` float16 ``(B, Hkv, Ns,
  D/value_group)`` (one per token per group of channels). ``x = code·scale + min``.
- 16-bit window ``k_win`` / ``v_win`` ``(B, Hkv, Nw, D)``: the most recent tokens, exact
  (the current token included, so ``Nw ≥ 1``).

The query ``q`` ``(B, Hq, D)`` of one decode step attends to all ``Ns + Nw`` tokens; query head
``i`` reads kv head ``i // (Hq/Hkv)`` (GQA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx import formats

__all__ = ["unpack", "dequantize_store", "kv_decode_attention_reference"]


def unpack(packed: Tensor, bits: int) -> Tensor:
    """``(…, D·bits/8)`` bytes → ``(…, D)`` codes (uint8): ``slimfx.formats``' integer codes."""
    return formats.unpack_codes(packed, bits, packed.shape[-1] * 8 // bits)


def dequantize_store(
    k_codes: Tensor,
    k_scale: Tensor,
    k_min: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_min: Tensor,
    key_bits: int,
    value_bits: int,
    key_group: int,
    value_group: int,
) -> tuple[Tensor, Tensor]:
    """The store's keys and values ``(B, Hkv, Ns, D)`` in float32."""
    kq = unpack(k_codes, key_bits).float()
    B, H, N, D = kq.shape
    k = kq.view(B, H, N // key_group, key_group, D) * k_scale.float().unsqueeze(3)
    k = (k + k_min.float().unsqueeze(3)).view(B, H, N, D)
    vq = unpack(v_codes, value_bits).float().view(B, H, N, D // value_group, value_group)
    v = vq * v_scale.float().unsqueeze(-1) + v_min.float().unsqueeze(-1)
    return k, v.view(B, H, N, D)


def kv_decode_attention_reference(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_min: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_min: Tensor,
    k_win: Tensor,
    v_win: Tensor,
    key_bits: int,
    value_bits: int,
    key_group: int,
    value_group: int,
    scaling: float,
) -> Tensor:
    """``softmax(q·Kᵀ·scaling)·V`` over store + window, float32 math, output in ``q.dtype``."""
    k, v = dequantize_store(
        k_codes, k_scale, k_min, v_codes, v_scale, v_min, key_bits, value_bits, key_group,
        value_group,
    )
    k = torch.cat([k, k_win.float()], dim=2)
    v = torch.cat([v, v_win.float()], dim=2)
    B, Hq, D = q.shape
    rep = Hq // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scaling
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhn,bhnd->bhd", p, v).to(q.dtype)
