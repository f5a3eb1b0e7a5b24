"""Static-shape compressed caches, for ``torch.compile`` (and CUDA graphs).

Every layer preallocates, for ``max_cache_len`` (``M``) tokens, what it holds; nothing is
reallocated and every index is a tensor, so a decode step traces into one graph with no
data-dependent shapes. A step returns full-length ``(B, H, M, ·)`` tensors (positions after
the call's last token are masked by the static attention mask).

- :class:`StaticQuantizedKVLayer` (``kv_quant``) and :class:`StaticQuantizedLatentLayer`
  (``kv_latent_quant``, the latents in place of K/V) keep the quantized store (layout of
  :func:`.cache.encode_store`, room for ``M − sink`` tokens rounded up to whole blocks), a 16-bit
  *ring* of ``W = residual + 2·block`` slots and a 16-bit buffer of the ``sink`` first tokens
  (``block``: ``key_group`` tokens; a per-channel latent's ``group``; 1 for a per-token latent,
  whose tokens leave the window one by one).

  The residual window: token ``p`` is written to ring slot ``p mod W`` (and, if ``p < sink``,
  to the sink buffer). Before writing, the step re-quantizes, unconditionally, store block
  ``b = max(0, ⌊(p − sink − residual)/block⌋ − 1)`` — the newest block out of the window —
  from the ring (``index_copy_``). Each block is quantized during the ``block`` steps after it
  leaves the window, from its final tokens, so the repeats are idempotent; blocks that are not
  complete yet hold throw-away codes nobody reads. A call reads, right after writing its first
  token, as the dynamic layer does after its flush: position ``j`` from the sink buffer if
  ``j < sink``, from the store if ``j < sink + quantized_tokens(n0)`` (``n0``: the tokens
  before the call), else from the ring — which then covers ``[n0 − W + 1, n0]``, every window
  token. The call's own tokens are returned exact. So the static layer holds ``W`` 16-bit tokens
  where the dynamic one holds ``residual`` to ``residual + block − 1``, and reads equal the
  dynamic cache's token for token (chunked prefill included).
  A multi-token call (a prefill, a chunk) writes its tokens in one pass of tensor ops
  (``_write_many``: the state the token-by-token writes would leave; compiled, it is a few
  ops instead of a graph unrolled per token). In fused mode
  (``slimfx.forms.kv.fused``) a one-token ``update`` of :class:`StaticQuantizedKVLayer` writes
  the token and builds no full-length K/V: ``decode_attention`` attends over the tokens written
  so far, the store read in place (``kernels.kv_attention.static_step``).
- :class:`StaticLatentLayer` (``kv_lowrank``): the 16-bit latent of every position.

The latent layers also give the low-rank attention (:mod:`.lowrank`) the positions ``0 … M−1``
and the sink tokens' exact K/V: a ``(2, B, Hkv, sink, D)`` buffer merged by
``sinks.merge_sinks`` (no shape-dependent branch; slot ``j`` holds each row's ``j``-th real
token), updated in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, StaticLayer

from slimfx.forms.kv.cache import hides_tokens
from slimfx.forms.kv.config import (
    KVDecision,
    KVDenseConfig,
    KVLatentQuantConfig,
    KVLowRankConfig,
    KVQuantConfig,
)
from slimfx.forms.kv.sinks import merge_sinks, real_columns
from slimfx.forms.kv.store import decode_store, encode_store

__all__ = [
    "StaticCacheNoCrop",
    "StaticQuantizedKVLayer",
    "StaticQuantizedLatentLayer",
    "StaticLatentLayer",
    "StaticKVCache",
    "static_layer_for",
]


def _zeros(shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _index(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


class _StaticStoreLayer(StaticLayer):
    """Quantized store + ring + sink buffer (module docstring). ``self.keys`` /
    ``self.values`` are the ring."""

    is_compileable = True

    def __init__(
        self, config: KVQuantConfig | KVLatentQuantConfig, max_cache_len: int, block: int
    ) -> None:
        if max_cache_len <= config.sink:
            raise ValueError(f"max_cache_len {max_cache_len} must exceed sink {config.sink}")
        super().__init__(max_cache_len=max_cache_len)
        self.config, self.block = config, block
        self.sink, self.residual = config.sink, config.residual
        self.window = config.residual + 2 * block
        self.room = -(-(max_cache_len - config.sink) // block) * block  # store tokens

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, H = key_states.shape[:2]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = B, H
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        # the store's arrays, shaped by encoding zeros: token rows (room) or block rows
        zk = _zeros((B, H, self.room, self.k_head_dim), key_states)
        zv = _zeros((B, H, self.room, self.v_head_dim), value_states)
        self.store = encode_store(self.config, zk, zv)
        W, s = self.window, max(self.sink, 1)
        self.keys = _zeros((B, H, W, self.k_head_dim), key_states)
        self.values = _zeros((B, H, W, self.v_head_dim), value_states)
        self.sink_keys = _zeros((B, H, s, self.k_head_dim), key_states)
        self.sink_values = _zeros((B, H, s, self.v_head_dim), value_states)
        # where each of the M positions is read from, computed once: the rows of the store, the
        # ring slots, the sink rows — constant index tensors built from Python ints, not arange
        # arithmetic: inductor's index simplification fails on the latter with sinks ("vr must
        # not be None"), in a compiled step and in a compiled first call that initializes
        M, room, dev = self.max_cache_len, self.room, self.device
        self.read_rows = _index([min(max(i - self.sink, 0), room - 1) for i in range(M)], dev)
        self.read_slots = _index([i % W for i in range(M)], dev)
        self.read_sinks = _index([min(i, s - 1) for i in range(M)], dev)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.is_initialized = True

    def _due(self, p: Tensor) -> Tensor:
        """The store block :meth:`_write_one` re-quantizes before writing position ``p``: the
        newest block out of the window (0 until one is)."""
        t = torch.div(p - self.sink - self.residual, self.block, rounding_mode="floor")
        return torch.clamp(t - 1, min=0)

    def _write_one(self, k1: Tensor, v1: Tensor) -> None:
        G, W, s, p = self.block, self.window, self.sink, self.cumulative_length
        b = self._due(p)
        toks = b * G + torch.arange(G, device=self.device)  # store rows of block b
        slots = (toks + s) % W
        new = encode_store(
            self.config, self.keys.index_select(2, slots), self.values.index_select(2, slots)
        )
        for name, t in self.store.items():
            t.index_copy_(2, toks if t.shape[2] == self.room else b.reshape(1), new[name])
        slot = (p % W).reshape(1)
        self.keys.index_copy_(2, slot, k1)
        self.values.index_copy_(2, slot, v1)
        if s:
            i = torch.clamp(p, max=s - 1).reshape(1)
            first = p < s
            self.sink_keys.index_copy_(2, i, torch.where(first, k1, self.sink_keys.index_select(2, i)))
            self.sink_values.index_copy_(
                2, i, torch.where(first, v1, self.sink_values.index_select(2, i))
            )
        self.cumulative_length.add_(1)

    def _write_many(self, k: Tensor, v: Tensor) -> None:
        """What ``T`` calls of :meth:`_write_one` leave, in one pass of tensor ops (no
        data-dependent shape: eager and traced alike). The blocks due during those writes,
        ``b0 … b1`` (at most ``K = (T−1)//G + 2``; the ``K`` slots past ``b1`` repeat ``b1``,
        so duplicate writes carry equal values), are quantized once from their exact tokens —
        the ring's for positions before the call, the call's own after; positions not written
        yet (an early block 0) read the call's last token: throw-away codes nobody reads, as
        the loop's stale ring slots — then the newest ``min(T, W)`` tokens go to the ring and
        those before ``sink`` to the sink buffer."""
        G, W, s, T = self.block, self.window, self.sink, k.shape[-2]
        p0, dev = self.cumulative_length, self.device
        b0, b1 = self._due(p0), self._due(p0 + T - 1)
        blocks = torch.minimum(b0 + torch.arange((T - 1) // G + 2, device=dev), b1)
        rows = (blocks[:, None] * G + torch.arange(G, device=dev)).reshape(-1)  # store rows
        pos = rows + s
        src = torch.where(pos >= p0, W + torch.clamp(pos - p0, max=T - 1), pos % W)
        enc = encode_store(
            self.config,
            torch.cat([self.keys, k], 2).index_select(2, src),
            torch.cat([self.values, v], 2).index_select(2, src),
        )
        for name, t in self.store.items():
            t.index_copy_(2, rows if t.shape[2] == self.room else blocks, enc[name])
        n = min(T, W)  # the ring keeps the newest W positions
        slots = (p0 + (T - n) + torch.arange(n, device=dev)) % W
        self.keys.index_copy_(2, slots, k[:, :, T - n :])
        self.values.index_copy_(2, slots, v[:, :, T - n :])
        if s:
            r = torch.arange(s, device=dev)
            inside = ((r >= p0) & (r < p0 + T)).view(1, 1, s, 1)
            at = torch.clamp(r - p0, 0, T - 1)
            for buf, x in ((self.sink_keys, k), (self.sink_values, v)):
                buf.copy_(torch.where(inside, x.index_select(2, at), buf))
        self.cumulative_length.add_(T)

    def _read(self, n0: Tensor) -> tuple[Tensor, Tensor]:
        """Full-length keys/values as the dynamic layer returns them after its flush with
        ``n0`` tokens before the call (module docstring)."""
        G, s, M = self.block, self.sink, self.max_cache_len
        n_q = torch.clamp(torch.div(n0 - s - self.residual, G, rounding_mode="floor"), min=0) * G
        kd, vd = decode_store(self.config, self.store, self.dtype)
        idx = torch.arange(M, device=self.device)
        stored = ((idx >= s) & (idx - s < n_q)).view(1, 1, M, 1)
        out = []
        for d, ring, sinks in ((kd, self.keys, self.sink_keys), (vd, self.values, self.sink_values)):
            x = torch.where(
                stored, d.index_select(2, self.read_rows), ring.index_select(2, self.read_slots)
            )
            if s:
                first = (idx < s).view(1, 1, M, 1)
                x = torch.where(first, sinks.index_select(2, self.read_sinks), x)
            out.append(x)
        return out[0], out[1]

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Write the call's tokens; return full-length keys/values (module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._start = start = self.cumulative_length.clone()
        T = key_states.shape[-2]
        self._write_one(key_states[:, :, :1], value_states[:, :, :1])
        keys, values = self._read(start)
        if T > 1:  # a prefill or a chunk: the rest in one pass; the call's own tokens
            # returned exact, even those already out of the window
            self._write_many(key_states[:, :, 1:], value_states[:, :, 1:])
            pos = start + torch.arange(T, device=self.device)
            keys = keys.index_copy(2, pos, key_states)
            values = values.index_copy(2, pos, value_states)
        return keys, values

    def _buffers(self) -> tuple[Tensor, ...]:
        """The store's arrays and the sink buffer: batch first, besides transformers' ring."""
        return (*self.store.values(), self.sink_keys, self.sink_values)

    def reset(self) -> None:
        if self.is_initialized:
            for t in self._buffers():
                t.zero_()
        super().reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the ring (``keys`` / ``values``, transformers' part), the store and the
        sink buffer follow the beams, the latter in place."""
        super().reorder_cache(beam_idx)
        if self.is_initialized:
            for t in self._buffers():
                t.copy_(t.index_select(0, beam_idx.to(t.device)))


