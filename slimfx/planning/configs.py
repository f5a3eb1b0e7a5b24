"""Decision configs: what to do with one site, as frozen, versioned, JSON-able dataclasses.

Every config knows its exact storage cost in *reference bytes* for a linear of shape
(out_features, in_features): weights that stay floating point are priced at 16 bits whatever
dtype the model was loaded in, integer codes at their bit width, and scales / zeros / masks /
indices at their true size. One budget therefore gives one result for an fp32 or a bf16 load.

Byte formulas (``in`` = in_features, ``out`` = out_features, bias always 2·out when present):

- dense:        2·in·out
- lowrank(r):   2·r·(in + out)                                  (U: out×r, V: r×in, 16-bit)
- quant(b, g):  ceil(b·in·out / 8) + scales + zeros
                scales: 2 bytes per (row, group); zeros: 1 byte per (row, group) when asymmetric
                (a per-channel config has one group per row, g = in)
- sparse24:     2·in·out/2 values + in·out/2 · 2 bits of indices = 1.125·in·out  (56.25% of dense)
- lowrank_quant(r, b, g): quant(b, g) + lowrank(r)
- sparse24_lowrank(r):    sparse24 + lowrank(r)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Decision",
    "DenseConfig",
    "LowRankConfig",
    "QuantConfig",
    "Sparse24Config",
    "LowRankQuantConfig",
    "Sparse24LowRankConfig",
    "decision_from_dict",
    "register_decision",
    "DECISIONS",
    "DEFAULT_FAMILIES",
]

#: Candidate families the solver is offered when the caller names none (``optimize``, the
#: compile backend, the CLI): low-rank, int8 and int4 weight-only (round-to-nearest and GPTQ).
#: The rest are opt-in because they cost more to price than they usually win: 2:4 pays only
#: on GPUs (and ONNX Runtime runs it dense), and the combined forms (``lowrank_quant``,
#: ``sparse24_lowrank``) take minutes per 100M weights on a CPU.
DEFAULT_FAMILIES: tuple[str, ...] = ("lowrank", "int8", "int4", "int4_gptq")

DECISIONS: dict[str, type[Decision]] = {}


def register_decision(cls: type[Decision]) -> type[Decision]:
    """Class decorator: make a Decision config loadable from JSON by its ``kind``."""
    if cls.kind in DECISIONS and DECISIONS[cls.kind] is not cls:
        raise ValueError(f"decision kind {cls.kind!r} registered twice")
    DECISIONS[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class Decision:
    """Base of all decision configs. Subclasses set ``kind`` and ``version``."""

    kind: ClassVar[str] = "abstract"
    version: ClassVar[int] = 1

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        """Exact reference bytes of the weight in this form (bias excluded)."""
        raise NotImplementedError

    def bytes(self, in_features: int, out_features: int, bias: bool = False) -> int:
        """Reference bytes including a 16-bit bias."""
        return self.weight_bytes(in_features, out_features) + (2 * out_features if bias else 0)

    def flops(self, in_features: int, out_features: int, tokens: int = 1) -> int:
        """Multiply-adds ×2 for ``tokens`` rows of input (dequantization not counted)."""
        return 2 * tokens * in_features * out_features

    def short(self) -> str:
        """A compact human label, e.g. ``lowrank r=64``."""
        fields = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.kind}({fields})" if fields else self.kind

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "version": self.version}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return d


def decision_from_dict(d: dict[str, Any]) -> Decision:
    """Inverse of ``Decision.to_dict``; rejects unknown kinds and newer versions."""
    d = dict(d)
    kind = d.pop("kind", None)
    version = d.pop("version", 1)
    if kind not in DECISIONS:
        raise ValueError(f"unknown decision kind {kind!r}; known: {sorted(DECISIONS)}")
    cls = DECISIONS[kind]
    if version > cls.version:
        raise ValueError(
            f"decision {kind!r} has version {version}, this slimfx reads up to {cls.version}"
        )
    return cls(**d)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@register_decision
@dataclass(frozen=True)
class DenseConfig(Decision):
    """Keep the linear as it is."""

    kind: ClassVar[str] = "dense"

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        return 2 * in_features * out_features

    def short(self) -> str:
        return "dense"


LOWRANK_METHODS = ("svd", "whitened")


@register_decision
@dataclass(frozen=True)
class LowRankConfig(Decision):
    """W ≈ U·V with U: out×rank, V: rank×in.

    ``method``: ``svd`` (plain truncated SVD, minimizes ‖W−Ŵ‖_F) or ``whitened`` (SVD of W·L
    with L Lᵀ = XᵀX, minimizes the output error ‖(W−Ŵ)X‖_F, SVD-LLM style).
    """

    kind: ClassVar[str] = "lowrank"
    rank: int = 1
    method: str = "whitened"

    def __post_init__(self) -> None:
        _check(isinstance(self.rank, int) and self.rank >= 1, f"rank must be ≥ 1, got {self.rank}")
        _check(self.method in LOWRANK_METHODS, f"method must be one of {LOWRANK_METHODS}")

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        return 2 * self.rank * (in_features + out_features)

    def flops(self, in_features: int, out_features: int, tokens: int = 1) -> int:
        return 2 * tokens * self.rank * (in_features + out_features)

    def short(self) -> str:
        return f"lowrank r={self.rank}" + (" (svd)" if self.method == "svd" else "")


QUANT_METHODS = ("rtn", "gptq", "awq")


@register_decision
@dataclass(frozen=True)
class QuantConfig(Decision):
    """Weight-only integer quantization.

    ``group_size=None`` means one group per output row (per-channel). ``symmetric`` stores no
    zero point. ``method``: ``rtn`` round-to-nearest, ``gptq`` error-compensating rounding with
    the calibration Gram matrix, ``awq`` activation-aware per-input-channel scaling.
    """

    kind: ClassVar[str] = "quant"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    method: str = "rtn"

    def __post_init__(self) -> None:
        _check(self.bits in (2, 3, 4, 8), f"bits must be 2, 3, 4 or 8, got {self.bits}")
        _check(
            self.group_size is None or (isinstance(self.group_size, int) and self.group_size > 0),
            f"group_size must be a positive int or None, got {self.group_size}",
        )
        _check(self.method in QUANT_METHODS, f"method must be one of {QUANT_METHODS}")

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        codes = math.ceil(self.bits * in_features * out_features / 8)
        groups = out_features * self.n_groups(in_features)
        return codes + 2 * groups + (0 if self.symmetric else groups)

    def short(self) -> str:
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        s = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {g} {s} {self.method}"


SPARSE_MASKS = ("magnitude", "wanda")


@register_decision
@dataclass(frozen=True)
class Sparse24Config(Decision):
    """2:4 semi-structured sparsity: two of every four consecutive input weights kept.

    ``compensate``: update kept weights from the Gram matrix to absorb the pruning error
    (SparseGPT-style).
    """

    kind: ClassVar[str] = "sparse24"
    mask: str = "wanda"
    compensate: bool = True

    def __post_init__(self) -> None:
        _check(self.mask in SPARSE_MASKS, f"mask must be one of {SPARSE_MASKS}")

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        kept = in_features * out_features // 2
        return 2 * kept + math.ceil(2 * kept / 8)

    def flops(self, in_features: int, out_features: int, tokens: int = 1) -> int:
        return tokens * in_features * out_features

    def short(self) -> str:
        return f"2:4 {self.mask}" + (" +comp" if self.compensate else "")


LOWRANK_QUANT_METHODS = ("lorc", "lqlora")


@register_decision
@dataclass(frozen=True)
class LowRankQuantConfig(Decision):
    """W ≈ Q(W) + U·V (``lorc``: low-rank fit of the quantization residual) or
    W ≈ L + Q(W − L) iterated (``lqlora``)."""

    kind: ClassVar[str] = "lowrank_quant"
    rank: int = 8
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    method: str = "lorc"

    def __post_init__(self) -> None:
        _check(isinstance(self.rank, int) and self.rank >= 1, f"rank must be ≥ 1, got {self.rank}")
        _check(self.method in LOWRANK_QUANT_METHODS, f"method must be one of {LOWRANK_QUANT_METHODS}")
        self.quant  # validates bits / group size  # noqa: B018

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(self.bits, self.group_size, self.symmetric, "rtn")

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        return self.quant.weight_bytes(in_features, out_features) + LowRankConfig(
            self.rank
        ).weight_bytes(in_features, out_features)

    def flops(self, in_features: int, out_features: int, tokens: int = 1) -> int:
        return 2 * tokens * (in_features * out_features + self.rank * (in_features + out_features))

    def short(self) -> str:
        return f"{self.quant.short().rsplit(' ', 1)[0]} + r={self.rank} {self.method}"


@register_decision
@dataclass(frozen=True)
class Sparse24LowRankConfig(Decision):
    """W ≈ S + U·V with S 2:4 sparse."""

    kind: ClassVar[str] = "sparse24_lowrank"
    rank: int = 8
    mask: str = "wanda"

    def __post_init__(self) -> None:
        _check(isinstance(self.rank, int) and self.rank >= 1, f"rank must be ≥ 1, got {self.rank}")
        _check(self.mask in SPARSE_MASKS, f"mask must be one of {SPARSE_MASKS}")

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        return Sparse24Config(self.mask).weight_bytes(in_features, out_features) + LowRankConfig(
            self.rank
        ).weight_bytes(in_features, out_features)

    def flops(self, in_features: int, out_features: int, tokens: int = 1) -> int:
        return tokens * in_features * out_features + 2 * tokens * self.rank * (
            in_features + out_features
        )

    def short(self) -> str:
        return f"2:4 {self.mask} + r={self.rank}"
