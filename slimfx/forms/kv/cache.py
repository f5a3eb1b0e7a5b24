"""Compressed KV caches that Hugging Face ``generate()`` uses unchanged.

``KVCache(forms)`` is a transformers ``Cache`` with one layer per decoder layer, chosen by that
layer's KV form:

- ``KVDenseConfig``       → transformers' own ``DynamicLayer`` (16-bit);
- ``KVQuantConfig``       → :class:`QuantizedKVLayer`: a quantized store (packed codes, float16
  scales and minimums, layout of :mod:`slimfx.forms.kv.numerics`) plus a 16-bit window of the
  most recent tokens. New tokens enter the window; at the start of each ``update`` (and on
  ``flush()``), the oldest whole blocks of ``key_group`` tokens beyond the ``residual`` most
  recent are quantized and moved to the store, so with ``n`` tokens cached before a call the
  store holds ``config.quantized_tokens(n)``. ``update`` returns the store dequantized, then
  the window (the call's tokens included) exact: queries of one call see each other exactly,
  past tokens as stored. ``config.cache_bytes(n)`` counts the flushed state (``flush()``);
  between calls the window also holds the last call's tokens;
- ``KVLowRankConfig``     → :class:`LatentLayer` (the 16-bit latent, the positions of its
  tokens and the sink tokens' exact K/V; the attention rewritten by
  :mod:`slimfx.forms.kv.lowrank` rebuilds K/V);
- ``KVLatentQuantConfig`` → :class:`QuantizedLatentLayer` (the latent quantized per token or
  per channel once more than ``residual`` tokens wait; with mixed widths the ``low_bits``
  channels are a second store, ``k_tail_*`` / ``v_tail_*``).

Sliding-window layers are refused (the compressed layers never evict). Pass the cache as
``model.generate(..., past_key_values=KVCache.for_model(model, form))``.

The static variants for ``torch.compile`` (every form) are in
:mod:`slimfx.forms.kv.static_cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from slimfx.forms.kv.config import (
    KVDecision,
    KVDenseConfig,
    KVLatentQuantConfig,
    KVLowRankConfig,
    KVQuantConfig,
)
from slimfx.forms.kv.sinks import merge_sinks, real_columns
from slimfx.forms.kv.store import (
    decode_store,
    drop_stored,
    encode_store,
    latent_segments,
)
from slimfx.kernels.kv_attention.folded import hides_tokens  # re-exported: the caches' mask test

__all__ = [
    "QuantizedKVLayer",
    "LatentLayer",
    "QuantizedLatentLayer",
    "KVCache",
    "layer_for",
    "sliding_layers",
    "kv_forms_of",
    "KV_FORM_ATTR",
    "CACHE_KWARGS",
    "call_cache",
    "hides_tokens",
    "latent_segments",
    "encode_store",
    "decode_store",
]


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _StoreLayer(DynamicLayer):
    """A 16-bit window (``self.keys``/``self.values``) in front of a quantized store held in
    ``self.store`` (name → tensor, all with batch first and tokens third)."""

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[str, Tensor] | None = None
        self.n_stored = 0
        self.sink = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0].clone()
        self.values = value_states[:, :, :0].clone()
        self.is_initialized = True

    # subclasses: _quantize(keys, values) -> dict, _dequantize() -> (keys, values), _target(n)
    def _quantize(self, keys: Tensor, values: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _dequantize(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _target(self, tokens: int) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        """Move the whole blocks that are out of the window into the store, so that it holds
        ``config.quantized_tokens(n)`` of the ``n`` cached tokens. The window keeps the ``sink``
        first tokens in front of the most recent ones."""
        if not self.is_initialized:
            return
        move = self._target(self.get_seq_length()) - self.n_stored
        if move <= 0:
            return
        s = self.sink
        new = self._quantize(self.keys[:, :, s : s + move], self.values[:, :, s : s + move])
        if self.store is None:
            self.store = new
        else:
            self.store = {n: torch.cat([self.store[n], t], dim=2) for n, t in new.items()}
        self.n_stored += move
        self.keys = torch.cat([self.keys[:, :, :s], self.keys[:, :, s + move :]], dim=2)
        self.values = torch.cat([self.values[:, :, :s], self.values[:, :, s + move :]], dim=2)

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Flush the tokens of earlier calls that left the window, append the new tokens, and
        return every cached token (store dequantized, window and new tokens exact). A decode
        step's query therefore reads ``quantized_tokens(t)`` of its ``t`` past tokens from the
        store, and the layer's state after ``update`` is exactly what it read (what the decode
        kernel reads)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.flush()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if not self.n_stored:
            return self.keys, self.values
        past_k, past_v = self._dequantize()
        s = self.sink  # positions: sink tokens, the store, the recent window
        keys = torch.cat([self.keys[:, :, :s], past_k, self.keys[:, :, s:]], dim=-2)
        values = torch.cat([self.values[:, :, :s], past_v, self.values[:, :, s:]], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_stored + self.keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (store and window)."""
        store = list(self.store.values()) if self.store else []
        return _nbytes(self.keys, self.values, *store)

    def reset(self) -> None:
        self.store, self.n_stored = None, 0
        super().reset()

    def _map(self, fn: Any) -> None:
        if self.get_seq_length() == 0:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.store is not None:
            self.store = {n: fn(t) for n, t in self.store.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' convention; assisted
        generation crops rejected draft tokens). Stored blocks the shorter cache would not
        hold yet (``config.quantized_tokens``) come back to the 16-bit window dequantized —
        as read, so the kept tokens' values do not change — and are stored again when they
        leave it."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        total = self.get_seq_length()
        if n > total:
            raise ValueError(f"cannot crop {n} tokens: the layer holds {total}")
        keep = min(self.n_stored, self._target(total - n))
        if keep < self.n_stored:
            back_k, back_v = (t[:, :, keep:] for t in self._dequantize())
            s = self.sink
            self.keys = torch.cat([self.keys[:, :, :s], back_k, self.keys[:, :, s:]], dim=2)
            self.values = torch.cat([self.values[:, :, :s], back_v, self.values[:, :, s:]], 2)
            self.store = drop_stored(self.store, self.n_stored, keep) if keep else None
            self.n_stored = keep
        self.keys, self.values = self.keys[:, :, :-n], self.values[:, :, :-n]


