"""Module-level attention sites for Hugging Face Llama / Qwen2 / Gemma-style attention.

A module is an attention site when it has ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
linears, a ``head_dim`` and a ``layer_idx`` (the decoder-only attention of transformers'
Llama, Mistral, Qwen2/3, Gemma 1-3, SmolLM, Phi-3-small …). Heads come from the projection
widths (so a pruned model reads right), RoPE from the config (``partial_rotary_factor``),
the sliding window from the module or from ``config.layer_types[layer_idx]``.

``nn.MultiheadAttention`` and other attention modules are reported with the reason they are
not sites.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimfx.planning.shapes import AttentionShape

__all__ = ["AttentionSite", "find_attention_sites", "MHA_REASON"]

MHA_REASON = (
    "nn.MultiheadAttention keeps no KV cache between calls (no layer index, no position "
    "encoding, q/k/v fused in in_proj_weight): there is no cache to compress"
)


@dataclass(frozen=True)
class AttentionSite:
    """One attention block: where it lives, its shape and the fqns of its projections."""

    fqn: str
    shape: AttentionShape
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    module_type: str

    @property
    def layer_idx(self) -> int | None:
        """The block's index in the model (the cache layer it writes)."""
        return self.shape.layer_idx


def _rope_dim(config: object, head_dim: int) -> int:
    if config is None:
        return head_dim
    factor = getattr(config, "partial_rotary_factor", None)
    if factor is None:
        rope = getattr(config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0
    d = int(head_dim * float(factor))
    return d - d % 2


def _sliding_window(module: nn.Module, config: object, layer_idx: int | None) -> int | None:
    win = getattr(module, "sliding_window", None)
    if win:
        return int(win)
    types = getattr(config, "layer_types", None)
    if types is not None and layer_idx is not None and layer_idx < len(types):
        if types[layer_idx] == "sliding_attention":
            return int(getattr(config, "sliding_window", 0) or 0) or None
    return None


def _site(fqn: str, m: nn.Module) -> AttentionSite | str:
    projs = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not all(isinstance(p, nn.Linear) for p in projs):
        return "its q/k/v/o projections are not all nn.Linear (already rewritten?)"
    q, k, v, o = projs
    head_dim = getattr(m, "head_dim", None)
    if not isinstance(head_dim, int):
        return "no integer head_dim attribute"
    if k.out_features != v.out_features:
        return f"k_proj ({k.out_features}) and v_proj ({v.out_features}) widths differ"
    if q.out_features % head_dim or k.out_features % head_dim:
        return f"projection widths are not multiples of head_dim {head_dim}"
    config = getattr(m, "config", None)
    layer_idx = getattr(m, "layer_idx", None)
    try:
        shape = AttentionShape(
            hidden_size=q.in_features,
            num_heads=q.out_features // head_dim,
            num_kv_heads=k.out_features // head_dim,
            head_dim=head_dim,
            rope_dim=_rope_dim(config, head_dim),
            sliding_window=_sliding_window(m, config, layer_idx),
            layer_idx=layer_idx if isinstance(layer_idx, int) else None,
        )
    except ValueError as e:
        return str(e)
    p = f"{fqn}." if fqn else ""
    return AttentionSite(
        fqn, shape, f"{p}q_proj", f"{p}k_proj", f"{p}v_proj", f"{p}o_proj", type(m).__name__
    )


def find_attention_sites(model: nn.Module) -> tuple[list[AttentionSite], dict[str, str]]:
    """``(sites, rejected)``: the attention sites of ``model`` in module order and, for each
    attention-like module that is not one, the reason (by fqn)."""
    sites: list[AttentionSite] = []
    rejected: dict[str, str] = {}
    for fqn, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            rejected[fqn] = MHA_REASON
            continue
        has_projs = all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if not has_projs:
            continue
        if getattr(m, "layer_idx", None) is None:
            rejected[fqn] = "no layer_idx: not a decoder attention with a cache layer"
            continue
        got = _site(fqn, m)
        if isinstance(got, str):
            rejected[fqn] = got
        else:
            sites.append(got)
    return sites, rejected
