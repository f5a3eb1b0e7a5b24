"""Convert the attention blocks of a Hugging Face Llama/Qwen2-style causal LM to MLA.

    capture_attention_inputs(model, batches)   the hidden state each attention block reads
    attention_calib(attn, x, ...)              → AttentionCalib (Gram, mean, pair norms)
    convert_model(model, cfg, batches)         fit + swap every block (or the given layers)

Every block is checked before any is changed (``describe_block`` and
``MLAConfig.reason_invalid``): with ``strict=True`` (default) one rejected block raises and
leaves the model untouched; otherwise the rejected blocks stay as they are and the result says
why. With a ``refine`` config the blocks are converted in order and each one's up-projections
are fitted on the inputs the already-converted layers give (sequential, closed form).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.ir.find import attention_variant_reasons, describe_attention
from slimfx.ir.modules import carry_hooks
from slimfx.ir.sites import AttentionSite

from .config import MLAConfig
from .module import MLAAttention, dense_weight
from .numerics import AttentionCalib, entry_scores, fit_mla

__all__ = [
    "MLAConversion",
    "MLA_REFUSES",
    "capture_attention_inputs",
    "attention_calib",
    "convert_model",
    "describe_block",
]

#: attention variants MLA cannot convert: it keeps RoPE on one decoupled key over every head
#: dim, needs keys linear in the hidden state, and its latent cache keeps every token.
MLA_REFUSES = ("no_rope", "partial_rotary", "qk_norm", "sliding_window", "softcap")
#: the block's projections MLA takes as they are, rewritten or not (a weights budget may give
#: them a linear form): it calls them and fits on their dense equivalent (``dense_weight``);
#: ``k_proj`` / ``v_proj`` are the conversion's own and must still be ``nn.Linear``
REWRITTEN_OK = ("q_proj", "o_proj")


def describe_block(
    attn: nn.Module, config: object, layer_idx: int, fqn: str = ""
) -> AttentionSite | str:
    """The attention site of ``attn`` (a Hugging Face Llama / Qwen2-style block of a model with
    ``config``), or why MLA cannot convert it (``slimfx.ir.find.describe_attention`` and the
    variants in ``MLA_REFUSES``)."""
    site = describe_attention(attn, fqn, config, layer_idx, rewritten=REWRITTEN_OK)
    if isinstance(site, str):
        return site
    why = [r for v, r in attention_variant_reasons(site).items() if v in MLA_REFUSES]
    return why[0] if why else site


def _unlike_llama(model: nn.Module, sites: Mapping[int, AttentionSite]) -> dict[int, str]:
    """Layer → why, for each block whose output is not the Llama-style attention MLA is fitted
    to (``forms.kv.calibrate.simulation_mismatch``, on a probe of random token ids: Cohere's
    interleaved RoPE pairs)."""
    from slimfx.forms.kv.calibrate import SIMULATION_TOLERANCE, simulation_mismatch

    if not sites:
        return {}
    diff = simulation_mismatch(model, list(sites.values()))
    by_fqn = {s.fqn: i for i, s in sites.items()}
    return {
        by_fqn[f]: f"unsupported attention variant: the block's output differs from the "
        f"Llama-style attention MLA is fitted to by {d:.1e} (relative, float32; e.g. another "
        "RoPE layout)"
        for f, d in diff.items()
        if not d <= SIMULATION_TOLERANCE
    }


class _Stop(Exception):
    pass


def _layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers (not a Llama-style LM)")
    return layers


def _inv_freq(model: nn.Module) -> Tensor:
    rot = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise ValueError("no rotary embedding (model.model.rotary_emb.inv_freq) found")
    return rot.inv_freq.detach().float().cpu()


@torch.no_grad()
def capture_attention_inputs(
    model: nn.Module, batches: Sequence[Tensor], layers: Sequence[int], stop_after: int | None = None
) -> dict[int, Tensor]:
    """Per layer index, the attention block's input over all ``batches``: (tokens, D), float32
    on CPU. ``stop_after``: stop the forward once that layer's input is seen (saves time)."""
    store: dict[int, list[Tensor]] = {i: [] for i in layers}
    hooks = []
    blocks = _layers(model)

    def make(i: int):
        def hook(_mod, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            store[i].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
            if stop_after is not None and i == stop_after:
                raise _Stop

        return hook

    for i in layers:
        hooks.append(blocks[i].self_attn.register_forward_pre_hook(make(i), with_kwargs=True))
    try:
        for ids in batches:
            try:
                model(ids.to(next(model.parameters()).device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in store.items()}


@torch.no_grad()
def attention_distances(
    attn: nn.Module, x: Tensor, num_heads: int, num_kv_heads: int, seq_len: int,
    inv_freq: Tensor,
) -> Tensor:
    """(E_w cos θ_iΔ, E_w sin θ_iΔ) per query head and pair, shape (H, d/2, 2): ``w`` is the
    head's attention mass at distance Δ in the original block (causal softmax over windows of
    ``seq_len`` rows of ``x``, RoPE at positions 0..L−1), averaged over queries."""
    H, K = num_heads, num_kv_heads
    d = attn.k_proj.out_features // K
    half = d // 2
    L = seq_len
    xw = x.reshape(-1, L, x.shape[-1]).to(attn.k_proj.weight)
    pos = torch.arange(L, dtype=torch.float64)
    ang = pos[:, None] * inv_freq.double()[None, :half]
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()

    def rope(t: Tensor) -> Tensor:
        rot = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * cos + rot * sin

    dist = (pos[:, None] - pos[None, :]).clamp_min(0).long().flatten()
    mass = torch.zeros(H, L, dtype=torch.float64)
    scale = float(getattr(attn, "scaling", d**-0.5))
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for w in xw:
        q = rope(attn.q_proj(w).float().view(L, H, d).transpose(0, 1))
        k = rope(attn.k_proj(w).float().view(L, K, d).transpose(0, 1))
        k = k.repeat_interleave(H // K, dim=0)
        s = (q @ k.transpose(1, 2) * scale).masked_fill(~causal, float("-inf"))
        p = torch.softmax(s, -1).double().reshape(H, -1)
        mass.scatter_add_(1, dist.expand(H, -1), p)
    wdist = mass / mass.sum(1, keepdim=True)
    ang = pos[:, None] * inv_freq.double()[None, :half]  # (L, half) angle at distance Δ
    return torch.stack([wdist @ ang.cos(), wdist @ ang.sin()], -1)


@torch.no_grad()
def attention_calib(
    attn: nn.Module, x: Tensor, num_heads: int, num_kv_heads: int, seq_len: int,
    x_new: Tensor | None = None, inv_freq: Tensor | None = None,
) -> AttentionCalib:
    """Statistics of one block from its inputs ``x`` (tokens, D); ``x_new``: the inputs the
    converted model gives for the same tokens (adds ``gram_new`` and ``cross``); ``inv_freq``:
    also measure the attention distances (``rot_mean``, see :func:`attention_distances`)."""
    x64 = x.to(torch.float64)
    n = x64.shape[0]
    d = attn.k_proj.out_features // num_kv_heads
    half = d // 2
    dev, dt = attn.k_proj.weight.device, attn.k_proj.weight.dtype

    def pair_norm(lin: nn.Linear, heads: int) -> Tensor:
        y = lin(x.to(dev, dt)).float().cpu().reshape(n, heads, d)
        return (y[..., :half].square() + y[..., half:].square()).sqrt().mean(0).double()

    calib = AttentionCalib(
        gram=x64.T @ x64 / n,
        mean=x64.mean(0),
        q_pair_norm=pair_norm(attn.q_proj, num_heads),
        k_pair_norm=pair_norm(attn.k_proj, num_kv_heads),
        tokens=n,
        seq_len=seq_len,
    )
    if inv_freq is not None and seq_len > 1 and n % seq_len == 0:
        calib.rot_mean = attention_distances(attn, x, num_heads, num_kv_heads, seq_len, inv_freq)
    if x_new is not None:
        ones = torch.ones(n, 1, dtype=torch.float64)
        xo = torch.cat([x64, ones], 1)
        xn = torch.cat([x_new.to(torch.float64), ones], 1)
        calib.gram_new = xn.T @ xn / n
        calib.cross = xo.T @ xn / n
    return calib


def _shared_entries(
    blocks: Sequence[nn.Module], layers: Sequence[int], plan: Mapping[int, MLAConfig],
    shapes: Mapping[int, Any], inputs: Mapping[int, Tensor] | None, seq_len: int,
    inv_freq: Tensor,
) -> tuple[int, ...]:
    """The RoPE entries ``rope_share`` keeps in every one of ``layers``: the ``K·rope_pairs``
    best by the layers' scores (``numerics.entry_scores``), each layer's normalized to sum 1
    and then summed. The layers must agree on the shape of the choice."""
    first = plan[layers[0]]
    key = lambda i: (  # noqa: E731
        shapes[i].num_kv_heads, shapes[i].head_dim, plan[i].rope_pairs, plan[i].rope_select,
        plan[i].rope_mix,
    )
    groups: dict[tuple, list[int]] = {}
    for i in layers:
        groups.setdefault(key(i), []).append(i)
    if len(groups) > 1:  # a conversion-wide choice: refused even with strict=False
        raise ValueError(
            "rope_share chooses one set of RoPE entries for every layer converted with it: those "
            "layers differ in (kv heads, head_dim, rope_pairs, rope_select, rope_mix): "
            + "; ".join(f"layers {v}: {k}" for k, v in groups.items())
            + " — convert them separately (model unchanged)"
        )
    f64 = torch.float64
    total = None
    for i in layers:
        c, shape, attn = plan[i], shapes[i], blocks[i].self_attn
        calib = None
        if c.needs_data:
            calib = attention_calib(
                attn, inputs[i], shape.num_heads, shape.num_kv_heads, seq_len, None,  # type: ignore[index]
                inv_freq if c.rope_select == "norm_attn" else None,
            )
        _, score = entry_scores(
            c, dense_weight(attn.q_proj).detach().to(f64), attn.k_proj.weight.detach().to(f64),
            None if calib is None else calib.gram.to(f64), calib, inv_freq,
            shape.num_heads, shape.num_kv_heads,
        )
        score = score.flatten() / score.sum().clamp_min(1e-300)
        total = score if total is None else total + score
    order = torch.argsort(total, descending=True, stable=True)  # type: ignore[arg-type]
    n = shapes[layers[0]].num_kv_heads * first.rope_pairs
    return tuple(sorted(order[:n].tolist()))


@dataclass
class MLAConversion:
    """What ``convert_model`` did: converted layer indices, the configs used, and the reason
    for each rejected layer."""

    converted: list[int] = field(default_factory=list)
    configs: dict[int, MLAConfig] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


def convert_model(
    model: nn.Module,
    cfg: MLAConfig | Mapping[int, MLAConfig],
    batches: Sequence[Tensor] | None = None,
    strict: bool = True,
    absorb: str = "auto",
    inputs: Mapping[int, Tensor] | None = None,
) -> MLAConversion:
    """Replace attention blocks of ``model`` in place by :class:`MLAAttention` — all or none:
    a failure or an interrupt while fitting leaves the model as it was.

    ``cfg``: one config for every layer or a mapping layer index → config (others untouched).
    ``batches``: calibration input ids, each (1, L); needed unless every config is data-free.
    ``inputs``: the blocks' inputs already captured from the original model on ``batches``
    (:func:`capture_attention_inputs`), to share one capture between several conversions.
    """
    blocks = _layers(model)
    hf_cfg = model.config
    plan = {i: cfg for i in range(len(blocks))} if isinstance(cfg, MLAConfig) else dict(cfg)
    result = MLAConversion()
    shapes, sites = {}, {}
    names = {id(m): n for n, m in model.named_modules()}
    for i, c in sorted(plan.items()):
        attn = blocks[i].self_attn
        site = describe_block(attn, hf_cfg, i, names.get(id(attn), ""))
        reason = site if isinstance(site, str) else c.reason_invalid(site.site_shape)
        if reason:
            result.rejected[i] = reason
        else:
            shapes[i], sites[i] = site.site_shape, site  # type: ignore[union-attr]
    result.rejected.update(_unlike_llama(model, sites))
    shapes = {i: sh for i, sh in shapes.items() if i not in result.rejected}
    if result.rejected and strict:
        raise ValueError(
            "MLA conversion rejected (model unchanged): "
            + "; ".join(f"layer {i}: {r}" for i, r in result.rejected.items())
        )
    todo = sorted(shapes)
    if not todo:
        return result
    inv_freq = _inv_freq(model)
    needs_data = any(plan[i].needs_data for i in todo)
    if needs_data and not batches:
        raise ValueError("calibration batches are needed for data-aware MLA configs")
    seq_len = int(batches[0].shape[-1]) if batches else 1
    if needs_data and (inputs is None or any(i not in inputs for i in todo)):
        inputs = capture_attention_inputs(model, batches, todo)
    shared = [i for i in todo if plan[i].rope_share and plan[i].rope_kept is None]
    if shared:
        kept = _shared_entries(blocks, shared, plan, shapes, inputs, seq_len, inv_freq)
        plan.update({i: replace(plan[i], rope_kept=kept) for i in shared})
    originals = {i: blocks[i].self_attn for i in todo}
    try:  # all or nothing: an error or an interrupt mid-way puts the converted blocks back
        for i in todo:
            c, shape, attn = plan[i], shapes[i], blocks[i].self_attn
            calib = None
            if needs_data:
                x_new = None
                if c.refine and result.converted:
                    x_new = capture_attention_inputs(model, batches, [i], stop_after=i)[i]
                calib = attention_calib(
                    attn, inputs[i], shape.num_heads, shape.num_kv_heads, seq_len, x_new,  # type: ignore[index]
                    inv_freq if (c.rope_fold or c.rope_select == "norm_attn") else None,
                )
            w = fit_mla(
                c,
                dense_weight(attn.q_proj), attn.k_proj.weight, attn.v_proj.weight,
                dense_weight(attn.o_proj), attn.k_proj.bias, attn.v_proj.bias,
                shape.num_heads, shape.num_kv_heads, inv_freq, calib,
            )
            blocks[i].self_attn = MLAAttention(
                attn, w, shape.num_heads, shape.num_kv_heads, absorb=absorb,
                latent_bits=c.latent_bits, factor_bits=c.factor_bits, per_head_q_mix=c.rope_fold,
            )
            blocks[i].self_attn.mla_config = c
            blocks[i].self_attn.train(attn.training)  # a new module starts in training mode
            carry_hooks(attn, blocks[i].self_attn)
            result.converted.append(i)
            result.configs[i] = c
    except BaseException:
        for i in result.converted:
            blocks[i].self_attn = originals[i]
        raise
    return result
