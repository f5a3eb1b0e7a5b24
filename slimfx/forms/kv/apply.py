"""Apply the KV-cache decisions of a plan to a model, so that ``generate()`` uses them unchanged.

The form lives in the model: each attention module with a compressed-cache decision carries it
(attribute ``KV_FORM_ATTR``) and a forward pre-hook (:func:`upgrade_cache_layer`) that, the
first time the module sees a cache, replaces that cache's still-empty 16-bit layer for this
module's ``layer_idx`` by the compressed layer of its form (``cache.layer_for``; the static
quantized layer for a ``StaticLayer``); layer classes it does not know (an exporter's
stand-in, a caller's own) are left as they are. So whatever cache ``generate()`` builds (its default
``DynamicCache``, or ``cache_implementation="static"`` for a quantized cache) ends up holding
the compressed cache; a ``KVCache.for_model(model)`` passed in is used as it is. A layer that
already holds 16-bit tokens is refused (the hook cannot compress the past it did not see).

- ``kv_quant``: no weights change; the module is the model's own attention plus the hook.
- ``kv_lowrank`` / ``kv_latent_quant``: k_proj/v_proj are factorized
  (:func:`~slimfx.forms.kv.lowrank.apply_lowrank_kv`, fitted from the block's input Gram), the
  module becomes ``LowRankKVAttention`` (plus the hook).
- ``kv_dense``: nothing.

``split_plan`` separates a plan's attention decisions from its linear ones (the module swap
applies the latter); ``empty_kv_like_plan`` gives a freshly built model the module structure
so a saved state dict loads (``slimfx.load``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.ir.sites import AttentionSite
from slimfx.planning.plan import Plan

from .cache import KV_FORM_ATTR, LatentLayer, _StoreLayer, call_cache, layer_for
from .config import KVDecision, KVDenseConfig

__all__ = [
    "apply_kv_plan",
    "split_plan",
    "empty_kv_like_plan",
    "upgrade_cache_layer",
    "plain_layer_kind",
]

_HOOK_ATTR = "_slimfx_kv_hook"


def split_plan(plan: Plan) -> tuple[Plan, dict[str, Any]]:
    """``(linear plan, attention decisions)``: the plan without the decisions of attention
    sites (forms with ``site_kind="attention"``: KV caches, MLA) and without the sites they
    own, which the linear pass leaves as they are; and those decisions by attention fqn."""
    from slimfx.forms import form_of

    kv = {k: d for k, d in plan.items() if form_of(d).site_kind == "attention"}
    linear = Plan(
        {k: d for k, d in plan.items() if k not in kv},
        {k: s for k, s in plan.shapes.items() if k not in kv and k not in plan.owned_by},
        dict(plan.meta),
        {k: o for k, o in plan.owned_by.items() if o not in kv},
    )
    return linear, kv


def upgrade_cache_layer(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook (module docstring): give the cache passed as ``past_key_values`` (or
    ``layer_past``) this module's compressed layer, or leave a compressed layer a caller built
    as it is."""
    cache = call_cache(kwargs)
    form = getattr(module, KV_FORM_ATTR, None)
    if cache is None or form is None or isinstance(form, KVDenseConfig):
        return
    layers = getattr(cache, "layers", None)
    idx = module.layer_idx
    if layers is None:
        raise TypeError(
            f"{type(cache).__name__} has no cache layers: a model with a compressed KV cache "
            "needs a transformers Cache (e.g. the default DynamicCache) or slimfx's KVCache"
        )
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while replicate is not None and len(layers) <= idx:
        layers.append(replicate())
    layer = layers[idx]
    from .static_cache import StaticLatentLayer, _StaticStoreLayer, static_layer_for

    if isinstance(layer, (_StoreLayer, LatentLayer, _StaticStoreLayer, StaticLatentLayer)):
        return  # a compressed layer: a KVCache (or this hook) built it
    kind = plain_layer_kind(layer, getattr(module, "config", None))
    if kind is None:
        return  # a layer class of the caller's (an export's stand-in): theirs to hold

    empty = not getattr(layer, "is_initialized", False)
    if kind == "dynamic" and empty:
        layers[idx] = layer_for(form)
        return
    if kind == "static" and empty:
        layers[idx] = static_layer_for(form, layer.max_cache_len)
        return
    raise TypeError(
        f"layer {idx} of the cache is a {type(layer).__name__}"
        f"{'' if empty else ' that already holds 16-bit tokens'}: this model keeps that layer "
        f"as {form.short()} — pass no cache (generate() builds one), an empty DynamicCache, "
        "or slimfx.forms.kv.cache.KVCache.for_model(model)"
    )


