"""KV-cache decision configs, priced against an :class:`~slimfx.planning.shapes.AttentionShape`.

Each config is one registered decision (``register_decision``), frozen and JSON round-trips
through ``decision_from_dict``. Bytes are *reference bytes* like the linear forms: floating-point
cache entries at 16 bits whatever dtype the model runs in, integer codes at their bit width,
scales and minimums at 2 bytes each (stored as float16).

Notation: ``H`` = num_kv_heads, ``D`` = head_dim, ``hidden`` = hidden_size, ``L`` = tokens of
context held by one sequence.

- dense (16-bit):          per token ``2·H·D·2``; a sliding-window layer holds only its last
  ``window − 1`` tokens (``AttentionShape.held_tokens``, as transformers' cache keeps them), so
  at a context its cache stops growing and its steady rate is 0.
- ``kv_quant`` (KIVI):     keys per channel with one (scale, min) per ``key_group`` tokens,
  values per token with one (scale, min) per ``value_group`` channels; asymmetric min/max.
  Quantized bytes per token::

      H·( D·key_bits/8 + 4·D/key_group  +  D·value_bits/8 + 4·D/value_group )

  The most recent tokens stay 16-bit: tokens move to the quantized store in whole blocks of
  ``key_group`` once more than ``residual`` tokens are waiting, so at context ``L`` the store
  holds ``Q(L) = max(0, ⌊(L − residual)/key_group⌋)·key_group`` tokens and ``L − Q(L)`` (between
  ``residual`` and ``residual + key_group − 1`` once ``L ≥ residual``) are 16-bit. ``sink``: the
  first tokens of the sequence (the attention sink most heads lean on) also stay 16-bit; the
  store then holds positions ``sink … sink + Q − 1`` with ``Q = Q(L − sink)``.
- ``kv_lowrank`` (Palu):   the cache holds a 16-bit latent of ``key_rank + value_rank`` values
  per token (summed over head groups): ``2·(key_rank + value_rank)`` bytes per token. The k/v
  projections become down (hidden → rank) and up (rank → group width, one block per group), so
  the weights change too: ``weight_bytes = 2·(rank·hidden + rank·H·D/groups)`` for each of k, v.
  ``sink`` first tokens also hold their exact K/V (16-bit, ``2·H·D·2`` bytes each, on top of
  their latent); the original k/v projections are then kept too (their bytes count in
  ``projection_weight_bytes``). ``factor_bits=8`` stores all those matrices as int8 codes with a
  16-bit scale per row: ``entries + 2·rows`` bytes instead of ``2·entries``.
- ``kv_latent_quant``:     the latent quantized per token with one (scale, min) per
  ``group`` latent values (per head group), the residual window as for ``kv_quant``
  (block of ``key_group``-free: whole tokens, so ``Q(L) = max(0, L − residual)``); or per
  channel with one (scale, min) per latent channel per block of ``group`` tokens (tokens leave
  the window in blocks), optionally with the smallest channels at ``low_bits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slimfx.planning.configs import Decision, attention_shape, register_decision
from slimfx.planning.shapes import (
    KV_BYTES_PER_TOKEN,
    WEIGHT_BYTES,
    AttentionShape,
    AttentionWork,
)

__all__ = [
    "KVDecision",
    "KVDenseConfig",
    "KVQuantConfig",
    "KVLowRankConfig",
    "KVLatentQuantConfig",
    "KV_BITS",
    "SCALE_BYTES",
    "dense_fraction",
]

KV_BITS = (2, 4, 8)
#: widths of a low-rank cache's own weights (16-bit, or int8 rows with a scale each)
FACTOR_BITS = (16, 8)
SCALE_BYTES = 2  # float16 scale, float16 minimum
LOWRANK_KV_METHODS = ("whitened", "attention")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _pos_int(name: str, v: object) -> None:
    _check(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        f"{name} must be a positive int, got {v!r}",
    )


def _nonneg_int(name: str, v: object) -> None:
    _check(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        f"{name} must be an int ≥ 0, got {v!r}",
    )


@dataclass(frozen=True)
class KVDecision(Decision):
    """Base of the KV-cache configs: priced per token of context, not per linear."""

    kind: ClassVar[str] = "kv_abstract"

    #: the projections (roles) the form replaces, whose weights it then owns and prices
    owns: ClassVar[tuple[str, ...]] = ()

    def weight_bytes(self, shape: AttentionShape) -> int:
        """Reference bytes of the weights this form owns at an attention site of ``shape``
        (``projection_weight_bytes`` when it replaces k_proj / v_proj, else 0); a
        ``TypeError`` for a linear shape: a KV-cache form prices attention sites."""
        shape = attention_shape(self, shape)
        return self.projection_weight_bytes(shape) if self.owns else 0

    def check(self, shape: AttentionShape) -> str | None:
        """Why this form cannot apply to ``shape`` (``None``: it can)."""
        if shape.sliding_window is not None:
            return (
                f"sliding-window attention (window {shape.sliding_window}) is not supported by "
                "the compressed caches: they never evict"
            )
        return None

    def cache_bytes(self, shape: AttentionShape, tokens: int) -> int:
        """Exact reference bytes one sequence's cache of this layer holds at ``tokens``."""
        raise NotImplementedError

    def bytes_per_token(self, shape: AttentionShape, context: int | None = None) -> float:
        """Cache bytes per token at ``context`` tokens (``None``: the steady-state rate, the
        16-bit residual window amortized away)."""
        if context is None:
            return self.steady_bytes_per_token(shape)
        _pos_int("context", context)
        return self.cache_bytes(shape, context) / context

    def steady_bytes_per_token(self, shape: AttentionShape) -> float:
        """Bytes per token of the compressed store alone (the limit as context grows)."""
        raise NotImplementedError

    def projection_weight_bytes(self, shape: AttentionShape) -> int:
        """Reference bytes of the k_proj and v_proj weights in this form (biases excluded)."""
        return 2 * 2 * shape.hidden_size * shape.kv_dim

    def step_work(
        self, shape: AttentionShape, context: int, tokens: int = 1, branchless: bool = False
    ) -> AttentionWork:
        """One attention step of one sequence (:class:`AttentionWork`): ``tokens`` new tokens,
        ``context`` tokens in the cache after it; ``branchless``: the runtime runs one exported
        step graph (ONNX Runtime), so the low-rank forms take their branch-free path. A form
        that does not define it cannot be priced for latency (no default)."""
        raise NotImplementedError(f"{type(self).__name__} does not define step_work")

    def costs(
        self, shape: AttentionShape, bias: bool = False, context: int | None = None
    ) -> dict[str, float]:
        """The option's cost vector at a site of ``shape``: ``KV_BYTES_PER_TOKEN`` and
        ``WEIGHT_BYTES`` (:meth:`weight_bytes`: the owned k/v projections, biases not counted,
        ``bias`` is accepted for the ``Decision.costs`` signature only).

        Cache bytes depend on the context (the 16-bit residual window and sink tokens): by
        default ``costs`` prices the **steady state** — the compressed store's bytes per token,
        the limit as the context grows (:meth:`steady_bytes_per_token`); ``context=L`` prices
        the exact ``cache_bytes(shape, L) / L`` instead."""
        return {
            KV_BYTES_PER_TOKEN: self.bytes_per_token(shape, context),
            WEIGHT_BYTES: self.weight_bytes(shape),
        }


