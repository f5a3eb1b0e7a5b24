"""A converted model as a DeepSeek-V3 checkpoint that transformers' ``DeepseekV3ForCausalLM``
loads with the same logits (``export_deepseek_v3``).

Every block of the model must be an :class:`~slimfx.forms.mla.module.MLAAttention`; DeepSeek-V3
has one attention shape for all layers, so the latent rank (``kv_lora_rank``), the RoPE key
(``qk_rope_head_dim``) and the position-free key (``qk_nope_head_dim``) are the largest over the
layers, the smaller ones padded with zero rows (the same function; the padded cache is reported).
How each piece maps (``docs/MLA.md``):

- **latent norm**: DeepSeek normalizes the latent (``kv_a_layernorm``, an RMSNorm with eps
  ``1e-6``) before its up-projection, which the converted block does not do. The latent rows of
  ``kv_a_proj_with_mqa`` are scaled by a small ``α`` chosen from a bound on the latent's size
  (``σ_max(W_dkv) · max|γ_in| · √hidden``) so that ``mean(c²) α² ≤ 1e-9 · eps`` for every possible
  input: the norm's divisor is then ``√eps`` to within 5e-10 and the norm's weight ``√eps / α``
  gives back ``c``. The scaled latent is ~1e-10 of the original: exact in float32 and bfloat16
  (whose exponent range is float32's), not representable in float16 (refused).
- **RoPE**: the converted block keeps RoPE on chosen entries of a shared key space, each at one
  of the original frequencies, possibly several entries per frequency. The exported RoPE key
  holds, per frequency, as many pairs as the layer keeping the most; the frequencies are given
  per dimension by ``longrope`` factors (equal short and long factors, attention factor = the
  source's RoPE scaling), chosen so that transformers computes the source's inverse frequencies
  to within two float32 ulps (mostly exactly). Where the kept frequencies are a geometric prefix of the schedule
  (``rope_select="per_frequency"``) the config is plain RoPE with the base that gives them.
  Pairs are stored interleaved (``rope_interleave=True``).
- **keys and values per head**: DeepSeek's ``kv_b_proj`` rebuilds keys and values for every
  query head; a GQA conversion repeats its kv head's rows (weights grow, the cache does not).
- **scaling**: DeepSeek scales scores by ``(qk_nope + qk_rope)^-0.5``; the query rows carry the
  ratio to the block's own scaling.
- **biases**: the fit's value bias (the centred latent's mean, folded into ``o_proj``'s bias), a
  RoPE key bias or an ``o_proj`` bias need ``attention_bias=True``; a query bias (Qwen2) needs the
  query through ``q_a_proj`` (which has a bias) and ``q_a_layernorm`` (the same small-scale
  trick), ``q_lora_rank`` = the query width.
- an int8 latent is held at 16 bits by DeepSeek's cache: refused unless
  ``drop_latent_rounding=True`` (the logits then match the block without the rounding).

``DeepSeekExport.engine_notes`` lists what serving engines' DeepSeek implementations read
differently from transformers (biases they do not load, per-dimension RoPE frequencies they
replace by DeepSeek-YaRN, the latent norm's eps taken from ``rms_norm_eps``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimfx import files
from slimfx.ir.cpu_runtime import reference_ops

from .module import MLAAttention, dense_weight
from .save import converted_layers

__all__ = ["DeepSeekExport", "DeepSeekMismatch", "deepseek_v3_model", "export_deepseek_v3"]

#: the eps transformers' DeepseekV3Attention gives its latent (and query) norm
LATENT_NORM_EPS = 1e-6
#: α² · (largest possible mean square of the latent) ≤ this × eps
_NORM_SLACK = 1e-9
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_MANIFEST = "slimfx_export.json"


class DeepSeekMismatch(RuntimeError):
    """The DeepSeek-V3 model's logits are not the converted model's (nothing was written)."""


@dataclass
class DeepSeekExport:
    """What ``export_deepseek_v3`` wrote and measured."""

    path: str | None
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None
    attention_bias: bool
    rope_type: str
    #: cache values per token and layer: DeepSeek's (padded) vs the converted block's own
    cache_values: int
    converted_cache_values: list[int] = field(default_factory=list)
    max_abs_logit_diff: float = float("nan")
    logit_scale: float = float("nan")
    engine_notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bias(mod: nn.Module, n: int, like: Tensor) -> Tensor:
    b = getattr(mod, "bias", None)
    return torch.zeros(n, dtype=like.dtype) if b is None else b.detach().float().cpu()


def _small_scale(w: Tensor, b: Tensor | None, gamma_max: float, hidden: int, width: int) -> float:
    """``α`` with ``α² · max mean((W x + b)²) ≤ slack · eps`` over every input ``x`` the
    decoder's RMSNorm can give (``‖x‖ ≤ max|γ| · √hidden``)."""
    bound = torch.linalg.matrix_norm(w.double(), ord=2).item() * gamma_max * math.sqrt(hidden)
    if b is not None:
        bound += b.double().norm().item()
    mean_sq = max(bound * bound / width, 1e-30)
    return math.sqrt(_NORM_SLACK * LATENT_NORM_EPS / mean_sq)


