"""The low-rank KV caches in the ONNX decode step (``kv_lowrank``, ``kv_latent_quant``).

A layer rewritten by :mod:`slimfx.forms.kv.lowrank` caches the latent of its k/v projections
and rebuilds K/V from it on every call. In the step graph of :mod:`slimfx.backends.onnx_kv`
a group ``j`` of such layers sharing a form carries

- ``window_j`` ``(layers, batch, W, key_rank + value_rank)``: the 16-bit latents (keys' first,
  then values') of the sink tokens and of the recent tokens — the whole latent for
  ``kv_lowrank``, which has no store;
- for ``kv_latent_quant``, the quantized store in the layout of ``QuantizedLatentLayer``
  (one ``codes`` / ``scale`` / ``min`` triple per latent segment: ``k``, ``k_tail`` (the
  ``low_bits`` channels of mixed widths), ``v``, ``v_tail``)::

      per channel: codes (layers, batch, nb, group, w·bits/8) uint8, scale/min (layers,
                   batch, nb, w) float16 — ``nb`` blocks of ``group`` tokens
      per token:   codes (layers, batch, n, w·bits/8) uint8, scale/min (layers, batch, n,
                   w/group) float16

  with ``w`` the segment's channels over all head groups;
- with ``sink > 0``, ``sink_j`` ``(layers, 2, batch, kv_heads, sink, head_dim)``: the exact
  rotated keys (``[:, 0]``) and values of each row's first ``sink`` real tokens (slot ``j``:
  the row's ``j``-th token that is not padding, :mod:`slimfx.forms.kv.sinks`). Its length is
  fixed, so the graph has no shape-dependent branch: the attention module computes the exact
  K/V of every token of the call, and :meth:`ExportLatentLayer.merge_sinks` takes, for each
  row's sink columns (read from the padding mask), the held slot (a past token) or the call's
  (a token of this call) by per-row gathers; ``present_sink_j`` returns the buffer with this
  call's sink tokens written (slots of tokens not reached yet are unspecified, never read).

Keys are rebuilt from the latent and rotated with cos/sin of each cached token's position id
— the running count of tokens in the step's padding mask, as the torch layer records the
position ids ``generate()`` passes (``0 … S−1`` in an unpadded row) — then attention runs as in
torch. The per-channel store grows by whole blocks in a flush graph (:class:`LatentFlush`), as
for ``kv_quant``; the per-token store by single tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from slimfx.forms.kv.config import KVDecision, KVLatentQuantConfig, KVLowRankConfig
from slimfx.forms.kv.numerics import _minmax, join_latent, split_latent
from slimfx.forms.kv.sinks import merge_sinks, real_columns
from slimfx.forms.kv.store import latent_segments

__all__ = [
    "LATENT_FORMS",
    "ExportLatentLayer",
    "LatentFlush",
    "dequantize_latent",
    "latent_store_names",
    "latent_store_shapes",
    "pack_codes",
    "unpack_codes",
]

LATENT_FORMS = (KVLowRankConfig, KVLatentQuantConfig)
_TRIPLE = ("codes", "scale", "min")


def unpack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 packed codes → float32 code values (last dim ``·8/bits``): the layout of
    ``formats.unpack_codes`` (code ``i`` of a byte at bits ``bits·i``), computed in int32
    because the ONNX exporter types a uint8 mask constant as int8 (``BitwiseAnd`` then fails
    to load in ONNX Runtime)."""
    if bits == 8:
        return codes.float()
    c = codes.to(torch.int32)
    mask = (1 << bits) - 1
    parts = [(c >> (bits * i)) & mask for i in range(8 // bits)]
    return torch.stack(parts, dim=-1).flatten(-2).float()


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``(..., D)`` → packed bytes ``(..., D·bits/8)``, the layout of
    ``numerics.pack_codes``, computed in int32 (see :func:`unpack_codes`)."""
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.to(torch.int32).unflatten(-1, (-1, per))
    out = c[..., 0]
    for i in range(1, per):
        out = out | (c[..., i] << (bits * i))
    return out.to(torch.uint8)


def quantize_blocks(x: Tensor, bits: int, dim: int) -> list[Tensor]:
    """Per-channel codes over the block axis ``dim`` (each channel's min/max over the block):
    packed codes, scales, minimums (``numerics._minmax``; ``dim`` dropped from the last two)."""
    q, s, m = _minmax(x, bits, dim=dim)
    return [pack_codes(q, bits), s.squeeze(dim), m.squeeze(dim)]


def quantize_groups(x: Tensor, bits: int, group: int) -> list[Tensor]:
    """Per-token codes over groups of ``group`` channels of the last axis: packed codes,
    scales and minimums ``(…, channels / group)``."""
    q, s, m = _minmax(x.unflatten(-1, (-1, group)), bits, dim=-1)
    return [pack_codes(q.flatten(-2), bits), s.squeeze(-1), m.squeeze(-1)]


def dequantize_blocks(codes: Tensor, scale: Tensor, mn: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`quantize_blocks` with the block axis second to last (float32)."""
    return unpack_codes(codes, bits) * scale.float().unsqueeze(-2) + mn.float().unsqueeze(-2)


def dequantize_groups(codes: Tensor, scale: Tensor, mn: Tensor, bits: int, group: int) -> Tensor:
    """Inverse of :func:`quantize_groups` (float32)."""
    x = unpack_codes(codes, bits).unflatten(-1, (-1, group))
    return (x * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)).flatten(-2)


def _segments(form: KVLatentQuantConfig, role: str) -> list[tuple[str, int, int]]:
    """``(store name prefix, channels over all head groups, bits)`` of the role's segments."""
    return [(name, form.groups * n, b) for name, n, b in latent_segments(form, role)]


def latent_store_names(form: KVDecision) -> list[str]:
    """The store arrays of one group, in graph-input order (none for ``kv_lowrank``)."""
    if not isinstance(form, KVLatentQuantConfig):
        return []
    return [f"{p}_{t}" for r in ("key", "value") for p, _, _ in _segments(form, r) for t in _TRIPLE]


def latent_store_shapes(form: KVLatentQuantConfig, lead: tuple[int, ...], n: int) -> list:
    """``(shape, dtype)`` of each store array holding ``n`` tokens (a whole number of blocks
    on the per-channel axis) with leading dims ``lead`` (e.g. ``(layers, batch)``)."""
    out = []
    g = form.group
    for role in ("key", "value"):
        for _, w, bits in _segments(form, role):
            if form.axis == "channel":
                code, side = (*lead, n // g, g, w * bits // 8), (*lead, n // g, w)
            else:
                code, side = (*lead, n, w * bits // 8), (*lead, n, w // g)
            out += [(code, torch.uint8), (side, torch.float16), (side, torch.float16)]
    return out


def dequantize_latent(
    store: Sequence[Tensor], form: KVLatentQuantConfig, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """One layer's store arrays (``latent_store_names`` order, batch first) → the key and
    value latents ``(batch, n, rank)`` in ``dtype`` (float32 arithmetic, as
    ``numerics.dequantize_keys`` / ``dequantize_values``)."""
    it = iter(store)
    out = []
    for role in ("key", "value"):
        parts = []
        for _, _, bits in _segments(form, role):
            arrays = next(it), next(it), next(it)
            if form.axis == "channel":  # (B, nb, g, w) · (B, nb, 1, w)
                parts.append(dequantize_blocks(*arrays, bits).flatten(1, 2))
            else:  # (B, n, w/g, g) · (B, n, w/g, 1)
                parts.append(dequantize_groups(*arrays, bits, form.group))
        out.append((parts[0] if len(parts) == 1 else join_latent(parts, form.groups)).to(dtype))
    return out[0], out[1]


class LatentFlush(nn.Module):
    """Latents leaving the window ``(rows, n, key_rank)`` and ``(rows, n, value_rank)`` (``n``
    a whole number of blocks on the per-channel axis) → their store arrays: the quantization
    of ``QuantizedLatentLayer._quantize`` (``numerics._minmax``), packed by
    :func:`pack_codes`."""

    def __init__(self, form: KVLatentQuantConfig) -> None:
        super().__init__()
        self.form = form

    def forward(self, key_latent: Tensor, value_latent: Tensor) -> tuple[Tensor, ...]:
        f = self.form
        out: list[Tensor] = []
        for role, x in (("key", key_latent), ("value", value_latent)):
            segs = _segments(f, role)
            sizes = [w // f.groups for _, w, _ in segs]
            parts = [x] if len(segs) == 1 else split_latent(x, f.groups, sizes)
            for (_, _, bits), part in zip(segs, parts):
                if f.axis == "channel":  # per channel over each block of `group` tokens
                    out += quantize_blocks(part.unflatten(1, (-1, f.group)), bits, 2)
                else:  # per token over each `group` channels
                    out += quantize_groups(part, bits, f.group)
        return tuple(out)


class ExportLatentLayer(DynamicLayer):
    """The cache layer the step graph traces for a low-rank layer: ``window`` ``(B, W, rk +
    rv)``, the store arrays and the ``sink`` buffer ``(2, B, Hkv, sink, D)`` are graph inputs.
    ``update`` returns the latent of every cached token and the call's (``sinks ‖ store ‖
    recent window ‖ new``, as ``QuantizedLatentLayer.update``); ``positions`` ``(B, S)``: the
    position ids of every cached token and the call's (from the padding mask; ``None``:
    ``0 … S−1``);
    :meth:`merge_sinks` puts the sink tokens' exact K/V in place (module docstring)."""

    def __init__(
        self,
        window: Tensor,
        store: Sequence[Tensor] | None,
        sink: Tensor | None,
        form: KVLowRankConfig | KVLatentQuantConfig,
        positions: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.window, self.store, self.sink, self.form = window, store, sink, form
        self.key_rank = form.key_rank
        self.keys = self.values = window  # for DynamicLayer's bookkeeping only
        self.is_initialized = True
        self.stored = 0
        if store is not None:
            n = store[0].shape[1]
            self.stored = n * form.group if form.axis == "channel" else n  # type: ignore[union-attr]
        self.positions: Tensor | None = positions
        self.new: Tensor | None = None
        self.present_sink: Tensor | None = None

    def get_seq_length(self) -> int:
        return self.window.shape[1] + self.stored

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Latents ``(B, 1, T, rank)`` of the call → those of every cached token and the
        call's, ``(B, 1, S, rank)`` each."""
        B = key_states.shape[0]
        n0 = self.get_seq_length()
        new = torch.cat([key_states.squeeze(1), value_states.squeeze(1)], dim=-1)
        self.new = new
        parts = [self.window, new]
        if self.store is not None:  # sinks ‖ store ‖ recent ‖ new, in one concatenation
            k, v = dequantize_latent(self.store, self.form, new.dtype)  # type: ignore[arg-type]
            s = self.form.sink
            parts = [self.window[:, :s], torch.cat([k, v], dim=-1), self.window[:, s:], new]
        lat = torch.cat(parts, dim=1)
        S = n0 + key_states.shape[2]
        if self.positions is None:  # no mask given: consecutive positions from 0
            self.positions = torch.arange(S, device=lat.device).unsqueeze(0).expand(B, S)
        r = self.key_rank
        return lat[..., :r].unsqueeze(1), lat[..., r:].unsqueeze(1)

    def present(self) -> Tensor:
        """The call's latents ``(B, T, rk + rv)``."""
        assert self.new is not None
        return self.new

    def merge_sinks(
        self, k: Tensor, v: Tensor | None, ek: Tensor, ev: Tensor, mask: Any
    ) -> tuple[Tensor, Any]:
        """Rebuilt K/V with each row's sink tokens exact (``sinks.merge_sinks``, the real
        tokens read from the model's ``mask``); sets ``present_sink``."""
        assert self.sink is not None
        n0, S = self.get_seq_length(), k.shape[2]
        real = real_columns(mask, k.shape[0], S, S)
        k, v, self.present_sink = merge_sinks(k, v, ek, ev, self.sink, n0, self.form.sink, real)
        return k, v
