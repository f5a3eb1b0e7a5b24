"""Decision configs: what to do with one site, as frozen, versioned, JSON-able dataclasses.

A config is one piece of a form (``slimfx.forms``): it holds the facts the cost model needs,
priced against the site's shape object (``slimfx.planning.shapes``): ``storage(shape)`` (float
elements and integer bytes of the stored tensors), ``weight_bytes``, ``flops``, ``launches``,
``intermediate`` (activations written and read back between launches), ``dequantizes`` and
``needs_gram`` (whether realizing it uses calibration statistics). A linear form prices only a
:class:`~slimfx.planning.shapes.LinearShape`; another shape raises a ``TypeError`` naming both.

Prices are *reference bytes*: weights that stay floating point count 16 bits whatever dtype the
model was loaded in, integer codes, zero points and indices their stored size (the formats of
``slimfx.formats``). One budget therefore gives one result for an fp32 or a bf16 load, and
``weight_bytes = 2·floats + ints`` equals the bytes of the tensors a built module stores.

Byte formulas (``in`` = in_features, ``out`` = out_features, bias always 2·out when present):

- dense:        2·in·out
- lowrank(r):   2·r·(in + out)                                  (U: out×r, V: r×in, 16-bit)
- quant(b, g):  out·ceil(b·in / 8) + scales + zeros   (each row's codes a packed bit stream)
                scales: 2 bytes per (row, group); zeros: 1 byte per (row, group) when asymmetric
                (a per-channel config has one group per row, g = in)
- sparse24:     2·in·out/2 values + out·ceil(in/8) metadata bytes = 1.125·in·out (in % 8 == 0)
- lowrank_quant(r, b, g): quant(b, g) + lowrank(r)
- sparse24_lowrank(r):    sparse24 + lowrank(r)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from slimfx.planning.shapes import WEIGHT_BYTES, AttentionShape, LinearShape

__all__ = [
    "Decision",
    "DenseConfig",
    "LowRankConfig",
    "QuantConfig",
    "Sparse24Config",
    "LowRankQuantConfig",
    "Sparse24LowRankConfig",
    "decision_from_dict",
    "linear_shape",
    "attention_shape",
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


def _shape_of(decision: Decision, shape: object, cls: type, sites: str) -> Any:
    if not isinstance(shape, cls):
        what = getattr(shape, "kind", type(shape).__name__)
        def a(word: str) -> str:
            return f"an {word}" if word[:1].lower() in "aeiou" else f"a {word}"

        raise TypeError(
            f"decision kind {decision.kind!r} prices {sites} sites ({a(cls.__name__)}), "
            f"not {a(str(what))} shape {shape!r}"
        )
    return shape


def attention_shape(decision: Decision, shape: object) -> AttentionShape:
    """``shape`` when it is an :class:`AttentionShape`; otherwise a ``TypeError`` saying that
    ``decision``'s form prices attention sites only (a KV-cache or attention form)."""
    return _shape_of(decision, shape, AttentionShape, "attention")


def linear_shape(decision: Decision, shape: object) -> LinearShape:
    """``shape`` when it is a :class:`LinearShape`; otherwise a ``TypeError`` saying that
    ``decision``'s form prices linear sites only."""
    return _shape_of(decision, shape, LinearShape, "linear")