def _frequencies(
    layers: dict[int, MLAAttention],
) -> tuple[list[int], dict[int, list[int]]]:
    """The RoPE key's frequency per pair (indices into the source's inverse frequencies, as
    many pairs per frequency as the layer with the most) and each layer's slot per entry."""
    need: dict[int, int] = {}
    for attn in layers.values():
        f, c = torch.unique(attn.rope_freq.cpu(), return_counts=True)
        for fi, ci in zip(f.tolist(), c.tolist(), strict=True):
            need[fi] = max(need.get(fi, 0), ci)
    order = [f for f in sorted(need) for _ in range(need[f])]
    first = {f: order.index(f) for f in need}
    slots = {}
    for i, attn in layers.items():
        used: dict[int, int] = {}
        s = []
        for f in attn.rope_freq.tolist():
            s.append(first[f] + used.get(f, 0))
            used[f] = used.get(f, 0) + 1
        slots[i] = s
    return order, slots


def _longrope_factors(target: Tensor, base: float, dim: int) -> list[float]:
    """Per-pair factors for which transformers' longrope (``1 / (f · base ** (2i / dim))`` in
    float32) gives ``target`` (float32): among the float32 values within 64 ulps of the real
    solution, the one whose result is nearest (exact where one rounds to it; a product of two
    float32 values cannot reach every float32, so some frequencies come out an ulp or two off)."""
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    powers = base**shape
    f0 = (1.0 / (target.double() * powers.double())).float()
    cand = [f0]
    up, down = f0, f0
    for _ in range(64):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.zeros_like(down))
        cand += [up, down]
    cands = torch.stack(cand, dim=1)  # (n, 129), nearest first
    miss = ((1.0 / (cands * powers[:, None])).double() - target[:, None].double()).abs()
    pick = miss.argmin(dim=1)  # the first of equals: the nearest factor
    return [float(f) for f in cands.gather(1, pick[:, None])[:, 0].tolist()]


