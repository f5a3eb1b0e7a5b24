"""An attention block's output with a compressed KV cache, computed in one pass.

Each query ``t`` attends to keys/values ``0..t``; the first ``n_q(t) = config.quantized_tokens(t)``
of them are read back from the compressed store (dequantized), the rest exactly — what the
cache classes in :mod:`slimfx.forms.kv.cache` give when the sequence is decoded token by token
(the store after the step that wrote ``t`` tokens holds ``quantized_tokens(t)`` of them; the
residual window stays exact). Low-rank forms rebuild K (before RoPE) and V from the latent of
every token; ``kv_latent_quant`` reads the quantized latent for the first ``n_q(t)`` tokens.

Used for the error of a site (:func:`attention_error`, same scale as the linear forms:
relative squared error of the block's output, optionally Fisher-weighted per output channel)
and, by wrapping the attention modules (:class:`SimulatedKVAttention`), for perplexity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from slimfx.forms.kv.config import (
    KVDecision,
    KVDenseConfig,
    KVLatentQuantConfig,
    KVLowRankConfig,
    KVQuantConfig,
)
from slimfx.forms.kv.numerics import (
    dequantize_keys,
    dequantize_values,
    join_latent,
    quantize_keys,
    quantize_values,
    split_latent,
)
from slimfx.ir.find import logit_softcap
from slimfx.ir.int8_rows import dequantized

__all__ = [
    "apply_rope",
    "rope_of",
    "rebuild",
    "fake_quant_keys",
    "fake_quant_keys_all",
    "fake_quant_values",
    "compressed_attention",
    "quantized_cache_attention",
    "block_forward",
    "stored_factors",
    "attention_error",
    "SimulatedKVAttention",
]


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_of(attn: nn.Module, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` as ``attn`` applies them: the identity rotation on a layer that takes no
    RoPE (SmolLM3's ``use_rope=False`` layers), else as given."""
    if getattr(attn, "use_rope", True):
        return cos, sin
    return torch.ones_like(cos), torch.zeros_like(sin)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE as transformers' Llama applies it (``rotate_half`` pairs ``i``, ``i + d/2``) to the
    first ``cos.shape[-1]`` dims of ``x`` ``(B, H, T, D)``; ``cos``/``sin`` ``(B, T, d)``."""
    d = cos.shape[-1]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


def _heads(x: Tensor, head_dim: int) -> Tensor:
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)


def rebuild(latent: Tensor, up: Tensor, bias: Tensor | None) -> Tensor:
    """``(B, T, groups·r)`` latent → ``(B, T, kv_dim)`` through the per-group ``up`` (groups ×
    group_dim × r), plus the projection's bias."""
    B, T, _ = latent.shape
    g, gd, r = up.shape
    out = torch.einsum("btgr,gdr->btgd", latent.view(B, T, g, r), up.to(latent.dtype))
    out = out.reshape(B, T, g * gd)
    return out if bias is None else out + bias.to(out.dtype)


def fake_quant_keys(k: Tensor, bits: int, group: int) -> Tensor:
    """Keys ``(B, H, T, D)`` through quantize/dequantize; the tail after the last whole block
    of ``group`` tokens is returned unchanged (the cache never stores it quantized)."""
    T = k.shape[2]
    full = T // group * group
    if full == 0:
        return k
    deq = dequantize_keys(*quantize_keys(k[:, :, :full], bits, group), bits, group, k.dtype)
    return torch.cat([deq, k[:, :, full:]], dim=2)


