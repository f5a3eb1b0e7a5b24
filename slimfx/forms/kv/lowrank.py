"""The low-rank KV rewrite: the cache holds the latent, K and V are rebuilt on read.

Design (the simplest correct one with Hugging Face attention): each attention site's module is
replaced by :class:`LowRankKVAttention`, which keeps ``q_proj`` / ``o_proj``, replaces
``k_proj`` / ``v_proj`` by ``k_down`` / ``v_down`` (hidden → rank, no bias) and per-group up
projections, and calls ``past_key_values.update`` with the *latent* ``(B, 1, T, rank)``
plus the tokens' position ids. The cache layer (``LatentLayer`` / ``QuantizedLatentLayer``)
stores latent and positions; on every call the module rebuilds K from the whole cached latent
(up projection + bias), rotates it with cos/sin of the cached positions (the model's
``rotary_emb``), rebuilds V, and runs the model's configured attention function (SDPA, eager …)
unchanged. Keys are therefore rebuilt *before* RoPE, as Palu requires: a post-RoPE key is not
low rank in a fixed basis. With no cache (``use_cache=False``) the latent of the call is used.

Sink tokens (``form.sink > 0``): the module keeps the original ``k_proj`` / ``v_proj``; for the
first ``sink`` tokens of the sequence it computes their exact K (rotated) and V, hands them to
the cache layer (``add_sink``), and on every read they replace the rebuilt K/V of those
positions. Their latent is cached too, so the latent stays one row per token. "The first
tokens of this call that are sinks" depends on the cached length — a branch one exported graph
cannot hold — so with a branch-free cache layer (one with ``merge_sinks``: the ONNX export's,
:mod:`slimfx.backends.onnx_kv_latent`, and the static caches for torch.compile) the module
computes every call token's exact K/V and the layer puts the first ``sink`` positions' in
place by a gather over positions.

Rebuilding costs ``O(context · rank · kv_dim)`` per step. A one-token (decode) call absorbs
the value up-projection: the attention weights contract with the value latent and each head's
rows of ``v_up`` apply after (``O(heads · context · rank)``); keys are still rebuilt — past
RoPE a key up-projection cannot fold into the query. With a branch-free cache layer the same
holds; where the call length is symbolic (an exported graph serves every length) the choice is
a ``torch.cond`` — an ``If`` in ONNX. Attention masks other than a 4-D one (flash attention's
2-D padding mask, flex attention's block mask) take the rebuilding path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from slimfx.forms.kv.config import KVLatentQuantConfig, KVLowRankConfig
from slimfx.forms.kv.simulate import apply_rope, rebuild, rope_of
from slimfx.ir.sites import AttentionSite

__all__ = ["LowRankKVAttention", "apply_lowrank_kv", "find_rotary", "merge_sinks"]


class LowRankKVAttention(nn.Module):
    """HF attention with factorized k/v projections and a latent cache (module docstring).
    ``absorb_decode``: one-token calls contract the attention weights with the value latent
    (:meth:`_absorbed`) instead of rebuilding V; False: always rebuild."""

    absorb_decode = True

    def __init__(
        self,
        attn: nn.Module,
        factors: dict[str, Tensor],
        form: KVLowRankConfig | KVLatentQuantConfig,
        rotary: nn.Module,
    ) -> None:
        super().__init__()
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.num_key_value_groups = attn.num_key_value_groups
        self.attention_dropout = getattr(attn, "attention_dropout", 0.0)
        self.is_causal = True
        self.use_rope = getattr(attn, "use_rope", True)  # False: a NoPE layer (SmolLM3)
        self.form = form
        self.q_proj, self.o_proj = attn.q_proj, attn.o_proj
        dt, dev = attn.k_proj.weight.dtype, attn.k_proj.weight.device
        hidden = attn.k_proj.in_features
        self.k_down = nn.Linear(
            hidden, factors["k_down"].shape[0], bias=False, device=dev, dtype=dt
        )
        self.v_down = nn.Linear(
            hidden, factors["v_down"].shape[0], bias=False, device=dev, dtype=dt
        )
        with torch.no_grad():
            self.k_down.weight.copy_(factors["k_down"])
            self.v_down.weight.copy_(factors["v_down"])
        self.k_up = nn.Parameter(factors["k_up"].to(device=dev, dtype=dt), requires_grad=False)
        self.v_up = nn.Parameter(factors["v_up"].to(device=dev, dtype=dt), requires_grad=False)
        self.k_bias = attn.k_proj.bias
        self.v_bias = attn.v_proj.bias
        self.sink = getattr(form, "sink", 0)
        if self.sink:  # the sink tokens' exact K/V need the original projections
            self.k_proj, self.v_proj = attn.k_proj, attn.v_proj
        self._rotary = (rotary,)  # not a submodule: the model owns it

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None = None,
        past_key_values: Any = None,
        position_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        B, T, _ = hidden_states.shape
        hd = self.head_dim
        cos, sin = rope_of(self, *position_embeddings)
        q = self.q_proj(hidden_states).view(B, T, -1, hd).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        lk = self.k_down(hidden_states).unsqueeze(1)  # (B, 1, T, rank)
        lv = self.v_down(hidden_states).unsqueeze(1)
        layer = None
        if past_key_values is not None:
            layers = getattr(past_key_values, "layers", [])
            layer = layers[self.layer_idx] if self.layer_idx < len(layers) else None
        # a branch-free cache layer (the ONNX export's, the static ones) merges the sinks
        # without a shape-dependent branch: it takes every call token's exact K/V and keeps
        # those of the first ``sink`` positions
        branchless = hasattr(layer, "merge_sinks")
        sink_k = sink_v = None
        if branchless and self.sink:
            sink_k, sink_v = self._exact(hidden_states, cos, sin)
        elif not branchless:
            n0 = layer.get_seq_length() if hasattr(layer, "positions") else 0
            need = max(0, min(self.sink, n0 + T) - n0)  # this call's tokens that are sinks
            if need:
                sink_k, sink_v = self._exact(hidden_states[:, :need], cos[:, :need], sin[:, :need])
                if hasattr(layer, "add_sink"):
                    layer.add_sink(sink_k, sink_v)
            if hasattr(layer, "add_sink") and layer.sink_keys is not None:
                sink_k, sink_v = layer.sink_keys, layer.sink_values
        if past_key_values is not None:
            if position_ids is None:
                raise ValueError("LowRankKVAttention needs position_ids with a cache")
            if not hasattr(layer, "positions"):  # the pre-hook upgrades an empty 16-bit layer
                raise TypeError(
                    f"layer {self.layer_idx} of the cache is a {type(layer).__name__}; a low-rank "
                    "KV model needs slimfx's KVCache (past_key_values=KVCache.for_model(...))"
                )
            lk, lv = past_key_values.update(lk, lv, self.layer_idx, positions=position_ids)
            cos, sin = rope_of(self, *self._rotary[0](hidden_states, layer.positions))
        k = rebuild(lk.squeeze(1), self.k_up, self.k_bias)
        S = k.shape[1]
        k = apply_rope(k.view(B, S, -1, hd).transpose(1, 2), cos, sin)
        ns = 0 if branchless or sink_k is None else sink_k.shape[2]
        if ns:  # the first tokens' exact K/V replace their rebuilt ones
            k = torch.cat([sink_k.to(k.dtype), k[:, :, ns:]], dim=2)
        mask_ok = attention_mask is None or (
            isinstance(attention_mask, Tensor) and attention_mask.dim() == 4
        )  # the absorbed path reads a 4-D additive / boolean mask
        absorb = self.absorb_decode and mask_ok and not kwargs.get("output_attentions")
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if branchless and absorb:
            out = self._branchless_step(fn, q, k, lv.squeeze(1), layer, sink_k, sink_v,
                                        attention_mask, kwargs)  # fmt: skip
            return self.o_proj(out.reshape(B, T, -1)), None
        if absorb and T == 1:  # (no dropout)
            out = self._absorbed(q, k, lv.squeeze(1), attention_mask, sink_v if ns else None)
            return self.o_proj(out.reshape(B, T, -1)), None
        v = rebuild(lv.squeeze(1), self.v_up, self.v_bias).view(B, S, -1, hd).transpose(1, 2)
        if branchless and sink_k is not None:
            k, v = layer.merge_sinks(k, v, sink_k, sink_v)
        elif ns:
            v = torch.cat([sink_v.to(v.dtype), v[:, :, ns:]], dim=2)
        out, weights = fn(
            self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        out = out.reshape(B, T, -1).contiguous()
        return self.o_proj(out), weights

    def _branchless_step(
        self, fn: Any, q: Tensor, k: Tensor, lv: Tensor, layer: Any, sink_k: Tensor | None,
        sink_v: Tensor | None, mask: Tensor | None, kwargs: dict[str, Any],
    ) -> Tensor:  # fmt: skip
        """A branch-free layer's step (ONNX export, static caches): the sinks' exact keys put in
        place, then one-token calls attend absorbed (:meth:`_absorbed`) and longer calls over
        rebuilt values. Where the call length is symbolic (an exported graph for every length)
        the choice is a ``torch.cond`` — an ``If`` in ONNX — else a Python branch. Returns
        ``(B, T, Hq, D)``."""
        B, Hq, T, D = q.shape
        head = None  # the sinks' exact values, positions 0 … sink−1 (those ≥ S unspecified)
        if sink_k is not None:
            k, head = layer.merge_sinks(k, None, sink_k, sink_v)
        extra = [t for t in (head, mask) if t is not None]

        def split(rest: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor | None]:
            it = iter(rest)
            return (None if head is None else next(it)), (None if mask is None else next(it))

        def flat(out: Tensor) -> Tensor:  # (B, T, Hq, D) → a fresh dense (B·T, Hq·D)
            return out.reshape(-1, Hq * D).clone(memory_format=torch.contiguous_format)

        def absorbed(q: Tensor, k: Tensor, lv: Tensor, *rest: Tensor) -> Tensor:
            h, m = split(rest)
            return flat(self._absorbed(q, k, lv, m, h))

        def rebuilt(q: Tensor, k: Tensor, lv: Tensor, *rest: Tensor) -> Tensor:
            h, m = split(rest)
            S = k.shape[2]
            v = rebuild(lv, self.v_up, self.v_bias).view(B, S, -1, D).transpose(1, 2)
            if h is not None:  # positions < sink take the exact values
                pos = torch.arange(S, device=v.device)
                exact = h.to(v.dtype).index_select(2, torch.clamp(pos, max=h.shape[2] - 1))
                v = torch.where((pos < h.shape[2]).view(1, 1, S, 1), exact, v)
            out, _ = fn(self, q, k, v, m, dropout=0.0, scaling=self.scaling, **kwargs)
            return flat(out)

        # both branches give (B·T, Hq·D): torch.cond needs outputs whose strides are plain
        # products of the sizes, which a symbolic T axis in the middle is not
        ops = (q, k, lv, *extra)
        if isinstance(T, int):
            out = (absorbed if T == 1 else rebuilt)(*ops)
        else:
            torch._check(T >= 1)  # (the strides then simplify to plain products)
            out = torch.cond(T == 1, absorbed, rebuilt, ops)
        return out.view(B, T, -1, D)

    def _absorbed(
        self, q: Tensor, k: Tensor, lv: Tensor, mask: Tensor | None, sink_v: Tensor | None
    ) -> Tensor:
        """Attention with the value up-projection absorbed: each head's softmax weights
        contract with the value *latent* ``lv`` ``(B, S, rank)`` and the result goes through
        that head's rows of ``v_up`` (+ bias), instead of rebuilding every cached token's V
        (``S·rank·kv_dim`` → ``heads·S·rank`` multiply-adds per query: the decode path).
        ``q`` ``(B, Hq, T, D)``, ``k`` ``(B, Hkv, S, D)`` with the sinks' exact keys in place,
        ``sink_v`` ``(B, Hkv, n, D)`` the exact values of positions ``0 … n−1`` (those ≥ S
        ignored: their weight is 0), which replace the rebuilt ones by a correction over those
        ``n`` positions — static lengths, no shape-dependent slice; ``mask`` 4-D (``(B, 1, T,
        ≥S)``) or ``None`` (no mask: a one-token call). Softmax in float32 as transformers'
        eager attention; equal to it up to rounding (tested). Returns ``(B, T, Hq, D)``."""
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        rep = Hq // Hkv
        scores = torch.einsum("bhrtd,bhsd->bhrts", q.view(B, Hkv, rep, T, D), k) * self.scaling
        if mask is not None:
            m = mask[:, :, -T:, :S].unsqueeze(2)  # (B, 1, 1, T, S)
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        p = scores.float().softmax(-1).to(q.dtype)
        g, _, r = self.v_up.shape
        pg = p.reshape(B, g, Hkv // g, rep, T, S)
        ctx = torch.einsum("bgjrts,bsgz->bgjrtz", pg, lv.reshape(B, S, g, r))
        up = self.v_up.to(q.dtype).view(g, Hkv // g, D, r)
        out = torch.einsum("bgjrtz,gjdz->bgjrtd", ctx, up).reshape(B, Hkv, rep, T, D)
        if self.v_bias is not None:  # rebuilt values carry the bias; weights sum to 1
            out = out + self.v_bias.to(q.dtype).view(1, Hkv, 1, 1, D)
        if sink_v is not None:  # the sinks' exact values replace their rebuilt ones
            n = sink_v.shape[2]
            pos = torch.arange(n, device=q.device)
            at = torch.clamp(pos, max=S - 1)  # positions past S (a short sequence) weigh 0
            ph = p.index_select(-1, at) * (pos < S).to(p.dtype)
            vh = rebuild(lv.index_select(1, at), self.v_up, self.v_bias)
            delta = sink_v.to(q.dtype) - vh.view(B, n, Hkv, D).transpose(1, 2)
            out = out + torch.einsum("bhrts,bhsd->bhrtd", ph, delta)
        return out.reshape(B, Hq, T, D).transpose(1, 2)

    def _exact(self, hidden: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The original projections' K (rotated) and V of ``hidden`` ``(B, n, hidden)``:
        ``(B, Hkv, n, head_dim)`` each."""
        B, n, _ = hidden.shape
        k = self.k_proj(hidden).view(B, n, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(B, n, -1, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v


def merge_sinks(
    k: Tensor, v: Tensor | None, ek: Tensor, ev: Tensor, held: Tensor, n0: Any, sink: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Sink tokens without a shape-dependent branch (the ONNX export's and the static cache's
    path). ``k`` / ``v`` ``(B, Hkv, S, D)``: K/V rebuilt for cache positions ``0 … S−1``;
    ``ek`` / ``ev`` ``(B, Hkv, T, D)``: the exact K/V of the call's tokens, at positions
    ``n0 … n0+T−1`` (``n0``: the cached length before the call, an int, SymInt or 0-dim
    tensor); ``held`` ``(2, B, Hkv, sink, D)``: the exact K/V of the sink tokens cached before.
    Returns ``k`` / ``v`` with each position ``p < sink`` exact — ``held[:, …, p]`` for a past
    token, the call's for this call's — and the sink buffer after the call (entries of
    positions not reached yet unspecified, never read). ``v=None`` (values kept latent): the
    returned ``v`` is the exact values of positions ``0 … sink−1`` alone (the buffer's)."""
    T, S = ek.shape[2], k.shape[2]
    exact = torch.stack([torch.cat([held[0], ek], 2), torch.cat([held[1], ev], 2)]).to(k.dtype)

    def index(n: int) -> Tensor:  # position p → entry of `exact` (past: p, call: sink+p−n0)
        p = torch.arange(n, device=k.device)
        i = torch.where(p < n0, p, p - n0 + sink)
        return torch.where(i < sink + T, i, torch.zeros_like(i))

    keep = (torch.arange(S, device=k.device) < sink).view(1, 1, S, 1)
    present = exact.index_select(3, index(sink))
    if v is None:  # values kept latent: the exact values of positions 0 … sink−1 alone
        return torch.where(keep, exact[0].index_select(2, index(S)), k), present[1], present
    full = exact.index_select(3, index(S))
    k, v = torch.where(keep, full[0], k), torch.where(keep, full[1], v)
    return k, v, present


def find_rotary(model: nn.Module) -> nn.Module:
    """The model's shared rotary embedding module (``…rotary_emb``)."""
    for name, m in model.named_modules():
        if name.endswith("rotary_emb"):
            return m
    raise ValueError("no rotary_emb module found: the low-rank KV rewrite needs RoPE from it")


def apply_lowrank_kv(
    model: nn.Module,
    sites: list[AttentionSite],
    forms: dict[str, KVLowRankConfig | KVLatentQuantConfig],
    factors: dict[str, dict[str, Tensor]],
) -> list[str]:
    """Replace each site in ``forms`` (by fqn) by :class:`LowRankKVAttention` with its
    ``factors``; every site is checked before any is replaced, so a refusal leaves the model
    unchanged. Returns the rewritten fqns."""
    todo = [s for s in sites if s.fqn in forms]
    if not todo:  # (a model without RoPE may still take quantized caches)
        return []
    rotary = find_rotary(model)
    mods = dict(model.named_modules())
    for s in todo:
        lr = getattr(forms[s.fqn], "lowrank", forms[s.fqn])
        why = lr.check(s.site_shape)
        if why:
            raise ValueError(f"{s.fqn}: {why}")
        if s.fqn not in factors:
            raise ValueError(f"{s.fqn}: no low-rank factors given")
    for s in todo:
        parent, _, child = s.fqn.rpartition(".")
        new = LowRankKVAttention(mods[s.fqn], factors[s.fqn], forms[s.fqn], rotary)
        new.train(mods[s.fqn].training)  # a new module starts in training mode
        setattr(mods[parent] if parent else model, child, new)
    return [s.fqn for s in todo]
