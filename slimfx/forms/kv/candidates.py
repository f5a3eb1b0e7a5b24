"""KV-cache candidates of one attention site, priced and with their error, for the budget solver.

``default_kv_forms(shape)`` is the candidate set (the forms and settings that won on SmolLM2 in
``benchmarks/kv_quality.py``, adapted to the site's head_dim); ``kv_site_options`` turns a list of
forms into the site's :class:`~slimfx.planning.problem.SiteOptions`:

- **error**: the relative squared error of the attention block's output (``y = o_proj(...)``)
  with the compressed cache, on the calibration inputs the block received, in the *steady*
  state — every past token older than the residual window read from the store, as at long
  context (:func:`~slimfx.forms.kv.simulate.block_forward` with ``steady=True``) — times the
  site's loss-sensitivity weight (its ``o_proj``'s, the same output): the scale of the linear
  forms' errors; a cache-only site's block (Phi-3's fused projections, …) is replayed through
  its own forward with the attention function simulating the cache (:mod:`.replay`);
- **costs**: ``weight_bytes`` (the k/v projections a low-rank form owns, biases included; 0 for
  a quantized cache), ``kv_bytes_per_token`` (rounded up to a whole byte; at ``context`` tokens
  when given, else the steady state) and, with a ``context``, ``kv_cache_bytes`` (one
  sequence's exact cache bytes at that context);
- **covers**: a low-rank form owns the site's k_proj and v_proj linear sites.

A form the site cannot take (``config.check``, keys behind a q/k norm for the low-rank forms, k/v
projections that are not sites of the problem, a cache-only site or a soft-capped attention for
the low-rank forms) is left out, with the reason returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.ir.sites import AttentionSite
from slimfx.planning.problem import Option, SiteOptions
from slimfx.planning.shapes import (
    KV_BYTES_PER_TOKEN,
    KV_CACHE_BYTES,
    WEIGHT_BYTES,
    AttentionShape,
)

from .config import (
    KVDecision,
    KVDenseConfig,
    KVLatentQuantConfig,
    KVLowRankConfig,
    KVQuantConfig,
)

__all__ = [
    "default_kv_forms", "kv_costs", "kv_site_options", "cache_only_reason", "fit_key",
    "KV_ERROR_BATCHES", "SINK",
]  # fmt: skip

#: calibration batches the error of each KV candidate is measured on (block replays are cheap,
#: but every candidate replays every batch)
KV_ERROR_BATCHES = 4
#: sink tokens kept 16-bit by the default candidates (the largest single gain measured)
SINK = 4


def _group(dim: int, want: int) -> int | None:
    """The largest of ``want``, 32, 16, 8 that divides ``dim``."""
    for g in (want, 32, 16, 8):
        if g <= want and dim % g == 0:
            return g
    return None


def _rank(fraction: float, width: int) -> int:
    """``fraction`` of ``width`` rounded to a multiple of 8 (at least 8, at most ``width``)."""
    return max(8, min(width, int(round(fraction * width / 8)) * 8))


def default_kv_forms(shape: AttentionShape) -> list[KVDecision]:
    """The default candidates for a site of ``shape``: the 16-bit cache; KIVI caches int8,
    int4 (key blocks of 32 and 128 tokens), 4-bit keys with 2-bit values, int2; Palu low-rank
    caches at 3/4, 1/2 and 3/8 of the cache (keys at half the values' rank: keys compress
    more); low-rank latents quantized per channel (``LATENTS``: at about 1/4, 3/8, 1/8 and
    1/10, the smallest channels of three of them at 2 bits). Every compressed form keeps
    ``SINK`` first tokens 16-bit and no residual window (the steady state prices it)."""
    D, kv = shape.head_dim, shape.kv_dim
    out: list[KVDecision] = [KVDenseConfig()]
    g64, g32 = _group(D, 64), _group(D, 32)
    if g64 is not None and g32 is not None:
        out += [
            KVQuantConfig(8, 8, 32, g64, 0, SINK),
            KVQuantConfig(4, 4, 32, g64, 0, SINK),
            KVQuantConfig(4, 4, 128, g64, 0, SINK),
            KVQuantConfig(4, 2, 32, g32, 0, SINK),
            KVQuantConfig(2, 2, 32, g32, 0, SINK),
        ]
    for k, v in ((0.5, 1.0), (1 / 3, 2 / 3), (0.25, 0.5)):
        out.append(KVLowRankConfig(_rank(k, kv), _rank(v, kv), 1, "whitened", SINK))
    for k, v, bits, group, k_low, v_low in LATENTS:
        kr, vr = _rank(k, kv), _rank(v, kv)
        kl, vl = (min(_rank(f, kv), r) if f else 0 for f, r in ((k_low, kr), (v_low, vr)))
        out.append(
            KVLatentQuantConfig(
                kr, vr, 1, "whitened", bits, group, 0, SINK, "channel", 2 if kl + vl else 0, kl, vl
            )
        )
    return out


#: the default quantized latents: key rank, value rank (fractions of kv_dim), bits, token block,
#: and the key / value channels (fractions of kv_dim) in a 2-bit tail. At about 1/4, 3/8, 1/8
#: and 1/10 of the 16-bit cache on SmolLM2; the mixed widths (the smallest channels at 2
#: bits, a larger rank) beat a uniform 4-bit latent at equal bytes: 1/8 +13% → +5.5%,
#: 1/4 +0.9% → +0.5% (``benchmarks/RESULTS.md``)
LATENTS = (
    (1.0, 1.0, 4, 64, 1 / 3, 1 / 6),
    (0.75, 1.0, 4, 64, 0, 0),
    (2 / 3, 2 / 3, 8, 32, 0, 0),
    (11 / 24, 17 / 24, 4, 64, 1 / 4, 3 / 8),
    (3 / 8, 5 / 8, 4, 64, 1 / 4, 5 / 12),
)


def kv_costs(
    config: KVDecision, shape: AttentionShape, context: int | None, bias_bytes: int = 0
) -> dict[str, int]:
    """The option's integer cost vector (see the module docstring); ``bias_bytes``: the owned
    k/v projections' biases, which a low-rank form keeps."""
    costs = config.costs(shape, context=context)
    out = {
        WEIGHT_BYTES: int(costs[WEIGHT_BYTES]) + (bias_bytes if config.owns else 0),
        KV_BYTES_PER_TOKEN: math.ceil(costs[KV_BYTES_PER_TOKEN] - 1e-9),
    }
    if context is not None:
        out[KV_CACHE_BYTES] = config.cache_bytes(shape, context)
    return out


