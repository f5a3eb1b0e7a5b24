"""The quantized store of a compressed KV cache layer: the arrays a ``kv_quant`` layer's keys
and values, or a ``kv_latent_quant`` layer's latents, are held as (layout of
:mod:`slimfx.forms.kv.numerics`), shared by the dynamic and static cache layers and the ONNX
export."""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.forms.kv.config import KVLatentQuantConfig, KVQuantConfig
from slimfx.forms.kv.numerics import (
    dequantize_keys,
    dequantize_values,
    join_latent,
    quantize_keys,
    quantize_values,
    split_latent,
)

__all__ = ["latent_segments", "encode_store", "decode_store", "drop_stored"]


def latent_segments(config: KVLatentQuantConfig, role: str) -> list[tuple[str, int, int]]:
    """``(store name prefix, channels per head group, bits)`` of the role's ("key" / "value")
    latent segments: ``k`` / ``v`` for the full-width channels, ``k_tail`` / ``v_tail`` for
    the ``low_bits`` ones (``config.segments``)."""
    pre = role[0]
    return [(pre if b == config.bits else f"{pre}_tail", n, b)
            for n, b in config.segments(role)]  # fmt: skip


def encode_store(
    config: KVQuantConfig | KVLatentQuantConfig, keys: Tensor, values: Tensor
) -> dict[str, Tensor]:
    """The store arrays (name → tensor, batch first, tokens third) of ``keys`` / ``values``
    ``(B, H, T, D)`` — a ``kv_quant`` layer's K/V, or a ``kv_latent_quant`` layer's key and
    value latents ``(B, 1, T, rank)`` — in ``config``'s layout (:mod:`.numerics`). Per-channel
    arrays have one row per block of tokens (``T`` a multiple of the block), the rest one per
    token."""
    c = config
    if isinstance(c, KVQuantConfig):
        kq, ks, km = quantize_keys(keys, c.key_bits, c.key_group)
        vq, vs, vm = quantize_values(values, c.value_bits, c.value_group)
        return {"k_codes": kq, "k_scale": ks, "k_min": km,
                "v_codes": vq, "v_scale": vs, "v_min": vm}  # fmt: skip
    quant = quantize_values if c.axis == "token" else quantize_keys
    out: dict[str, Tensor] = {}
    for role, x in (("key", keys), ("value", values)):
        segs = latent_segments(c, role)
        parts = [x] if len(segs) == 1 else split_latent(x, c.groups, [n for _, n, _ in segs])
        for (name, _, bits), part in zip(segs, parts):
            codes, scale, mn = quant(part, bits, c.group)
            out |= {f"{name}_codes": codes, f"{name}_scale": scale, f"{name}_min": mn}
    return out


def decode_store(
    config: KVQuantConfig | KVLatentQuantConfig, store: dict[str, Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`encode_store`: keys and values (or latents) in ``dtype``."""
    c, s = config, store
    if isinstance(c, KVQuantConfig):
        k = dequantize_keys(s["k_codes"], s["k_scale"], s["k_min"], c.key_bits, c.key_group, dtype)
        v = dequantize_values(
            s["v_codes"], s["v_scale"], s["v_min"], c.value_bits, c.value_group, dtype
        )
        return k, v
    deq = dequantize_values if c.axis == "token" else dequantize_keys
    out = []
    for role in ("key", "value"):
        parts = [
            deq(s[f"{nm}_codes"], s[f"{nm}_scale"], s[f"{nm}_min"], bits, c.group, dtype)
            for nm, _, bits in latent_segments(c, role)
        ]
        out.append(parts[0] if len(parts) == 1 else join_latent(parts, c.groups))
    return out[0], out[1]


def drop_stored(store: dict[str, Tensor], stored: int, keep: int) -> dict[str, Tensor]:
    """The store arrays of the first ``keep`` of ``stored`` tokens (``keep`` a whole number of
    blocks): per-token arrays keep ``keep`` rows, per-block ones ``keep / block``."""
    out = {}
    for name, t in store.items():
        rows = t.shape[2]
        out[name] = t[:, :, : keep if rows == stored else keep * rows // stored]
    return out
