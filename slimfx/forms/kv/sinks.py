"""Sink tokens of the low-rank caches, per row: the first ``sink`` *real* tokens of each row.

A low-rank cache rebuilds every cached K/V from its latent, except the sink tokens (the first
tokens of a sequence, which most heads lean on), whose exact K/V the cache holds as well. In a
left-padded batch a row's first tokens are not at the first cache columns: row ``b``'s sink
``j`` is its ``j``-th real (non-padding) token, at some column ``col[b, j]``. The columns that
hold real tokens come from the model's attention mask (:func:`real_columns`); the exact K/V
live in a buffer of ``sink`` *slots* per row, ``(2, B, Hkv, sink, D)``, slot ``j`` holding the
row's ``j``-th real token. :func:`merge_sinks` writes the call's sink tokens into their slots
and puts every slot in place of the rebuilt K (and V) of its column — gathers over per-row
indices, no shape-dependent branch, so one exported graph or one compiled static step serves
every padding. Without padding slot ``j`` is column ``j``.

Not covered: flex attention's block mask cannot be read as a tensor — the sinks are then the
first columns, which a left-padded row fills with padding (a warning says so) —, and a 4-D mask
that packs several sequences in one row keeps only the row's first real tokens exact, not
each packed sequence's.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Sinks", "merge_sinks", "real_columns"]


def real_columns(mask: Any, B: int, S: Any, valid: Any) -> Tensor:
    """``(B, S)`` bool: which of the ``S`` cache columns hold a token of the row, not padding.

    From the model's 4-D mask (``(B or 1, H or 1, T, ≥ S)``, boolean or additive): the call's
    last query row — each row's last token is real (a prompt that ends in padding is refused
    by the drivers) and sees every real token before it under a causal, padding-aware mask; a
    chunk of a left-padded prompt that is all padding sees nothing, and rightly marks nothing.
    A 2-D padding mask (flash attention's) is read as is. No mask: the first ``valid`` columns,
    the tokens written so far; so too a mask that cannot be read (a flex block mask), with a
    warning."""
    if isinstance(mask, Tensor) and mask.dim() in (2, 4):
        row = mask[:, 0, -1, :S] if mask.dim() == 4 else mask[:, :S]
        if row.dtype != torch.bool:
            row = row > torch.finfo(row.dtype).min / 2 if row.is_floating_point() else row != 0
        return row.expand(B, row.shape[-1])
    if mask is not None and not isinstance(mask, Tensor):
        warnings.warn(
            f"low-rank KV sinks: a {type(mask).__name__} cannot be read for padding; the sinks are "
            "the first cache columns, which a left-padded row fills with padding",
            stacklevel=2,
        )
    cols = torch.arange(S, device=mask.device if isinstance(mask, Tensor) else None)
    return (cols < valid).unsqueeze(0).expand(B, -1)


class Sinks(NamedTuple):
    """Where each row's sinks are, for an attention that keeps the values latent. ``values``
    ``(B, Hkv, sink, D)``: slot ``j``'s exact value; ``slot`` / ``is_sink`` ``(B, S)``: each
    column's slot and whether it is a sink; ``col`` / ``has`` ``(B, sink)``: each slot's column
    and whether that token is cached yet."""

    values: Tensor
    slot: Tensor
    is_sink: Tensor
    col: Tensor
    has: Tensor

    def merge_values(self, v: Tensor) -> Tensor:
        """Rebuilt values ``(B, Hkv, S, D)`` with each sink column's exact value."""
        B, H, S, D = v.shape
        exact = self.values.to(v.dtype).gather(2, self.slot.view(B, 1, S, 1).expand(B, H, S, D))
        return torch.where(self.is_sink.view(B, 1, S, 1), exact, v)


def merge_sinks(
    k: Tensor, v: Tensor | None, ek: Tensor, ev: Tensor, held: Tensor, n0: Any, sink: int,
    real: Tensor,
) -> tuple[Tensor, Tensor | Sinks, Tensor]:  # fmt: skip
    """``k`` / ``v`` ``(B, Hkv, S, D)``: K/V rebuilt for cache columns ``0 … S−1``; ``ek`` /
    ``ev`` ``(B, Hkv, T, D)``: the exact K/V of the call's first ``T`` tokens, at columns
    ``n0 … n0+T−1`` (``n0`` an int, SymInt or 0-dim tensor; every sink column of the call must
    lie among them); ``held`` ``(2, B, Hkv, sink, D)``: the slots before the call; ``real``
    ``(B, S)``: :func:`real_columns`. Returns ``k`` with every sink column exact, ``v`` likewise
    — or, for ``v=None`` (values kept latent), the :class:`Sinks` to merge or correct them —
    and the slots after the call (those of tokens not reached yet unspecified, never read)."""
    B, H, T, D = ek.shape
    S = k.shape[2]
    count = real.long().cumsum(1)  # real tokens up to and including each column
    js = torch.arange(sink, device=k.device)
    col = (count.unsqueeze(1) <= js.view(1, sink, 1)).sum(2)  # (B, sink): slot j's column
    in_call = (col >= n0) & (col < n0 + T)
    src = torch.where(in_call, col - n0 + sink, js.view(1, sink))  # entry of held ‖ call
    exact = torch.stack([torch.cat([held[0], ek], 2), torch.cat([held[1], ev], 2)]).to(k.dtype)
    present = exact.gather(3, src.view(1, B, 1, sink, 1).expand(2, B, H, sink, D))
    is_sink = real & (count <= sink)
    slot = (count - 1).clamp(0, sink - 1)
    keep, at = is_sink.view(B, 1, S, 1), slot.view(B, 1, S, 1).expand(B, H, S, D)
    k = torch.where(keep, present[0].gather(2, at), k)
    if v is None:
        return k, Sinks(present[1], slot, is_sink, col, col < S), present
    return k, torch.where(keep, present[1].gather(2, at), v), present
