"""Site shapes: the plain-number description of a site that a decision is priced against.

A site has a *kind* (``"linear"``, ``"attention"``) and a shape object of that kind; the cost
methods of a decision take the shape object, the plan stores it, and a replay checks it. Shapes
are frozen and hashable, and round-trip through JSON with their kind.

Budget dimensions an option can cost in: ``WEIGHT_BYTES`` (bytes of stored weights),
``KV_BYTES_PER_TOKEN`` (bytes the KV cache holds per token of context, per sequence, rounded up
to a whole byte) and ``KV_CACHE_BYTES`` (the exact bytes of one sequence's cache at the context a
problem was priced for; present only when a context was given). ``TOTAL_BYTES`` is derived by
the solver (weight bytes + batch × cache bytes) for ``Budget(total_bytes=…)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

__all__ = [
    "LinearShape",
    "AttentionShape",
    "Shape",
    "shape_from_dict",
    "SHAPE_KINDS",
    "WEIGHT_BYTES",
    "KV_BYTES_PER_TOKEN",
    "KV_CACHE_BYTES",
    "TOTAL_BYTES",
    "DIMENSIONS",
    "AttentionWork",
]

WEIGHT_BYTES = "weight_bytes"
KV_BYTES_PER_TOKEN = "kv_bytes_per_token"
KV_CACHE_BYTES = "kv_cache_bytes"
TOTAL_BYTES = "total_bytes"
DIMENSIONS = (WEIGHT_BYTES, KV_BYTES_PER_TOKEN, KV_CACHE_BYTES)


def _positive(owner: str, **fields: int | None) -> None:
    for name, v in fields.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{owner}.{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class LinearShape:
    """``y = x Wᵀ + b`` with ``W`` of shape ``(out_features, in_features)``."""

    in_features: int
    out_features: int
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _positive("LinearShape", in_features=self.in_features, out_features=self.out_features)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class AttentionShape:
    """One attention block: ``num_heads`` query heads sharing ``num_kv_heads`` key/value heads
    (GQA when fewer), ``head_dim`` per head, reading a ``hidden_size`` residual stream.

    ``rope_dim``: dims per head that carry rotary position (0: no RoPE). ``sliding_window``:
    tokens a query may see (``None``: all). ``layer_idx``: the block's index in the model."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_dim: int = 0
    sliding_window: int | None = None
    layer_idx: int | None = None
    kind: ClassVar[str] = "attention"

    def __post_init__(self) -> None:
        _positive(
            "AttentionShape",
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"AttentionShape: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if not (0 <= self.rope_dim <= self.head_dim) or self.rope_dim % 2:
            raise ValueError(
                f"AttentionShape.rope_dim must be even and in [0, head_dim={self.head_dim}], "
                f"got {self.rope_dim}"
            )
        if self.sliding_window is not None:
            _positive("AttentionShape", sliding_window=self.sliding_window)

    @property
    def kv_dim(self) -> int:
        """Width of one of the key / value projections' outputs."""
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, bits: int = 16) -> int:
        """Bytes the dense cache holds per token (keys and values) at ``bits`` per element."""
        return 2 * self.kv_dim * bits // 8

    def held_tokens(self, tokens: int) -> int:
        """Tokens this layer's 16-bit cache holds at a context of ``tokens``: all of them, or
        with a sliding window the last ``sliding_window − 1`` (what transformers' dynamic
        sliding layer keeps between steps; a step reads them and its own token)."""
        if self.sliding_window is None:
            return tokens
        return min(tokens, max(self.sliding_window - 1, 1))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class AttentionWork:
    """What one forward of an attention block does with its cache, per sequence: ``tokens``
    new tokens (1 at decode) with ``context`` tokens in the cache after the step — the numbers a
    KV-cache or MLA decision gives (``step_work``) and a target's roofline prices.

    - ``cache_floats``: floating-point cache entries read (at the target's float width);
      ``cache_ints``: integer codes and 16-bit scales read, in bytes;
    - ``weight_floats``: weight entries the form's own projections read per step (the k/v
      factors of a low-rank cache, the converted projections of MLA; 0 when the k/v projections
      stay linear sites of their own), read once per step whatever the batch;
      ``weight_ints``: integer weight codes and their 16-bit scales read per step, in bytes
      (MLA's int8 factors; what they are dequantized to counts in ``weight_floats``);
    - ``flops``: arithmetic of the step (attention, rebuilds, dequantization, own projections);
    - ``rebuilt``: floating-point entries a runtime writes and reads back (dequantized or
      rebuilt keys/values/latents) when no fused kernel reads the cache in place;
    - ``launches``: op calls of the step; ``dequantizes``: integer codes are expanded on the fly
      (the compute term runs at the target's dequantization efficiency);
    - ``fused``: a fused decode kernel reads this cache in place (one launch, nothing rebuilt)
      on targets that run one at one-token steps."""

    cache_floats: int
    cache_ints: int
    weight_floats: int
    flops: int
    rebuilt: int
    launches: int
    dequantizes: bool = False
    fused: bool = False
    weight_ints: int = 0


Shape = LinearShape | AttentionShape
SHAPE_KINDS: dict[str, type] = {"linear": LinearShape, "attention": AttentionShape}


def shape_from_dict(d: dict[str, Any]) -> LinearShape | AttentionShape:
    """Inverse of ``to_dict``; an unknown kind or field raises a ``ValueError`` naming it."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"a site shape is a dict with a 'kind', got {d!r}")
    d = dict(d)
    kind = d.pop("kind")
    cls = SHAPE_KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown site kind {kind!r}; known: {sorted(SHAPE_KINDS)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"bad {kind} shape {d!r}: {e}") from None
