"""``MLAAttention``: a drop-in replacement for a Hugging Face Llama/Qwen2 attention block.

Per token it computes and caches the latent ``c = W_dkv x`` (r) and the RoPE key of every kv
head (K·2p, rotated), through the cache's ``update(latent, rope_key, layer_idx)`` — keys slot
``(B, 1, T, r)``, values slot ``(B, 1, T, K·2p)`` — so ``DynamicCache``, ``StaticCache`` and
:class:`~slimfx.forms.mla.cache.MLALatentCache` all hold the latent.

Unabsorbed (prefill):  ``k_g = [k_rope_g ; W_uk,g c]``, ``v_g = W_uv,g c + b_g``, then the usual
    GQA attention with the block's scaling, then ``o_proj``.
Absorbed (decode):     ``q_lat,h = W_uk,gᵀ q_nope,h`` (r), scores ``q_rope,h·k_rope,g + q_lat,h·c``;
    ``ctx_h = Σ_t a_t c_t`` (r); output ``Σ_h (W_o,h W_uv,g) ctx_h + W_o b`` — attention runs
    directly over the latent, no key or value is rebuilt.

The two are equal up to rounding (tests); ``absorb`` selects the form: ``"auto"`` (absorbed
when one query token), ``"always"``, ``"never"``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .numerics import MLAWeights, head_dim_split

__all__ = ["MLAAttention", "ABSORB_MODES"]

ABSORB_MODES = ("auto", "always", "never")


def _linear(w: Tensor, b: Tensor | None, dtype: torch.dtype, device: torch.device) -> nn.Linear:
    with warnings.catch_warnings():  # a zero-width projection (no RoPE pair / no nope dim)
        warnings.simplefilter("ignore", UserWarning)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class MLAAttention(nn.Module):
    """Latent attention replacing ``orig`` (a Llama-style attention) with fitted ``weights``.

    ``forward`` has the signature of ``LlamaAttention.forward`` and returns ``(output, None)``.
    """

    def __init__(
        self, orig: nn.Module, weights: MLAWeights, num_heads: int, num_kv_heads: int,
        absorb: str = "auto",
    ) -> None:
        super().__init__()
        if absorb not in ABSORB_MODES:
            raise ValueError(f"absorb must be one of {ABSORB_MODES}, got {absorb!r}")
        self.config = getattr(orig, "config", None)
        self.layer_idx = orig.layer_idx
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = orig.k_proj.out_features // num_kv_heads
        self.scaling = float(getattr(orig, "scaling", self.head_dim**-0.5))
        self.rope_pairs = int(weights.rope_idx.shape[1])
        self.rank = int(weights.w_dkv.shape[0])
        self.is_causal = True
        self.absorb = absorb
        dt, dev = orig.q_proj.weight.dtype, orig.q_proj.weight.device
        qb = None if orig.q_proj.bias is None else orig.q_proj.bias[weights.q_perm]
        self.q_proj = _linear(orig.q_proj.weight[weights.q_perm], qb, dt, dev)
        self.k_rope_proj = _linear(weights.w_krope, weights.b_krope, dt, dev)
        self.kv_down = _linear(weights.w_dkv, None, dt, dev)
        self.k_up = _linear(weights.w_uk, None, dt, dev)
        self.v_up = _linear(weights.w_uv, weights.b_uv, dt, dev)
        self.o_proj = orig.o_proj
        kept, _ = head_dim_split(weights.rope_idx, self.head_dim)
        self.register_buffer("rope_dims", kept.to(dev), persistent=True)  # (K, 2p)

    # -- helpers ------------------------------------------------------------------------------
    @property
    def nope_dim(self) -> int:
        return self.head_dim - 2 * self.rope_pairs

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate the kept pairs: ``x`` (B, n, T, 2p) with n = K or H (head h uses group h//G)."""
        if self.rope_pairs == 0:
            return x
        idx = self.rope_dims
        if x.shape[1] != self.num_kv_heads:
            idx = idx.repeat_interleave(self.num_heads // self.num_kv_heads, dim=0)
        c = cos[:, None, :, :].expand(-1, idx.shape[0], -1, -1)
        s = sin[:, None, :, :].expand(-1, idx.shape[0], -1, -1)
        gather = idx[None, :, None, :].expand(c.shape[0], -1, c.shape[2], -1)
        c = torch.gather(c, 3, gather).to(x.dtype)
        s = torch.gather(s, 3, gather).to(x.dtype)
        return x * c + _rotate_half(x) * s

    def absorbed_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``W_uk`` per kv head (K, d−2p, r), ``W_o,h W_uv,g`` per query head (H, D, r), and
        the output bias ``W_o b`` (D) — what the absorbed form multiplies by."""
        K, H, d, r = self.num_kv_heads, self.num_heads, self.head_dim, self.rank
        w_uk = self.k_up.weight.reshape(K, self.nope_dim, r)
        w_uv = self.v_up.weight.reshape(K, d, r)
        wo = self.o_proj.weight.reshape(-1, H, d).transpose(0, 1)  # (H, D, d)
        w_o_lat = wo @ w_uv.repeat_interleave(H // K, dim=0)  # (H, D, r)
        bias = self.o_proj.weight @ self.v_up.bias.reshape(K, d).repeat_interleave(
            H // K, dim=0
        ).reshape(-1)
        if self.o_proj.bias is not None:
            bias = bias + self.o_proj.bias
        return w_uk, w_o_lat, bias

    @staticmethod
    def _mask(mask: Tensor | None, T: int, S: int, device: torch.device) -> Tensor | None:
        """SDPA mask: HF's bool / additive mask sliced to ``S`` keys, or a causal mask with
        the queries at the last ``T`` positions when HF passed none."""
        if mask is not None:
            return mask[..., :S]
        if T == 1:
            return None
        q_pos = torch.arange(S - T, S, device=device)[:, None]
        return torch.arange(S, device=device)[None, :] <= q_pos

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: Any | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """Same contract as ``LlamaAttention.forward`` (attention weights are not returned)."""
        if position_embeddings is None:
            raise ValueError("MLAAttention needs position_embeddings (cos, sin) from the model")
        B, T, _ = hidden_states.shape
        H, K, d, p2 = self.num_heads, self.num_kv_heads, self.head_dim, 2 * self.rope_pairs
        cos, sin = position_embeddings
        q = self.q_proj(hidden_states).view(B, T, H, d).transpose(1, 2)
        q_rope = self._rope(q[..., :p2], cos, sin)
        q_nope = q[..., p2:]
        k_rope = self.k_rope_proj(hidden_states).view(B, T, K, p2).transpose(1, 2)
        k_rope = self._rope(k_rope, cos, sin)
        latent = self.kv_down(hidden_states)[:, None]  # (B, 1, T, r)
        rope_flat = k_rope.transpose(1, 2).reshape(B, 1, T, K * p2)
        if past_key_values is not None:
            latent, rope_flat = past_key_values.update(latent, rope_flat, self.layer_idx)
        S = latent.shape[2]
        k_rope_all = rope_flat.reshape(B, S, K, p2).transpose(1, 2)  # (B, K, S, 2p)
        mask = self._mask(attention_mask, T, S, hidden_states.device)
        absorbed = self.absorb == "always" or (self.absorb == "auto" and T == 1)
        if absorbed:
            out = self._absorbed(q_rope, q_nope, k_rope_all, latent, mask)
        else:
            out = self._unabsorbed(q_rope, q_nope, k_rope_all, latent, mask)
        return out, None

    def _unabsorbed(
        self, q_rope: Tensor, q_nope: Tensor, k_rope: Tensor, latent: Tensor, mask: Tensor | None
    ) -> Tensor:
        B, H, T, _ = q_rope.shape
        K, d, S = self.num_kv_heads, self.head_dim, latent.shape[2]
        c = latent[:, 0]  # (B, S, r)
        k_nope = self.k_up(c).view(B, S, K, self.nope_dim).transpose(1, 2)
        v = self.v_up(c).view(B, S, K, d).transpose(1, 2)
        k = torch.cat([k_rope, k_nope], dim=-1).repeat_interleave(H // K, dim=1)
        v = v.repeat_interleave(H // K, dim=1)
        q = torch.cat([q_rope, q_nope], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))

    def _absorbed(
        self, q_rope: Tensor, q_nope: Tensor, k_rope: Tensor, latent: Tensor, mask: Tensor | None
    ) -> Tensor:
        B, H, T, _ = q_rope.shape
        K, r = self.num_kv_heads, self.rank
        G = H // K
        w_uk, w_o_lat, bias = self.absorbed_weights()
        # q_lat[b, h, t] = W_uk,gᵀ q_nope[b, h, t]
        q_lat = torch.einsum(
            "bkgtn,knr->bkgtr", q_nope.reshape(B, K, G, T, self.nope_dim), w_uk
        ).reshape(B, H, T, r)
        q = torch.cat([q_rope, q_lat], dim=-1)
        S = latent.shape[2]
        keys = torch.cat([k_rope, latent.expand(B, K, S, r)], dim=-1).repeat_interleave(G, dim=1)
        vals = latent.expand(B, H, S, r)
        ctx = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=self.scaling)
        out = torch.einsum("bhtr,hdr->btd", ctx, w_o_lat)
        return out + bias
