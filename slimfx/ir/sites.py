"""Sites: frozen views of the expensive parts of a captured graph.

A site has a ``kind`` (``"linear"``, ``"attention"``) and a shape object of that kind
(``site_shape``: a ``LinearShape`` / ``AttentionShape``, the plain numbers a decision is
priced against and a plan records). Sites are frozen and hashable.

This module defines the site types; ``find_linear_sites`` / ``find_attention_sites`` (in
``slimfx.ir.find``) are the only pattern-recognition code that creates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from slimfx.planning.shapes import AttentionShape, LinearShape

__all__ = ["LinearSite", "AttentionSite", "Site", "SITE_KINDS"]


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

    ``shape`` is the weight's ``(out_features, in_features)``; ``site_shape`` the
    ``LinearShape`` the cost methods take.
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
    kind: ClassVar[str] = "linear"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def site_shape(self) -> LinearShape:
        """The shape object decisions are priced against and plans record."""
        return LinearShape(self.in_features, self.out_features)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class AttentionSite:
    """One attention block: heads, kv-heads, head_dim, causality and its projections.

    ``projections`` is a tuple of ``(role, linear site fqn)`` pairs, roles ``q``/``k``/``v``/
    ``o`` (a mapping given to the constructor is converted, so the site stays hashable);
    ``projection(role)`` looks one up. ``hidden_size`` is the residual width the block reads
    (``num_heads · head_dim`` when not given); ``rope_dim``, ``sliding_window`` and
    ``layer_idx`` as in ``AttentionShape``. ``module_type``: the class name of the attention
    module (``"LlamaAttention"``); ``qk_norm``: the attribute of a per-head norm between the
    q/k projections and RoPE (``"k_norm"``, …), ``None`` without one. ``cache_only``: why the
    block's cache can be compressed where it is held but its computation is rewritten by no
    form (quantized caches only), ``None`` for a block any form may take: no separate
    ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears (Phi-3's fused ``qkv_proj``, Phi's
    ``dense``, OPT's ``out_proj``), or an attention the rewritten blocks do not reproduce
    (measured at calibration: Cohere's interleaved RoPE). ``softcap``: the
    attention-logit soft-cap (Gemma 2's ``attn_logit_softcapping``), ``None`` without one.
    """

    fqn: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    projections: tuple[tuple[str, str], ...] = ()
    hidden_size: int | None = None
    rope_dim: int = 0
    sliding_window: int | None = None
    layer_idx: int | None = None
    module_type: str | None = None
    qk_norm: str | None = None
    cache_only: str | None = None
    softcap: float | None = None
    kind: ClassVar[str] = "attention"

    def __post_init__(self) -> None:
        projs = self.projections
        pairs = tuple(projs.items()) if isinstance(projs, Mapping) else tuple(projs)
        object.__setattr__(self, "projections", tuple((str(r), str(f)) for r, f in pairs))

    def projection(self, role: str) -> str | None:
        """The linear site FQN playing ``role`` (``"q"``, ``"k"``, ``"v"``, ``"o"``), if any."""
        return dict(self.projections).get(role)

    @property
    def site_shape(self) -> AttentionShape:
        """The shape object decisions are priced against and plans record."""
        return AttentionShape(
            hidden_size=self.hidden_size or self.num_heads * self.head_dim,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_dim=self.rope_dim,
            sliding_window=self.sliding_window,
            layer_idx=self.layer_idx,
        )


Site = LinearSite | AttentionSite
SITE_KINDS: dict[str, type] = {"linear": LinearSite, "attention": AttentionSite}
