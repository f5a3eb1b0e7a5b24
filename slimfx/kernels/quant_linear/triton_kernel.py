"""Triton weight-only int4/int8 linear, dequantization fused into the matmul.

    y[m, n] = Σ_k x[m, k] · (q[n, k] − z[n, k // G]) · s[n, k // G]  + b[n]

Layout read (``slimfx.numerics``): ``qweight`` uint8 (N × ceil(K/2)) for int4 — column ``k`` in
byte ``k // 2``, low nibble for even ``k`` — or (N × K) for int8; ``scales`` (N × n_groups) in
the weight dtype; ``zeros`` uint8 (N × n_groups) or absent (symmetric: offset 8 / 128);
``group_size=None`` (or one group covering K) is per-channel.

Each program loads packed bytes, unpacks the nibbles in registers (``tl.interleave`` of the low
and high nibbles restores column order), subtracts the zero point and applies one scale per
group (the tile is viewed as [BLOCK_N, BLOCK_K/G, G] when a tile spans several groups), and
accumulates in fp32. Per-channel codes skip the per-element scale: Σ x·(q − z) is scaled once
in the epilogue. The output is written in ``x.dtype``.

Two paths, chosen by M (rows of x):

- decode, M ≤ 16: GEMV with split-K. Grid (N blocks, K splits, M blocks). M = 1 uses CUDA-core
  FMAs (a [1, BLOCK_N, BLOCK_K] product reduced over K); 2..16 rows use ``tl.dot`` on a
  16-row tile. With several K splits the fp32 partials go to a workspace reduced by torch.
- prefill, M > 16: tiled matmul, grouped program order for L2 reuse of weight tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimfx.kernels import device_reason
from slimfx.kernels._triton_utils import interp_bf16, mma, num_sms, round_to
from slimfx.kernels.quant_linear.reference import n_groups, symmetric_offset

__all__ = [
    "QuantLinearConfig",
    "DECODE_CONFIGS",
    "PREFILL_CONFIGS",
    "pick_config",
    "quant_linear",
    "supports",
    "run",
]


@dataclass(frozen=True)
class QuantLinearConfig:
    """Block sizes for one range of M (rows of x). ``split_k=0`` picks the K split from the
    grid size (enough programs for twice the SM count)."""

    max_m: int
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.block_m not in (1,) and self.block_m < 16:
            raise ValueError("block_m must be 1 (FMA GEMV) or ≥ 16 (tl.dot)")
        if self.block_k < 16:
            raise ValueError("block_k must be ≥ 16")

    @property
    def decode(self) -> bool:
        """Whether this config runs the split-K GEMV kernel (else the tiled matmul)."""
        return self.max_m <= 16


DECODE_CONFIGS: tuple[QuantLinearConfig, ...] = (
    QuantLinearConfig(max_m=1, block_m=1, block_n=32, block_k=256, num_warps=4, num_stages=3),
    QuantLinearConfig(max_m=16, block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3),
)
PREFILL_CONFIGS: tuple[QuantLinearConfig, ...] = (
    QuantLinearConfig(max_m=64, block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4),
    QuantLinearConfig(max_m=256, block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    QuantLinearConfig(max_m=2**62, block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pick_config(M: int) -> QuantLinearConfig:
    """The first config whose ``max_m`` covers M (decode configs first)."""
    for cfg in DECODE_CONFIGS + PREFILL_CONFIGS:
        if M <= cfg.max_m:
            return cfg
    raise AssertionError("unreachable: the last prefill config covers every M")


def _split_k(cfg: QuantLinearConfig, M: int, N: int, K: int, device: torch.device) -> int:
    k_blocks = triton.cdiv(K, cfg.block_k)
    if cfg.split_k:
        return max(1, min(cfg.split_k, k_blocks))
    programs = triton.cdiv(N, cfg.block_n) * triton.cdiv(M, cfg.block_m)
    target = 2 * num_sms(device)
    split = 1
    while split * 2 <= k_blocks and programs * split < target:
        split *= 2
    return split


@triton.jit
def _dequant_tile(
    qw_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, K, KQ, n_grp,
    stride_qn, stride_sn, stride_zn,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    PER_CHANNEL: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_N, BLOCK_K] tile of deq(W) for rows ``offs_n``, columns k0 … k0+BLOCK_K.
    Per-channel tiles hold q − z only (the scale is applied in the epilogue)."""
    if BITS == 4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = tl.load(
            qw_ptr + offs_n[:, None] * stride_qn + offs_b[None, :],
            mask=mask_n[:, None] & (offs_b[None, :] < KQ), other=0,
        )
        q = tl.interleave(p & 0xF, p >> 4).to(tl.float32)  # even k ← low nibble
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(
            qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :],
            mask=mask_n[:, None] & (offs_k[None, :] < K), other=0,
        ).to(tl.float32)
    if PER_CHANNEL:
        if HAS_ZEROS:
            z = tl.load(z_ptr + offs_n * stride_zn, mask=mask_n, other=0).to(tl.float32)
            w = q - z[:, None]
        else:
            w = q - ZERO_OFFSET
    elif BLOCK_K <= GROUP:
        # The whole tile lies in one group (G is a multiple of BLOCK_K): one scale per row.
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + offs_n * stride_zn + g, mask=mask_n, other=0).to(tl.float32)
            w = (q - z[:, None]) * s[:, None]
        else:
            w = (q - ZERO_OFFSET) * s[:, None]
    else:
        # BLOCK_K / G groups per tile: view the tile as [BLOCK_N, groups, G].
        offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        mask_g = mask_n[:, None] & (offs_g[None, :] < n_grp)
        s = tl.load(
            s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=mask_g, other=0
        ).to(tl.float32)
        q3 = tl.reshape(q, (BLOCK_N, BLOCK_K // GROUP, GROUP))
        if HAS_ZEROS:
            z = tl.load(
                z_ptr + offs_n[:, None] * stride_zn + offs_g[None, :], mask=mask_g, other=0
            ).to(tl.float32)
            w3 = (q3 - z[:, :, None]) * s[:, :, None]
        else:
            w3 = (q3 - ZERO_OFFSET) * s[:, :, None]
        w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def _epilogue(
    acc, s_ptr, b_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_sn, stride_om,
    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """Per-channel scale, bias, cast to the output dtype, store."""
    if PER_CHANNEL:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0).to(tl.float32)
        acc = acc * s[None, :]
    out_ty = out_ptr.dtype.element_ty
    if HAS_BIAS:  # the bias is used in the output dtype, as F.linear would
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
        acc += round_to(b, out_ty, INTERP_BF16).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
        round_to(acc, out_ty, INTERP_BF16),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _quant_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, KQ, n_grp, k_per_split,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_om, stride_os,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    PER_CHANNEL: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode GEMV: program (n block, K split, m block) reduces its K range."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    # int64 rows: row × stride passes 2^31 at e.g. 16k prefill tokens × a 128k-vocab lm_head
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0,
        )
        w = _dequant_tile(
            qw_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, K, KQ, n_grp,
            stride_qn, stride_sn, stride_zn,
            BITS, GROUP, ZERO_OFFSET, PER_CHANNEL, HAS_ZEROS, BLOCK_N, BLOCK_K,
        )
        if BLOCK_M >= 16:
            wq = round_to(w, x.dtype, INTERP_BF16)
            acc = mma(x, tl.trans(wq), acc, DOT_PRECISION, INTERP_BF16)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if SPLIT_K == 1:
        _epilogue(acc, s_ptr, b_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n,
                  stride_sn, stride_om, PER_CHANNEL, HAS_BIAS, INTERP_BF16)
    else:
        # fp32 partials; the launcher sums the splits and adds the bias.
        _epilogue(acc, s_ptr, b_ptr, out_ptr + pid_k * stride_os, offs_m, offs_n, mask_m,
                  mask_n, stride_sn, stride_om, PER_CHANNEL, False, False)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, KQ, n_grp,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    PER_CHANNEL: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Prefill: one [BLOCK_M, BLOCK_N] output tile per program, GROUP_M-swizzled order."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    # int64 rows: row × stride passes 2^31 at e.g. 16k prefill tokens × a 128k-vocab lm_head
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0,
        )
        w = _dequant_tile(
            qw_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, K, KQ, n_grp,
            stride_qn, stride_sn, stride_zn,
            BITS, GROUP, ZERO_OFFSET, PER_CHANNEL, HAS_ZEROS, BLOCK_N, BLOCK_K,
        )
        acc = mma(x, tl.trans(round_to(w, x.dtype, INTERP_BF16)), acc, DOT_PRECISION, INTERP_BF16)
    _epilogue(acc, s_ptr, b_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n,
              stride_sn, stride_om, PER_CHANNEL, HAS_BIAS, INTERP_BF16)