def site_refusal(
    config: KVDecision, site: AttentionSite, sites: set[str] | None = None
) -> str | None:
    """Why ``site`` cannot take ``config`` (``None``: it can): the form's own shape check, then,
    for a form that rewrites the block (low-rank caches), what the rewritten block would not
    compute as the original does; ``sites``: the problem's linear sites (a rewriting form owns
    the k/v projections, which must be among them)."""
    why = config.check(site.site_shape)
    if why or not config.owns:
        return why
    if site.cache_only:
        return cache_only_reason(site)
    if site.softcap is not None:
        return (
            f"attention logits soft-capped at {site.softcap:g} (Gemma 2): the low-rank "
            "block's attention does not apply the cap"
        )
    if site.qk_norm is not None:
        return (
            f"the block normalizes its queries/keys per head ({site.qk_norm}) after the "
            "projections: normalized keys are not linear in the hidden state, so a low-rank "
            "cache cannot rebuild them"
        )
    missing = [r for r in config.owns if sites is not None and site.projection(r) not in sites]
    if missing:
        return (
            f"{', '.join(f'{r}_proj' for r in missing)} is not a site of this problem "
            "(excluded, or not a plain linear): a low-rank cache owns and replaces it"
        )
    return None


def fit_key(config: KVLowRankConfig) -> KVLowRankConfig:
    """The factorization ``config`` is fitted as: the rounding of ``factor_bits=8`` comes after
    the fit (:func:`.simulate.stored_factors`), so both widths share one."""
    return replace(config, factor_bits=16)


def cache_only_reason(site: AttentionSite) -> str:
    """Why a cache-only site takes no form that rewrites its block (low-rank caches, MLA)."""
    return (
        f"{site.cache_only}: only quantized caches, which keep the block's own computation, "
        "are offered there"
    )


