"""Ground truth for ``mla_decode``: one decode step of latent attention, in plain torch.

For batch ``b``, query head ``h`` (kv group ``g = h // (H / K)``) and cached token ``t < len_b``:

    s[b, h, t]  = scale · (q_lat[b, h] · c[b, t] + q_rope[b, h] · k_rope[b, t, g])
    ctx[b, h]   = Σ_t softmax_t(s[b, h, :len_b]) · c[b, t]

``c`` is the latent cache (B, S, R) in a float dtype, or int8 codes with one scale per token
(``latent_scales`` (B, S)): ``c = codes · scale``. ``k_rope`` (B, S, K, P) holds the rotated
RoPE keys (P may be 0). Scores, softmax and the weighted sum run in fp32; the result is rounded
once to ``q_lat.dtype``. A sequence of length 0 gives zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mla_decode_reference", "dequantize_latent"]


def dequantize_latent(latent: Tensor, latent_scales: Tensor | None) -> Tensor:
    """The latent in fp32: ``latent`` itself, or int8 codes × per-token scales."""
    if latent_scales is None:
        return latent.float()
    return latent.float() * latent_scales.float()[..., None]


def mla_decode_reference(
    q_lat: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    latent_scales: Tensor | None,
    k_rope: Tensor,
    lengths: Tensor,
    scale: float,
) -> Tensor:
    """``ctx`` (B, H, R) in ``q_lat.dtype`` (see the module docstring)."""
    B, H, R = q_lat.shape
    S, K = k_rope.shape[1], k_rope.shape[2]
    c = dequantize_latent(latent, latent_scales)
    kr = k_rope.float().repeat_interleave(H // K, dim=2)  # (B, S, H, P)
    s = torch.einsum("bhr,bsr->bhs", q_lat.float(), c)
    s = s + torch.einsum("bhp,bshp->bhs", q_rope.float(), kr)
    s = s * scale
    valid = torch.arange(S, device=q_lat.device)[None, :] < lengths.to(q_lat.device)[:, None]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row of -inf (length 0) → zeros
    return torch.einsum("bhs,bsr->bhr", p, c).to(q_lat.dtype)