class StaticQuantizedKVLayer(_StaticStoreLayer):
    """Static-shape KIVI layer (module docstring)."""

    def __init__(self, config: KVQuantConfig, max_cache_len: int, **kwargs: Any) -> None:
        super().__init__(config, max_cache_len, config.key_group)
        #: set by ``slimfx.forms.kv.fused`` for the coming call: a one-token ``update`` then
        #: writes the token and returns the ring (nobody reads it); :meth:`decode_attention`
        #: attends over the tokens written so far, the store read in place
        self.fused_decode = False

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``_StaticStoreLayer.update``; with ``fused_decode`` set and one new token, the same
        state change without building the full-length K/V."""
        if not (self.fused_decode and key_states.shape[-2] == 1):
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._start = self.cumulative_length.clone()
        self._write_one(key_states, value_states)
        return self.keys, self.values

    def step_hides_tokens(self, mask: Tensor | None) -> bool:
        """Whether the static decode ``mask`` hides one of the tokens written so far (a padded
        batch; the columns after them are always hidden). Under ``torch.compile`` it cannot
        be read: ``False``, and the op itself sends a hiding mask to the torch step."""
        if mask is None or torch.compiler.is_compiling():
            return False
        return hides_tokens(mask[..., -1:, : int(self._start) + 1])

    def decode_attention(
        self, q: Tensor, scaling: float, kernel: bool = False, mask: Tensor | None = None
    ) -> Tensor:
        """One decode step's attention ``(B, Hq, D)`` for ``q`` ``(B, Hq, D)`` (or ``(B, Hq, 1,
        D)``) after a fused-mode ``update``: the opaque op
        ``slimfx_kernels::kv_decode_attention_static`` reads the sinks, the store quantized so
        far (in place) and the ring's window — the tokens ``0 … n0``, not the preallocation;
        ``mask``: the static decode mask. Equals softmax attention over what the plain
        ``update`` returns under that mask."""
        from slimfx.kernels.kv_attention.static_step import kv_decode_attention_static

        if q.dim() == 4:
            q = q.squeeze(2)
        c, st = self.config, self.store
        names = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")
        return kv_decode_attention_static(
            q, *(st[n] for n in names), self.keys, self.values, self.sink_keys,
            self.sink_values, self._start, mask, c.key_bits, c.value_bits, c.key_group,
            c.value_group, self.sink, self.residual, float(scaling), bool(kernel),
        )  # fmt: skip


class _StaticLatentSide:
    """What the low-rank attention reads from a static latent layer: ``positions`` ``(B, M)``,
    the rotary position of the token in each slot (the caller's ``position_ids``: a
    left-padded row's tokens sit at shifted positions; slots not written yet keep their
    index), and ``merge_sinks`` over the exact-K/V buffer ``exact_sinks``. The concrete layers
    list it first, so its ``lazy_initialization`` / ``update`` / ``reset`` wrap theirs."""

    max_cache_len: int
    cumulative_length: Tensor
    config: Any
    _start: Tensor

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = config
        self.positions: Tensor | None = None  # set on the first call
        self.exact_sinks: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # type: ignore[misc]
        M, B = self.max_cache_len, key_states.shape[0]
        self.positions = torch.arange(M, device=key_states.device).repeat(B, 1)

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any,
        positions: Tensor | None = None, **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """The layer's update; then the call's ``positions`` written into its slots."""
        out = super().update(key_states, value_states)  # type: ignore[misc]
        if positions is not None:
            assert self.positions is not None
            B, T = self.positions.shape[0], key_states.shape[-2]
            slots = self._start + torch.arange(T, device=self.positions.device)
            self.positions.index_copy_(1, slots, positions.to(self.positions).expand(B, T))
        return out

    def merge_sinks(
        self, k: Tensor, v: Tensor | None, ek: Tensor, ev: Tensor, mask: Any
    ) -> tuple[Tensor, Any]:
        """Each row's sink tokens' exact K/V in place of the rebuilt ones (``mask``: the
        model's, which says which slots hold padding); the buffer updated."""
        sink = self.config.sink
        B, H, S, D = k.shape
        if self.exact_sinks is None:  # the first call: the K/V shapes are known now
            self.exact_sinks = torch.zeros(2, B, H, sink, D, dtype=k.dtype, device=k.device)
        real = real_columns(mask, B, S, self._start + ek.shape[2])
        k, v, present = merge_sinks(k, v, ek, ev, self.exact_sinks, self._start, sink, real)
        self.exact_sinks.copy_(present)
        return k, v

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the sinks' exact K/V and the slots' positions follow the beams too (a
        row whose sinks are still being written reads its own beam's)."""
        super().reorder_cache(beam_idx)  # type: ignore[misc]
        if self.exact_sinks is not None:
            self.exact_sinks.copy_(self.exact_sinks.index_select(1, beam_idx.to(self.exact_sinks.device)))
        if self.positions is not None:
            self.positions.copy_(self.positions.index_select(0, beam_idx.to(self.positions.device)))

    def reset(self) -> None:
        if self.exact_sinks is not None:
            self.exact_sinks.zero_()
        if self.positions is not None:
            self.positions.copy_(torch.arange(self.max_cache_len, device=self.positions.device))
        super().reset()  # type: ignore[misc]


class StaticQuantizedLatentLayer(_StaticLatentSide, _StaticStoreLayer):
    """Static ``kv_latent_quant`` layer: latents ``(B, 1, T, rank)`` in, full-length latents
    out (module docstring)."""

    def __init__(self, config: KVLatentQuantConfig, max_cache_len: int, **kwargs: Any) -> None:
        block = config.group if config.axis == "channel" else 1
        super().__init__(config, config, max_cache_len, block)


class StaticLatentLayer(_StaticLatentSide, StaticLayer):
    """Static ``kv_lowrank`` layer: the 16-bit latents of every position (module docstring)."""

    def __init__(self, config: KVLowRankConfig, max_cache_len: int, **kwargs: Any) -> None:
        super().__init__(config, max_cache_len=max_cache_len)

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._start = self.cumulative_length.clone()
        return super().update(key_states, value_states, **kwargs)


def static_layer_for(form: KVDecision, max_cache_len: int) -> StaticLayer:
    """A fresh static cache layer of ``max_cache_len`` tokens for one decoder layer in
    ``form``."""
    if isinstance(form, KVDenseConfig):
        return StaticLayer(max_cache_len)
    if isinstance(form, KVQuantConfig):
        return StaticQuantizedKVLayer(form, max_cache_len)
    if isinstance(form, KVLatentQuantConfig):
        return StaticQuantizedLatentLayer(form, max_cache_len)
    if isinstance(form, KVLowRankConfig):
        return StaticLatentLayer(form, max_cache_len)
    raise TypeError(f"no static cache layer for {type(form).__name__}")


class StaticCacheNoCrop(Cache):
    """A static cache refuses to be cropped up front, as transformers refuses its own
    ``StaticCache`` for assisted generation (its check names that class only, so these failed
    after the prefill with an ``AttributeError``)."""

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(
                f"{type(self).__name__} is static and cannot be cropped: assisted generation "
                "and prompt lookup (assistant_model=, prompt_lookup_num_tokens=) need the "
                "dynamic cache (generate()'s default, or KVCache.for_model(model))"
            )


class StaticKVCache(StaticCacheNoCrop):
    """A static transformers ``Cache`` whose layer ``i`` holds layer ``i``'s cache in
    ``forms[i]`` (:func:`static_layer_for`)."""

    def __init__(self, forms: list[KVDecision], max_cache_len: int) -> None:
        self.forms = list(forms)
        super().__init__(layers=[static_layer_for(f, max_cache_len) for f in self.forms])