@dataclass(frozen=True)
class Decision:
    """Base of all decision configs. Subclasses set ``kind`` and ``version`` and define
    ``storage``, ``flops`` and ``launches`` (the base raises: an unknown form is never priced
    by a default)."""

    kind: ClassVar[str] = "abstract"
    version: ClassVar[int] = 1

    def _missing(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"decision kind {self.kind!r} ({type(self).__name__}) does not define {what}"
        )

    def storage(self, shape: LinearShape) -> tuple[int, int]:
        """``(float elements, integer bytes)`` of the stored weight tensors (bias excluded)."""
        raise self._missing("storage(shape)")

    def weight_bytes(self, shape: LinearShape) -> int:
        """Exact reference bytes of the weight in this form (bias excluded): 16-bit floats
        plus integer bytes (:meth:`storage`)."""
        floats, ints = self.storage(linear_shape(self, shape))
        return 2 * floats + ints

    def bytes(self, shape: LinearShape, bias: bool = False) -> int:
        """Reference bytes including a 16-bit bias."""
        shape = linear_shape(self, shape)
        return self.weight_bytes(shape) + (2 * shape.out_features if bias else 0)

    def costs(self, shape: LinearShape, bias: bool = False) -> dict[str, int]:
        """Bytes per budget dimension (``slimfx.planning.shapes.DIMENSIONS``) this option
        costs at a site of ``shape``: a linear form costs weight bytes only."""
        return {WEIGHT_BYTES: self.bytes(shape, bias)}

    def flops(self, shape: LinearShape, tokens: int = 1) -> int:
        """Multiply-adds ×2 for ``tokens`` rows of input (dequantization not counted)."""
        raise self._missing("flops(shape, tokens)")

    def launches(self) -> int:
        """Kernel launches (op calls) per forward."""
        raise self._missing("launches()")

    def intermediate(self) -> int:
        """Activation elements per token a form writes and reads back between its launches
        (the rank of a two-factor product); 0 for one-launch forms."""
        return 0

    @property
    def dequantizes(self) -> bool:
        """Whether its kernels dequantize integer codes in their inner loop (the roofline's
        compute term then runs at ``Target.dequant_efficiency``)."""
        return False

    def needs_gram(self) -> bool:
        """Whether realizing this decision uses calibration statistics (the input Gram)."""
        return False

    def short(self) -> str:
        """A compact human label, e.g. ``lowrank r=64``."""
        fields = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.kind}({fields})" if fields else self.kind

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "version", <fields>}`` (JSON-able; :func:`decision_from_dict` reads it)."""
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


def _is_int(x: object) -> bool:
    """An int that is not a bool (``True`` is an int to Python; a rank of ``True`` is a typo)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _check_rank(rank: object) -> None:
    _check(_is_int(rank) and rank >= 1, f"rank must be an int ≥ 1, got {rank!r}")  # type: ignore[operator]


def _check_quant(bits: object, group_size: object, symmetric: object) -> None:
    """The quantized fields a hand-written plan may get wrong: ``bits`` 2, 3, 4 or 8 (an int:
    ``4.0`` crashed later), ``group_size`` a positive int or ``None`` (``true`` was a group of
    1), ``symmetric`` a bool (the string ``"false"`` was applied as symmetric)."""
    _check(_is_int(bits) and bits in QUANT_BITS, f"bits must be 2, 3, 4 or 8, got {bits!r}")
    _check(
        group_size is None or (_is_int(group_size) and group_size > 0),  # type: ignore[operator]
        f"group_size must be a positive int or None, got {group_size!r}",
    )
    _check(isinstance(symmetric, bool), f"symmetric must be true or false, got {symmetric!r}")


def _lowrank_floats(rank: int, shape: LinearShape) -> int:
    return rank * (shape.in_features + shape.out_features)


def _quant_storage(
    bits: int, group_size: int | None, symmetric: bool, shape: LinearShape
) -> tuple[int, int]:
    """Scales (floats) and codes + zero points (integer bytes) of a quantized weight."""
    in_f, out_f = shape.in_features, shape.out_features
    groups = out_f * (1 if group_size is None else math.ceil(in_f / group_size))
    codes = out_f * math.ceil(bits * in_f / 8)
    return groups, codes + (0 if symmetric else groups)


def _sparse24_storage(shape: LinearShape) -> tuple[int, int]:
    """Kept values (floats) and 2-bit position metadata (bytes) of a 2:4 weight."""
    return shape.numel // 2, shape.out_features * math.ceil(shape.in_features / 8)


@register_decision
@dataclass(frozen=True)
class DenseConfig(Decision):
    """Keep the linear as it is."""

    kind: ClassVar[str] = "dense"

    def storage(self, shape: LinearShape) -> tuple[int, int]:
        return linear_shape(self, shape).numel, 0

    def flops(self, shape: LinearShape, tokens: int = 1) -> int:
        return 2 * tokens * linear_shape(self, shape).numel

    def launches(self) -> int:
        return 1

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
        _check_rank(self.rank)
        _check(self.method in LOWRANK_METHODS, f"method must be one of {LOWRANK_METHODS}")

    def storage(self, shape: LinearShape) -> tuple[int, int]:
        return _lowrank_floats(self.rank, linear_shape(self, shape)), 0

    def flops(self, shape: LinearShape, tokens: int = 1) -> int:
        return 2 * tokens * _lowrank_floats(self.rank, linear_shape(self, shape))

    def launches(self) -> int:
        return 2

    def intermediate(self) -> int:
        return self.rank

    def needs_gram(self) -> bool:
        return self.method == "whitened"

    def short(self) -> str:
        return f"lowrank r={self.rank}" + (" (svd)" if self.method == "svd" else "")