class QuantizedKVLayer(_StoreLayer):
    """KIVI-style quantized layer (see the module docstring)."""

    def __init__(self, config: KVQuantConfig) -> None:
        super().__init__()
        self.config = config
        self.sink = config.sink
        #: set by ``slimfx.forms.kv.fused`` for the coming call: a one-token ``update``
        #: then returns the 16-bit window only (the store is read in place by
        #: :meth:`decode_attention`, not dequantized)
        self.fused_decode = False

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``_StoreLayer.update``; with ``fused_decode`` set and one new token, the same state
        change but only the window (sinks, recent tokens, the new one) is returned."""
        if not (self.fused_decode and key_states.shape[-2] == 1 and self.is_initialized):
            return super().update(key_states, value_states, *args, **kwargs)
        self.flush()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def _target(self, tokens: int) -> int:
        return self.config.quantized_tokens(tokens)

    def _quantize(self, keys: Tensor, values: Tensor) -> dict[str, Tensor]:
        return encode_store(self.config, keys, values)

    def decode_attention(
        self, q: Tensor, scaling: float, kernel: bool = True, mask: Tensor | None = None
    ) -> Tensor:
        """One decode step's attention ``(B, Hq, D)`` for queries ``q`` ``(B, Hq, D)`` (or
        ``(B, Hq, 1, D)``) over this layer's state after ``update``: the store read in place
        and the 16-bit window (sinks included) — ``kernel=True``: the Triton kernel
        ``slimfx_kernels::kv_decode_attention_triton`` (dequantization fused; it takes no mask:
        one that hides a cached token is refused), else the torch op
        ``kv_attention.folded.kv_decode_attention_folded`` (scales folded into the products;
        ``mask``, transformers' decode mask over the cached tokens, applied). Equals softmax
        attention over what ``update`` returned."""
        from slimfx.kernels.kv_attention.folded import kv_decode_attention_folded

        if q.dim() == 4:
            q = q.squeeze(2)
        c = self.config
        if self.store is None:
            B, H, _, D = self.keys.shape
            u8 = torch.empty(B, H, 0, D, dtype=torch.uint8, device=self.keys.device)
            f16 = torch.empty(B, H, 0, D, dtype=torch.float16, device=self.keys.device)
            store = {
                "k_codes": u8[..., : D * c.key_bits // 8],
                "k_scale": f16,
                "k_min": f16,
                "v_codes": u8[..., : D * c.value_bits // 8],
                "v_scale": f16[..., : D // c.value_group],
                "v_min": f16[..., : D // c.value_group],
            }
        else:
            store = self.store
        names = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")
        args = (
            q, *(store[n] for n in names), self.keys, self.values,
            c.key_bits, c.value_bits, c.key_group, c.value_group, float(scaling),
        )  # fmt: skip
        if not kernel:
            return kv_decode_attention_folded(*args, mask=mask, sink=self.sink)
        if hides_tokens(mask):
            raise ValueError(
                "the KV decode kernel takes no mask: this step's mask hides cached tokens "
                "(a padded batch?); use kernel=False (the torch op applies the mask)"
            )
        from slimfx.kernels.kv_attention import kv_decode_attention_triton

        return kv_decode_attention_triton(*args)

    def _dequantize(self) -> tuple[Tensor, Tensor]:
        return decode_store(self.config, self.store, self.dtype)


class _LatentSide:
    """Side tensors of the latent layers, batch first: ``positions`` ``(B, T)`` of every cached
    token (the rewritten attention rotates the rebuilt keys with them) and, when the form keeps
    sink tokens, their exact post-RoPE keys and values ``sink_keys`` / ``sink_values``
    ``(B, Hkv, sink, D)``: slot ``j`` holds the row's ``j``-th real token (:mod:`.sinks`)."""

    positions: Tensor | None
    sink_keys: Tensor | None
    sink_values: Tensor | None
    config: Any

    def _init_side(self) -> None:
        self.positions = self.sink_keys = self.sink_values = None
        self.sinks_full = False  # every row's sink slots written (no more exact K/V needed)
        self._call_start = 0

    def _record(self, positions: Tensor | None, key_states: Tensor) -> None:
        if positions is None:
            raise ValueError("a latent cache layer needs the position ids of the new tokens")
        B, T = key_states.shape[0], key_states.shape[-2]
        positions = positions.expand(B, T)
        self.positions = (
            positions.clone()
            if self.positions is None
            else torch.cat([self.positions, positions], 1)
        )

    def sink_span(self, mask: Any, T: int) -> int:
        """Called before the update: how many of the call's first tokens may be sink tokens
        of some row (the attention computes their exact K/V, and no more). Without a mask that
        is known from the lengths; with one (padding, or eager attention's causal mask), from
        the mask — one device sync per call until every row's slots are written (a padded row
        gets its sinks later)."""
        sink = self.config.sink
        n0 = self._call_start = self.get_seq_length()  # type: ignore[attr-defined]
        S = n0 + T
        if self.sinks_full:
            return 0
        if not (isinstance(mask, Tensor) and mask.dim() in (2, 4)):
            self.sinks_full = S >= sink
            return max(0, min(sink, S) - n0)
        real = real_columns(mask, mask.shape[0], S, S)
        count = real.long().cumsum(1)
        in_call = (real & (count <= sink))[:, n0:].any(0)  # (T,) a sink of some row
        last = (in_call * torch.arange(1, T + 1, device=mask.device)).max()
        span, least = torch.stack([last, count[:, -1].min()]).tolist()
        self.sinks_full = least >= sink
        return int(span)

    def merge_sinks(
        self, k: Tensor, v: Tensor | None, ek: Tensor, ev: Tensor, mask: Any
    ) -> tuple[Tensor, Any]:
        """Rebuilt K/V with each row's sink tokens exact (:func:`.sinks.merge_sinks`; ``ek`` /
        ``ev``: the first tokens of the call, :meth:`sink_span`); the slots updated."""
        B, H, S, D = k.shape
        sink = self.config.sink
        held = (
            k.new_zeros(2, B, H, sink, D)
            if self.sink_keys is None
            else torch.stack([self.sink_keys, self.sink_values])
        )
        real = real_columns(mask, B, S, S)
        k, v, present = merge_sinks(k, v, ek, ev, held, self._call_start, sink, real)
        self.sink_keys, self.sink_values = present[0], present[1]
        return k, v

    def update(
        self,
        key_states: Tensor,
        value_states: Tensor,
        *args: Any,
        positions: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Record the new tokens' ``positions`` (required), then the layer's own update (the
        cache layer class after this mixin in the MRO)."""
        self._record(positions, key_states)
        return super().update(key_states, value_states)  # type: ignore[misc]

    def reset(self) -> None:
        self._init_side()
        super().reset()  # type: ignore[misc]

    def _side_nbytes(self) -> int:
        return _nbytes(self.sink_keys, self.sink_values)

    def _crop_side(self, n: int) -> None:
        """The side tensors after the layer's last ``n`` tokens were cropped: their positions
        go; a cropped token may have filled a row's sink slot, so the slots are checked again
        on the next call (a slot is written whenever its token arrives)."""
        if n and self.positions is not None:
            self.positions = self.positions[:, :-n]
            self.sinks_full = False

    def _map_side(self, fn: Any) -> None:
        for name in ("positions", "sink_keys", "sink_values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))


class LatentLayer(_LatentSide, DynamicLayer):
    """The 16-bit low-rank latent ``(B, 1, T, rank)`` of keys and of values, the position id of
    every cached token and the sink tokens' exact K/V (:class:`_LatentSide`). Pass
    ``positions=`` to ``update``."""

    def __init__(self, config: KVLowRankConfig | KVLatentQuantConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self._init_side()

    def nbytes(self) -> int:
        """Bytes of the latent and sink tensors (positions, shared by all layers in principle,
        excluded)."""
        return _nbytes(self.keys, self.values) + self._side_nbytes()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_side(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_side(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_side(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (16-bit latent: exact)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        super().crop(tokens_to_remove)
        self._crop_side(-tokens_to_remove)


class QuantizedLatentLayer(_LatentSide, _StoreLayer):
    """The latent of :class:`LatentLayer`, quantized outside the 16-bit window (per token or
    per channel in blocks, ``config.axis``); the first ``sink`` columns' latents stay 16-bit
    (the sinks of an unpadded row; any row's sinks read their exact K/V instead)."""

    def __init__(self, config: KVLatentQuantConfig) -> None:
        super().__init__()
        self.config = config
        self.sink = config.sink
        self._init_side()

    def _target(self, tokens: int) -> int:
        return self.config.quantized_tokens(tokens)

    def _quantize(self, keys: Tensor, values: Tensor) -> dict[str, Tensor]:
        return encode_store(self.config, keys, values)

    def _dequantize(self) -> tuple[Tensor, Tensor]:
        return decode_store(self.config, self.store, self.dtype)

    def nbytes(self) -> int:
        return super().nbytes() + self._side_nbytes()

    def _map(self, fn: Any) -> None:
        super()._map(fn)
        self._map_side(fn)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._crop_side(-tokens_to_remove)


#: attribute of an attention module holding its KV form (``slimfx.forms.kv.apply``)
KV_FORM_ATTR = "_slimfx_kv_form"
#: the keyword an attention module's caller passes the transformers ``Cache`` under (most
#: blocks: ``past_key_values``; GPT-NeoX: ``layer_past``)
CACHE_KWARGS = ("past_key_values", "layer_past")


def call_cache(kwargs: dict[str, Any]) -> Any:
    """The cache an attention module's call received (``CACHE_KWARGS``), or ``None``."""
    return next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)


def kv_forms_of(model: Any) -> dict[int, KVDecision]:
    """Layer index → the KV form an attention module of ``model`` carries (empty: none)."""
    out: dict[int, KVDecision] = {}
    for m in model.modules():
        form = getattr(m, KV_FORM_ATTR, None)
        if isinstance(form, KVDecision) and isinstance(getattr(m, "layer_idx", None), int):
            out[m.layer_idx] = form
    return out


def _layer_types(config: Any, n: int) -> tuple[list[str], list[int | None]]:
    """Each decoder layer's attention type and sliding window as transformers builds its
    cache layers (``get_layer_types_and_kwargs``; else ``layer_types`` and the config's
    window)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # an older transformers: the config's layer_types
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        win = getattr(config, "sliding_window", None)
        return types, [win if t == "sliding_attention" else None for t in types]
    types, kwargs = get_layer_types_and_kwargs(config)
    types = list(types)
    if isinstance(kwargs, dict):  # transformers before per-layer kwargs (5.17): one for all
        kwargs = [kwargs] * len(types)
    wins = [kw.get("sliding_window") if t == "sliding_attention" else None
            for t, kw in zip(types, kwargs)]  # fmt: skip
    return types, wins


def sliding_layers(config: Any) -> dict[int, int]:
    """Decoder layer → sliding window, for the layers whose cache transformers crops to the
    window (``DynamicSlidingWindowLayer``: the last ``window - 1`` tokens); none where the
    window never binds (``ir.find.unbound_window``). ``config``: the decoder's."""
    from slimfx.ir.find import unbound_window

    if unbound_window(config) is not None:
        return {}
    types, windows = _layer_types(config, int(config.num_hidden_layers))
    return {i: int(w) for i, (t, w) in enumerate(zip(types, windows))
            if t == "sliding_attention" and w is not None}  # fmt: skip


def layer_for(form: KVDecision) -> DynamicLayer:
    """A fresh cache layer for one decoder layer in ``form``."""
    if isinstance(form, KVDenseConfig):
        return DynamicLayer()
    if isinstance(form, KVQuantConfig):
        return QuantizedKVLayer(form)
    if isinstance(form, KVLatentQuantConfig):
        return QuantizedLatentLayer(form)
    if isinstance(form, KVLowRankConfig):
        return LatentLayer(form)
    raise TypeError(f"no cache layer for {type(form).__name__}")


class KVCache(Cache):
    """A transformers ``Cache`` whose layer ``i`` holds layer ``i``'s cache in ``forms[i]``."""

    def __init__(self, forms: Sequence[KVDecision]) -> None:
        self.forms = list(forms)
        super().__init__(layers=[layer_for(f) for f in self.forms])

    @classmethod
    def for_model(
        cls,
        model: Any,
        form: KVDecision | dict[int, KVDecision] | None = None,
        default: KVDecision | None = None,
    ) -> KVCache:
        """One layer per decoder layer of ``model``: ``form`` for all, or per layer index (the
        missing ones ``default``, else 16-bit); ``None``: the forms the model's attention
        modules carry (``kv_forms_of``: a model ``optimize`` gave KV decisions). A 16-bit
        sliding-window layer is transformers' own (it keeps its window: a full layer grew
        with the context); a compressed form on one is refused, unless the window never binds
        (``ir.find.unbound_window``)."""
        from transformers.cache_utils import DynamicSlidingWindowLayer

        from slimfx.ir.find import unbound_window

        if form is None:
            form = kv_forms_of(model)
        config = model.config.get_text_config(decoder=True)
        n = config.num_hidden_layers
        types, _ = _layer_types(config, n)
        forms = []
        for i in range(n):
            f = form.get(i, default or KVDenseConfig()) if isinstance(form, dict) else form
            if types[i] != "full_attention" and unbound_window(config) is None:
                if not isinstance(f, KVDenseConfig):
                    raise ValueError(
                        f"layer {i} is {types[i]!r}: {f.kind} supports full attention only"
                    )
            forms.append(f)
        cache = cls(forms)
        for i, window in sliding_layers(config).items():
            cache.layers[i] = DynamicSlidingWindowLayer(sliding_window=window)
        return cache

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds now."""
        total = 0
        for layer in self.layers:
            if hasattr(layer, "nbytes"):
                total += layer.nbytes()
            elif layer.is_initialized:
                total += _nbytes(layer.keys, layer.values)
        return total
