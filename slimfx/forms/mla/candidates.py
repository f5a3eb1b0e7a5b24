"""MLA options of one attention site for the budget solver, and applying the chosen ones.

``mla_candidates(model, site, inputs, gram)`` fits, for each latent rank (fractions of the
block's full latent rank) and each kept-RoPE / latent-width variant, the converted block and
returns per candidate ``(config, error, costs)``:

- ``error``: the *unweighted* relative squared error of the attention block's output over the
  calibration ``inputs`` (``(hidden, cos, sin)`` per batch, as
  ``slimfx.forms.kv.calibrate.capture_attention_inputs`` records them),
  ``Σ‖y_c − y‖² / Σ‖y‖²`` — ``y`` the original block (``slimfx.forms.kv.simulate``'s
  ``block_forward`` with the 16-bit cache, causal, unpadded), ``y_c`` the converted
  :class:`~slimfx.forms.mla.module.MLAAttention` on the same inputs: the definition of
  ``slimfx.forms.kv.simulate.attention_error``, so MLA and KV-cache options of a site are
  on one scale;
- ``costs``: ``MLAConfig.costs(site shape)`` — ``weight_bytes`` (the converted k/v
  projections the decision owns) and ``kv_bytes_per_token``.

A site MLA cannot convert raises ``ValueError`` with the reason (no RoPE, partial rotary, q/k
norm, sliding window, not a Llama-style block, a variant invalid at this shape).

``apply_mla(model, sites, decisions, batches)`` checks every decision first and then converts
those sites in place through :func:`~slimfx.forms.mla.convert.convert_model` (one rejected
decision: ``ValueError``, model unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from slimfx.forms.kv.config import KVDenseConfig
from slimfx.forms.kv.simulate import block_forward
from slimfx.ir.sites import AttentionSite
from slimfx.planning.shapes import AttentionShape

from .config import MLAConfig
from .convert import _inv_freq, _layers, attention_calib, convert_model, describe_block
from .module import MLAAttention, dense_weight
from .numerics import MLAWeights, fit_mla

__all__ = ["DEFAULT_RANK_FRACTIONS", "MLAContext", "mla_candidates", "apply_mla", "site_layer"]

#: latent ranks offered, as fractions of the block's full latent rank (``MLAConfig.full_rank``)
DEFAULT_RANK_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


@dataclass(frozen=True)
class MLAContext:
    """Which MLA variants :func:`mla_candidates` offers besides the rank.

    ``base``: the template config (fit method, objective, RoPE selection and mixing, …); its
    ``rank`` is replaced by each candidate's. ``rope_pairs``: kept RoPE pairs per kv head to
    offer (default: ``base.rope_pairs``). ``latent_bits``: latent widths to offer; by default
    both (on SmolLM2 the int8 latent's error is within 1.1% of the 16-bit one at about 0.6× the
    bytes, ``benchmarks/RESULTS.md``, so the 16-bit options are dominated there).
    ``factor_bits``: widths of the converted block's own projections to offer (16; 8: int8
    rows, about half the weight bytes — worth offering when the budget counts weights).
    ``inv_freq``: RoPE inverse frequencies (default: the model's ``rotary_emb.inv_freq``)."""

    base: MLAConfig = MLAConfig()
    rope_pairs: tuple[int, ...] | None = None
    latent_bits: tuple[int, ...] = (16, 8)
    factor_bits: tuple[int, ...] = (16,)
    inv_freq: Tensor | None = None


def site_layer(model: nn.Module, site: AttentionSite) -> int:
    """The decoder layer index whose ``self_attn`` is the module at ``site.fqn``."""
    mod = dict(model.named_modules()).get(site.fqn)
    if mod is None:
        raise ValueError(f"{site.fqn}: no such module in the model")
    for i, blk in enumerate(_layers(model)):
        if getattr(blk, "self_attn", None) is mod:
            return i
    raise ValueError(f"{site.fqn}: not the self_attn of a decoder layer (model.model.layers)")


def _refusal(model: nn.Module, site: AttentionSite) -> tuple[nn.Module, AttentionShape]:
    """The block and its shape, or ``ValueError`` with why MLA cannot convert it."""
    i = site_layer(model, site)
    attn = _layers(model)[i].self_attn
    if isinstance(attn, MLAAttention):
        raise ValueError(f"{site.fqn}: already converted to MLA")
    got = describe_block(attn, model.config, i, site.fqn)
    if isinstance(got, str):
        raise ValueError(f"{site.fqn}: MLA refuses this site: {got}")
    return attn, got.site_shape


def _configs(
    shape: AttentionShape, rank_fractions: Sequence[float], ctx: MLAContext, fqn: str
) -> list[MLAConfig]:
    out: list[MLAConfig] = []
    for p in ctx.rope_pairs if ctx.rope_pairs is not None else (ctx.base.rope_pairs,):
        probe = replace(ctx.base, rope_pairs=p, rank=1)
        why = probe.reason_invalid(shape)
        if why:
            raise ValueError(f"{fqn}: MLA variant rope_pairs={p} refused: {why}")
        full = probe.full_rank(shape)
        ranks = sorted({min(full, max(1, round(f * full))) for f in rank_fractions})
        for fbits in ctx.factor_bits:
            for bits in ctx.latent_bits:
                out += [replace(probe, rank=r, latent_bits=bits, factor_bits=fbits)
                        for r in ranks]
    return out


@torch.no_grad()
def mla_candidates(
    model: nn.Module,
    site: AttentionSite,
    inputs: Sequence[tuple[Tensor, Tensor, Tensor]],
    gram: Tensor | None = None,
    rank_fractions: Sequence[float] = DEFAULT_RANK_FRACTIONS,
    context: MLAContext | None = None,
    measure: Callable[[MLAConfig, nn.Module], None] | None = None,
    fit_inputs: Tensor | None = None,
) -> list[tuple[MLAConfig, float, dict[str, float]]]:
    """``(config, error, costs)`` per MLA candidate of ``site`` (module docstring).

    ``inputs``: the block's calibration inputs ``(hidden (B, T, D), cos, sin)`` per batch,
    every batch of the same length ``T`` (the calibration sequence length). ``gram``: ``XᵀX``
    of those hidden states summed over all tokens (``slimfx.forms.kv.calibrate
    .attention_grams``), reused as the fit's second moment; computed from ``inputs`` when
    ``None``. ``fit_inputs``: the block's inputs ``(tokens, D)`` the fit's statistics come from
    instead (``gram`` then unused) — the whole calibration set, as ``convert_model`` (what
    ``apply_mla`` runs) fits, so that the priced block is the applied one; the errors are still
    measured on ``inputs``. ``rank_fractions``: latent ranks as fractions of the full rank (rounded,
    deduplicated, at least 1). ``context``: the other variants offered (:class:`MLAContext`).
    ``measure``: called with each candidate's config and converted block (e.g. to measure its
    loss, :class:`~slimfx.forms.mla.measured.LayerReplay`). Candidates are ordered by RoPE
    pairs, factor bits, latent bits, then rank."""
    ctx = context or MLAContext()
    if not inputs:
        raise ValueError(f"{site.fqn}: no calibration inputs for the MLA candidates")
    attn, shape = _refusal(model, site)
    configs = _configs(shape, rank_fractions, ctx, site.fqn)
    seq_len = int(inputs[0][0].shape[1])
    if any(h.shape[1] != seq_len for h, _, _ in inputs):
        raise ValueError(f"{site.fqn}: calibration inputs of different lengths")
    x = torch.cat([h.reshape(-1, h.shape[-1]).float().cpu() for h, _, _ in inputs])
    if fit_inputs is not None:
        if fit_inputs.dim() != 2 or fit_inputs.shape[1] != x.shape[1]:
            raise ValueError(f"{site.fqn}: fit_inputs is {tuple(fit_inputs.shape)}, the inputs "
                             f"are {x.shape[1]} wide")
        x, gram = fit_inputs.float().cpu(), None
    inv_freq = _inv_freq(model) if ctx.inv_freq is None else ctx.inv_freq.detach().float().cpu()
    needs_rot = ctx.base.rope_fold or ctx.base.rope_select == "norm_attn"
    calib = attention_calib(
        attn, x, shape.num_heads, shape.num_kv_heads, seq_len,
        inv_freq=inv_freq if needs_rot else None,
    )
    if gram is not None:
        if tuple(gram.shape) != (x.shape[1], x.shape[1]):
            raise ValueError(f"{site.fqn}: gram is {tuple(gram.shape)}, the inputs are "
                             f"{x.shape[1]} wide")
        calib.gram = gram.detach().to(torch.float64).cpu() / x.shape[0]
    refs = [block_forward(attn, h, c, s, KVDenseConfig()).float() for h, c, s in inputs]
    den = sum(float(y.square().sum()) for y in refs)
    out = []
    fits: dict[MLAConfig, MLAWeights] = {}  # nor on the latent's or the factors' bits
    w_q, w_o = dense_weight(attn.q_proj), dense_weight(attn.o_proj)  # once, not per config
    for cfg in configs:
        key = replace(cfg, latent_bits=16, factor_bits=16)
        if key not in fits:
            fits[key] = fit_mla(
                cfg, w_q, attn.k_proj.weight, attn.v_proj.weight, w_o, attn.k_proj.bias,
                attn.v_proj.bias, shape.num_heads, shape.num_kv_heads, inv_freq,
                calib if cfg.needs_data else None,
            )
        w = fits[key]
        conv = MLAAttention(attn, w, shape.num_heads, shape.num_kv_heads, absorb="never",
                            latent_bits=cfg.latent_bits, factor_bits=cfg.factor_bits,
                            per_head_q_mix=cfg.rope_fold)
        num = 0.0
        for (h, c, s), y in zip(inputs, refs):
            yc = conv(h, position_embeddings=(c, s), attention_mask=None)[0].float()
            num += float((yc - y).square().sum())
        if measure is not None:
            measure(cfg, conv)
        costs = {k: float(v) for k, v in cfg.costs(shape).items()}
        out.append((cfg, num / den if den > 0 else 0.0, costs))
    return out


def apply_mla(
    model: nn.Module,
    sites: Sequence[AttentionSite],
    decisions: Mapping[str, MLAConfig],
    batches: Sequence[Tensor] | None,
) -> list[str]:
    """Convert the sites named in ``decisions`` (fqn → :class:`MLAConfig`) to MLA, in place,
    fitted on the calibration ``batches`` (input ids, each (1, L)); returns the converted fqns
    in layer order. Every decision is checked first (a known site, an ``MLAConfig``, a site MLA
    can convert, a config valid at its shape): one failure raises ``ValueError`` listing them
    all and leaves the model unchanged."""
    by_fqn = {s.fqn: s for s in sites}
    plan: dict[int, MLAConfig] = {}
    fqn_of: dict[int, str] = {}
    problems = []
    for fqn, cfg in decisions.items():
        try:
            if fqn not in by_fqn:
                raise ValueError(f"{fqn}: not one of the given attention sites")
            if not isinstance(cfg, MLAConfig):
                raise ValueError(f"{fqn}: decision {type(cfg).__name__} is not an MLAConfig")
            _, shape = _refusal(model, by_fqn[fqn])
            why = cfg.reason_invalid(shape)
            if why:
                raise ValueError(f"{fqn}: {cfg.short()} refused: {why}")
            i = site_layer(model, by_fqn[fqn])
            plan[i], fqn_of[i] = cfg, fqn
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("MLA decisions rejected (model unchanged): " + "; ".join(problems))
    if not plan:
        return []
    res = convert_model(model, plan, batches, strict=True)
    return [fqn_of[i] for i in res.converted]
