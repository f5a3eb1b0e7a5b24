"""KV-cache numerics: KIVI-style group quantization and the Palu-style low-rank k/v fit.

Quantization is asymmetric min/max: ``q = round((x − min) / s)`` clamped to ``[0, 2^b − 1]``,
``s = (max − min) / (2^b − 1)``, with ``s`` and ``min`` stored as float16 (codes computed with
the float16-rounded values, so dequantization ``q·s + min`` is what was fitted).

- keys  ``(B, H, T, D)``: one (s, min) per channel per block of ``group`` tokens
  (``T`` a multiple of ``group``): scale/min ``(B, H, T/group, D)``;
- values ``(B, H, T, D)``: one (s, min) per token per ``group`` channels: ``(B, H, T, D/group)``.

Codes are packed along the last dim: ``8/b`` codes per byte, code ``i`` of a byte at bits
``b·i`` (little end first), so a packed row has ``D·b/8`` bytes.

Low-rank fit (``fit_lowrank_kv``): per head group, ``W ≈ U·A`` with the down projection ``A``
(rank × hidden, its output is what the cache holds) and the up projection ``U`` (group width ×
rank). ``whitened``: SVD of ``W·L`` with ``L Lᵀ`` the Gram of the projection's inputs (Palu /
SVD-LLM: minimizes the error of the projection's output). ``attention``: SVD of ``Mᵀ·W·L``
with an output-side weight ``M Mᵀ``: for keys the query energy of each rotary pair (the
query covariance averaged over the relative rotations RoPE applies, kept diagonal), so the
fit minimizes the error of the attention scores; for values ``Σ_h W_o,hᵀ W_o,h`` over the query
heads reading the kv head, so it minimizes the error after o_proj.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slimfx import formats
from slimfx.numerics.lowrank import whiten

__all__ = [
    "pack_codes",
    "unpack_codes",
    "quantize_keys",
    "dequantize_keys",
    "quantize_values",
    "dequantize_values",
    "quantize_tokens",
    "dequantize_tokens",
    "split_latent",
    "join_latent",
    "fit_lowrank_kv",
    "key_output_weight",
    "value_output_weight",
]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``(..., D)`` with values < 2^bits → ``(..., D·bits/8)`` bytes."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    c = codes.to(torch.uint8).unflatten(-1, (-1, per))
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``(..., D·bits/8)`` bytes → uint8 codes ``(..., D)``
    (the integer-code format of ``slimfx.formats``)."""
    return formats.unpack_codes(packed, bits, packed.shape[-1] * 8 // bits)


def _minmax(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, float16 scale and float16 min of ``x`` reduced over ``dim`` (kept)."""
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    qmax = (1 << bits) - 1
    s16 = ((hi - lo) / qmax).to(torch.float16)
    m16 = lo.to(torch.float16)
    s = s16.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, torch.round((xf - m16.float()) / safe), torch.zeros_like(xf))
    return q.clamp_(0, qmax).to(torch.uint8), s16, m16


def quantize_keys(k: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keys ``(B, H, T, D)``, ``T`` a multiple of ``group`` → packed codes ``(B, H, T,
    D·bits/8)``, scale and min ``(B, H, T/group, D)`` (float16)."""
    B, H, T, D = k.shape
    if T % group:
        raise ValueError(f"key quantization needs whole blocks: {T} tokens, group {group}")
    g = k.reshape(B, H, T // group, group, D)
    q, s, m = _minmax(g, bits, dim=3)
    return pack_codes(q.reshape(B, H, T, D), bits), s.squeeze(3), m.squeeze(3)


def dequantize_keys(
    codes: Tensor, scale: Tensor, mn: Tensor, bits: int, group: int, dtype: torch.dtype
) -> Tensor:
    """Inverse of :func:`quantize_keys` in ``dtype`` (float32 arithmetic)."""
    q = unpack_codes(codes, bits).float()
    B, H, T, D = q.shape
    q = q.reshape(B, H, T // group, group, D)
    x = q * scale.float().unsqueeze(3) + mn.float().unsqueeze(3)
    return x.reshape(B, H, T, D).to(dtype)


def quantize_values(v: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Values ``(B, H, T, D)``, ``D`` a multiple of ``group`` → packed codes ``(B, H, T,
    D·bits/8)``, scale and min ``(B, H, T, D/group)`` (float16)."""
    *lead, D = v.shape
    if D % group:
        raise ValueError(f"head_dim {D} is not divisible by the value group {group}")
    g = v.reshape(*lead, D // group, group)
    q, s, m = _minmax(g, bits, dim=-1)
    return pack_codes(q.reshape(*lead, D), bits), s.squeeze(-1), m.squeeze(-1)


def dequantize_values(
    codes: Tensor, scale: Tensor, mn: Tensor, bits: int, group: int, dtype: torch.dtype
) -> Tensor:
    """Inverse of :func:`quantize_values` in ``dtype``."""
    q = unpack_codes(codes, bits).float()
    *lead, D = q.shape
    q = q.reshape(*lead, D // group, group)
    x = q * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)
    return x.reshape(*lead, D).to(dtype)


# per-token quantization of any last dim (the low-rank latent) is the value layout
quantize_tokens = quantize_values
dequantize_tokens = dequantize_values


def split_latent(x: Tensor, groups: int, sizes: Sequence[int]) -> list[Tensor]:
    """A latent ``(..., groups·Σsizes)`` (head groups one after the other) → one tensor per
    segment ``(..., groups·size)``: channels ``[Σsizes[:j], Σsizes[:j+1])`` of every group."""
    parts = x.unflatten(-1, (groups, -1)).split(list(sizes), dim=-1)
    return [p.flatten(-2) for p in parts]


def join_latent(parts: Sequence[Tensor], groups: int) -> Tensor:
    """Inverse of :func:`split_latent`."""
    return torch.cat([p.unflatten(-1, (groups, -1)) for p in parts], dim=-1).flatten(-2)


def key_output_weight(
    q_weight: Tensor, gram: Tensor, shape_heads: tuple[int, int, int], rope_dim: int
) -> Tensor:
    """Diagonal output weight of the keys (``num_kv_heads·head_dim``): for each key dim the
    energy of the queries that read it, ``diag(W_q G W_qᵀ)`` summed over the query heads
    sharing the kv head and averaged over each rotary pair (dims ``i`` and ``i + rope_dim/2``
    of the head, the pairs ``rotate_half`` mixes)."""
    num_heads, num_kv_heads, head_dim = shape_heads
    Wq = q_weight.detach().double()
    energy = ((Wq @ gram.double()) * Wq).sum(1)  # (num_heads·head_dim,)
    e = energy.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim).sum(1)
    if rope_dim:
        half = rope_dim // 2
        pair = 0.5 * (e[:, :half] + e[:, half:rope_dim])
        e = torch.cat([pair, pair, e[:, rope_dim:]], dim=1)
    return e.reshape(-1)


def value_output_weight(o_weight: Tensor, shape_heads: tuple[int, int, int]) -> Tensor:
    """Output-side Gram of the values, block diagonal per kv head: ``Σ_h W_o,hᵀ W_o,h`` over the
    query heads ``h`` reading that kv head (``num_kv_heads·head_dim`` square)."""
    num_heads, num_kv_heads, head_dim = shape_heads
    Wo = o_weight.detach().double()  # (hidden, num_heads·head_dim)
    rep = num_heads // num_kv_heads
    kv_dim = num_kv_heads * head_dim
    M = torch.zeros(kv_dim, kv_dim, dtype=torch.float64)
    for h in range(num_heads):
        j = h // rep
        blk = Wo[:, h * head_dim : (h + 1) * head_dim]
        M[j * head_dim : (j + 1) * head_dim, j * head_dim : (j + 1) * head_dim] += blk.T @ blk
    return M


def _fit_one(
    W: Tensor, L: Tensor, L_inv: Tensor, out_weight: Tensor | None, rank: int
) -> tuple[Tensor, Tensor]:
    """``W ≈ up @ down`` of ``rank`` minimizing ‖Mᵀ(W − Ŵ)L‖ (M = identity when ``out_weight``
    is None; a 1-D ``out_weight`` is a diagonal M Mᵀ, a 2-D one a full M Mᵀ)."""
    W = W.double()
    if out_weight is None:
        Mt = Mt_inv = None
        A = W @ L
    else:
        if out_weight.dim() == 1:
            d = out_weight.double().clamp_min(1e-12 * float(out_weight.max().clamp_min(1e-300)))
            Mt, Mt_inv = torch.diag(d.sqrt()), torch.diag(d.rsqrt())
        else:
            Lm, Lm_inv, _ = whiten(out_weight)
            Mt, Mt_inv = Lm.T, Lm_inv.T
        A = Mt @ W @ L
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    up = U[:, :rank]
    down = S[:rank, None] * Vh[:rank] @ L_inv
    if Mt_inv is not None:
        up = Mt_inv @ up
    return up, down


def fit_lowrank_kv(
    k_weight: Tensor,
    v_weight: Tensor,
    gram: Tensor,
    key_rank: int,
    value_rank: int,
    groups: int,
    key_weight: Tensor | None = None,
    value_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """Factor ``k_proj`` / ``v_proj`` weights (``kv_dim × hidden``) per head group.

    Returns float32 ``k_down`` (key_rank × hidden), ``k_up`` (groups × group_dim × key_rank/
    groups), ``v_down``, ``v_up`` likewise: group ``g``'s rows of ``W`` are ≈ ``up[g] @
    down[g·r:(g+1)·r]``. ``key_weight`` / ``value_weight``: the output-side weights of the
    ``attention`` method (:func:`key_output_weight`, :func:`value_output_weight`), None for
    ``whitened``."""
    L, L_inv, _ = whiten(gram)
    out: dict[str, Tensor] = {}
    for name, W, rank, ow in (
        ("k", k_weight, key_rank, key_weight),
        ("v", v_weight, value_rank, value_weight),
    ):
        kv_dim = W.shape[0]
        gd, r = kv_dim // groups, rank // groups
        ups, downs = [], []
        for g in range(groups):
            rows = slice(g * gd, (g + 1) * gd)
            w_g = None
            if ow is not None:
                w_g = ow[rows] if ow.dim() == 1 else ow[rows, rows]
            up, down = _fit_one(W.detach()[rows], L, L_inv, w_g, r)
            ups.append(up)
            downs.append(down)
        out[f"{name}_down"] = torch.cat(downs).float()
        out[f"{name}_up"] = torch.stack(ups).float()
    return out
