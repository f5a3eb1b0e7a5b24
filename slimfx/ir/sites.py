"""Sites: frozen views of the expensive parts of a captured graph.

This module defines the site types; ``find_linear_sites`` / ``find_attention_sites`` (in
``slimfx.ir.find``) are the only pattern-recognition code that creates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LinearSite", "AttentionSite"]


@dataclass(frozen=True)
class LinearSite:
    """One linear layer ``y = x Wᵀ + b``.

    - ``fqn``: module path of the ``nn.Linear`` (e.g. ``model.layers.0.self_attn.q_proj``).
    - ``weight``: FQN of the weight parameter (``<fqn>.weight`` for a plain linear).
    - ``group``: sites that read the same input tensor share a group name (q/k/v, gate/up)
      and therefore one input Gram matrix; a site alone has ``group == fqn``.
    - ``tied``: FQNs of other parameters that are the same tensor as the weight (a tied
      embedding); compressing this site must keep the tie or pay for a dense copy.
    - ``node``: name of the graph node (``None`` when found by module-level discovery).
    - ``dtype``: the weight's dtype as a string, e.g. ``torch.float32``.
    """

    fqn: str
    in_features: int
    out_features: int
    dtype: str
    has_bias: bool
    weight: str
    group: str
    tied: tuple[str, ...] = ()
    node: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class AttentionSite:
    """One attention block: heads, kv-heads, head_dim, causality and its projections."""

    fqn: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    projections: dict[str, str] = field(default_factory=dict)  # role (q/k/v/o) → LinearSite fqn
