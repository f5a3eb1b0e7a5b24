"""Latent KV caches for Hugging Face ``generate()`` over :class:`MLAAttention` blocks.

An MLA block calls ``cache.update(latent, rope_key, layer_idx)`` with ``latent`` of shape
(B, 1, T, r) in the keys slot and the rotated RoPE keys of every kv head, (B, 1, T, K·2p), in
the values slot. What the caches here hold per token and layer:

- :class:`MLALatentCache` (``latent_bits=16``): the latent and the RoPE keys as given (a
  ``DynamicLayer`` per layer: crop, beam reorder and batch selection work unchanged).
- :class:`MLALatentCache` (``latent_bits=8``): the latent as symmetric int8 codes with one scale
  per token (``latent_codes`` int8 (B, 1, S, r), ``latent_scales`` (B, 1, S, 1) in the model
  dtype); ``update`` returns the dequantized latent, the decode kernel reads the codes.
- :class:`MLAStaticLatentCache`: preallocated ``StaticLayer`` s of ``max_cache_len`` tokens for
  ``torch.compile`` (16-bit latent); the attention mask covers the unused tail.

An int8-latent block handed a cache whose layer is a still-empty plain ``DynamicLayer`` (the
default ``DynamicCache`` of ``generate()``) swaps it for an int8 :class:`MLALatentLayer` first
(:func:`hold_int8_latent`), so the default cache holds what the block is priced at.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from slimfx.forms.kv.static_cache import StaticCacheNoCrop

from .module import quantize_latent

__all__ = [
    "MLALatentLayer", "MLALatentCache", "MLAStaticLatentCache", "quantize_latent", "hold_int8_latent",
]


class MLALatentLayer(DynamicLayer):
    """One layer of :class:`MLALatentCache` (see the module docstring)."""

    def __init__(self, latent_bits: int = 16, **kwargs: Any) -> None:
        if latent_bits not in (16, 8):
            raise ValueError(f"latent_bits must be 16 or 8, got {latent_bits}")
        super().__init__(**kwargs)
        self.latent_bits = latent_bits
        self.latent_codes: Tensor | None = None
        self.latent_scales: Tensor | None = None

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if self.latent_bits == 16:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.latent_codes = torch.empty(
                (*key_states.shape[:2], 0, key_states.shape[-1]),
                dtype=torch.int8, device=key_states.device,
            )
            self.latent_scales = torch.empty(
                (*key_states.shape[:2], 0, 1), dtype=key_states.dtype, device=key_states.device
            )
        codes, scales = quantize_latent(key_states)
        self.latent_codes = torch.cat([self.latent_codes, codes], dim=-2)
        self.latent_scales = torch.cat([self.latent_scales, scales], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.keys = self.latent_codes  # seq length and device bookkeeping of the base class
        latent = self.latent_codes.to(self.latent_scales.dtype) * self.latent_scales
        return latent, self.values

    def nbytes(self) -> int:
        """Bytes this layer holds (codes, scales, RoPE keys / latent as stored)."""
        if not self.is_initialized:
            return 0
        if self.latent_bits == 8:
            parts = (self.latent_codes, self.latent_scales, self.values)
        else:
            parts = (self.keys, self.values)
        return sum(t.numel() * t.element_size() for t in parts)  # type: ignore[union-attr]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.latent_bits == 8 and tokens_to_remove < 0 and self.is_initialized:
            self.latent_codes = self.latent_codes[..., :tokens_to_remove, :]
            self.latent_scales = self.latent_scales[..., :tokens_to_remove, :]
            self.keys = self.latent_codes

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.latent_bits == 8 and self.get_seq_length() > 0:
            self.latent_codes = self.latent_codes.index_select(0, beam_idx)
            self.latent_scales = self.latent_scales.index_select(0, beam_idx)
            self.keys = self.latent_codes


def hold_int8_latent(cache: Any, layer_idx: int, config: Any = None) -> None:
    """Give ``cache`` (a transformers cache an int8-latent block was handed) an int8
    :class:`MLALatentLayer` for ``layer_idx`` where it holds a still-empty plain
    ``DynamicLayer`` (what ``generate()``'s default ``DynamicCache`` gives; or its sliding
    class where ``config``'s window never binds, ``forms.kv.apply.plain_layer_kind``), so the latent is
    held as the int8 codes the block is priced at, not dequantized; any other layer — a
    compressed one already, a static one (16-bit, for ``torch.compile``), an exporter's stand-in,
    one holding tokens — is left as it is."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while replicate is not None and len(layers) <= layer_idx:
        layers.append(replicate())
    if layer_idx < len(layers):
        layer = layers[layer_idx]
        from slimfx.forms.kv.apply import plain_layer_kind

        if plain_layer_kind(layer, config) == "dynamic" and not layer.is_initialized:
            layers[layer_idx] = MLALatentLayer(8)


class MLALatentCache(Cache):
    """Dynamic latent cache: one :class:`MLALatentLayer` per decoder layer.

    ``num_layers``: the model's layer count (``config.num_hidden_layers``); layers are added
    lazily when ``None``."""

    def __init__(self, num_layers: int | None = None, latent_bits: int = 16) -> None:
        self.latent_bits = latent_bits
        if num_layers is None:
            super().__init__(layer_class_to_replicate=lambda: MLALatentLayer(latent_bits))
        else:
            super().__init__(layers=[MLALatentLayer(latent_bits) for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Bytes held by every layer."""
        return sum(layer.nbytes() for layer in self.layers)


class MLAStaticLatentCache(StaticCacheNoCrop):
    """Static latent cache of ``max_cache_len`` tokens per layer (16-bit latent), for
    ``torch.compile``: the buffers are allocated on the first update and written in place."""

    def __init__(self, num_layers: int, max_cache_len: int) -> None:
        super().__init__(layers=[StaticLayer(max_cache_len) for _ in range(num_layers)])
