"""Weight-only integer quantization: round-to-nearest (RTN) and GPTQ, in the stored format.

Grid, per (row n, group g) with group g covering columns [g·G, (g+1)·G), maxq = 2^bits − 1:

- asymmetric:  lo = min(0, min w), hi = max(0, max w),  s = (hi − lo) / maxq,
               z = clamp(round(−lo / s), 0, maxq)  (an integer),  q = clamp(round(w/s) + z, 0, maxq)
- symmetric:   s = max|w| / (2^(bits−1) − 1),  q = clamp(round(w/s) + o, 0, maxq),
               o = 2^(bits−1) (8 for int4, 128 for int8), no ``zeros`` stored
- dequantized: ŵ = (q − z) · s            (z = o when symmetric)

The range is widened to contain 0 so the integer zero point always lies in [0, maxq]. An
all-zero group has s = 0 and gets s = 1 (its codes then dequantize to exact zeros). The scale
is rounded to its storage dtype (the weight's) *before* the codes are computed, so
``dequantize`` reproduces exactly the grid the codes were chosen on.

Stored tensors (the formats of ``slimfx.formats``): ``qweight`` uint8, each row's codes packed
as a little-endian bit stream (int4 two per byte, column j in byte j//2, low nibble for even j:
ONNX MatMulNBits order; int8 one per byte; int2 four per byte; int3 eight per three bytes);
``scales`` (out × n_groups) in the weight dtype; ``zeros`` uint8 (out × n_groups) only when
asymmetric. bits 2 and 3 are packed and priced honestly but have no runtime op
(``LinearToQuant`` rejects them): they serve error estimates.

Caveat for weights that already lie on a 4-bit grid with a *float* offset (GGUF Q4_1: w = d·q +
m per 32-block, m arbitrary): an integer zero point reproduces such a block only when m/d is an
integer; otherwise every weight of the block is off by the same m − d·round(m/d) (at most d/2).
Re-quantizing a Q4_1 model at g32 is therefore not lossless in this format; on a grid with an
integer offset (what this module itself produces) it is exact.

GPTQ (``quantize_gptq``) quantizes columns in order and pushes each column's rounding error onto
the columns not yet quantized through the upper Cholesky factor of the damped inverse Gram
matrix, which minimizes the output error ‖(W − Ŵ)Xᵀ‖² one column at a time. slimfx uses GPTQ
rather than AWQ because GPTQ uses the calibration Gram matrix directly, needs no per-input-
channel activation scale at run time (AWQ's scale must be folded into the op producing the
linear's input, which a per-linear rewrite cannot always do: residual streams, shared inputs),
and its output is the same plain (q, s, z) MatMulNBits format as RTN.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from slimfx import formats
from slimfx.formats import symmetric_offset
from slimfx.planning.configs import Decision, QuantConfig

__all__ = [
    "quantize_rtn",
    "quantize_gptq",
    "quantize_gptq_many",
    "dequantize",
    "pack_int4",
    "unpack_int4",
    "group_width",
    "symmetric_offset",
]


def group_width(in_features: int, bits: int, group_size: int | None) -> int:
    """The group width G (``in_features`` when per-channel), after checking the shape:
    ValueError when ``in_features`` is not a multiple of ``group_size``, or not a whole number
    of packed chunks (even for int4, a multiple of 4 for int2, of 8 for int3)."""
    if bits not in formats.CODE_BITS:
        raise ValueError(f"bits must be one of {formats.CODE_BITS}, got {bits}")
    G = in_features if group_size is None else group_size
    if G <= 0 or in_features % G:
        raise ValueError(f"in_features {in_features} is not a multiple of group size {G}")
    if bits == 4 and in_features % 2:
        raise ValueError(f"int4 packs two codes per byte: in_features {in_features} is odd")
    chunk = formats.codes_per_chunk(bits)
    if in_features % chunk:
        raise ValueError(
            f"int{bits} packs {chunk} codes in {chunk * bits // 8} bytes: in_features "
            f"{in_features} is not a multiple of {chunk}"
        )
    return G


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes (out × in, values 0..15) → uint8 (out × ceil(in/2)) in the int4 format of
    ``slimfx.formats`` (column j in byte j//2, low nibble for even j; an odd ``in`` gets a zero
    high nibble in its last byte)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"int4 codes must be uint8, got {codes.dtype}")
    return formats.pack_codes(codes, 4)


def unpack_int4(packed: Tensor, in_features: int | None = None) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 (out × ceil(in/2)) → uint8 codes (out × in);
    ``in_features`` defaults to twice the packed width."""
    k = 2 * packed.shape[-1] if in_features is None else in_features
    return formats.unpack_codes(packed, 4, k).contiguous()


