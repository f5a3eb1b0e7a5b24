"""``MLAConfig``: convert one GQA/MHA attention block to multi-head latent attention (MLA).

The decision owns the block's ``k_proj`` and ``v_proj``. Per token the converted block caches

- one latent ``c = W_dkv x`` of ``rank`` values, shared by every head, from which the
  position-free ("nope") key dims and the values of every kv head are rebuilt
  (``k_nope = W_uk c``, ``v = W_uv c + b_v``), and
- the RoPE key: ``rope_pairs`` rotary frequency pairs (2 dims each) per kv head, computed
  exactly from the original ``k_proj`` rows and rotated as before. The other pairs lose their
  rotation in both query and key (partial RoPE): they become position-free and enter the latent.
  ``rope_select="per_frequency"`` keeps at most ``d/2`` entries (one per frequency), ``K·p``
  below then reads ``min(K·p, d/2)`` (``MLAConfig.rope_entries``).

Bytes (``H`` heads, ``K`` kv heads, ``d`` head_dim, ``D`` hidden, ``p`` = rope_pairs,
``r`` = rank; floating point priced at 16 bits):

- KV bytes per token: ``2·r + 2·K·2p`` (16-bit latent), or ``r + 2 + 2·K·2p`` with an int8
  latent (symmetric, one 16-bit scale per token).
- weight bytes of the owned projections: ``2·(D·K·2p + D·r + r·K·(d − 2p) + r·K·d) + 2·K·d``
  (RoPE key rows, down-projection, key and value up-projections, value bias), plus each
  kv group's map into the shared key space ``q_mix`` (``2·K·d·d`` per group, per query head
  with ``rope_fold``; ``rope_mix="pca"``'s mixing lives in it and in the RoPE rows), replacing
  the original ``2·2·D·K·d`` (+ bias). With ``factor_bits=8`` every one of those matrices (and
  ``q_mix``) is stored as int8 codes, 1 byte each, plus a 16-bit scale per row
  (:mod:`~slimfx.ir.int8_rows`); the biases stay 16-bit. The absorbed decode form
  additionally stores ``W_uk`` folded into each query head (``H·r·d``) and ``W_uv`` folded
  into the output projection (``H·r·D``): ``absorbed_extra_bytes``.
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
    "MLAConfig", "MLA_METHODS", "MLA_OBJECTIVES", "ROPE_SELECTIONS", "ROPE_MIXES", "LATENT_BITS",
    "FACTOR_BITS",
]

#: ``svd``: weight-only SVD of the norm-balanced ``[W_k_nope; W_v]`` (MHA2MLA-style, no data);
#: ``whitened``: SVD of the weighted ``[W_k_nope; W_v]`` times the square root of the input
#: Gram (uncentered); ``pca``: principal components of the weighted key/value outputs,
#: centered (the mean goes into the up-projection's bias).
MLA_METHODS = ("svd", "whitened", "pca")
#: ``kv``: key and value output errors, each block scaled to the same calibration norm;
#: ``attention``: key error seen through the queries that read it (the group's query Gram),
#: value error seen through ``o_proj`` (its head blocks' Gram), then norm-balanced.
MLA_OBJECTIVES = ("kv", "attention")
#: how the kept RoPE pairs are chosen per kv head: ``norm`` ranks pairs by the calibration mean
#: ‖q_pair‖·‖k_pair‖ (summed over the group's query heads); ``high_freq`` keeps the fastest
#: rotating pairs; ``norm_freq`` weights the ``norm`` score by how far the pair rotates over
#: the calibration distances (1 − mean cos(θ·Δ)): a slow pair barely rotates, so dropping its
#: rotation costs little whatever its norm.
#: ``norm_attn`` weights the ``norm`` score by 1 − |E_w e^{iθΔ}|², the spread of the pair's
#: rotation under the distances the original heads attend over (``w`` measured on calibration
#: text): what is left after ``rope_fold`` replaces the rotation by its mean.
#: ``per_frequency`` keeps one entry per frequency, the first mixed component (with
#: ``rope_mix="pca"``, the one holding most of the frequency's key energy) of the ``K·p``
#: fastest frequencies (all ``head_dim / 2`` at most): every layer at the same frequencies, a
#: geometric prefix of the schedule — plain RoPE with another base, which a DeepSeek-V3
#: checkpoint served by engines that accept only that can express (``forms/mla/deepseek``).
ROPE_SELECTIONS = ("norm", "high_freq", "norm_freq", "norm_attn", "per_frequency")
#: ``none``: an entry is one kv head's pair; ``pca`` (RoRoPE-style): the K pairs of one
#: frequency are first mixed by the eigenvectors of their calibrated second moment.
ROPE_MIXES = ("none", "pca")
LATENT_BITS = (16, 8)
#: the converted block's own projections: 16-bit, or int8 rows (one scale per output row)
FACTOR_BITS = (16, 8)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@register_decision
@dataclass(frozen=True)
class MLAConfig(Decision):
    """Latent attention for one attention site (see the module docstring for the algebra).

    ``rank``: latent width r. ``rope_pairs``: RoPE pairs kept, per kv head on average (K·p
    entries in all, one RoPE key shared by every query head). ``method`` / ``objective`` /
    ``rope_select`` / ``rope_mix``: see ``MLA_METHODS``, ``MLA_OBJECTIVES``,
    ``ROPE_SELECTIONS``, ``ROPE_MIXES``; the defaults are the best measured on SmolLM2
    (``benchmarks/RESULTS.md``). ``rope_fold``: a dropped pair's query is multiplied by
    the mean rotation E_w[R(θΔ)] over the distances its head attends to (calibrated), instead of
    losing its rotation outright — a fixed 2×2 map per head and pair, folded into the query. ``refine``: refit the up-projections by closed-form least squares on
    calibration activations (inputs seen by the converted model when the caller gives them).
    ``latent_bits``: 16 or 8 (int8 latent cache, one 16-bit scale per token).
    ``factor_bits``: 16 or 8 (the block's own projections stored as int8 rows).
    ``rope_share``: the kept entries are chosen once for every layer converted with it (each
    layer's scores normalized and summed; ``convert_model``), which then carries them as
    ``rope_kept`` (entries ``i·K + j``: frequency ``i``, component ``j``; ``K·rope_pairs`` of
    them): every layer at the same frequencies, so a DeepSeek-V3 export needs no padding.
    """

    kind: ClassVar[str] = "mla"
    #: the projections (roles) the conversion replaces
    owns: ClassVar[tuple[str, ...]] = ("k", "v")
    rank: int = 64
    rope_pairs: int = 8
    method: str = "pca"
    objective: str = "kv"
    rope_select: str = "norm_freq"
    rope_mix: str = "pca"
    rope_fold: bool = False
    refine: bool = False
    latent_bits: int = 16
    factor_bits: int = 16
    rope_share: bool = False
    rope_kept: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.rope_kept is not None:  # a plan's JSON gives a list
            kept = tuple(self.rope_kept)
            _check(
                all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in kept)
                and len(set(kept)) == len(kept),
                f"MLAConfig.rope_kept must be distinct entry indices ≥ 0, got {self.rope_kept!r}",
            )
            object.__setattr__(self, "rope_kept", tuple(sorted(kept)))
            _check(self.rope_select != "per_frequency",
                   "MLAConfig.rope_kept names the entries: rope_select='per_frequency' chooses "
                   "them itself")
        _check(
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
            f"MLAConfig.rank must be an int ≥ 1, got {self.rank!r}",
        )
        _check(
            isinstance(self.rope_pairs, int) and self.rope_pairs >= 0,
            f"MLAConfig.rope_pairs must be an int ≥ 0, got {self.rope_pairs!r}",
        )
        _check(self.method in MLA_METHODS, f"MLAConfig.method must be one of {MLA_METHODS}")
        _check(
            self.objective in MLA_OBJECTIVES,
            f"MLAConfig.objective must be one of {MLA_OBJECTIVES}",
        )
        _check(
            self.rope_select in ROPE_SELECTIONS,
            f"MLAConfig.rope_select must be one of {ROPE_SELECTIONS}",
        )
        _check(self.rope_mix in ROPE_MIXES, f"MLAConfig.rope_mix must be one of {ROPE_MIXES}")
        _check(isinstance(self.refine, bool), "MLAConfig.refine must be a bool")
        _check(isinstance(self.rope_fold, bool), "MLAConfig.rope_fold must be a bool")
        _check(isinstance(self.rope_share, bool), "MLAConfig.rope_share must be a bool")
        _check(not (self.rope_share and self.rope_select == "per_frequency"),
               "rope_select='per_frequency' keeps the same entries in every layer already: "
               "rope_share has nothing to choose")
        _check(self.latent_bits in LATENT_BITS, f"MLAConfig.latent_bits must be in {LATENT_BITS}")
        _check(self.factor_bits in FACTOR_BITS, f"MLAConfig.factor_bits must be in {FACTOR_BITS}")

    @property
    def needs_data(self) -> bool:
        """Whether fitting this config needs calibration statistics."""
        return (
            self.method != "svd" or self.rope_select != "high_freq" or self.refine
            or self.rope_mix != "none" or self.rope_fold
        )

    # -- validity against a site -----------------------------------------------------------
    def reason_invalid(self, shape: AttentionShape) -> str | None:
        """Why this config cannot convert ``shape`` (``None`` when it can)."""
        if shape.rope_dim == 0:
            return "no RoPE found: MLA keeps RoPE on a decoupled key; a NoPE block is unsupported"
        if shape.rope_dim != shape.head_dim:
            return (
                f"unsupported attention variant: RoPE on {shape.rope_dim} of {shape.head_dim} "
                "head dims (partial rotary) is not handled"
            )
        if shape.sliding_window is not None:
            return "sliding-window attention is unsupported (the latent cache keeps every token)"
        if self.rope_select == "per_frequency":
            if self.rope_mix != "pca":
                return ("rope_select='per_frequency' keeps each frequency's first mixed "
                        "component: it needs rope_mix='pca'")
        elif 2 * self.rope_pairs > shape.head_dim:
            return f"rope_pairs={self.rope_pairs} exceeds head_dim/2={shape.head_dim // 2}"
        if self.rope_kept is not None:
            K, half = shape.num_kv_heads, shape.head_dim // 2
            top = max(self.rope_kept, default=-1)
            if len(self.rope_kept) != K * self.rope_pairs or top >= K * half:
                return (f"rope_kept holds {len(self.rope_kept)} entries up to {top}: this "
                        f"block keeps K·rope_pairs = "
                        f"{K * self.rope_pairs} of its {K * half} entries")
        full = self.full_rank(shape)
        if self.rank > full:
            return f"rank {self.rank} exceeds the full latent rank {full} of this block"
        return None

    def rope_entries(self, num_kv_heads: int, head_dim: int) -> int:
        """RoPE entries (pairs) the RoPE key keeps: ``K·rope_pairs`` (at most ``head_dim / 2``
        with ``rope_select="per_frequency"``, one per frequency)."""
        if self.rope_select == "per_frequency":
            return min(num_kv_heads * self.rope_pairs, head_dim // 2)
        return num_kv_heads * self.rope_pairs

    def full_rank(self, shape: AttentionShape) -> int:
        """The rank at which the latent loses nothing: min(hidden, K·d − 2N + K·d) with N the
        kept RoPE entries."""
        n2 = 2 * self.rope_entries(shape.num_kv_heads, shape.head_dim)
        return min(shape.hidden_size, 2 * shape.num_kv_heads * shape.head_dim - n2)

    # -- bytes ------------------------------------------------------------------------------
    def kv_bytes_per_token(self, shape: AttentionShape) -> int:
        """Exact bytes the latent cache holds per token of context for this block."""
        rope = 2 * 2 * self.rope_entries(shape.num_kv_heads, shape.head_dim)
        latent = 2 * self.rank if self.latent_bits == 16 else self.rank + 2
        return latent + rope

    def bytes_per_token(self, shape: AttentionShape, context: int | None = None) -> float:
        """Cache bytes per token (the same at every context: no 16-bit window, no sink)."""
        return float(self.kv_bytes_per_token(shape))

    def cache_bytes(self, shape: AttentionShape, tokens: int) -> int:
        """Exact bytes one sequence's latent cache of this block holds at ``tokens``."""
        return self.kv_bytes_per_token(shape) * tokens

    def step_work(
        self, shape: AttentionShape, context: int, tokens: int = 1, branchless: bool = False
    ) -> AttentionWork:
        """One attention step of one sequence (``tokens`` new, ``context`` cached after it).
        Every converted projection (``q_mix``, RoPE rows, down, key/value up) is read once;
        only the new tokens' queries and RoPE key are rotated (the cache holds rotated keys);
        one-token steps attend over the latent directly (absorbed: ``q_lat = W_ukᵀ q'``,
        scores ``q_rope k_ropeᵀ + q_lat cᵀ`` with every head a row of one product over the
        shared cache, the context stays r wide until ``v_up``: nothing rebuilt); longer steps
        rebuild every cached token's keys and values (unabsorbed). An int8 latent is
        dequantized whole every step (the cache layer does it), and int8 factors every step too
        (their codes read, the float matrices written and read back: no fused int8 kernel).
        ``q_proj`` and ``o_proj`` stay linear sites of their own; ``branchless`` changes nothing
        here."""
        if not (isinstance(context, int) and isinstance(tokens, int) and context >= 1
                and tokens >= 1):
            raise ValueError(f"context and tokens are ints ≥ 1, got {context!r}, {tokens!r}")
        C, T = max(context, tokens), tokens
        D, H, K, d, r = (
            shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim, self.rank
        )
        n2 = 2 * self.rope_entries(K, d)
        nope = K * d - n2
        weights = self.q_mix_heads(shape) * K * d * d + D * n2 + D * r + r * nope + r * K * d
        flops = 2 * T * (H * d * K * d + D * n2 + D * r) + 4 * T * (H + 1) * n2  # ...; RoPE
        weight_ints, launches = 0, 6
        if self.factor_bits == 8:  # codes and row scales read, each matrix rebuilt (r + w)
            weight_ints = weights + 2 * self._factor_rows(shape)
            flops += 2 * weights
            weights, launches = 2 * weights, launches + 10
        if T == 1:
            flops += 2 * H * nope * r + 2 * H * C * (n2 + r) + 2 * H * C * r + 2 * H * r * d
            rebuilt = 0
        else:
            flops += 2 * C * r * (nope + K * d) + 2 * H * T * C * (K * d + d)
            rebuilt = C * (2 * K * d)
        int8 = self.latent_bits == 8
        floats = C * (n2 + (0 if int8 else r))
        ints = self.cache_bytes(shape, C) - 2 * floats
        if int8:  # the cache layer dequantizes the whole latent each step
            rebuilt, flops = rebuilt + C * r, flops + 4 * C * r
        return AttentionWork(
            floats, ints, weights, flops, rebuilt, launches, int8, not int8, weight_ints
        )

    def owned_weight_bytes(self, shape: AttentionShape, bias: bool = False) -> int:
        """Reference bytes of the original ``k_proj`` + ``v_proj`` this decision replaces."""
        return 2 * 2 * shape.hidden_size * shape.kv_dim + (2 * 2 * shape.kv_dim if bias else 0)

    def q_mix_heads(self, shape: AttentionShape) -> int:
        """Maps ``q_mix`` stores: one per kv group (every query head of a group reads the
        group's columns of the key-space map), one per query head with ``rope_fold`` (a
        per-head rotation folded in)."""
        return shape.num_heads if self.rope_fold else shape.num_kv_heads

    def _factor_rows(self, shape: AttentionShape) -> int:
        """Rows of the converted block's matrices (one int8 scale each with ``factor_bits=8``):
        RoPE key rows, down-projection, key and value up-projections, ``q_mix``."""
        K, d, r = shape.num_kv_heads, shape.head_dim, self.rank
        n2 = 2 * self.rope_entries(K, d)
        return n2 + r + (K * d - n2) + K * d + self.q_mix_heads(shape) * K * d

    def converted_weight_bytes(self, shape: AttentionShape, bias: bool = False) -> int:
        """Reference bytes of what the converted block stores besides q_proj/o_proj (unabsorbed
        form): the RoPE key rows (``2N × D``, N = K·p; their bias with ``bias``), the
        down-projection, the key and value up-projections, the value bias, each query head's
        map into the mixed key space ``q_mix`` (``S × K·d × d``, one map per kv group — S = K —
        or with ``rope_fold`` per query head — S = H; the RoRoPE mixing lives in it
        and in the RoPE rows) at 16 bits, and the N kept frequencies' indices at 2 bytes each —
        the module's tensors, so priced bytes = stored bytes (``tests/forms/mla``). With
        ``factor_bits=8`` the matrices are int8 codes (1 byte) plus a 16-bit scale per row."""
        D, K, d, r = shape.hidden_size, shape.num_kv_heads, shape.head_dim, self.rank
        n2 = 2 * self.rope_entries(K, d)
        S = self.q_mix_heads(shape)
        matrices = D * n2 + D * r + r * (K * d - n2) + r * K * d + S * K * d * d
        biases = K * d + (n2 if bias else 0)
        if self.factor_bits == 8:
            stored = matrices + 2 * self._factor_rows(shape) + 2 * biases
        else:
            stored = 2 * (matrices + biases)
        return stored + 2 * (n2 // 2)

    def weight_bytes_delta(self, shape: AttentionShape, bias: bool = False) -> int:
        """Weight bytes added (positive) or removed (negative) by the conversion."""
        return self.converted_weight_bytes(shape, bias) - self.owned_weight_bytes(shape, bias)

    def absorbed_extra_bytes(self, shape: AttentionShape) -> int:
        """Bytes of the absorbed decode matrices: ``W_ukᵀ`` composed with each query head's
        key-space map (``H·r·d``) and ``o_proj·W_uv`` per head (``H·r·D``)."""
        H, d, r, D = shape.num_heads, shape.head_dim, self.rank, shape.hidden_size
        return 2 * (H * r * d + H * r * D)

    def costs(self, shape: AttentionShape, bias: bool = False) -> dict[str, int]:
        """The budget vector at a site of ``shape``: ``WEIGHT_BYTES`` of the converted k/v
        projections the decision owns (:meth:`weight_bytes`) and ``KV_BYTES_PER_TOKEN``. The
        latent cache has no 16-bit window and no sink, so its bytes per token are the same at
        every context (no steady-state approximation); ``bias`` is accepted for the
        ``Decision.costs`` signature (the value bias is always counted)."""
        return {
            WEIGHT_BYTES: self.weight_bytes(shape),
            KV_BYTES_PER_TOKEN: self.kv_bytes_per_token(attention_shape(self, shape)),
        }

    def weight_bytes(self, shape: AttentionShape) -> int:
        """Reference bytes of the converted projections (:meth:`converted_weight_bytes`); a
        ``TypeError`` for a linear shape: an MLA decision prices attention sites."""
        return self.converted_weight_bytes(attention_shape(self, shape))

    def short(self) -> str:
        q = " int8" if self.latent_bits == 8 else ""
        q += " f8" if self.factor_bits == 8 else ""
        ref = ("+ls" if self.refine else "") + ("" if self.rope_mix == "none" else " rorope")
        ref += " fold" if self.rope_fold else ""
        ref += " shared" if self.rope_share or self.rope_kept is not None else ""
        return (
            f"mla r={self.rank} rope={self.rope_pairs}p/{self.rope_select} "
            f"{self.method}/{self.objective}{ref}{q}"
        )