def _check(model: nn.Module, drop_latent_rounding: bool) -> dict[int, MLAAttention]:
    layers = converted_layers(model)
    blocks = model.model.layers
    missing = [i for i in range(len(blocks)) if i not in layers]
    if not layers or missing:
        raise ValueError(
            "export_deepseek_v3: every layer must be converted to MLA (DeepSeek-V3 has one "
            f"attention shape for all layers); not converted: layers {missing} (a budget may keep "
            "a layer's 16-bit cache, even with only MLA offered: convert every layer with "
            "slimfx.forms.mla.convert_model, one config for all — the checkpoint pads each layer "
            "to the largest rank)")
    rounded = [i for i, a in layers.items() if a.latent_bits != 16]
    if rounded and not drop_latent_rounding:
        raise ValueError(
            f"export_deepseek_v3: layers {rounded} round their latent to int8, which a "
            "DeepSeek-V3 checkpoint cannot express (its cache holds the latent at 16 bits); "
            "pass drop_latent_rounding=True (slimfx export --drop-latent-rounding) to export the "
            "block without the rounding")
    if next(model.parameters()).dtype == torch.float16:
        raise ValueError("export_deepseek_v3: float16 cannot hold the latent norm's small scale "
                         "(~1e-10); convert the model to bfloat16 or float32 first")
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _STATIC_ROPE:
        raise ValueError(f"export_deepseek_v3: the source's RoPE type {rope!r} changes its "
                         "frequencies with the sequence length; supported: " + str(_STATIC_ROPE))
    for i, blk in enumerate(blocks):
        mlp = blk.mlp
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"export_deepseek_v3: layer {i}'s MLP is not gate/up/down")
        if any(getattr(getattr(mlp, n), "bias", None) is not None
               for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"export_deepseek_v3: layer {i}'s MLP has biases (DeepSeek's has none)")
        if getattr(blk, "input_layernorm", None) is None:
            raise ValueError(f"export_deepseek_v3: layer {i} has no input_layernorm")
    return layers


def _place(rows: Tensor, n: int, slots: list[int], width: int) -> Tensor:
    """``rows`` (…, 2n, x) ordered ``[firsts; seconds]`` → (…, 2·width, x) interleaved, entry e
    at pair ``slots[e]``, zero rows elsewhere."""
    out = rows.new_zeros(*rows.shape[:-2], 2 * width, rows.shape[-1])
    idx = torch.tensor(slots, dtype=torch.long)
    out[..., 2 * idx, :] = rows[..., :n, :]
    out[..., 2 * idx + 1, :] = rows[..., n:2 * n, :]
    return out


def _pad(t: Tensor, rows: int, cols: int | None = None) -> Tensor:
    cols = t.shape[-1] if cols is None else cols
    out = t.new_zeros(*t.shape[:-2], rows, cols)
    out[..., : t.shape[-2], : t.shape[-1]] = t
    return out


