"""The static-shape quantized cache, for ``torch.compile`` (and CUDA graphs).

:class:`StaticQuantizedKVLayer` preallocates, for ``max_cache_len`` tokens, the packed codes and
float16 scales/minimums of the quantized store (layout of :mod:`slimfx.forms.kv.numerics`) and
a 16-bit *ring* of ``W = residual + 2·key_group`` slots; nothing is reallocated and every index
is a tensor, so a decode step traces into one graph with no data-dependent shapes.

The residual window: token ``p`` is written to ring slot ``p mod W``. Before writing, the step
re-quantizes, unconditionally, block ``b = max(0, ⌊(p − residual)/key_group⌋ − 1)`` — the newest
block that is out of the window — from the ring into the store (``index_copy_``). Each block is
quantized during the ``key_group`` steps after it leaves the window, from its final tokens, so
the repeats are idempotent; the store's blocks that are not complete yet hold throw-away codes
that nobody reads. A step returns full-length ``(B, H, max_cache_len, D)`` keys/values: the
dequantized store for positions ``j < quantized_tokens(p)``, the ring (exact) for the rest
(positions after ``p`` are masked by the static attention mask). The ring covers
``[p − W + 1, p] ⊇ [quantized_tokens(p), p]``. A call with several tokens (prefill) runs the
same per-token bookkeeping in a loop and returns its own tokens exact.

So the static cache holds ``W`` 16-bit tokens where the dynamic one holds ``residual`` to
``residual + key_group − 1``; reads equal the dynamic cache's token for token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, StaticLayer

from slimfx.forms.kv.config import KVDecision, KVDenseConfig, KVQuantConfig
from slimfx.forms.kv.numerics import (
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
)

__all__ = ["StaticQuantizedKVLayer", "StaticKVCache"]


class StaticQuantizedKVLayer(StaticLayer):
    """Static-shape KIVI layer (module docstring)."""

    is_compileable = True

    def __init__(self, config: KVQuantConfig, max_cache_len: int, **kwargs: Any) -> None:
        if max_cache_len % config.key_group:
            raise ValueError(
                f"max_cache_len {max_cache_len} must be a multiple of key_group "
                f"{config.key_group} (the store holds whole blocks)"
            )
        if config.sink:
            raise ValueError("the static cache keeps no sink tokens yet (sink must be 0)")
        super().__init__(max_cache_len=max_cache_len)
        self.config = config
        self.window = config.residual + 2 * config.key_group

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        c, M, W = self.config, self.max_cache_len, self.window
        B, H, _, D = key_states.shape
        dev = key_states.device
        self.dtype, self.device = key_states.dtype, dev
        self.batch_size, self.num_heads, self.k_head_dim = B, H, D
        self.v_head_dim = D

        def z(*shape: int, dtype: torch.dtype = torch.float16) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        self.store = {
            "k_codes": z(B, H, M, D * c.key_bits // 8, dtype=torch.uint8),
            "k_scale": z(B, H, M // c.key_group, D),
            "k_min": z(B, H, M // c.key_group, D),
            "v_codes": z(B, H, M, D * c.value_bits // 8, dtype=torch.uint8),
            "v_scale": z(B, H, M, D // c.value_group),
            "v_min": z(B, H, M, D // c.value_group),
        }
        self.keys = z(B, H, W, D, dtype=self.dtype)  # the ring
        self.values = z(B, H, W, D, dtype=self.dtype)
        self.cumulative_length = self.cumulative_length.to(dev)
        self.is_initialized = True

    def _write_one(self, k1: Tensor, v1: Tensor) -> None:
        c, W, G = self.config, self.window, self.config.key_group
        p = self.cumulative_length
        b = torch.clamp(torch.div(p - c.residual, G, rounding_mode="floor") - 1, min=0)
        toks = b * G + torch.arange(G, device=self.device)
        slots = toks % W
        kq, ks, km = quantize_keys(self.keys.index_select(2, slots), c.key_bits, G)
        vq, vs, vm = quantize_values(
            self.values.index_select(2, slots), c.value_bits, c.value_group
        )
        s = self.store
        blk = b.reshape(1)
        s["k_codes"].index_copy_(2, toks, kq)
        s["k_scale"].index_copy_(2, blk, ks)
        s["k_min"].index_copy_(2, blk, km)
        s["v_codes"].index_copy_(2, toks, vq)
        s["v_scale"].index_copy_(2, toks, vs)
        s["v_min"].index_copy_(2, toks, vm)
        slot = (p % W).reshape(1)
        self.keys.index_copy_(2, slot, k1)
        self.values.index_copy_(2, slot, v1)
        self.cumulative_length.add_(1)

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Write the call's tokens; return full-length keys/values (module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c, M, W = self.config, self.max_cache_len, self.window
        start = self.cumulative_length.clone()
        T = key_states.shape[-2]
        for i in range(T):
            self._write_one(key_states[:, :, i : i + 1], value_states[:, :, i : i + 1])
        last = self.cumulative_length - 1  # the position of the call's last query
        n_q = torch.clamp(torch.div(last - c.residual, c.key_group, rounding_mode="floor"), min=0)
        n_q = n_q * c.key_group
        s = self.store
        kd = dequantize_keys(
            s["k_codes"], s["k_scale"], s["k_min"], c.key_bits, c.key_group, self.dtype
        )
        vd = dequantize_values(
            s["v_codes"], s["v_scale"], s["v_min"], c.value_bits, c.value_group, self.dtype
        )
        idx = torch.arange(M, device=self.device)
        ring = (idx >= n_q).view(1, 1, M, 1)
        keys = torch.where(ring, self.keys.index_select(2, idx % W), kd)
        values = torch.where(ring, self.values.index_select(2, idx % W), vd)
        if T > 1:  # the call's own tokens exact, even those already out of the window
            pos = start + torch.arange(T, device=self.device)
            keys = keys.index_copy(2, pos, key_states)
            values = values.index_copy(2, pos, value_states)
        return keys, values

    def reset(self) -> None:
        if self.is_initialized:
            for t in self.store.values():
                t.zero_()
        super().reset()


class StaticKVCache(Cache):
    """A static transformers ``Cache``: :class:`StaticQuantizedKVLayer` for ``KVQuantConfig``
    layers, transformers' ``StaticLayer`` for 16-bit ones (other forms: not yet)."""

    def __init__(self, forms: list[KVDecision], max_cache_len: int) -> None:
        layers = []
        for i, f in enumerate(forms):
            if isinstance(f, KVQuantConfig):
                layers.append(StaticQuantizedKVLayer(f, max_cache_len))
            elif isinstance(f, KVDenseConfig):
                layers.append(StaticLayer(max_cache_len))
            else:
                raise TypeError(f"layer {i}: no static cache layer for {f.kind} yet")
        self.forms = list(forms)
        super().__init__(layers=layers)
