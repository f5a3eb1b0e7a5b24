"""MLA in the budget: an attention site's MLA options for the solver, and the module structure a
plan's MLA decisions give a freshly built model (``slimfx.load``).

``mla_options`` turns :func:`~slimfx.forms.mla.candidates.mla_candidates` into solver options
on the scale of the KV-cache forms: error = the block output's relative error times the site's
loss-sensitivity weight; costs = the converted k/v projections' weight bytes (they replace the
owned k_proj and v_proj), the latent cache's bytes per token and, with a context, its bytes at
that context (the latent cache has no 16-bit window: bytes per token × context). The options own
the site's k_proj and v_proj. ``MLA_LADDER`` is what ``kv_forms=[..., "mla"]`` offers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from slimfx.ir.sites import AttentionSite
from slimfx.planning.problem import Option
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN, KV_CACHE_BYTES, WEIGHT_BYTES

from .candidates import MLAContext, mla_candidates
from .config import MLAConfig

__all__ = ["MLA_LADDER", "ladder_context", "mla_options", "empty_mla_like_plan"]

#: the MLA candidates the solver is offered per site: latent ranks (fractions of the full
#: rank) × int8 / 16-bit latents × 16-bit / int8 factors (the int8 ones only where the budget
#: counts weights: ``mla_options(int8_factors=)``), with RoPE kept on 10 of 32 frequency pairs
#: per kv head (the best measured on SmolLM2; ``rope_fraction`` of the pairs at other head dims)
MLA_LADDER = dict(
    rank_fractions=(0.25, 0.5, 0.75), latent_bits=(8, 16), factor_bits=(16, 8),
    rope_fraction=10 / 32,
)


def ladder_context(head_dim: int, int8_factors: bool = True) -> MLAContext:
    """The ladder's MLA variants at a head dim: ``rope_fraction`` of its pairs, both latent widths,
    both factor widths (16-bit only without ``int8_factors``)."""
    pairs = max(1, round(MLA_LADDER["rope_fraction"] * head_dim / 2))  # type: ignore[operator]
    fbits = MLA_LADDER["factor_bits"] if int8_factors else (16,)
    return MLAContext(base=MLAConfig(rope_pairs=pairs), latent_bits=MLA_LADDER["latent_bits"],
                      factor_bits=fbits)  # type: ignore[arg-type]


def mla_options(
    model: nn.Module,
    site: AttentionSite,
    inputs: Sequence[tuple[Tensor, Tensor, Tensor]],
    gram: Tensor | None,
    *,
    weight: float,
    context: int | None,
    linear_sites: set[str] | None = None,
    measure: Callable[[MLAConfig, nn.Module], None] | None = None,
    fit_inputs: Tensor | None = None,
    int8_factors: bool = True,
) -> tuple[list[Option], str | None]:
    """The site's MLA options, or ``([], why)`` when MLA cannot convert it; ``measure`` is
    handed each candidate's converted block; ``fit_inputs``: the block inputs its fit's
    statistics come from (``mla_candidates``); ``int8_factors``: offer the int8-factor
    variants too (worth it only where weight bytes are priced: they add error)."""
    owned = [site.projection(r) for r in ("k", "v")]
    if linear_sites is not None and any(f not in linear_sites for f in owned):
        return [], "k_proj/v_proj are not sites of this problem: MLA owns and replaces them"
    try:
        cands = mla_candidates(
            model, site, inputs, gram, MLA_LADDER["rank_fractions"],
            ladder_context(site.head_dim, int8_factors), measure, fit_inputs,
        )  # type: ignore[arg-type]  # fmt: skip
    except ValueError as e:
        return [], str(e).split(": ", 1)[-1]
    out = []
    for cfg, err, costs in cands:
        c = {
            WEIGHT_BYTES: int(costs[WEIGHT_BYTES]),
            KV_BYTES_PER_TOKEN: math.ceil(costs[KV_BYTES_PER_TOKEN]),
        }
        if context is not None:
            c[KV_CACHE_BYTES] = int(costs[KV_BYTES_PER_TOKEN]) * context
        out.append(Option(cfg, c[WEIGHT_BYTES], weight * err, costs=c, covers=tuple(owned)))
    return out, None


def empty_mla_like_plan(
    model: nn.Module, decisions: Mapping[str, MLAConfig], sites: Sequence[AttentionSite]
) -> nn.Module:
    """Give a freshly built ``model`` an empty :class:`MLAAttention` (zero weights of the
    decided shapes) at every site in ``decisions``, so the saved state dict loads."""
    from .save import mla_shell

    by_fqn = {s.fqn: s for s in sites}
    mods = dict(model.named_modules())
    for fqn, cfg in decisions.items():
        if fqn not in by_fqn:
            raise ValueError(f"MLA decision for {fqn!r}, which is not an attention site")
        sh, orig = by_fqn[fqn].site_shape, mods[fqn]
        new = mla_shell(
            orig, sh.num_heads, sh.num_kv_heads, sh.head_dim, cfg.rank,
            cfg.rope_entries(sh.num_kv_heads, sh.head_dim), rope_bias=orig.k_proj.bias is not None,
            latent_bits=cfg.latent_bits, factor_bits=cfg.factor_bits,
            per_head_q_mix=cfg.rope_fold,
        )  # fmt: skip
        new.mla_config = cfg
        new.train(orig.training)
        parent, _, child = fqn.rpartition(".")
        setattr(mods[parent] if parent else model, child, new)
    return model