QUANT_METHODS = ("rtn", "gptq")
QUANT_BITS = (2, 3, 4, 8)


@register_decision
@dataclass(frozen=True)
class QuantConfig(Decision):
    """Weight-only integer quantization.

    ``group_size=None`` means one group per output row (per-channel). ``symmetric`` stores no
    zero point. ``method``: ``rtn`` round-to-nearest, ``gptq`` error-compensating rounding with
    the calibration Gram matrix. ``bits`` 2 and 3 are packed and priced like 4 and 8 (each
    row's codes one bit stream) but no runtime op runs them: they serve error estimates.
    """

    kind: ClassVar[str] = "quant"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    method: str = "rtn"

    def __post_init__(self) -> None:
        _check_quant(self.bits, self.group_size, self.symmetric)
        _check(self.method in QUANT_METHODS, f"method must be one of {QUANT_METHODS}")

    def n_groups(self, in_features: int) -> int:
        """Scale groups per row (1 when per-channel)."""
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def storage(self, shape: LinearShape) -> tuple[int, int]:
        shape = linear_shape(self, shape)
        return _quant_storage(self.bits, self.group_size, self.symmetric, shape)

    def flops(self, shape: LinearShape, tokens: int = 1) -> int:
        return 2 * tokens * linear_shape(self, shape).numel

    def launches(self) -> int:
        return 1

    @property
    def dequantizes(self) -> bool:
        return True

    def needs_gram(self) -> bool:
        return self.method == "gptq"

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
        _check(isinstance(self.compensate, bool),
               f"compensate must be true or false, got {self.compensate!r}")  # fmt: skip

    def storage(self, shape: LinearShape) -> tuple[int, int]:
        return _sparse24_storage(linear_shape(self, shape))

    def flops(self, shape: LinearShape, tokens: int = 1) -> int:
        return tokens * linear_shape(self, shape).numel

    def launches(self) -> int:
        return 1

    def needs_gram(self) -> bool:
        return self.mask == "wanda" or self.compensate

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
        _check_rank(self.rank)
        _check(self.method in LOWRANK_QUANT_METHODS, f"method must be one of {LOWRANK_QUANT_METHODS}")
        self.quant  # validates bits / group size  # noqa: B018

    @property
    def quant(self) -> QuantConfig:
        """The quantized core as a :class:`QuantConfig` (round-to-nearest)."""
        return QuantConfig(self.bits, self.group_size, self.symmetric, "rtn")

    def storage(self, shape: LinearShape) -> tuple[int, int]:
        shape = linear_shape(self, shape)
        floats, ints = _quant_storage(self.bits, self.group_size, self.symmetric, shape)
        return floats + _lowrank_floats(self.rank, shape), ints

    def flops(self, shape: LinearShape, tokens: int = 1) -> int:
        shape = linear_shape(self, shape)
        return 2 * tokens * (shape.numel + _lowrank_floats(self.rank, shape))

    def launches(self) -> int:
        return 3

    def intermediate(self) -> int:
        return self.rank

    @property
    def dequantizes(self) -> bool:
        return True

    def needs_gram(self) -> bool:
        return True

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
        _check_rank(self.rank)
        _check(self.mask in SPARSE_MASKS, f"mask must be one of {SPARSE_MASKS}")

    def storage(self, shape: LinearShape) -> tuple[int, int]:
        shape = linear_shape(self, shape)
        floats, ints = _sparse24_storage(shape)
        return floats + _lowrank_floats(self.rank, shape), ints

    def flops(self, shape: LinearShape, tokens: int = 1) -> int:
        shape = linear_shape(self, shape)
        return tokens * shape.numel + 2 * tokens * _lowrank_floats(self.rank, shape)

    def launches(self) -> int:
        return 3

    def intermediate(self) -> int:
        return self.rank

    def needs_gram(self) -> bool:
        return True

    def short(self) -> str:
        return f"2:4 {self.mask} + r={self.rank}"