def _grid(
    Wg: Tensor, bits: int, symmetric: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Scale (as stored, in ``dtype``), the same scale in fp32 and the zero point (fp32,
    integer-valued) for each row of groups ``Wg`` (… × G, fp32) over its last dim."""
    maxq = (1 << bits) - 1
    if symmetric:
        s = Wg.abs().amax(-1) / ((1 << (bits - 1)) - 1)
    else:
        lo = Wg.amin(-1).clamp(max=0.0)
        hi = Wg.amax(-1).clamp(min=0.0)
        s = (hi - lo) / maxq
    s = torch.where(s > 0, s, torch.ones_like(s))
    stored = s.to(dtype)
    s32 = stored.to(torch.float32)
    bad = ~(s32 > 0) | ~torch.isfinite(s32)  # underflow/overflow in a narrow scale dtype
    if bad.any():
        s32 = torch.where(bad, torch.ones_like(s32), s32)
        stored = s32.to(dtype)
    if symmetric:
        z = torch.full_like(s32, float(symmetric_offset(bits)))
    else:
        z = torch.round(-lo / s32).clamp(0, maxq)
    return stored, s32, z


def _codes(W: Tensor, s: Tensor, z: Tensor, bits: int) -> Tensor:
    """Codes clamp(round(w/s) + z, 0, maxq) as fp32 (s and z broadcast against W)."""
    return (torch.round(W / s) + z).clamp(0, (1 << bits) - 1)


def _pack(
    codes: Tensor, stored: Tensor, zeros: Tensor, bits: int, symmetric: bool
) -> dict[str, Tensor]:
    qweight = formats.pack_codes(codes.to(torch.uint8), bits)
    out = {"qweight": qweight, "scales": stored.contiguous()}
    if not symmetric:
        out["zeros"] = zeros.to(torch.uint8).contiguous()
    return out


def _scale_dtype(weight: Tensor) -> torch.dtype:
    if not weight.is_floating_point():
        raise TypeError(f"weight dtype {weight.dtype} is not floating point")
    return weight.dtype


def quantize_rtn(
    weight: Tensor, bits: int, group_size: int | None, symmetric: bool
) -> dict[str, Tensor]:
    """Round-to-nearest quantization of ``weight`` (out × in) to the stored format:
    ``{"qweight", "scales"}`` plus ``"zeros"`` when asymmetric (see the module docstring).
    ``group_size=None`` is per-channel (one group per row)."""
    dtype = _scale_dtype(weight)
    out_f, in_f = weight.shape
    G = group_width(in_f, bits, group_size)
    Wg = weight.detach().to(torch.float32).reshape(out_f, in_f // G, G)
    stored, s, z = _grid(Wg, bits, symmetric, dtype)
    codes = _codes(Wg, s[..., None], z[..., None], bits).reshape(out_f, in_f)
    return _pack(codes, stored, z, bits, symmetric)


def dequantize(
    tensors: dict[str, Tensor],
    bits: int,
    group_size: int | None,
    symmetric: bool,
    in_features: int,
) -> Tensor:
    """The dense (out × in) weight (q − z)·s, computed in fp32 and returned in the scales'
    dtype. ``zeros`` is ignored when ``symmetric`` (the offset 2^(bits−1) is used)."""
    scales = tensors["scales"]
    G = in_features if group_size is None else group_size
    if in_features % G:
        raise ValueError(f"in_features {in_features} is not a multiple of group size {G}")
    zeros = None if symmetric else tensors["zeros"]
    W = formats.dequantize(tensors["qweight"], scales, zeros, bits, G, in_features)
    return W.to(scales.dtype)


_DAMP_GROWTH = (1.0, 10.0, 100.0, 1000.0)


def _reverse_in_place(H: Tensor, chunk: int = 1 << 16) -> Tensor:
    """``H.flip(0, 1)`` written into ``H``'s own memory (a contiguous matrix reversed as one
    flat array is the matrix flipped along both axes), a ``chunk`` of elements at a time."""
    flat = H.view(-1)
    n = flat.numel()
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        front = flat[a:b].clone()
        flat[a:b] = flat[n - b : n - a].flip(0)
        flat[n - b : n - a] = front.flip(0)
    return H


def _flipped_symmetric(gram: Tensor, device: torch.device) -> tuple[Tensor, float]:
    """``(J H J, mean(diag H))`` with H = ½(G + Gᵀ) in float64, its dead channels (diagonal
    ≤ 0) given diagonal 1 and J the reversal, as one new matrix: the flip is done in place."""
    G = gram.detach().to(device=device, dtype=torch.float64)
    H = G + G.T  # (one temporary fewer than 0.5 * (H + H.T) on a clone; the same bits)
    del G
    H.mul_(0.5)
    dead = H.diagonal() <= 0
    if dead.any():
        H[dead, dead] = 1.0
    mean_diag = float(H.diagonal().mean())  # (a strided diagonal: its own summation order)
    return _reverse_in_place(H).add_(0.0), mean_diag


def _inverse_cholesky_upper(
    gram: Tensor, damp: float, device: torch.device
) -> tuple[Tensor, float]:
    """``(U, λ·mean(diag H))``: the upper Cholesky factor U (float32) of (H + λ·mean(diag H)·I)⁻¹
    (Uᵀ U = H⁻¹) for H = ½(G + Gᵀ) with dead channels given diagonal 1 (float64 throughout),
    and the ridge added; λ starts at ``damp`` and grows ×10 while the damped matrix is not
    numerically positive definite.

    Computed without forming H⁻¹: with J the reversal permutation and J H J = L Lᵀ,
    H⁻¹ = J L⁻ᵀ L⁻¹ J = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper triangular with a positive
    diagonal, hence the Cholesky factor (one factorization and one triangular solve).

    Memory: besides ``gram``, at most two n×n float64 matrices live at once — J H J (flipped in
    place, damped on its diagonal in place, factorized in place into L) and the solve's
    right-hand side, an identity in column-major order that the solve overwrites with L⁻¹
    (the layout ``solve_triangular`` returns: the same bits as a solve into a new matrix) —
    and U is flipped after its cast to float32 (casting and flipping commute). ``+ 0.0`` on
    the whole matrix keeps the bits of ``H + λ·I`` (a −0.0 entry becomes +0.0 there too)."""
    flipped: Tensor | None
    flipped, mean_diag = _flipped_symmetric(gram, device)
    n = flipped.shape[0]
    diag0 = flipped.diagonal().clone()
    info = torch.empty((), dtype=torch.int32, device=device)
    for growth in _DAMP_GROWTH:
        if flipped is None:  # rare: the last damping failed; rebuild
            flipped = _flipped_symmetric(gram, device)[0]
        flipped.diagonal().copy_(diag0 + (damp * growth) * mean_diag)
        # L, in place: the matrix is symmetric, so its column-major view (the layout LAPACK
        # factorizes in) holds the same values and the factorization needs no copy
        flipped = flipped.T
        torch.linalg.cholesky_ex(flipped, out=(flipped, info))
        if int(info) != 0:
            flipped = None
            continue
        U = torch.eye(n, dtype=torch.float64, device=device).T  # column-major identity
        torch.linalg.solve_triangular(flipped, U, upper=False, out=U)
        flipped = None
        if torch.isfinite(U).all():
            return U.to(torch.float32).flip(0, 1), (damp * growth) * mean_diag
        del U
    raise ValueError(
        f"Gram matrix is not positive definite even with damping {damp * _DAMP_GROWTH[-1]:g}"
    )


#: (weakref to the caller's Gram, its version counter, damp, device) → (U, ridge); see
#: _gptq_factor.
_FACTOR_CACHE: list[tuple[weakref.ref[Tensor], int, float, torch.device, tuple[Tensor, float]]] = []
_FACTOR_CACHE_SIZE = 4


def _gptq_factor(gram: Tensor, damp: float, device: torch.device) -> Tensor:
    """U (float32) of the damped inverse of ``gram`` (:func:`_gptq_factor_and_ridge`)."""
    return _gptq_factor_and_ridge(gram, damp, device)[0]


def _gptq_factor_and_ridge(gram: Tensor, damp: float, device: torch.device) -> tuple[Tensor, float]:
    """``(U, ridge)``: U (float32) of the damped inverse of ``gram`` with dead channels given
    diagonal 1, as the GPTQ loop uses it, and the ridge added to the diagonal; cached per Gram
    *object*.

    Callers that quantize several weights (or the same weight several times: LQ-LoRA's
    alternations, the cost model's group sizes and references) against one Gram would
    otherwise refactorize it each time (≈35% of a GPTQ call on SmolLM2's shapes). The key is
    the tensor's identity (a weak reference, so a freed Gram never matches a new one at the
    same address) plus its version counter (an in-place edit invalidates the entry), ``damp``
    and the device; the last few Grams are kept. Inference-mode tensors have no version
    counter and are not cached."""
    try:
        version = gram._version
    except RuntimeError:  # inference tensor
        version = None
    if version is not None:
        for ref, ver, d, dev, U in _FACTOR_CACHE:
            if ref() is gram and ver == version and d == damp and dev == device:
                return U
    out = _inverse_cholesky_upper(gram, damp, device)
    if version is not None:
        live = [e for e in _FACTOR_CACHE if e[0]() is not None]
        _FACTOR_CACHE[:] = live[len(live) - (_FACTOR_CACHE_SIZE - 1) :] if live else []
        _FACTOR_CACHE.append((weakref.ref(gram, _forget), version, damp, device, out))
    return out


def _forget(ref: weakref.ref[Tensor]) -> None:
    """A cached Gram was freed: its factors go too (nothing can look them up any more, and
    an n×n factor of the last fitted site would otherwise stay until four more are cached)."""
    _FACTOR_CACHE[:] = [e for e in _FACTOR_CACHE if e[0] is not ref]


def quantize_gptq(
    weight: Tensor,
    gram: Tensor | None,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    damp: float = 0.01,
    block: int = 128,
) -> dict[str, Tensor]:
    """GPTQ error-compensating rounding of ``weight`` (out × in) given the input Gram matrix
    ``gram`` = XᵀX (in × in); same output format as :func:`quantize_rtn`.

    Columns are quantized in order. With U the upper Cholesky factor of (G + λ·mean(diag G)·I)⁻¹
    (λ = ``damp``), quantizing column j with error e = (w_j − ŵ_j) / U[j, j] updates every later
    column k by w_k −= e · U[j, k]; updates are applied within blocks of ``block`` columns and
    lazily to the rest. Each group's scale and zero are computed at its first column from the
    current (already updated) weights of the whole group. Dead input channels (zero Gram
    diagonal: the input is always 0 there) get diagonal 1 and a zero weight column, so they
    neither receive nor spread error. ``gram=None`` falls back to RTN (with an identity Gram
    GPTQ is exactly RTN).
    """
    return quantize_gptq_many(weight, gram, bits, [group_size], symmetric, damp, block)[0]


def quantize_gptq_many(
    weight: Tensor,
    gram: Tensor | None,
    bits: int,
    group_sizes: Sequence[int | None],
    symmetric: bool,
    damp: float = 0.01,
    block: int = 128,
    losses: list[tuple[float, float]] | None = None,
) -> list[dict[str, Tensor]]:
    """:func:`quantize_gptq` for several group sizes at once, one result per group size.

    ``losses``: when given (and no input channel is dead), filled per group size with
    ``(tr(E H Eᵀ), ridge)`` — GPTQ's own loss Σⱼ ‖errⱼ‖², which equals the output error of
    E = W − Ŵ under H = G + ridge·I exactly (E = Err·U and U H Uᵀ = I), so tr(E G Eᵀ) is that
    minus ridge·‖E‖²_F with no in × in product (``cost.family_quant`` prices with it).

    GPTQ treats rows independently given U, so the copies of W for the different group sizes
    are stacked as extra rows and share one factorization and one column loop (the loop's
    per-column overhead, not its arithmetic, dominates on CPU for SmolLM2-sized layers)."""
    if gram is None:
        return [quantize_rtn(weight, bits, g, symmetric) for g in group_sizes]
    dtype = _scale_dtype(weight)
    out_f, in_f = weight.shape
    widths = [group_width(in_f, bits, g) for g in group_sizes]
    if tuple(gram.shape) != (in_f, in_f):
        raise ValueError(f"gram shape {tuple(gram.shape)} does not match in_features {in_f}")
    if block < 1:
        raise ValueError(f"block must be ≥ 1, got {block}")
    dev = weight.device
    W = weight.detach().to(torch.float32).clone()
    dead = gram.detach().diagonal().to(dev) <= 0
    if dead.any():
        W[:, dead] = 0.0
    U, ridge = _gptq_factor_and_ridge(gram, damp, dev)

    k = len(widths)
    rows = [slice(c * out_f, (c + 1) * out_f) for c in range(k)]
    scales = [torch.empty(in_f // G, out_f, dtype=dtype, device=dev) for G in widths]
    zeros = [torch.empty(in_f // G, out_f, dtype=torch.float32, device=dev) for G in widths]
    # Work on the stacked Wᵀ (in × k·out): one column of W is one contiguous row.
    Wt = W.T.repeat(1, k).contiguous()
    codes = torch.empty_like(Wt)
    maxq = (1 << bits) - 1
    s = torch.empty(k * out_f, dtype=torch.float32, device=dev)
    z = torch.empty_like(s)
    loss = [0.0] * k
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        diag = U1.diagonal().tolist()  # the same float32 values, read once per block
        for i in range(i2 - i1):
            j = i1 + i
            for c, G in enumerate(widths):
                if j % G:
                    continue
                # the group's current weights: the in-block part is W1, the rest is Wt[i2:]
                # minus the not-yet-applied updates from this block's columns < i
                r = rows[c]
                head = W1[i : i + G, r]
                if j + G > i2:
                    tail = Wt[i2 : j + G, r] - U[i1 : i1 + i, i2 : j + G].T @ Err1[:i, r]
                    head = torch.cat((head, tail), dim=0)
                stored, s[r], z[r] = _grid(head.T, bits, symmetric, dtype)
                scales[c][j // G] = stored
                zeros[c][j // G] = z[r]
            # _codes and the error, written in place into their rows (the same operations in
            # the same order as `_codes(w, s, z)` and `(w − (q − z)·s) / U[j, j]`: the same
            # bits, fewer temporaries and copies in this per-column loop)
            w, q, err = W1[i], codes[j], Err1[i]
            torch.div(w, s, out=q).round_().add_(z).clamp_(0, maxq)
            torch.sub(q, z, out=err).mul_(s)
            torch.sub(w, err, out=err).div_(diag[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
        if losses is not None:
            for c in range(k):
                loss[c] += float(Err1[:, rows[c]].square().sum(dtype=torch.float64))
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)
    if losses is not None and not dead.any():
        losses[:] = [(v, ridge) for v in loss]
    return [_pack(codes[:, rows[c]].T, scales[c].T, zeros[c].T, bits, symmetric) for c in range(k)]


def _in_features(decision: QuantConfig, tensors: dict[str, Tensor]) -> int:
    """The weight's columns from its packed codes (:func:`group_width` made them whole chunks,
    so the packed width determines them)."""
    return tensors["qweight"].shape[1] * 8 // decision.bits


def factorize_quant(weight: Tensor, decision: Decision, gram: Tensor | None) -> dict[str, Tensor]:
    """The ``quant`` form's tensors: round-to-nearest, or GPTQ with the Gram matrix."""
    assert isinstance(decision, QuantConfig)
    d = decision
    if d.method == "gptq":
        return quantize_gptq(weight, gram, d.bits, d.group_size, d.symmetric)
    return quantize_rtn(weight, d.bits, d.group_size, d.symmetric)


def reconstruct_quant(decision: Decision, tensors: dict[str, Tensor]) -> Tensor:
    """The dense weight the ``quant`` form's tensors represent."""
    assert isinstance(decision, QuantConfig)
    d = decision
    return dequantize(tensors, d.bits, d.group_size, d.symmetric, _in_features(d, tensors))
