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

Sink tokens (``form.sink > 0``): the module keeps the original ``k_proj`` / ``v_proj``; for
each row's first ``sink`` real tokens (not padding: a left-padded row's first tokens sit after
its padding) it computes their exact K (rotated) and V, the cache layer holds them in ``sink``
slots per row, and on every read they replace the rebuilt K/V of their columns
(:mod:`slimfx.forms.kv.sinks`: the real columns read from the model's attention mask, per-row
gathers, no shape-dependent branch). Their latent is cached too, so the latent stays one row
per token. The dynamic layer (``sink_span``) has the module compute the exact K/V of only the
call's tokens that may be sinks; the branch-free ones (the ONNX export's,
:mod:`slimfx.backends.onnx_kv_latent`, and the static caches for torch.compile) take every
call token's, which one graph serves for every call.

With ``factor_bits=8`` the down-projections and the sinks' projections are
:class:`~slimfx.ir.int8_rows.Int8Factor` (int8 codes, a scale per row, applied to the product's
output) and the up-projections :class:`~slimfx.ir.int8_rows.Int8Rows`, dequantized where used
(:meth:`LowRankKVAttention.up`: a ``kv_dim × rank`` matrix per step, small beside the rebuild).

Rebuilding costs ``O(context · rank · kv_dim)`` per step. A one-token (decode) call absorbs
the value up-projection: the attention weights contract with the value latent and each head's
rows of ``v_up`` apply after (``O(heads · context · rank)``); keys are still rebuilt — past
RoPE a key up-projection cannot fold into the query. With a branch-free cache layer the same
holds; where the call length is symbolic (a traced graph serves every length) the choice is
a ``torch.cond``, except under :func:`onnx_branches` (the ONNX exports): both paths are traced
as plain code and ``slimfx::one_token_or`` picks, which the export makes an ONNX ``If``
(:mod:`slimfx.backends.onnx_branches`) — tracing the ``torch.cond`` took twice as long.
Attention masks other than a 4-D one (flash attention's 2-D padding mask, flex attention's
block mask) take the rebuilding path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.forms.kv.config import KVLatentQuantConfig, KVLowRankConfig
from slimfx.forms.kv.simulate import apply_rope, rebuild, rope_of
from slimfx.forms.kv.sinks import Sinks, merge_sinks, real_columns
from slimfx.ir.int8_rows import Int8Factor, Int8Rows
from slimfx.ir.modules import carry_hooks
from slimfx.ir.sites import AttentionSite

__all__ = ["LowRankKVAttention", "apply_lowrank_kv", "find_rotary", "onnx_branches"]


