"""Decode attention over a quantized KV cache in torch, the store never dequantized.

The CPU counterpart of the Triton kernel (same arguments, same storage layout — see
``reference``): where the reference rebuilds every key and value of the store in float and then
attends, this op folds the quantization parameters into the two products of attention,

- scores of the tokens of key block ``j``: ``(q ⊙ scale_j)·codesᵀ + q·min_j``,
- output: ``Σ_t (p_t ⊙ vscale_t)·vcodes_t + Σ_t p_t·vmin_t`` (per group of value channels),

so the store is read as integer codes converted to float once, in chunks of tokens that stay in
the processor's caches. The codes are unpacked plane by plane (code ``i`` of every byte at once,
which is a shift and a mask over contiguous bytes) instead of interleaved: the channels of one
plane are every ``8/bits``-th channel, so the query, the key scales and the output are permuted
to that order (``plane_order``) rather than the codes. Scores are computed for the whole store,
one softmax over store and window, then the values chunk by chunk.

``mask``: transformers' decode mask over the cached tokens in the layer's order (sinks, store,
recent window), bool (``True`` = attend) or additive; it lets padded batches use this op.
A store of at most ~``DEQUANTIZE_ROWS`` rows (tokens × sequences × kv heads; more for 2-bit
codes, fewer for 8-bit) is dequantized and attended instead: at that size the folded step's
fixed cost of small torch calls dominates.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kv_decode_attention_folded", "hides_tokens", "CHUNK_ROWS", "DEQUANTIZE_ROWS"]

#: store rows (tokens × sequences × kv heads) converted to float at a time by default: 4096
#: tokens of SmolLM2's 3 kv heads at batch 1 (2–3× fewer torch calls than 1024 tokens, ~10%
#: faster at 8k; larger chunks gain nothing and hold more float codes)
CHUNK_ROWS = 12288
#: stores of at most this many rows are dequantized instead, for int4 keys and values (a few
#: small products cost less than the ~40 calls of the folded step; measured break-even
#: ~1.5–2k rows at batch 1 and 4); scaled by the code planes, (8/key_bits + 8/value_bits) / 4:
#: int8 1024 rows, int2 4096
DEQUANTIZE_ROWS = 2048


def hides_tokens(mask: Tensor | None) -> bool:
    """Whether a transformers attention mask (bool ``True`` = attend, or additive) hides any
    token."""
    if mask is None:
        return False
    return bool((~mask if mask.dtype == torch.bool else mask < 0).any())


def _planes(codes: Tensor, bits: int) -> list[Tensor]:
    """The code planes of ``codes`` ``(…, D·bits/8)``: plane ``i`` ``(…, D·bits/8)`` float32
    holds code ``i`` of every byte, i.e. channels ``i, i+p, …`` (``p = 8/bits``)."""
    p = 8 // bits
    if p == 1:
        return [codes.float()]
    mask = (1 << bits) - 1
    return [((codes >> (bits * i)) & mask if i else codes & mask).float() for i in range(p)]


def _bias(mask: Tensor, batch: int) -> Tensor:
    """Additive float bias ``(B, 1, 1, T)`` of a bool (``True``: attend) or additive mask."""
    if mask.dim() == 4:
        mask = mask[:, :, -1:, :]  # the decode step's row
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return bias.masked_fill_(~mask, float("-inf")).expand(batch, 1, 1, mask.shape[-1])
    return mask.float().expand(batch, 1, 1, mask.shape[-1])


def _store_scores(
    qg: Tensor, codes: Tensor, scale: Tensor, mn: Tensor, bits: int, group: int, step: int
) -> Tensor:
    """``qg·Kᵀ`` ``(B, H, rep, Ns)`` over the store's keys, scales folded into the query per
    block of ``group`` tokens; plane ``i`` of the codes holds channels ``i::8/bits``."""
    B, H, rep, D = qg.shape
    Ns, p = codes.shape[2], 8 // bits
    out = (qg @ mn.float().transpose(-1, -2)).repeat_interleave(group, -1)
    qk = [qg[..., i::p].contiguous() for i in range(p)]
    ks = [scale[..., i::p].float().contiguous() for i in range(p)]
    for t0 in range(0, Ns, step):
        t1 = min(Ns, t0 + step)
        b0, b1 = t0 // group, t1 // group
        s = None
        for i, plane in enumerate(_planes(codes[:, :, t0:t1], bits)):
            kt = plane.view(B, H, b1 - b0, group, D // p).transpose(-1, -2)
            si = (qk[i][:, :, None] * ks[i][:, :, b0:b1, None]) @ kt
            s = si if s is None else s.add_(si)
        out[..., t0:t1] += s.permute(0, 1, 3, 2, 4).reshape(B, H, rep, t1 - t0)
    return out


def _store_values(
    ps: Tensor, codes: Tensor, scale: Tensor, mn: Tensor, bits: int, group: int, step: int
) -> Tensor:
    """``ps·V`` ``(B, H, rep, D)`` over the store's values, scales folded into the attention
    weights; byte column ``c`` holds channels ``c·p + i`` (``p = 8/bits``), group
    ``c·p // group``."""
    B, H, rep, Ns = ps.shape
    D = codes.shape[-1] * 8 // bits
    ng, p = D // group, 8 // bits
    out = (ps @ mn.float()).repeat_interleave(group, -1)
    vs = scale.float()
    for t0 in range(0, Ns, step):
        t1 = min(Ns, t0 + step)
        w = ps[..., t0:t1, None] * vs[:, :, None, t0:t1]  # (B, H, rep, n, ng)
        wg = w.permute(4, 0, 1, 2, 3)  # per group: a product over the group's columns
        for i, plane in enumerate(_planes(codes[:, :, t0:t1], bits)):
            v = plane.view(B, H, t1 - t0, ng, -1)
            o = (
                torch.cat([wg[j] @ v[..., j, :] for j in range(ng)], -1)
                if ng > 1
                else wg[0] @ plane
            )
            out[..., i::p] += o
    return out