def fake_quant_keys_all(k: Tensor, bits: int, group: int) -> Tensor:
    """Every key through quantize/dequantize, the last partial block too (padded with copies of
    its last token, which leave the block's range unchanged): the store at long context, where
    the exact tail is a vanishing share of the tokens."""
    T = k.shape[2]
    pad = -T % group
    if pad:
        k = torch.cat([k, k[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    return dequantize_keys(*quantize_keys(k, bits, group), bits, group, k.dtype)[:, :, :T]


def fake_quant_values(v: Tensor, bits: int, group: int) -> Tensor:
    """Values (or any per-token tensor) through quantize/dequantize per token."""
    return dequantize_values(*quantize_values(v, bits, group), bits, group, v.dtype)


def _fake_quant_latent(
    latent: Tensor, config: KVLatentQuantConfig, role: str, steady: bool = False
) -> Tensor:
    """The ``(B, T, w)`` ``role`` ("key" / "value") latent as the store holds it: per token
    (``axis="token"``) or per channel in blocks of ``group`` tokens counted from the first token
    after the sinks, each channel segment at its width (``config.segments``; ``steady``: the
    last partial block quantized too)."""
    if config.axis == "token":
        return fake_quant_values(latent, config.bits, config.group)
    s = config.sink
    fq = fake_quant_keys_all if steady else fake_quant_keys
    segs = config.segments(role)
    parts = split_latent(latent[:, s:], config.groups, [n for n, _ in segs])
    q = [fq(p.unsqueeze(1), b, config.group).squeeze(1) for p, (_, b) in zip(parts, segs)]
    return torch.cat([latent[:, :s], join_latent(q, config.groups)], dim=1)


def _n_quantized(config: KVDecision, T: int, device: torch.device, steady: bool) -> Tensor:
    """Per query ``t``: past tokens read from the store. ``steady``: every token older than
    the residual window (and past the sinks), as at long context; else ``quantized_tokens(t)``
    — what the cache holds at that step of token-by-token decoding."""
    sink, residual = getattr(config, "sink", 0), getattr(config, "residual", 0)
    if steady:
        return torch.tensor([max(0, t - sink - residual) for t in range(T)], device=device)
    return torch.tensor([config.quantized_tokens(t) for t in range(T)], device=device)


def _project(attn: nn.Module, hidden: Tensor, role: str, hd: int) -> Tensor:
    """``role``'s projection of ``hidden`` as heads ``(B, H, T, D)``, through the block's
    q/k norm when it has one (per head: Qwen3-style; over the whole width: OLMo-2-style)."""
    x = getattr(attn, f"{role}_proj")(hidden)
    norm = getattr(attn, f"{role}_norm", None) or getattr(attn, f"{role}_layernorm", None)
    if norm is None:
        return _heads(x, hd)
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.numel() != hd:
        return _heads(norm(x), hd)
    return norm(_heads(x, hd))


def tiered_attention(
    q: Tensor,
    tiers: list[tuple[Tensor, Tensor, Tensor | None]],
    scaling: float,
    softcap: float | None = None,
) -> Tensor:
    """Causal attention ``(B, Hq, T, D)`` where query ``t`` reads key/value ``j`` from the tier
    whose ``(T, T)`` mask holds at ``[t, j]`` (the masks partition the causal triangle; the last
    tier's mask may be None: every pair the others leave). GQA: kv heads repeated. ``softcap``:
    scores soft-capped to ``softcap · tanh(score / softcap)`` (Gemma 2). Softmax in float32;
    output in ``q.dtype``."""
    B, Hq, T, D = q.shape
    rep = Hq // tiers[0][0].shape[1]

    def r(x: Tensor) -> Tensor:
        return x.repeat_interleave(rep, dim=1).float() if rep > 1 else x.float()

    qf = q.float()
    j = torch.arange(T, device=q.device)
    causal = j[None, :] <= j[:, None]
    masks, left = [], torch.ones(T, T, dtype=torch.bool, device=q.device)
    for _, _, m in tiers:
        m = left if m is None else m & left
        masks.append(m)
        left = left & ~m
    s = torch.zeros(B, Hq, T, T, device=q.device)
    for (k, _, _), m in zip(tiers, masks):
        s = torch.where(m, qf @ r(k).transpose(-1, -2) * scaling, s)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    out = sum((p * m.to(p.dtype)) @ r(v) for (_, v, _), m in zip(tiers, masks))
    return out.to(q.dtype)


def compressed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_deq: Tensor | None,
    v_deq: Tensor | None,
    n_quantized: Tensor | None,
    scaling: float,
    sink: int = 0,
    softcap: float | None = None,
) -> Tensor:
    """Causal attention ``(B, Hq, T, D)`` where query ``t`` reads ``k_deq``/``v_deq`` for keys
    ``sink ≤ j < sink + n_quantized[t]`` and ``k``/``v`` otherwise (GQA: kv heads repeated;
    ``softcap`` as :func:`tiered_attention`). Softmax in float32; output in ``q.dtype``."""
    if n_quantized is None or k_deq is None:
        return tiered_attention(q, [(k, v, None)], scaling, softcap)
    T = q.shape[2]
    j = torch.arange(T, device=q.device)
    use_q = (j[None, :] < sink + n_quantized.to(q.device)[:, None]) & (j[None, :] >= sink)
    return tiered_attention(q, [(k_deq, v_deq, use_q), (k, v, None)], scaling, softcap)


def block_forward(
    attn: nn.Module,
    hidden: Tensor,
    cos: Tensor,
    sin: Tensor,
    config: KVDecision,
    factors: dict[str, Tensor] | None = None,
    steady: bool = False,
) -> Tensor:
    """Output of the HF attention block ``attn`` (its q/k/v/o projections, q/k norms,
    ``head_dim``, ``scaling``) on ``hidden`` ``(B, T, hidden)`` for causal, unpadded sequences,
    with the cache in form ``config``; ``factors`` (from ``fit_lowrank_kv``) for the low-rank
    forms. ``steady``: every past token older than the residual window read from the store
    (the last partial key block quantized too) — the cache at long context — instead of what
    token-by-token decoding of these ``T`` tokens holds."""
    hd = attn.head_dim
    scaling = float(getattr(attn, "scaling", hd**-0.5))
    T = hidden.shape[1]
    cos, sin = rope_of(attn, cos, sin)
    q = apply_rope(_project(attn, hidden, "q", hd), cos, sin)
    if isinstance(config, (KVLowRankConfig, KVLatentQuantConfig)):
        if factors is None:
            raise ValueError(f"{config.kind} needs the low-rank factors (fit_lowrank_kv)")
        if config.factor_bits == 8:
            factors = stored_factors(factors, attn)
        lk = hidden @ factors["k_down"].to(hidden.dtype).T
        lv = hidden @ factors["v_down"].to(hidden.dtype).T
        kb = getattr(attn.k_proj, "bias", None)
        vb = getattr(attn.v_proj, "bias", None)
        k = apply_rope(_heads(rebuild(lk, factors["k_up"], kb), hd), cos, sin)
        v = _heads(rebuild(lv, factors["v_up"], vb), hd)
        tiers = []
        j = torch.arange(T, device=hidden.device)
        sink = config.sink
        if sink:  # the sink tokens' exact K/V (original projections, as stored)
            ke = apply_rope(_heads(_sink_projection(attn, hidden, factors, "k"), hd), cos, sin)
            ve = _heads(_sink_projection(attn, hidden, factors, "v"), hd)
            tiers.append((ke, ve, (j < sink)[None, :].expand(T, T)))
        if isinstance(config, KVLatentQuantConfig):
            lkq = _fake_quant_latent(lk, config, "key", steady)
            lvq = _fake_quant_latent(lv, config, "value", steady)
            kq = apply_rope(_heads(rebuild(lkq, factors["k_up"], kb), hd), cos, sin)
            vq = _heads(rebuild(lvq, factors["v_up"], vb), hd)
            n_q = _n_quantized(config, T, j.device, steady)
            tiers.append((kq, vq, (j[None, :] < sink + n_q[:, None])))
        tiers.append((k, v, None))
        out = tiered_attention(q, tiers, scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(*hidden.shape[:-1], -1))
    k = apply_rope(_project(attn, hidden, "k", hd), cos, sin)
    v = _project(attn, hidden, "v", hd)
    out = quantized_cache_attention(q, k, v, config, scaling, steady, applied_softcap(attn))
    out = out.transpose(1, 2).reshape(*hidden.shape[:-1], -1)
    return attn.o_proj(out)


def stored_factors(factors: dict[str, Tensor], attn: nn.Module) -> dict[str, Tensor]:
    """A fit's low-rank ``factors`` as a block with ``factor_bits=8`` stores them (int8 rows
    with a scale in the model's dtype, :func:`slimfx.ir.int8_rows.dequantized`), with the sinks'
    k/v projections so stored too (``k_sink`` / ``v_sink``)."""
    dtype = attn.k_proj.weight.dtype
    out = {k: dequantized(w, dtype) for k, w in factors.items()}
    for r in ("k", "v"):
        out[f"{r}_sink"] = dequantized(getattr(attn, f"{r}_proj").weight.detach(), dtype)
    return out


def _sink_projection(attn: nn.Module, hidden: Tensor, factors: dict[str, Tensor], r: str) -> Tensor:
    """The sink tokens' exact ``r`` ("k" / "v") projection of ``hidden``: the block's own, or
    its int8 rows (``factors[r + "_sink"]``, :func:`stored_factors`) plus its bias."""
    proj = getattr(attn, f"{r}_proj")
    w = factors.get(f"{r}_sink")
    if w is None:
        return proj(hidden)
    return torch.nn.functional.linear(hidden, w.to(hidden.dtype), proj.bias)


def applies_softcap(implementation: str | None) -> bool:
    """Whether transformers' attention function ``implementation`` applies a logit soft-cap
    it is handed: every one but ``sdpa`` (transformers 5.17 runs Gemma 2 there and ignores
    the cap; later releases refuse it)."""
    return implementation != "sdpa"


def applied_softcap(attn: nn.Module) -> float | None:
    """The logit soft-cap ``attn``'s attention function applies (:func:`applies_softcap`):
    the simulation prices the block the model computes."""
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    return logit_softcap(attn) if applies_softcap(impl) else None


def quantized_cache_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: KVDecision,
    scaling: float,
    steady: bool = False,
    softcap: float | None = None,
) -> Tensor:
    """Causal attention ``(B, Hq, T, D)`` of the exact ``q`` / ``k`` / ``v`` (keys rotated) with
    the cache in form ``config`` (``kv_quant`` or ``kv_dense``): query ``t`` reads the tokens
    the store holds dequantized (``steady`` as in :func:`block_forward`), the sinks and the
    residual window exact; ``softcap`` as :func:`tiered_attention`."""
    if isinstance(config, KVDenseConfig):
        return compressed_attention(q, k, v, None, None, None, scaling, softcap=softcap)
    if not isinstance(config, KVQuantConfig):
        raise TypeError(f"no simulation for {type(config).__name__}")
    s = config.sink  # the store's blocks start after the sink tokens
    fq = fake_quant_keys_all if steady else fake_quant_keys
    k_deq = torch.cat([k[:, :, :s], fq(k[:, :, s:], config.key_bits, config.key_group)], 2)
    v_deq = fake_quant_values(v, config.value_bits, config.value_group)
    n_q = _n_quantized(config, q.shape[2], q.device, steady)
    return compressed_attention(q, k, v, k_deq, v_deq, n_q, scaling, s, softcap)


@torch.no_grad()
def attention_error(
    attn: nn.Module,
    inputs: list[tuple[Tensor, Tensor, Tensor]],
    config: KVDecision,
    factors: dict[str, Tensor] | None = None,
    fisher: Tensor | None = None,
) -> float:
    """Relative squared error ``Σ‖w⊙(y_c − y)‖² / Σ‖w⊙y‖²`` of the block output over the
    calibration ``inputs`` (``(hidden, cos, sin)`` each), ``y`` with the 16-bit cache, ``y_c``
    with ``config``; ``w² = fisher`` (per output channel) when given."""
    num = den = 0.0
    w = None if fisher is None else fisher.float().clamp_min(0).sqrt()
    for hidden, cos, sin in inputs:
        y = block_forward(attn, hidden, cos, sin, KVDenseConfig()).float()
        yc = block_forward(attn, hidden, cos, sin, config, factors).float()
        e = yc - y
        if w is not None:
            e, y = e * w, y * w
        num += float((e * e).sum())
        den += float((y * y).sum())
    return num / den if den > 0 else 0.0


class SimulatedKVAttention(nn.Module):
    """Drop-in for a HF attention module in *evaluation* of causal, unpadded, cache-less
    forwards (perplexity): runs :func:`block_forward` with ``config`` (``steady``: the cache
    as at long context, every past token older than the residual window read from the store).
    Any attention mask is taken to be the plain causal one; a cache passed in is refused."""

    def __init__(
        self,
        attn: nn.Module,
        config: KVDecision,
        factors: dict[str, Tensor] | None = None,
        steady: bool = False,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.config = config
        self.factors = factors
        self.steady = steady

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        if past_key_values is not None:
            raise ValueError("SimulatedKVAttention evaluates without a cache (use_cache=False)")
        cos, sin = position_embeddings
        out = block_forward(
            self.attn, hidden_states, cos, sin, self.config, self.factors, self.steady
        )
        return out, None
