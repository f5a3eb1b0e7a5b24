"""``MLAAttention``: a drop-in replacement for a Hugging Face Llama/Qwen2 attention block.

Per token it computes and caches the latent ``c = W_dkv x`` (r) and one RoPE key shared by all
query heads (2N = K·2p dims, rotated), through the cache's ``update(latent, rope_key,
layer_idx)`` — keys slot ``(B, 1, T, r)``, values slot ``(B, 1, T, 2N)`` — so ``DynamicCache``,
``StaticCache`` and :class:`~slimfx.forms.mla.cache.MLALatentCache` all hold the latent.

Query head h reads the shared key space through ``q'_h = q_mix_h q_h`` (K·d dims: the 2N RoPE
dims, then the nope dims; see ``numerics``).

Unabsorbed (prefill):  ``k = [k_rope ; W_uk c]`` (one key head of K·d dims), ``v_g = W_uv,g c +
    b_g``; attention with the block's scaling, then ``o_proj``.
Absorbed (decode):     ``q_lat,h = W_ukᵀ q'_nope,h`` (r), scores ``q'_rope,h·k_rope + q_lat,h·c``;
    ``ctx_h = Σ_t a_t c_t`` (r); output ``o_proj(W_uv,g ctx_h + b_g)`` — attention runs
    directly over the latent (multi-query: every head reads the same latent and RoPE key); the
    value up-projection is applied to the r-wide context after the attention, which equals
    folding it into ``o_proj`` (``absorbed_weights``) without storing ``H·r·D`` weights.

The two are equal up to rounding (tests); ``absorb`` selects the form: ``"auto"`` (absorbed
when one query token), ``"always"``, ``"never"``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimfx.ir.int8_rows import Int8Factor, Int8Rows
from slimfx.ir.match import is_linear_module, linear_weight
from slimfx.ir.modules import SlimLinear
from slimfx.numerics import reconstruct

from .numerics import MLAWeights

__all__ = ["MLAAttention", "ABSORB_MODES", "quantize_latent", "dense_weight"]

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


def dense_weight(module: nn.Module) -> Tensor:
    """The dense (out × in) weight a projection computes: an ``nn.Linear``'s (a ``Conv1D``'s
    transposed, ``ir.match.linear_weight``), a rewritten linear's (:class:`SlimLinear`) rebuilt
    from its form's tensors (``numerics.reconstruct``: what its reference op multiplies by) —
    what MLA fits on when a weights budget rewrote the block's q_proj / o_proj. Anything else
    raises ``TypeError``."""
    if isinstance(module, SlimLinear):
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        return reconstruct(module.decision, {n: t for n, t in own if n != "bias" and t is not None})
    if is_linear_module(module):
        return linear_weight(module)
    raise TypeError(f"{type(module).__name__} is not a linear module (no dense weight)")


def _grouped(q_mix: Tensor, num_kv_heads: int) -> Tensor:
    """``q_mix`` (H, K·d, d) as one map per kv group (K, K·d, d); ``ValueError`` when the query
    heads of a group have different maps (a per-head map: ``per_head_q_mix=True``)."""
    G = q_mix.shape[0] // num_kv_heads
    one = q_mix[::G]
    if not torch.equal(one.repeat_interleave(G, 0), q_mix):
        raise ValueError("q_mix differs between the query heads of a kv group (a per-head map, "
                         "e.g. rope_fold's): build the block with per_head_q_mix=True")
    return one.clone()


def quantize_latent(latent: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per token: ``codes = round(c / s)``, ``s = max|c| / 127`` (s ≥ tiny)."""
    scale = latent.abs().amax(dim=-1, keepdim=True).float() / 127.0
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(latent.float() / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale.to(latent.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class MLAAttention(nn.Module):
    """Latent attention replacing ``orig`` (a Llama-style attention) with fitted ``weights``.

    ``forward`` has the signature of ``LlamaAttention.forward`` and returns ``(output, None)``.
    ``mla_config``: the ``MLAConfig`` it was fitted with (set by ``convert_model``; saved).
    """

    mla_config: Any = None

    def __init__(
        self, orig: nn.Module, weights: MLAWeights, num_heads: int, num_kv_heads: int,
        absorb: str = "auto", latent_bits: int = 16, factor_bits: int = 16,
        per_head_q_mix: bool = False,
    ) -> None:
        super().__init__()
        if latent_bits not in (16, 8):
            raise ValueError(f"latent_bits must be 16 or 8, got {latent_bits}")
        if factor_bits not in (16, 8):
            raise ValueError(f"factor_bits must be 16 or 8, got {factor_bits}")
        #: 8: the block's own projections (RoPE key rows, down, key/value up, ``q_mix``) are
        #: stored as int8 rows (:mod:`~slimfx.ir.int8_rows`), dequantized where used
        self.factor_bits = factor_bits
        #: 8: the latent is rounded to int8 (one scale per token) as soon as it is computed, so
        #: every path (no cache, any cache) sees what an int8 latent cache holds
        self.latent_bits = latent_bits
        if absorb not in ABSORB_MODES:
            raise ValueError(f"absorb must be one of {ABSORB_MODES}, got {absorb!r}")
        self.config = getattr(orig, "config", None)
        self.layer_idx = orig.layer_idx
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = orig.k_proj.out_features // num_kv_heads
        self.scaling = float(getattr(orig, "scaling", self.head_dim**-0.5))
        self.rope_entries = int(weights.rope_freq.numel())
        self.rank = int(weights.w_dkv.shape[0])
        self.is_causal = True
        self.absorb = absorb
        #: run absorbed one-token steps through ``slimfx_kernels::mla_decode_triton`` when it
        #: supports the call (no padding mask); else (or when False) the torch path
        self.decode_kernel = False
        self.last_decode_path = ""
        dt, dev = orig.k_proj.weight.dtype, orig.k_proj.weight.device  # k/v: owned, dense
        self.q_proj = orig.q_proj
        proj = _linear if factor_bits == 16 else Int8Factor
        self.k_rope_proj = proj(weights.w_krope, weights.b_krope, dt, dev)
        self.kv_down = proj(weights.w_dkv, None, dt, dev)
        self.k_up = proj(weights.w_uk, None, dt, dev)
        self.v_up = proj(weights.w_uv, weights.b_uv, dt, dev)
        self.o_proj = orig.o_proj
        freq = weights.rope_freq.to(dev)
        self.register_buffer("rope_freq", freq, persistent=True)  # (N,)
        #: q_mix is stored once per kv group (the fit gives every query head of a group the
        #: same map, the group's columns of the key-space map) unless ``per_head_q_mix``
        #: (``rope_fold`` folds a per-head rotation into it)
        self.per_head_q_mix = per_head_q_mix or num_heads == num_kv_heads
        q_mix = weights.q_mix if self.per_head_q_mix else _grouped(weights.q_mix, num_kv_heads)
        if factor_bits == 16:
            self.register_buffer("q_mix", q_mix.to(dev, dt), persistent=True)  # (H | K, Kd, d)
        else:
            self.q_mix_rows = Int8Rows(q_mix, dt, dev)

    # -- helpers ------------------------------------------------------------------------------
    @property
    def key_dim(self) -> int:
        """Width of the shared key space (K·d)."""
        return self.num_kv_heads * self.head_dim

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate ``x`` (B, n, T, 2N) at the kept entries' frequencies (cos/sin: (B, T, d))."""
        if self.rope_entries == 0:
            return x
        half = self.head_dim // 2
        idx = torch.cat([self.rope_freq, self.rope_freq + half])
        c = cos[..., idx][:, None].to(x.dtype)
        s = sin[..., idx][:, None].to(x.dtype)
        return x * c + _rotate_half(x) * s

    @property
    def q_mix_heads(self) -> int:
        """Maps ``q_mix`` stores: one per query head, or one per kv group."""
        return self.num_heads if self.per_head_q_mix else self.num_kv_heads

    def stored_query_mix(self) -> Tensor:
        """``q_mix`` as stored (``q_mix_heads``, K·d, d): the 16-bit buffer, or its int8 rows
        dequantized."""
        return self.q_mix if self.factor_bits == 16 else self.q_mix_rows.weight

    def query_mix(self) -> Tensor:
        """``q_mix`` (H, K·d, d): each query head's map into the shared key space."""
        m = self.stored_query_mix()
        return m if self.per_head_q_mix else m.repeat_interleave(self.num_heads // len(m), 0)

    def _queries(self, hidden_states: Tensor) -> Tensor:
        """``q'`` (B, H, T, K·d): every head's query on the shared key space (the query heads
        of a group read the group's one map when q_mix is stored per group)."""
        B, T, _ = hidden_states.shape
        H, d, S = self.num_heads, self.head_dim, self.q_mix_heads
        q = self.q_proj(hidden_states).view(B, T, S, H // S, d)
        if self.factor_bits == 8:  # rows of q_mix scaled after the product
            codes, scale = self.q_mix_rows.codes_and_scales(q.dtype)  # (S, K·d, d), (S, K·d)
            out = torch.einsum("btsgd,sed->bsgte", q, codes) * scale[None, :, None, None, :]
        else:
            out = torch.einsum("btsgd,sed->bsgte", q, self.q_mix.to(q.dtype))
        return out.reshape(B, H, T, -1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Saves made before q_mix was stored per kv group hold it per query head: take each
        group's one map (refused, by the strict load, when the heads of a group differ)."""
        key = prefix + "q_mix"
        t = state_dict.get(key)
        if (t is not None and self.factor_bits == 16 and not self.per_head_q_mix
                and t.shape[0] == self.num_heads):
            G = self.num_heads // self.num_kv_heads
            if torch.equal(t[::G].repeat_interleave(G, 0), t):
                state_dict[key] = t[::G]
        super()._load_from_state_dict(state_dict, prefix, *args)

    def absorbed_weights(self) -> tuple[Tensor, Tensor]:
        """``W_o,h W_uv,g`` per query head (H, D, r) and the output bias ``W_o b`` (D)."""
        K, H, d, r = self.num_kv_heads, self.num_heads, self.head_dim, self.rank
        w_uv = self.v_up.weight.reshape(K, d, r)
        w_o = dense_weight(self.o_proj)
        wo = w_o.reshape(-1, H, d).transpose(0, 1)  # (H, D, d)
        w_o_lat = wo @ w_uv.repeat_interleave(H // K, dim=0)  # (H, D, r)
        b_heads = self.v_up.bias.reshape(K, d).repeat_interleave(H // K, dim=0).reshape(-1)
        bias = w_o @ b_heads
        if self.o_proj.bias is not None:
            bias = bias + self.o_proj.bias
        return w_o_lat, bias

    @staticmethod
    def _mask(
        mask: Tensor | None, T: int, S: int, past: int | Tensor, device: torch.device
    ) -> Tensor | None:
        """SDPA mask: HF's bool / additive mask sliced to ``S`` keys; when HF passed none, a
        causal mask with the ``T`` queries in cache slots ``past … past + T − 1`` (``past``:
        the tokens cached before this call) — a static cache's ``S`` preallocated slots past
        them are not attended; ``None`` for a one-token call that reads every slot."""
        if mask is not None:
            return mask[..., :S]
        if T == 1 and isinstance(past, int) and past + 1 == S:
            return None
        q_pos = past + torch.arange(T, device=device)[:, None]
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
        n2 = 2 * self.rope_entries
        cos, sin = position_embeddings
        q = self._queries(hidden_states)
        q_rope = self._rope(q[..., :n2], cos, sin)
        q_nope = q[..., n2:]
        k_rope = self._rope(self.k_rope_proj(hidden_states)[:, None], cos, sin)  # (B,1,T,2N)
        latent = self.kv_down(hidden_states)[:, None]  # (B, 1, T, r)
        if self.latent_bits == 8:
            codes, scales = quantize_latent(latent)
            latent = codes.to(latent.dtype) * scales
        past: int | Tensor = 0  # tokens cached before this call (a static layer: a tensor)
        if past_key_values is not None:
            if self.latent_bits == 8:  # the default DynamicCache holds the int8 codes
                from .cache import hold_int8_latent

                hold_int8_latent(past_key_values, self.layer_idx, self.config)
            if attention_mask is None:
                past = past_key_values.get_seq_length(self.layer_idx)
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)
        S = latent.shape[2]
        mask = self._mask(attention_mask, T, S, past, hidden_states.device)
        absorbed = self.absorb == "always" or (self.absorb == "auto" and T == 1)
        if absorbed:
            out = self._absorbed(q_rope, q_nope, k_rope, latent, mask)
        else:
            out = self._unabsorbed(q_rope, q_nope, k_rope, latent, mask)
        return out, None

    def _unabsorbed(
        self, q_rope: Tensor, q_nope: Tensor, k_rope: Tensor, latent: Tensor, mask: Tensor | None
    ) -> Tensor:
        B, H, T, _ = q_rope.shape
        K, d, S = self.num_kv_heads, self.head_dim, latent.shape[2]
        c = latent[:, 0]  # (B, S, r)
        k = torch.cat([k_rope, self.k_up(c)[:, None]], dim=-1).expand(B, H, S, self.key_dim)
        v = self.v_up(c).view(B, S, K, d).transpose(1, 2).repeat_interleave(H // K, dim=1)
        q = torch.cat([q_rope, q_nope], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))

    def _absorbed(
        self, q_rope: Tensor, q_nope: Tensor, k_rope: Tensor, latent: Tensor, mask: Tensor | None
    ) -> Tensor:
        B, H, T, _ = q_rope.shape
        r, S = self.rank, latent.shape[2]
        if self.factor_bits == 8:  # W_uk = diag(s) C: q_nope W_uk = (q_nope · s) C
            codes, scale = self.k_up.codes_and_scales(q_nope.dtype)
            q_lat = (q_nope * scale) @ codes
        else:
            q_lat = q_nope @ self.k_up.weight  # (B, H, T, r) = W_ukᵀ q'_nope per head
        if self.decode_kernel and T == 1:
            ctx = self._kernel_step(q_rope, q_lat, k_rope, latent, mask)
            if ctx is not None:
                return self._latent_to_output(ctx[:, :, None])
        self.last_decode_path = "torch"
        # every head attends over the one shared latent (and RoPE key): the heads are rows of
        # one product per sequence, so the cache is read as it is — never copied per head, nor
        # concatenated into a key row
        c, kr = latent[:, 0], k_rope[:, 0]  # (B, S, r), (B, S, 2N)
        rows = (B, H * T)
        scores = q_lat.reshape(*rows, r) @ c.mT
        if kr.shape[-1]:
            scores = scores + q_rope.reshape(*rows, -1) @ kr.mT
        scores = (scores * self.scaling).view(B, H, T, S).float()
        if mask is not None:
            scores = (
                scores.masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask.float()
            )
        p = torch.softmax(scores, dim=-1).to(c.dtype)
        ctx = (p.view(*rows, S) @ c).view(B, H, T, r)
        return self._latent_to_output(ctx)

    def _latent_to_output(self, ctx: Tensor) -> Tensor:
        """``o_proj(W_uv,g ctx_h + b_g)`` for the per-head latent contexts ``ctx`` (B, H, T, r):
        the value up-projection applied after the attention (cheaper at decode than storing
        ``W_o,h W_uv,g``, which ``absorbed_weights`` gives)."""
        B, H, T, r = ctx.shape
        K, d = self.num_kv_heads, self.head_dim
        if self.factor_bits == 8:  # W_uv = diag(s) C: scale the (K, d) outputs after
            codes, scale = self.v_up.codes_and_scales(ctx.dtype)
            v = torch.einsum("bkgtr,kdr->btkgd", ctx.view(B, K, H // K, T, r),
                             codes.view(K, d, r)) * scale.view(K, 1, d)
        else:
            w_uv = self.v_up.weight.view(K, d, r)
            v = torch.einsum("bkgtr,kdr->btkgd", ctx.view(B, K, H // K, T, r), w_uv)
        v = v + self.v_up.bias.view(K, 1, d)
        return self.o_proj(v.reshape(B, T, H * d))

    def _kernel_step(
        self, q_rope: Tensor, q_lat: Tensor, k_rope: Tensor, latent: Tensor, mask: Tensor | None
    ) -> Tensor | None:
        """One decode step through the Triton kernel, or ``None`` (with the reason kept in
        ``last_decode_path``) when it cannot run this call."""
        if mask is not None and not (mask.dtype == torch.bool and bool(mask.all())):
            self.last_decode_path = "torch: a padding mask (the kernel reads a prefix)"
            return None
        try:
            from slimfx.kernels.mla_decode import triton_kernel as tk
        except ImportError as e:
            self.last_decode_path = f"torch: {e}"
            return None
        B, S = latent.shape[0], latent.shape[2]
        args = (
            q_lat[:, :, 0].contiguous(), q_rope[:, :, 0].contiguous(), latent[:, 0], None,
            k_rope[:, 0, :, None, :], torch.full((B,), S, dtype=torch.int32,
                                                  device=latent.device), self.scaling,
        )
        ok, why = tk.supports(*args)
        if not ok:
            self.last_decode_path = f"torch: {why}"
            return None
        self.last_decode_path = "triton"
        return tk.run(*args)