def plain_layer_kind(layer: Any, config: Any) -> str | None:
    """``"dynamic"`` / ``"static"`` for transformers' 16-bit cache layers a compressed layer may
    replace: ``DynamicLayer`` / ``StaticLayer``, and their sliding-window classes where the
    model's window never binds (``ir.find.unbound_window``: transformers builds sliding layers
    from the raw config, e.g. Phi-3-128k's window of 262144 over 131072 positions); else
    ``None`` (a layer class of the caller's)."""
    from transformers.cache_utils import (
        DynamicLayer,
        DynamicSlidingWindowLayer,
        StaticLayer,
        StaticSlidingWindowLayer,
    )

    from slimfx.ir.find import unbound_window

    if type(layer) is DynamicLayer:
        return "dynamic"
    if type(layer) is StaticLayer:
        return "static"
    if unbound_window(config) is None:
        return None
    if type(layer) is DynamicSlidingWindowLayer:
        return "dynamic"
    return "static" if type(layer) is StaticSlidingWindowLayer else None


def _mark(module: nn.Module, form: KVDecision) -> None:
    setattr(module, KV_FORM_ATTR, form)
    if getattr(module, _HOOK_ATTR, None) is None:
        handle = module.register_forward_pre_hook(upgrade_cache_layer, with_kwargs=True)
        object.__setattr__(module, _HOOK_ATTR, handle)


def _check(
    decisions: Mapping[str, KVDecision], sites: list[AttentionSite]
) -> dict[str, AttentionSite]:
    by_fqn = {s.fqn: s for s in sites}
    unknown = [k for k in decisions if k not in by_fqn]
    if unknown:
        raise ValueError(f"KV decisions name {unknown} which are not attention sites of the model")
    bad = [
        f"{k}: {why}"
        for k, d in decisions.items()
        if (why := d.check(by_fqn[k].site_shape)) is not None
    ]
    if bad:
        raise ValueError("KV decisions the model cannot take: " + "; ".join(bad))
    return by_fqn


def _install(
    model: nn.Module,
    decisions: Mapping[str, KVDecision],
    sites: list[AttentionSite],
    factors: Mapping[str, dict[str, Tensor]],
    probe: bool = True,
) -> list[str]:
    """Swap the low-rank sites' attention for ``LowRankKVAttention`` with ``factors``, mark
    every compressed site with its form and hook; returns the marked fqns. ``probe``: check
    the blocks on a probe call first (``apply_lowrank_kv``)."""
    from .lowrank import apply_lowrank_kv

    lowrank = {k: d for k, d in decisions.items() if d.owns}
    apply_lowrank_kv(model, sites, lowrank, dict(factors), probe=probe)  # type: ignore[arg-type]
    mods = dict(model.named_modules())
    done = []
    for k, d in decisions.items():
        if not isinstance(d, KVDenseConfig):
            _mark(mods[k], d)
            done.append(k)
    return done


def apply_kv_plan(
    model: nn.Module,
    decisions: Mapping[str, KVDecision],
    sites: list[AttentionSite],
    grams: Mapping[str, Tensor | None] | None = None,
) -> list[str]:
    """Apply ``decisions`` (attention fqn → KV form) to ``model`` in place; ``grams``: per
    attention fqn the Gram of the block's input, for the low-rank forms. Every decision is
    checked (and every low-rank fit made) before the model changes. Returns the fqns given a
    compressed cache."""
    from .calibrate import fit_site

    by_fqn = _check(decisions, sites)
    factors: dict[str, dict[str, Tensor]] = {}
    for k, d in decisions.items():
        if not d.owns:
            continue
        gram = (grams or {}).get(k)
        if gram is None:
            raise ValueError(f"{k}: {d.short()} is fitted from calibration data (no input Gram)")
        factors[k] = fit_site(model, by_fqn[k], gram, getattr(d, "lowrank", d))
    return _install(model, decisions, sites, factors)


def empty_kv_like_plan(
    model: nn.Module, decisions: Mapping[str, KVDecision], sites: list[AttentionSite]
) -> nn.Module:
    """Give a freshly built ``model`` the modules ``apply_kv_plan`` made (low-rank attention
    with zero factors of the decided ranks, hooks), so the saved state dict loads into it; no
    probe call (the weights are not loaded yet: the plan was checked when it was made)."""
    by_fqn = _check(decisions, sites)
    zeros = {k: _zero_factors(model, by_fqn[k], d) for k, d in decisions.items() if d.owns}
    _install(model, decisions, sites, zeros, probe=False)
    return model


def _zero_factors(model: nn.Module, site: AttentionSite, d: Any) -> dict[str, Tensor]:
    lr = getattr(d, "lowrank", d)
    sh = site.site_shape
    gd = sh.kv_dim // lr.groups
    w = dict(model.named_modules())[str(site.projection("k"))].weight
    z = {"dtype": w.dtype, "device": w.device}
    return {
        "k_down": torch.zeros(lr.key_rank, sh.hidden_size, **z),
        "v_down": torch.zeros(lr.value_rank, sh.hidden_size, **z),
        "k_up": torch.zeros(lr.groups, gd, lr.key_rank // lr.groups, **z),
        "v_up": torch.zeros(lr.groups, gd, lr.value_rank // lr.groups, **z),
    }