def kv_decode_attention_folded(
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
    mask: Tensor | None = None,
    sink: int = 0,
    chunk: int | None = None,
    dequantize_rows: int | None = None,
) -> Tensor:
    """``softmax(q·Kᵀ·scaling)·V`` over store + window (module docstring), float32 math, output
    ``(B, Hq, D)`` in ``q.dtype``. ``mask`` ``(B, 1, 1, sink + Ns + Nw − sink)``: the columns of
    the ``sink`` first window tokens, then the store's, then the rest of the window's.
    ``chunk``: store tokens converted to float at a time (default ``CHUNK_ROWS / (B·Hkv)``),
    rounded down to whole key blocks. ``dequantize_rows``: the largest store (rows) dequantized
    instead of folded (default ``DEQUANTIZE_ROWS`` scaled by the code planes)."""
    from .reference import dequantize_store

    B, Hq, D = q.shape
    H, Ns, Nw = k_codes.shape[1], k_codes.shape[2], k_win.shape[2]
    rep = Hq // H
    if mask is not None and mask.shape[-1] != Ns + Nw:
        raise ValueError(f"the mask covers {mask.shape[-1]} tokens, the cache holds {Ns + Nw}")
    qg = q.float().view(B, H, rep, D) * scaling
    chunk = CHUNK_ROWS // (B * H) if chunk is None else chunk
    step = max(key_group, chunk // key_group * key_group)
    if dequantize_rows is None:
        dequantize_rows = DEQUANTIZE_ROWS * (8 // key_bits + 8 // value_bits) // 4
    small = 0 < B * H * Ns <= dequantize_rows
    if small:
        k, v = dequantize_store(
            k_codes, k_scale, k_min, v_codes, v_scale, v_min, key_bits, value_bits,
            key_group, value_group,
        )  # fmt: skip
        store = qg @ k.transpose(-1, -2)
    else:
        store = _store_scores(qg, k_codes, k_scale, k_min, key_bits, key_group, step)
    scores = torch.cat([store, qg @ k_win.float().transpose(-1, -2)], -1)
    if mask is not None:  # mask columns: sinks, store, rest of the window → scores' order
        bias = _bias(mask, B)
        scores += torch.cat(
            [bias[..., sink : sink + Ns], bias[..., :sink], bias[..., sink + Ns :]], -1
        )
    p = torch.softmax(scores, dim=-1)
    out = p[..., Ns:] @ v_win.float()
    if small:
        out += p[..., :Ns] @ v
    elif Ns:
        out += _store_values(p[..., :Ns], v_codes, v_scale, v_min, value_bits, value_group, step)
    return out.reshape(B, Hq, D).to(q.dtype)
