"""Module-level introspection of a Hugging Face Llama / Qwen2-style attention block.

One function, :func:`describe_hf_attention`, reads what the MLA conversion needs from the
module and the model config (heads, kv heads, head_dim, RoPE, sliding window, biases) and says
why a block cannot be converted. It is deliberately small and self-contained so that the
generic attention-site discovery can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from slimfx.planning.shapes import AttentionShape

__all__ = ["HFAttentionInfo", "describe_hf_attention"]


@dataclass(frozen=True)
class HFAttentionInfo:
    """What :func:`describe_hf_attention` found: the shape (``None`` when the block is not
    convertible), the reason it is not (``None`` when it is), and the projections' biases."""

    shape: AttentionShape | None
    reason: str | None
    qkv_bias: bool = False
    o_bias: bool = False


def _rope_params(config: Any) -> dict[str, Any] | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        # per-layer-type dicts ({"full_attention": {...}, ...}) are not the Llama/Qwen2 layout
        return params
    theta = getattr(config, "rope_theta", None)
    return {"rope_theta": theta, "rope_type": "default"} if theta is not None else None


def describe_hf_attention(attn: nn.Module, config: Any, layer_idx: int) -> HFAttentionInfo:
    """Describe ``attn`` (e.g. ``model.model.layers[i].self_attn``) of a model with ``config``.

    Accepted: separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears, full rotary
    embedding applied by ``rotate_half`` on every head dim (Llama, Qwen2, Mistral without a
    window), no per-head q/k norm, no sliding window on this layer. Every other case returns
    ``shape=None`` and a reason that names what was found.
    """
    projs = ("q_proj", "k_proj", "v_proj", "o_proj")
    missing = [p for p in projs if not isinstance(getattr(attn, p, None), nn.Linear)]
    if missing:
        return HFAttentionInfo(
            None,
            f"unsupported attention variant {type(attn).__name__}: no nn.Linear "
            f"{', '.join(missing)} (fused or missing projections)",
        )
    for norm in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
        if getattr(attn, norm, None) is not None:
            return HFAttentionInfo(
                None,
                f"unsupported attention variant {type(attn).__name__}: per-head {norm} sits "
                "between k_proj and RoPE, so keys are not linear in the hidden state",
            )
    hidden = attn.q_proj.in_features
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    if not heads or not head_dim:
        return HFAttentionInfo(None, "unsupported attention variant: heads/head_dim not found")
    if attn.k_proj.out_features != kv_heads * head_dim:
        return HFAttentionInfo(
            None,
            f"unsupported attention variant: k_proj has {attn.k_proj.out_features} outputs, "
            f"not kv_heads×head_dim = {kv_heads}×{head_dim}",
        )
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[layer_idx] if layer_types else None
    window = getattr(attn, "sliding_window", None)
    if window is None and getattr(config, "sliding_window", None):
        if layer_type == "sliding_attention" or (
            layer_type is None and getattr(config, "use_sliding_window", True)
        ):
            window = config.sliding_window
    rope = _rope_params(config)
    no_rope = getattr(config, "no_rope_layers", None)
    if rope is None or (no_rope is not None and not no_rope[layer_idx]):
        rope_dim = 0
    else:
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        rope_dim = int(head_dim * factor) // 2 * 2
    qkv_bias = attn.q_proj.bias is not None or attn.k_proj.bias is not None
    shape = AttentionShape(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_dim=rope_dim,
        sliding_window=window,
        layer_idx=layer_idx,
    )
    reason = None
    if rope_dim == 0:
        reason = "no RoPE found: MLA keeps RoPE on a decoupled key; a NoPE block is unsupported"
    elif rope_dim != head_dim:
        reason = (
            f"unsupported attention variant: RoPE on {rope_dim} of {head_dim} head dims "
            "(partial rotary) is not handled"
        )
    elif window is not None:
        reason = (
            f"sliding-window attention (window {window}) is unsupported: the latent cache keeps "
            "every token"
        )
    return HFAttentionInfo(
        None if reason else shape, reason, qkv_bias, attn.o_proj.bias is not None
    )