def _is_per_channel(K: int, group_size: int | None, scales: Tensor) -> bool:
    return group_size is None or (scales.shape[1] == 1 and group_size >= K)


def quant_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None = None,
    bias: Tensor | None = None,
    bits: int = 4,
    group_size: int | None = 128,
    *,
    config: QuantLinearConfig | None = None,
) -> Tensor:
    """Launch the fused dequant-matmul: ``x @ deq(W)ᵀ + b`` in ``x.dtype``. ``config`` overrides
    the M-based choice (tests use it to force a path). Call :func:`supports` first."""
    K = x.shape[-1]
    N = qweight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    qweight = qweight.contiguous()
    scales = scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    bias = None if bias is None else bias.contiguous()
    cfg = config or pick_config(M)
    per_channel = _is_per_channel(K, group_size, scales)
    common = dict(
        BITS=bits,
        GROUP=cfg.block_k if per_channel else int(group_size),  # unused when per-channel
        ZERO_OFFSET=symmetric_offset(bits),
        PER_CHANNEL=per_channel,
        HAS_ZEROS=zeros is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        INTERP_BF16=interp_bf16(x),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    z_arg = zeros if zeros is not None else scales  # placeholder pointer, never read
    stride_zn = zeros.stride(0) if zeros is not None else 0
    n_grp = scales.shape[1]
    if not cfg.decode:
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        _quant_matmul_kernel[grid](
            x2, qweight, scales, z_arg, bias if bias is not None else scales, out,
            M, N, K, qweight.shape[1], n_grp,
            x2.stride(0), qweight.stride(0), scales.stride(0), stride_zn, out.stride(0),
            HAS_BIAS=bias is not None, GROUP_M=8, **common,
        )
        return out.reshape(*lead, N)
    split = _split_k(cfg, M, N, K, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.block_k), split) * cfg.block_k
    split = triton.cdiv(K, k_per_split)  # no empty splits
    dst = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, cfg.block_m))
    _quant_gemv_kernel[grid](
        x2, qweight, scales, z_arg, bias if bias is not None else scales, dst,
        M, N, K, qweight.shape[1], n_grp, k_per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0), stride_zn,
        dst.stride(-2), dst.stride(0) if split > 1 else 0,
        HAS_BIAS=bias is not None, SPLIT_K=split, **common,
    )
    if split > 1:
        y = dst.sum(0)
        if bias is not None:
            y += bias.to(x.dtype).to(torch.float32)
        out = y.to(x.dtype)
    return out.reshape(*lead, N)