class LowRankKVAttention(nn.Module):
    """HF attention with factorized k/v projections and a latent cache (module docstring).
    ``absorb_decode``: one-token calls contract the attention weights with the value latent
    (:meth:`_absorbed`) instead of rebuilding V; False: always rebuild."""

    absorb_decode = True
    #: set while an ONNX export traces (:func:`onnx_branches`): a symbolic call length picks
    #: the path by ``slimfx::one_token_or`` instead of a ``torch.cond``
    onnx_branches = False

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
        self.factor_bits = getattr(form, "factor_bits", 16)
        int8 = self.factor_bits == 8
        for name in ("k_down", "v_down"):
            w = factors[name]
            if int8:
                setattr(self, name, Int8Factor(w, None, dt, dev))
                continue
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=dev, dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(w)
            setattr(self, name, lin)
        for name in ("k_up", "v_up"):  # (groups, group_dim, rank per group)
            if int8:  # the rows are the kv dims: one scale each
                setattr(self, f"{name}_rows", Int8Rows(factors[name], dt, dev))
            else:
                w = factors[name].to(device=dev, dtype=dt)
                setattr(self, name, nn.Parameter(w, requires_grad=False))
        self.k_bias = attn.k_proj.bias
        self.v_bias = attn.v_proj.bias
        self.sink = getattr(form, "sink", 0)
        if self.sink:  # the sink tokens' exact K/V need the original projections
            self.k_proj, self.v_proj = attn.k_proj, attn.v_proj
            if int8:  # as int8 rows, the bias shared with the rebuilt K/V's
                self.k_proj, self.v_proj = (
                    _int8_projection(p, dt, dev) for p in (attn.k_proj, attn.v_proj)
                )
        self._rotary = (rotary,)  # not a submodule: the model owns it

    def up(self, role: str) -> Tensor:
        """The ``role`` ("k" / "v") up-projection ``(groups, group_dim, rank per group)``:
        the 16-bit parameter, or the int8 rows dequantized (``factor_bits=8``)."""
        if self.factor_bits == 8:
            return getattr(self, f"{role}_up_rows").weight
        return getattr(self, f"{role}_up")

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
        ek = ev = None
        if self.sink:  # the exact K/V of the call's tokens that may be sinks (module docstring)
            m = layer.sink_span(attention_mask, T) if hasattr(layer, "sink_span") else T
            whole = m is T or (isinstance(m, int) and isinstance(T, int) and m >= T)
            h, c, s = (hidden_states, cos, sin) if whole else (
                hidden_states[:, :m], cos[:, :m], sin[:, :m])  # fmt: skip
            ek, ev = self._exact(h, c, s)
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
        k = rebuild(lk.squeeze(1), self.up("k"), self.k_bias)
        S = k.shape[1]
        k = apply_rope(k.view(B, S, -1, hd).transpose(1, 2), cos, sin)
        sinks = None
        if ek is not None and layer is None:  # no cache: the call's own first tokens
            held = k.new_zeros(2, B, k.shape[1], self.sink, hd)
            real = real_columns(attention_mask, B, S, S)
            k, sinks, _ = merge_sinks(k, None, ek, ev, held, 0, self.sink, real)
        elif ek is not None:
            k, sinks = layer.merge_sinks(k, None, ek, ev, attention_mask)
        mask_ok = attention_mask is None or (
            isinstance(attention_mask, Tensor) and attention_mask.dim() == 4
        )  # the absorbed path reads a 4-D additive / boolean mask
        absorb = self.absorb_decode and mask_ok and not kwargs.get("output_attentions")
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if absorb:
            out = self._step(fn, q, k, lv.squeeze(1), sinks, attention_mask, kwargs)
            return self.o_proj(out.reshape(B, T, -1)), None
        v = rebuild(lv.squeeze(1), self.up("v"), self.v_bias).view(B, S, -1, hd).transpose(1, 2)
        if sinks is not None:
            v = sinks.merge_values(v)
        out, weights = fn(
            self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        out = out.reshape(B, T, -1).contiguous()
        return self.o_proj(out), weights

    def _step(
        self, fn: Any, q: Tensor, k: Tensor, lv: Tensor, sinks: Sinks | None,
        mask: Tensor | None, kwargs: dict[str, Any],
    ) -> Tensor:  # fmt: skip
        """One call over keys ``k`` (sinks in place) and the value latent ``lv``: one-token
        calls attend absorbed (:meth:`_absorbed`), longer calls over rebuilt values (the
        sinks' exact ones merged). Where the call length is symbolic (an exported graph for
        every length) the choice is a ``torch.cond`` (under :func:`onnx_branches`
        ``slimfx::one_token_or`` over both paths, an ``If`` once exported), else a Python
        branch. Returns ``(B, T, Hq, D)``."""
        B, Hq, T, D = q.shape
        n_sinks = 0 if sinks is None else len(sinks)
        extra = [*(sinks or ()), *([] if mask is None else [mask])]

        def split(rest: tuple[Tensor, ...]) -> tuple[Sinks | None, Tensor | None]:
            s = Sinks(*rest[:n_sinks]) if n_sinks else None
            return s, (rest[n_sinks] if mask is not None else None)

        def flat(out: Tensor) -> Tensor:  # (B, T, Hq, D) → a fresh dense (B·T, Hq·D)
            return out.reshape(-1, Hq * D).clone(memory_format=torch.contiguous_format)

        def absorbed(q: Tensor, k: Tensor, lv: Tensor, *rest: Tensor) -> Tensor:
            s, m = split(rest)
            return flat(self._absorbed(q, k, lv, m, s))

        def rebuilt(q: Tensor, k: Tensor, lv: Tensor, *rest: Tensor) -> Tensor:
            s, m = split(rest)
            S = k.shape[2]
            v = rebuild(lv, self.up("v"), self.v_bias).view(B, S, -1, D).transpose(1, 2)
            if s is not None:
                v = s.merge_values(v)
            out, _ = fn(self, q, k, v, m, dropout=0.0, scaling=self.scaling, **kwargs)
            return flat(out)

        # both branches give (B·T, Hq·D): torch.cond needs outputs whose strides are plain
        # products of the sizes, which a symbolic T axis in the middle is not
        ops = (q, k, lv, *extra)
        if isinstance(T, int):
            out = (absorbed if T == 1 else rebuilt)(*ops)
        elif LowRankKVAttention.onnx_branches:  # both traced; the export makes it an ``If``
            out = torch.ops.slimfx.one_token_or(T, absorbed(*ops), rebuilt(*ops))
        else:
            torch._check(T >= 1)  # (the strides then simplify to plain products)
            out = torch.cond(T == 1, absorbed, rebuilt, ops)
        return out.view(B, T, -1, D)

    def _absorbed(
        self, q: Tensor, k: Tensor, lv: Tensor, mask: Tensor | None, sinks: Sinks | None
    ) -> Tensor:
        """Attention with the value up-projection absorbed: each head's softmax weights
        contract with the value *latent* ``lv`` ``(B, S, rank)`` and the result goes through
        that head's rows of ``v_up`` (+ bias), instead of rebuilding every cached token's V
        (``S·rank·kv_dim`` → ``heads·S·rank`` multiply-adds per query: the decode path).
        ``q`` ``(B, Hq, T, D)``, ``k`` ``(B, Hkv, S, D)`` with the sinks' exact keys in place;
        ``sinks``: the sinks' exact values replace their rebuilt ones by a correction over
        each row's ``sink`` slots (a slot not cached yet weighs 0) — static lengths, no
        shape-dependent slice; ``mask`` 4-D (``(B, 1, T, ≥S)``) or ``None`` (no mask: a
        one-token call). Softmax in float32 as transformers' eager attention; equal to it up to
        rounding (tested). Returns ``(B, T, Hq, D)``."""
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        rep = Hq // Hkv
        scores = torch.einsum("bhrtd,bhsd->bhrts", q.view(B, Hkv, rep, T, D), k) * self.scaling
        if mask is not None:
            m = mask[:, :, -T:, :S].unsqueeze(2)  # (B, 1, 1, T, S)
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        p = scores.float().softmax(-1).to(q.dtype)
        v_up = self.up("v")
        g, _, r = v_up.shape
        pg = p.reshape(B, g, Hkv // g, rep, T, S)
        ctx = torch.einsum("bgjrts,bsgz->bgjrtz", pg, lv.reshape(B, S, g, r))
        up = v_up.to(q.dtype).view(g, Hkv // g, D, r)
        out = torch.einsum("bgjrtz,gjdz->bgjrtd", ctx, up).reshape(B, Hkv, rep, T, D)
        if self.v_bias is not None:  # rebuilt values carry the bias; weights sum to 1
            out = out + self.v_bias.to(q.dtype).view(1, Hkv, 1, 1, D)
        if sinks is not None:  # the sinks' exact values replace their rebuilt ones
            n = sinks.col.shape[1]
            at = sinks.col.clamp(max=S - 1)  # (B, n): each slot's column (uncached: weight 0)
            ph = p.gather(-1, at.view(B, 1, 1, 1, n).expand(B, Hkv, rep, T, n))
            ph = ph * sinks.has.to(p.dtype).view(B, 1, 1, 1, n)
            lat = lv.gather(1, at.unsqueeze(-1).expand(B, n, lv.shape[-1]))
            vh = rebuild(lat, v_up, self.v_bias)
            delta = sinks.values.to(q.dtype) - vh.view(B, n, Hkv, D).transpose(1, 2)
            out = out + torch.einsum("bhrts,bhsd->bhrtd", ph, delta)
        return out.reshape(B, Hq, T, D).transpose(1, 2)

    def _exact(self, hidden: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The original projections' K (rotated) and V of ``hidden`` ``(B, n, hidden)``:
        ``(B, Hkv, n, head_dim)`` each."""
        B, n, _ = hidden.shape
        H = self.k_proj.out_features // self.head_dim
        k = self.k_proj(hidden).view(B, n, H, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(B, n, H, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v


@contextmanager
def onnx_branches() -> Iterator[None]:
    """Within the block, a low-rank KV layer traced with a symbolic call length computes both
    paths and picks by ``slimfx::one_token_or`` (an ONNX ``If`` once the export has run
    :func:`slimfx.backends.onnx_branches.lazy_branches`) instead of a ``torch.cond``."""
    before = LowRankKVAttention.onnx_branches
    LowRankKVAttention.onnx_branches = True
    try:
        yield
    finally:
        LowRankKVAttention.onnx_branches = before


def _int8_projection(proj: nn.Module, dtype: torch.dtype, device: torch.device) -> Int8Factor:
    """``proj`` (an ``nn.Linear``) as int8 rows, its bias the same parameter."""
    out = Int8Factor(proj.weight, None, dtype, device)
    if proj.bias is not None:
        out.bias = proj.bias
    return out


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
    probe: bool = True,
) -> list[str]:
    """Replace each site in ``forms`` (by fqn) by :class:`LowRankKVAttention` with its
    ``factors``; every site is checked before any is replaced — the form's shape check, the
    block variants the rewritten block does not compute (``candidates.site_refusal``: q/k
    norms, soft-capped logits, a cache-only block) and, on a probe call, that the
    block is the Llama-style attention the rewrite rebuilds (``calibrate.simulation_mismatch``:
    another RoPE layout; ``probe=False``: not, for a skeleton whose weights are not loaded
    yet) — so a refusal leaves the model unchanged. Returns the rewritten fqns."""
    from slimfx.forms.kv.calibrate import SIMULATION_TOLERANCE, simulation_mismatch
    from slimfx.forms.kv.candidates import site_refusal

    todo = [s for s in sites if s.fqn in forms]
    if not todo:  # (a model without RoPE may still take quantized caches)
        return []
    for s in todo:
        why = site_refusal(forms[s.fqn], s)
        if why:
            raise ValueError(f"{s.fqn}: {why}")
        if s.fqn not in factors:
            raise ValueError(f"{s.fqn}: no low-rank factors given")
    rotary = find_rotary(model)
    diff = simulation_mismatch(model, todo) if probe else {}
    bad = {f: d for f, d in diff.items() if not d <= SIMULATION_TOLERANCE}
    if bad:
        f, d = next(iter(bad.items()))
        raise ValueError(
            f"{f}: the block's output differs from the Llama-style attention a low-rank cache "
            f"rebuilds by {d:.1e} (relative, float32, on a probe call: another RoPE layout or "
            f"attention variant){f' — and {len(bad) - 1} more block(s)' if len(bad) > 1 else ''}"
        )
    mods = dict(model.named_modules())
    for s in todo:
        parent, _, child = s.fqn.rpartition(".")
        new = LowRankKVAttention(mods[s.fqn], factors[s.fqn], forms[s.fqn], rotary)
        new.train(mods[s.fqn].training)  # a new module starts in training mode
        carry_hooks(mods[s.fqn], new)
        setattr(mods[parent] if parent else model, child, new)
    return [s.fqn for s in todo]