def _attention_state(
    attn: MLAAttention, slots: list[int], dims: dict[str, int], gamma_max: float, hidden: int,
    q_lora: bool,
) -> dict[str, Tensor]:
    """The DeepSeek-V3 attention tensors (float32) of one converted block."""
    H, K, d, N, r = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.rope_entries, attn.rank
    M, R, n_nope = dims["pairs"], dims["rank"], dims["nope"]
    G = H // K
    f32 = {"dtype": torch.float32, "device": "cpu"}
    wq = dense_weight(attn.q_proj).detach().to(**f32).reshape(H, d, -1)
    bq = getattr(attn.q_proj, "bias", None)
    mix = attn.query_mix().detach().to(**f32)  # (H, K·d, d)
    scale = attn.scaling * math.sqrt(n_nope + 2 * M)  # the block's scaling / DeepSeek's

    def head_rows(m: Tensor) -> Tensor:  # (H, K·d, x) on the shared key space → DeepSeek rows
        nope = _pad(m[:, 2 * N:], n_nope)
        rope = _place(m[:, : 2 * N], N, slots, M)
        return (torch.cat([nope, rope], dim=1) * scale).reshape(H * (n_nope + 2 * M), -1)

    out: dict[str, Tensor] = {}
    if q_lora:  # q_a = α (W_q x + b_q), normalized back, then each head's map into the key space
        b = bq.detach().to(**f32) if bq is not None else torch.zeros(H * d)
        a = _small_scale(wq.reshape(H * d, -1), b, gamma_max, hidden, H * d)
        out["q_a_proj.weight"] = wq.reshape(H * d, -1) * a
        out["q_a_proj.bias"] = b * a
        out["q_a_layernorm.weight"] = torch.full((H * d,), math.sqrt(LATENT_NORM_EPS) / a)
        block = torch.zeros(H, K * d, H * d)
        for h in range(H):
            block[h, :, h * d:(h + 1) * d] = mix[h]
        out["q_b_proj.weight"] = head_rows(block)
    else:
        out["q_proj.weight"] = head_rows(torch.einsum("hed,hdi->hei", mix, wq))
    w_dkv = attn.kv_down.weight.detach().to(**f32)
    a = _small_scale(w_dkv, None, gamma_max, hidden, R)
    k_rope = attn.k_rope_proj.weight.detach().to(**f32)
    out["kv_a_proj_with_mqa.weight"] = torch.cat([_pad(w_dkv * a, R), _place(k_rope, N, slots, M)])
    kr_bias = _bias(attn.k_rope_proj, 2 * N, k_rope)[:, None]
    out["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(R), _place(kr_bias, N, slots, M)[:, 0]])
    out["kv_a_layernorm.weight"] = torch.full((R,), math.sqrt(LATENT_NORM_EPS) / a)
    k_up = _pad(attn.k_up.weight.detach().to(**f32), n_nope, R)  # (n_nope, R), every head
    v_up = _pad(attn.v_up.weight.detach().to(**f32).reshape(K, d, r), d, R)  # (K, d, R)
    per_head = [torch.cat([k_up, v_up[h // G]]) for h in range(H)]
    out["kv_b_proj.weight"] = torch.cat(per_head)
    w_o = dense_weight(attn.o_proj).detach().to(**f32)
    b_heads = _bias(attn.v_up, K * d, w_o).reshape(K, d).repeat_interleave(G, 0).reshape(-1)
    out["o_proj.weight"] = w_o
    out["o_proj.bias"] = w_o @ b_heads + _bias(attn.o_proj, w_o.shape[0], w_o)
    return out


def _needs_bias(attn: MLAAttention) -> bool:
    nonzero = [getattr(m, "bias", None) for m in (attn.k_rope_proj, attn.v_up, attn.o_proj)]
    return any(b is not None and bool(b.detach().ne(0).any()) for b in nonzero)


def _rope_config(src: nn.Module, order: list[int], M: int) -> tuple[dict[str, Any], str | None]:
    """DeepSeek's ``rope_parameters`` computing the source's frequencies ``order`` (to within
    two float32 ulps), and a note when they are not plain RoPE."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rot = src.model.rotary_emb
    target = rot.inv_freq.detach().float().cpu()[torch.tensor(order, dtype=torch.long)]
    theta = float(src.config.rope_parameters.get("rope_theta", 10000.0))
    att = float(getattr(rot, "attention_scaling", 1.0))
    dim = 2 * M
    # plain RoPE of the key's width when the frequencies are a geometric prefix 1, q, q², …
    # (q = base^(-1/M)): within two float32 ulps of what transformers computes for that base
    half = rot.inv_freq.numel()  # the source's pairs: its base scaled to the key's width first
    bases = [theta ** (M / half)] + ([float(target[1].double() ** -M)] if M > 1 else [])
    for base in bases:
        default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if att == 1.0 and bool(((default.double() / target.double()) - 1).abs().max() <= 2.5e-7):
            return {"rope_type": "default", "rope_theta": base}, None
    maxpos = int(src.config.max_position_embeddings)
    factors = _longrope_factors(target, theta, dim)
    params = {"rope_type": "longrope", "rope_theta": theta, "short_factor": factors,
              "long_factor": factors, "factor": 1.0, "attention_factor": att,
              "original_max_position_embeddings": maxpos}

    class _Probe:  # what the longrope init function reads
        hidden_size, num_attention_heads, head_dim = dim, 1, dim
        max_position_embeddings = maxpos
        rope_parameters = params

        def standardize_rope_params(self) -> None:
            pass

    got, _ = ROPE_INIT_FUNCTIONS["longrope"](_Probe())
    off = float(((got.double() - target.double()) / target.double()).abs().max())
    if off > 2.5e-7:  # two float32 ulps
        raise RuntimeError("export_deepseek_v3: longrope factors do not reproduce the source's "
                           f"frequencies (relative error {off:.2e})")
    return params, ("RoPE frequencies are given per dimension (rope_type 'longrope': the kept "
                    "frequencies are not the default schedule of the RoPE key); engines whose "
                    "DeepSeek path accepts only default or DeepSeek-YaRN RoPE (vLLM, SGLang) "
                    "would rotate at other frequencies")


def _dense(mod: nn.Module) -> Tensor:
    return dense_weight(mod).detach().float().cpu()


def deepseek_v3_model(
    model: nn.Module, *, drop_latent_rounding: bool = False, rms_norm_eps: float | None = None,
    check_ids: Tensor | None = None, rtol: float | None = None, untie_head: bool = False,
) -> tuple[nn.Module, DeepSeekExport]:
    """The DeepSeek-V3 model (transformers' ``DeepseekV3ForCausalLM``, in ``model``'s dtype, on
    the CPU) computing what ``model`` — a causal LM whose every block is ``MLAAttention`` —
    computes, and its description. Raises ``ValueError`` naming what does not map, and
    :class:`DeepSeekMismatch` when the two models' logits on ``check_ids`` (default: 2 × 24
    token ids drawn from the vocabulary with a fixed seed) differ by more than ``rtol`` × their
    largest magnitude (default 1e-4 in float32, 5e-2 in bfloat16): e.g. a decoder that is not
    Llama-style (a scaled embedding, ``1 + w`` norms, residual multipliers).
    ``rms_norm_eps``: the config's (default: the source's); ``1e-6`` makes engines that read it
    for the latent norm agree with transformers, at the price of the decoder norms' eps
    changing (the logit check measures what that costs: pass ``rtol`` to accept it).
    ``untie_head``: a head tied to the embedding gets its own ``lm_head.weight`` (engines whose
    DeepSeek model has no tied head need it; ``vocab × hidden`` more bytes)."""
    for name, v in (("rms_norm_eps", rms_norm_eps), ("rtol", rtol)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"export_deepseek_v3: {name} must be a finite number > 0, got {v!r}")
    model = getattr(model, "_orig_mod", model)
    ds, info = _build(model, drop_latent_rounding, rms_norm_eps, untie_head)
    src_eps = getattr(model.config, "rms_norm_eps", None)
    hint = (f"rms_norm_eps={rms_norm_eps:g} replaces the source's {src_eps:g} in every decoder "
            f"norm: {'a larger' if rtol is not None else 'pass'} rtol= (CLI --rtol) accepts "
            "what that changes"
            if rms_norm_eps is not None and src_eps is not None and rms_norm_eps != src_eps
            else "a decoder that is not Llama-style — a scaled embedding, 1 + w norms, residual "
            "multipliers — has no DeepSeek-V3 equivalent")
    _verify(model, ds, info, check_ids, rtol, hint)
    return ds, info


@torch.no_grad()
def _build(
    model: nn.Module, drop_latent_rounding: bool, rms_norm_eps: float | None, untie_head: bool
) -> tuple[nn.Module, DeepSeekExport]:
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    layers = _check(model, drop_latent_rounding)
    src = model.config
    blocks = model.model.layers
    L, hidden = len(blocks), int(src.hidden_size)
    first = layers[0]
    H, d = first.num_heads, first.head_dim
    if any((a.num_heads, a.head_dim) != (H, d) for a in layers.values()):
        raise ValueError("export_deepseek_v3: the layers differ in heads or head width")
    order, slots = _frequencies(layers)
    M = len(order)
    if M == 0:
        raise ValueError("export_deepseek_v3: no layer keeps a RoPE pair (DeepSeek's RoPE key "
                         "would be empty)")
    dims = {"pairs": M, "rank": max(a.rank for a in layers.values()),
            "nope": max(a.key_dim - 2 * a.rope_entries for a in layers.values())}
    q_lora = any(getattr(a.q_proj, "bias", None) is not None for a in layers.values())
    attention_bias = q_lora or any(_needs_bias(a) for a in layers.values())
    rope, rope_note = _rope_config(model, order, M)
    dtype = next(model.parameters()).dtype
    head = _dense(model.lm_head)
    # a tied head a weights budget rewrote is no longer the embedding: DeepSeek gets its own
    tied = not untie_head and bool(getattr(src, "tie_word_embeddings", False)) and torch.equal(
        head.to(dtype), model.model.embed_tokens.weight.detach().cpu())
    eps = float(getattr(src, "rms_norm_eps", 1e-6) if rms_norm_eps is None else rms_norm_eps)
    config = DeepseekV3Config(
        vocab_size=src.vocab_size, hidden_size=hidden, intermediate_size=src.intermediate_size,
        num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H,
        first_k_dense_replace=L, kv_lora_rank=dims["rank"], q_lora_rank=H * d if q_lora else None,
        qk_rope_head_dim=2 * M, qk_nope_head_dim=dims["nope"], v_head_dim=d,
        hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=eps, tie_word_embeddings=tied,
        rope_parameters=rope, rope_interleave=True, attention_bias=attention_bias,
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
        pad_token_id=getattr(src, "pad_token_id", None), dtype=dtype,
        num_nextn_predict_layers=0,  # no multi-token-prediction layer is written
    )
    state: dict[str, Tensor] = {"model.embed_tokens.weight": model.model.embed_tokens.weight,
                                "model.norm.weight": model.model.norm.weight,
                                "lm_head.weight": head}
    for i, blk in enumerate(blocks):
        p = f"model.layers.{i}."
        gamma = float(blk.input_layernorm.weight.detach().abs().max())
        for k, v in _attention_state(layers[i], slots[i], dims, gamma, hidden, q_lora).items():
            if k.endswith(".bias") and not attention_bias:
                if v.ne(0).any():  # _needs_bias said none: a nonzero bias here is a bug
                    raise RuntimeError(f"export_deepseek_v3: {p}self_attn.{k} is not zero")
                continue
            state[p + "self_attn." + k] = v
        for n in ("gate_proj", "up_proj", "down_proj"):
            state[f"{p}mlp.{n}.weight"] = _dense(getattr(blk.mlp, n))
        state[p + "input_layernorm.weight"] = blk.input_layernorm.weight
        state[p + "post_attention_layernorm.weight"] = blk.post_attention_layernorm.weight
    ds = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()  # built in the dtype
    ds.load_state_dict({k: v.detach().to("cpu", dtype) for k, v in state.items()}, strict=True)
    if getattr(model, "generation_config", None) is not None:
        ds.generation_config = copy.deepcopy(model.generation_config)
    notes = [rope_note] if rope_note else []
    if attention_bias:
        notes.append("attention_bias=True (the latent fit's value bias folded into o_proj"
                     + (", the query bias in q_a_proj" if q_lora else "") + "): vLLM's and "
                     "SGLang's DeepSeek attention load no projection biases")
    if eps != LATENT_NORM_EPS:
        notes.append(f"rms_norm_eps is {eps:g}: transformers normalizes the latent with eps "
                     f"{LATENT_NORM_EPS:g}, engines that take rms_norm_eps for it (vLLM, "
                     f"SGLang) would scale the latent by {math.sqrt(LATENT_NORM_EPS / eps):.3g}")
    if tied:
        notes.append("tie_word_embeddings=True (no lm_head.weight in the checkpoint): vLLM's "
                     "DeepSeek model (its code read) builds a head of its own and ties none; "
                     "untie_head=True (CLI --untie-head) writes it")
    if src.hidden_act != "silu":
        notes.append(f"hidden_act {src.hidden_act!r}: vLLM's DeepSeek MLP supports only silu")
    info = DeepSeekExport(
        path=None, kv_lora_rank=dims["rank"], qk_rope_head_dim=2 * M,
        qk_nope_head_dim=dims["nope"], v_head_dim=d, q_lora_rank=H * d if q_lora else None,
        attention_bias=attention_bias, rope_type=rope["rope_type"],
        cache_values=dims["rank"] + 2 * M,
        converted_cache_values=[layers[i].rank + 2 * layers[i].rope_entries for i in range(L)],
        engine_notes=notes)
    return ds, info


@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(ids, use_cache=False).logits.float()


def _verify(
    model: nn.Module, ds: nn.Module, info: DeepSeekExport, check_ids: Tensor | None,
    rtol: float | None, hint: str,
) -> None:
    """Fill ``info``'s logit difference; raise :class:`DeepSeekMismatch` above the tolerance.
    The converted model runs without its latent rounding and with its rewritten linears' exact
    products (what the checkpoint computes; packed CPU kernels round activations to bf16)."""
    if check_ids is None:
        gen = torch.Generator().manual_seed(0)
        check_ids = torch.randint(0, int(model.config.vocab_size), (2, 24), generator=gen)
    device = next(model.parameters()).device
    rounded = {a: a.latent_bits for a in converted_layers(model).values()}
    try:
        for a in rounded:
            a.latent_bits = 16
        with reference_ops(model):
            ref = _logits(model, check_ids.to(device)).cpu()
    finally:
        for a, bits in rounded.items():
            a.latent_bits = bits
    got = _logits(ds, check_ids.cpu())
    info.max_abs_logit_diff = float((got - ref).abs().max())
    info.logit_scale = float(ref.abs().max())
    dtype = next(model.parameters()).dtype
    tol = rtol if rtol is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    if not info.max_abs_logit_diff <= tol * info.logit_scale:
        raise DeepSeekMismatch(
            f"export_deepseek_v3: the DeepSeek-V3 model's logits differ from the converted "
            f"model's by {info.max_abs_logit_diff:.3g} (scale {info.logit_scale:.3g}, allowed "
            f"{tol:g} of it; model_type {getattr(model.config, 'model_type', '?')!r}: {hint})")


def export_deepseek_v3(
    model: nn.Module, directory: str | Path, *, check_ids: Tensor | None = None,
    drop_latent_rounding: bool = False, rms_norm_eps: float | None = None,
    rtol: float | None = None, untie_head: bool = False, overwrite: bool = False,
) -> DeepSeekExport:
    """Write ``model`` (every block converted to MLA) as a DeepSeek-V3 checkpoint that
    ``AutoModelForCausalLM.from_pretrained(directory)`` loads: ``config.json``,
    ``model.safetensors``, ``generation_config.json`` and ``slimfx_export.json`` (the returned
    :class:`DeepSeekExport`). The two models' logits are compared before anything is written
    (``check_ids``, ``rtol``, ``rms_norm_eps``, ``untie_head``: see :func:`deepseek_v3_model`).
    All or nothing:
    the directory appears complete or not at all; a non-empty directory is replaced only with
    ``overwrite=True``."""
    d = files.writable_target(directory, "export_deepseek_v3", overwrite)  # before the work
    ds, info = deepseek_v3_model(model, drop_latent_rounding=drop_latent_rounding,
                                 rms_norm_eps=rms_norm_eps, check_ids=check_ids, rtol=rtol,
                                 untie_head=untie_head)
    info.path = str(d)
    with files.writing(d) as tmp:
        ds.save_pretrained(tmp)
        files.finish(tmp, d, _MANIFEST, {"format": "slimfx.deepseek_v3", **info.to_dict()})
    return info