def supports(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None = None,
    bias: Tensor | None = None,
    bits: int = 4,
    group_size: int | None = 128,
) -> tuple[bool, str]:
    """``(True, "")`` when :func:`quant_linear` can run this call, else ``(False, reason)``."""
    if bits not in (4, 8):
        return False, f"bits {bits} unsupported (4 or 8)"
    if x.dtype not in _DTYPES:
        return False, f"x dtype {x.dtype} unsupported (float16, bfloat16, float32)"
    if x.dim() < 1 or x.shape[-1] == 0:
        return False, "x has no in_features dimension"
    K = x.shape[-1]
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        got = f"{qweight.dtype} {tuple(qweight.shape)}"
        return False, f"qweight must be a 2-D uint8 tensor, got {got}"
    N = qweight.shape[0]
    want = math.ceil(K / 2) if bits == 4 else K
    if qweight.shape[1] != want:
        return False, (
            f"qweight has {qweight.shape[1]} columns; int{bits} with in_features {K} needs {want}"
        )
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        return False, f"group_size must be a positive int or None, got {group_size!r}"
    G = n_groups(K, group_size)
    if not scales.dtype.is_floating_point or tuple(scales.shape) != (N, G):
        got = f"{scales.dtype} {tuple(scales.shape)}"
        return False, f"scales must be floating ({N}, {G}), got {got}"
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (N, G)):
        return False, f"zeros must be uint8 ({N}, {G}), got {zeros.dtype} {tuple(zeros.shape)}"
    if not _is_per_channel(K, group_size, scales):
        assert group_size is not None
        if group_size < 16 or group_size & (group_size - 1):
            return False, f"group_size {group_size} is not a power of two ≥ 16"
    if bias is not None and (not bias.dtype.is_floating_point or tuple(bias.shape) != (N,)):
        return False, f"bias must be floating ({N},), got {bias.dtype} {tuple(bias.shape)}"
    why = device_reason(
        x, _quant_gemv_kernel, {"qweight": qweight, "scales": scales, "zeros": zeros, "bias": bias}
    )
    return (not why), why


def run(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None = None,
    bias: Tensor | None = None,
    bits: int = 4,
    group_size: int | None = 128,
) -> Tensor:
    """Registry entry: the opaque ``slimfx_kernels::quant_linear_triton`` op."""
    return torch.ops.slimfx_kernels.quant_linear_triton(
        x, qweight, scales, zeros, bias, bits, group_size
    )