@register_decision
@dataclass(frozen=True)
class KVDenseConfig(KVDecision):
    """The 16-bit cache, unchanged."""

    kind: ClassVar[str] = "kv_dense"

    def check(self, shape: AttentionShape) -> str | None:
        return None

    def cache_bytes(self, shape: AttentionShape, tokens: int) -> int:
        """A sliding-window layer holds its window, not the context (``held_tokens``)."""
        return shape.held_tokens(tokens) * shape.kv_bytes_per_token(16)

    def steady_bytes_per_token(self, shape: AttentionShape) -> float:
        """0 for a sliding-window layer: its cache stops growing at the window."""
        return 0.0 if shape.sliding_window is not None else float(shape.kv_bytes_per_token(16))

    def step_work(
        self, shape: AttentionShape, context: int, tokens: int = 1, branchless: bool = False
    ) -> AttentionWork:
        """A step reads the cached tokens (a sliding window's at most) and its own."""
        C = _step_context(context, tokens)
        if shape.sliding_window is not None:
            C = min(C, shape.held_tokens(C) + tokens)
        return AttentionWork(C * 2 * shape.kv_dim, 0, 0, _attend_flops(shape, C, tokens), 0, 1)

    def short(self) -> str:
        return "kv dense"


@register_decision
@dataclass(frozen=True)
class KVQuantConfig(KVDecision):
    """KIVI-style quantized cache (see the module docstring for the layout and bytes).

    ``key_bits`` / ``value_bits`` in {2, 4, 8}; ``key_group``: tokens sharing one key
    (scale, min) per channel — also the block in which tokens leave the 16-bit window;
    ``value_group``: channels sharing one value (scale, min) per token (must divide head_dim);
    ``residual``: most recent tokens kept 16-bit (0: only the unfilled block); ``sink``: first
    tokens of the sequence kept 16-bit.
    """

    kind: ClassVar[str] = "kv_quant"
    key_bits: int = 4
    value_bits: int = 4
    key_group: int = 32
    value_group: int = 64
    residual: int = 0
    sink: int = 0

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            v = getattr(self, name)
            _check(v in KV_BITS, f"{name} must be one of {KV_BITS}, got {v!r}")
        _pos_int("key_group", self.key_group)
        _pos_int("value_group", self.value_group)
        _nonneg_int("residual", self.residual)
        _nonneg_int("sink", self.sink)

    def check(self, shape: AttentionShape) -> str | None:
        if (why := super().check(shape)) is not None:
            return why
        D = shape.head_dim
        if D % self.value_group:
            return f"head_dim {D} is not divisible by the value group {self.value_group}"
        for bits in (self.key_bits, self.value_bits):
            if D % (8 // bits):
                return f"head_dim {D} does not pack into bytes at {bits} bits"
        return None

    def quantized_tokens(self, tokens: int) -> int:
        """Tokens in the quantized store at context ``tokens`` (the rest are 16-bit)."""
        return max(0, (tokens - self.sink - self.residual) // self.key_group) * self.key_group

    def steady_bytes_per_token(self, shape: AttentionShape) -> float:
        H, D = shape.num_kv_heads, shape.head_dim
        k = D * self.key_bits / 8 + 2 * SCALE_BYTES * D / self.key_group
        v = D * self.value_bits / 8 + 2 * SCALE_BYTES * D / self.value_group
        return H * (k + v)

    def cache_bytes(self, shape: AttentionShape, tokens: int) -> int:
        H, D = shape.num_kv_heads, shape.head_dim
        q = self.quantized_tokens(tokens)
        codes = H * q * D * (self.key_bits + self.value_bits) // 8
        key_sm = H * (q // self.key_group) * D * 2 * SCALE_BYTES
        value_sm = H * q * (D // self.value_group) * 2 * SCALE_BYTES
        return codes + key_sm + value_sm + (tokens - q) * shape.kv_bytes_per_token(16)

    def step_work(
        self, shape: AttentionShape, context: int, tokens: int = 1, branchless: bool = False
    ) -> AttentionWork:
        """The store's codes and scales plus the 16-bit tokens are read; without the fused
        kernel the store is dequantized to keys and values first (written, read back)."""
        C = _step_context(context, tokens)
        q = self.quantized_tokens(C)
        floats = (C - q) * 2 * shape.kv_dim
        flops = _attend_flops(shape, C, tokens) + DEQUANT_OPS * q * 2 * shape.kv_dim
        ints = self.cache_bytes(shape, C) - 2 * floats
        return AttentionWork(floats, ints, 0, flops, q * 2 * shape.kv_dim, 3, True, True)

    def short(self) -> str:
        bits = (
            f"int{self.key_bits}"
            if self.key_bits == self.value_bits
            else f"k{self.key_bits}v{self.value_bits}"
        )
        sink = f" s{self.sink}" if self.sink else ""
        return f"kv {bits} gk{self.key_group} gv{self.value_group} r{self.residual}{sink}"


@register_decision
@dataclass(frozen=True)
class KVLowRankConfig(KVDecision):
    """Palu-style low-rank cache: ``k_proj``/``v_proj`` factorized per head group, the cache
    holds the pre-RoPE latent, keys are rebuilt (then rotated) and values rebuilt on read.

    ``key_rank`` / ``value_rank``: latent width per token summed over the ``groups`` head
    groups (each divisible by ``groups``; ``groups`` divides num_kv_heads). ``method``:
    ``whitened`` (SVD of W·L with L Lᵀ the input Gram, Palu / SVD-LLM) or ``attention``
    (also weighted on the output side: keys by the query energy per rotary pair, values by
    o_proj's columns, so the fit minimizes the error of scores and of the block output).
    ``factor_bits``: 16, or 8 — the block's own weights (down- and up-projections, the sinks'
    k/v projections; not the biases) stored as int8 rows with one 16-bit scale each
    (:mod:`slimfx.ir.int8_rows`), which halves what the form adds to a weight budget.
    """

    kind: ClassVar[str] = "kv_lowrank"
    owns: ClassVar[tuple[str, ...]] = ("k", "v")
    key_rank: int = 64
    value_rank: int = 64
    groups: int = 1
    method: str = "attention"
    sink: int = 0
    factor_bits: int = 16

    def __post_init__(self) -> None:
        _nonneg_int("sink", self.sink)
        _check(self.factor_bits in FACTOR_BITS,
               f"factor_bits must be one of {FACTOR_BITS}, got {self.factor_bits!r}")
        _pos_int("key_rank", self.key_rank)
        _pos_int("value_rank", self.value_rank)
        _pos_int("groups", self.groups)
        _check(self.method in LOWRANK_KV_METHODS, f"method must be one of {LOWRANK_KV_METHODS}")

    def check(self, shape: AttentionShape) -> str | None:
        if (why := super().check(shape)) is not None:
            return why
        if shape.num_kv_heads % self.groups:
            return f"{self.groups} head groups do not divide num_kv_heads={shape.num_kv_heads}"
        group_dim = shape.kv_dim // self.groups
        for name in ("key_rank", "value_rank"):
            r = getattr(self, name)
            if r % self.groups:
                return f"{name} {r} is not divisible by the {self.groups} head groups"
            if r // self.groups > group_dim:
                return f"{name} {r} exceeds the {self.groups}×{group_dim} dims it factorizes"
        return None

    def needs_gram(self) -> bool:
        return True  # the k/v factors are fitted from the block's input Gram

    @property
    def latent_width(self) -> int:
        """Values the cache holds per token (keys and values, all groups)."""
        return self.key_rank + self.value_rank

    def steady_bytes_per_token(self, shape: AttentionShape) -> float:
        return float(2 * self.latent_width)

    def cache_bytes(self, shape: AttentionShape, tokens: int) -> int:
        # sink tokens keep their latent too (positions stay uniform) plus their exact K/V
        s = min(self.sink, tokens)
        return 2 * self.latent_width * tokens + s * shape.kv_bytes_per_token(16)

    def projection_weight_bytes(self, shape: AttentionShape) -> int:
        """The down- and up-projections (and the sinks' k/v projections) as stored: 2 bytes
        per entry, or with ``factor_bits=8`` a byte per code plus a 16-bit scale per row (a
        down-projection row per latent channel, an up-projection row per kv dim)."""
        entries, rows = self._own_matrices(shape)
        return 2 * entries if self.factor_bits == 16 else entries + 2 * rows

    def _own_matrices(self, shape: AttentionShape, sinks: bool = True) -> tuple[int, int]:
        """``(entries, rows)`` of the block's own weight matrices: down (latent × hidden),
        up (2 · kv_dim × rank per group) and, with ``sinks``, the sinks' k/v projections
        (2 · kv_dim × hidden)."""
        hidden, kv = shape.hidden_size, shape.kv_dim
        entries = self.latent_width * (hidden + kv // self.groups)
        rows = self.latent_width + 2 * kv
        if sinks and self.sink:  # the sinks' exact K/V need the original projections
            entries, rows = entries + 2 * hidden * kv, rows + 2 * kv
        return entries, rows

    def step_work(
        self, shape: AttentionShape, context: int, tokens: int = 1, branchless: bool = False
    ) -> AttentionWork:
        """The new tokens' latent (the down-projections), cos/sin of every cached position,
        keys rebuilt for every cached token and rotated, then attention; at one-token steps
        the values stay latent (the attention weights meet the value latent, then its
        up-projection: absorbed — an ``If`` on the call length in the exported graph),
        otherwise they are rebuilt too. The factors are read once per step. The sinks' exact
        K/V come from the original projections only while the sequence is shorter than the
        sinks on the eager path (not priced); on a branch-free runtime (``branchless``) every
        step runs them."""
        C = _step_context(context, tokens)
        return self._lowrank_work(shape, C, tokens, C, branchless)

    def _lowrank_work(
        self, shape: AttentionShape, C: int, T: int, latent_floats: int, branchless: bool
    ) -> AttentionWork:
        """:meth:`step_work` with ``latent_floats`` latent tokens read as 16-bit."""
        H, D, kv, hidden = shape.num_heads, shape.head_dim, shape.kv_dim, shape.hidden_size
        gd, rk, rv = kv // self.groups, self.key_rank, self.value_rank
        s = min(self.sink, C)
        flops = 2 * T * hidden * (rk + rv) + 2 * C * rk * gd + ROPE_OPS * C * (kv + D)
        flops += 2 * H * D * C * T  # scores
        rebuilt = C * kv + 2 * C * D  # rebuilt keys; cos and sin of every cached position
        if T == 1:  # absorbed values: weights × value latent, then v_up
            flops += 2 * H * C * (rv // self.groups) + 2 * H * (rv // self.groups) * D
        else:
            flops += 2 * C * rv * gd + 2 * H * D * C * T
            rebuilt += C * kv
        weights, rows = self._own_matrices(shape, sinks=branchless)  # read per step
        if branchless and self.sink:  # every call token's exact K/V
            flops += 4 * T * hidden * kv
        floats = latent_floats * self.latent_width + s * 2 * kv
        if self.factor_bits == 8:  # codes and row scales read, each matrix made float (w + r)
            return AttentionWork(floats, 0, 2 * weights, flops + 2 * weights, rebuilt, 9,
                                 weight_ints=weights + 2 * rows)  # fmt: skip
        return AttentionWork(floats, 0, weights, flops, rebuilt, 5)

    def short(self) -> str:
        g = f" g{self.groups}" if self.groups > 1 else ""
        sink = f" s{self.sink}" if self.sink else ""
        f8 = " f8" if self.factor_bits == 8 else ""
        return f"kv lowrank k{self.key_rank} v{self.value_rank}{g} {self.method}{sink}{f8}"


@register_decision
@dataclass(frozen=True)
class KVLatentQuantConfig(KVDecision):
    """The low-rank latent of :class:`KVLowRankConfig`, quantized: ``bits`` codes with float16
    (scale, min) pairs, ``residual`` most recent tokens 16-bit. ``axis="token"``: one pair per
    token per ``group`` latent values (``group`` must divide each head group's ranks; tokens
    leave the window one by one); ``axis="channel"``: one pair per latent channel per block of
    ``group`` tokens, like the keys of ``kv_quant`` (tokens leave the window in blocks) — the
    latent's channels carry the singular values, so their ranges differ by orders of magnitude
    and a per-channel range suits them. Both cost ``w·bits/8 + 4·w/group`` bytes per token.

    Mixed widths (``low_bits`` > 0, per-channel axis only): the last ``key_low`` / ``value_low``
    channels of each head group's key / value latent — the ones with the smallest singular
    values, the fit orders them — are stored at ``low_bits`` instead of ``bits`` (transform
    coding's bit allocation: more bits where the variance is): ``w_hi·bits/8 + w_lo·low_bits/8
    + 4·w/group`` bytes per token. At equal bytes a larger latent with a 2-bit tail beats a
    uniform 4-bit one (SmolLM2 at 1/8 of the cache, ``benchmarks/RESULTS.md``)."""

    kind: ClassVar[str] = "kv_latent_quant"
    owns: ClassVar[tuple[str, ...]] = ("k", "v")
    key_rank: int = 64
    value_rank: int = 64
    groups: int = 1
    method: str = "attention"
    bits: int = 8
    group: int = 32
    residual: int = 0
    sink: int = 0
    axis: str = "token"
    low_bits: int = 0
    key_low: int = 0
    value_low: int = 0
    factor_bits: int = 16

    def __post_init__(self) -> None:
        self.lowrank  # validates ranks, method, sink and factor_bits  # noqa: B018
        _check(self.bits in KV_BITS, f"bits must be one of {KV_BITS}, got {self.bits!r}")
        _check(self.axis in ("token", "channel"), "axis must be 'token' or 'channel'")
        _pos_int("group", self.group)
        _nonneg_int("residual", self.residual)
        _nonneg_int("key_low", self.key_low)
        _nonneg_int("value_low", self.value_low)
        if not self.low_bits:
            _check(
                self.key_low == self.value_low == 0,
                "key_low / value_low need low_bits (the width of those channels)",
            )
            return
        _check(
            self.low_bits in KV_BITS and self.low_bits < self.bits,
            f"low_bits must be one of {KV_BITS} below bits={self.bits}, got {self.low_bits!r}",
        )
        _check(self.axis == "channel", "mixed widths (low_bits) need axis='channel'")
        _check(self.key_low + self.value_low > 0, "low_bits needs key_low or value_low > 0")
        for name, low, rank in (
            ("key_low", self.key_low, self.key_rank),
            ("value_low", self.value_low, self.value_rank),
        ):
            _check(low <= rank, f"{name}={low} exceeds its latent rank {rank}")
            _check(low % self.groups == 0, f"{name}={low} is not divisible by {self.groups} groups")

    def needs_gram(self) -> bool:
        return True

    @property
    def lowrank(self) -> KVLowRankConfig:
        """The factorization this form quantizes the latent of."""
        return KVLowRankConfig(
            self.key_rank, self.value_rank, self.groups, self.method, self.sink, self.factor_bits
        )

    def check(self, shape: AttentionShape) -> str | None:
        why = self.lowrank.check(shape)
        if why:
            return why
        for role in ("key", "value"):
            per_group = getattr(self, f"{role}_rank") // self.groups
            if self.axis == "token" and per_group % self.group:
                return f"{role}_rank per head group ({per_group}) is not divisible by group {self.group}"
            for n, bits in self.segments(role):
                if n % (8 // bits):
                    return f"{role} latent: {n} channels per head group do not pack at {bits} bits"
        return None

    def segments(self, role: str) -> list[tuple[int, int]]:
        """``(channels per head group, bits)`` of the ``role`` ("key" / "value") latent, in
        channel order: the full-width channels, then the ``low_bits`` tail (empty segments
        left out)."""
        rank = getattr(self, f"{role}_rank") // self.groups
        low = getattr(self, f"{role}_low") // self.groups
        return [(n, b) for n, b in ((rank - low, self.bits), (low, self.low_bits)) if n]

    def _code_bits(self) -> int:
        """Code bits per token of the whole latent (every group, keys and values)."""
        return self.groups * sum(n * b for r in ("key", "value") for n, b in self.segments(r))

    def quantized_tokens(self, tokens: int) -> int:
        """Tokens in the quantized store at context ``tokens``."""
        n = max(0, tokens - self.sink - self.residual)
        return n if self.axis == "token" else n // self.group * self.group

    def steady_bytes_per_token(self, shape: AttentionShape) -> float:
        w = self.lowrank.latent_width
        return self._code_bits() / 8 + 2 * SCALE_BYTES * w / self.group

    def cache_bytes(self, shape: AttentionShape, tokens: int) -> int:
        q = self.quantized_tokens(tokens)
        w = self.lowrank.latent_width
        if self.axis == "token":
            quant = q * (w * self.bits // 8 + 2 * SCALE_BYTES * (w // self.group))
        else:
            quant = q * self._code_bits() // 8 + (q // self.group) * w * 2 * SCALE_BYTES
        return quant + self.lowrank.cache_bytes(shape, tokens - q)  # sinks among the 16-bit

    def projection_weight_bytes(self, shape: AttentionShape) -> int:
        return self.lowrank.projection_weight_bytes(shape)

    def step_work(
        self, shape: AttentionShape, context: int, tokens: int = 1, branchless: bool = False
    ) -> AttentionWork:
        """:class:`KVLowRankConfig`'s step over a latent whose stored tokens are dequantized
        first (written, read back: no fused kernel reads a quantized latent)."""
        C = _step_context(context, tokens)
        q = self.quantized_tokens(C)
        w = self.lowrank._lowrank_work(shape, C, tokens, C - q, branchless)
        ints = self.cache_bytes(shape, C) - 2 * w.cache_floats
        n = q * self.lowrank.latent_width
        return AttentionWork(
            w.cache_floats, ints, w.weight_floats, w.flops + DEQUANT_OPS * n, w.rebuilt + n,
            w.launches + 2, True, weight_ints=w.weight_ints,
        )  # fmt: skip

    def short(self) -> str:
        ax = " ch" if self.axis == "channel" else ""
        tail = f" k{self.key_low}v{self.value_low}@int{self.low_bits}" if self.low_bits else ""
        return f"{self.lowrank.short()} int{self.bits}{ax}{tail} g{self.group} r{self.residual}"


#: elementwise operations per dequantized code (unpack, subtract the minimum, scale)
DEQUANT_OPS = 4
#: elementwise operations per rotated key entry (two multiplies, an add, the half swap)
ROPE_OPS = 4


def _step_context(context: int, tokens: int) -> int:
    """Tokens in the cache after a step of ``tokens`` at ``context`` (at least the step)."""
    _pos_int("context", context)
    _pos_int("tokens", tokens)
    return max(context, tokens)


def _attend_flops(shape: AttentionShape, context: int, tokens: int) -> int:
    """Scores and weighted values of ``tokens`` queries over ``context`` keys, every head."""
    return 4 * shape.num_heads * shape.head_dim * context * tokens


def dense_fraction(config: KVDecision, shape: AttentionShape, context: int | None = None) -> float:
    """Bytes per token of ``config`` as a fraction of the 16-bit cache."""
    return config.bytes_per_token(shape, context) / shape.kv_bytes_per_token(16)