@torch.no_grad()
def _errors(
    model: nn.Module,
    site: AttentionSite,
    inputs: Sequence[Any],
    configs: Sequence[KVDecision],
    factors: dict[KVLowRankConfig, dict[str, Tensor]],
) -> list[float]:
    """Relative squared error of the block output per config, dense outputs computed once: by
    :func:`.simulate.block_forward`, or for a cache-only site by replaying the block
    (:mod:`.replay`; raises ``replay.SiteMismatch`` for a block that does not attend as its
    site says)."""
    from .replay import replay_block, simulating
    from .simulate import block_forward

    attn = dict(model.named_modules())[site.fqn]
    num = [0.0] * len(configs)
    den = 0.0

    def run(x: Any, c: KVDecision, steady: bool) -> Tensor:
        if site.cache_only:
            return replay_block(attn, x, c, site.num_kv_heads, site.head_dim)
        lr = getattr(c, "lowrank", c)
        f = factors.get(fit_key(lr)) if isinstance(lr, KVLowRankConfig) else None
        return block_forward(attn, *x, c, f, steady=steady)

    with simulating(model) if site.cache_only else nullcontext():
        for x in inputs:
            y = run(x, KVDenseConfig(), False).double()
            den += float((y * y).sum())
            for i, c in enumerate(configs):
                if not isinstance(c, KVDenseConfig):
                    num[i] += float(((run(x, c, True).double() - y) ** 2).sum())
    if den == 0:  # a block whose output is 0: every form's error is its absolute one
        return [float(n) for n in num]
    blind = [c.short() for c, n in zip(configs, num) if n == 0 and not isinstance(c, KVDenseConfig)]
    if blind:  # a compressed cache whose stored tokens no query read: its error is unknown
        longest = max((x[0].shape[1] for x in inputs if isinstance(x, tuple)), default="?")
        raise ValueError(
            f"{site.fqn}: calibration windows of {longest} tokens at most are too short to "
            f"measure {', '.join(blind)}: no query reads a token it stores compressed (its "
            "sink tokens and residual window stay exact), so its error would count as 0 — "
            "calibrate on longer windows"
        )
    return [n / den for n in num]


def kv_site_options(
    model: nn.Module,
    site: AttentionSite,
    inputs: Sequence[tuple[Tensor, Tensor, Tensor]],
    gram: Tensor | None,
    *,
    weight: float = 1.0,
    context: int | None = None,
    forms: Sequence[KVDecision] | None = None,
    linear_sites: set[str] | None = None,
    bias_bytes: int = 0,
    int8_factors: bool = False,
) -> tuple[SiteOptions, dict[str, str]]:
    """The site's options (module docstring) and, per refused form (its ``short()``), why.

    ``inputs``: ``(hidden, cos, sin)`` per calibration batch as the block received them;
    ``gram``: ``XᵀX`` of the block's input (k_proj's input Gram) for the low-rank fits;
    ``weight``: the site's loss-sensitivity weight; ``linear_sites``: the problem's linear
    sites (a low-rank form is offered only when k_proj and v_proj are among them);
    ``int8_factors``: offer every low-rank form also with ``factor_bits=8`` (its own weights
    as int8 rows: fewer weight bytes, the rounding in its error) — for a budget that counts
    weight bytes; both share one fit."""
    from .calibrate import fit_site

    shape = site.site_shape
    refused: dict[str, str] = {}
    chosen: list[KVDecision] = []
    for c in default_kv_forms(shape) if forms is None else forms:
        why = site_refusal(c, site, linear_sites)
        if why:
            refused[c.short()] = why
        elif c not in chosen:
            chosen.append(c)
    if not any(isinstance(c, KVDenseConfig) for c in chosen):
        chosen.insert(0, KVDenseConfig())  # the 16-bit cache is always an option
    if int8_factors:  # each form that adds weights also with them as int8 rows
        chosen += [f8 for c in chosen if c.owns
                   and (f8 := replace(c, factor_bits=8)) not in chosen]  # fmt: skip
    factors: dict[KVLowRankConfig, dict[str, Tensor]] = {}
    for c in chosen:
        lr = getattr(c, "lowrank", c)
        if isinstance(lr, KVLowRankConfig) and fit_key(lr) not in factors:
            if gram is None:
                raise ValueError(f"{site.fqn}: {c.short()} needs the input Gram of k_proj")
            factors[fit_key(lr)] = fit_site(model, site, gram, lr)
    errors = _errors(model, site, inputs, chosen, factors)
    covers = tuple(str(site.projection(r)) for r in ("k", "v"))
    options = []
    for c, e in zip(chosen, errors):
        costs = kv_costs(c, shape, context, bias_bytes)
        options.append(
            Option(
                c,
                costs[WEIGHT_BYTES],
                weight * e,
                costs=costs,
                covers=covers if c.owns else (),
            )
        )
    dense = kv_costs(KVDenseConfig(), shape, context)
    return (
        SiteOptions(site.fqn, options, 0, 0.0, weight, "attention", shape, dense_costs=dense),
        refused,
    )
