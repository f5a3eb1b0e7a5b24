"""Tests of slimfx.cost, plus the small helpers they share."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimfx.ir.sites import LinearSite


def llama_sites(model: nn.Module, ids: torch.Tensor) -> list[LinearSite]:
    """The linear sites of a Hugging Face model, grouped by shared input (q/k/v, gate/up)."""
    from slimfx.ir.find import discover_linear_sites

    return discover_linear_sites(model, (), {"input_ids": ids, "use_cache": False})


def plain_sites(model: nn.Module) -> list[LinearSite]:
    """Every nn.Linear as its own group, built by hand (no grouping)."""
    return [
        LinearSite(
            fqn=fqn,
            in_features=m.in_features,
            out_features=m.out_features,
            dtype=str(m.weight.dtype),
            has_bias=m.bias is not None,
            weight=f"{fqn}.weight",
            group=fqn,
        )
        for fqn, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]


def direct_grams(model: nn.Module, fqns: list[str], batches: list[Any], call: Any) -> dict:
    """Reference XᵀX per module, from inputs stored by a plain forward-pre-hook on each
    module (every member hooked separately), computed in one float64 matmul."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {f: [] for f in fqns}
    handles = [
        modules[f].register_forward_pre_hook(
            lambda _m, args, f=f: seen[f].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for f in fqns
    ]
    try:
        with torch.no_grad():
            for b in batches:
                call(b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for f, xs in seen.items():
        X = torch.cat(xs).to(torch.float64)
        out[f] = (X.T @ X, X.shape[0])
    return out


def hooks_left(model: nn.Module) -> int:
    """Number of forward / backward hooks still registered on any submodule."""
    return sum(
        len(m._forward_pre_hooks)
        + len(m._forward_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )
