"""Triton low-rank linear: y = (x Vᵀ) Uᵀ + b with U: N × r, V: r × K (W ≈ U V).

Two paths:

- fused decode (M ≤ 16, r ≤ 256), one launch. Program (rank block ρ, N slice, M block)
  computes hρ = x V[ρ]ᵀ (BLOCK_M × BLOCK_R, all of K) in registers, rounds it to ``x.dtype``
  (as a stored intermediate would be), then for each BLOCK_N tile of its N slice adds
  hρ U[:, ρ]ᵀ into a zero-initialised fp32 output with atomics; the bias is added by the
  ρ = 0 programs. Every V row block is read once per N slice and every U entry once, and the
  rank-r intermediate never touches global memory. Summing r/BLOCK_R partial products per
  output with atomics makes the fp32 summation order (and the last bit) run-dependent.
  M = 1 uses CUDA-core FMAs, 2..16 rows ``tl.dot`` on a 16-row tile.
- tiled fallback: two launches of one tiled matmul kernel (``c = a bᵀ + bias``, grouped
  program order), h = x Vᵀ stored in ``x.dtype``, then y = h Uᵀ + b.

Accumulation is fp32, output in ``x.dtype``; U and V are converted to ``x.dtype`` by the
launchers when they differ (a copy), the bias is rounded to ``x.dtype`` in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimfx.kernels import device_reason
from slimfx.kernels._triton_utils import interp_bf16, mma, num_sms, round_to

__all__ = [
    "FusedConfig",
    "MatmulConfig",
    "FUSED_CONFIGS",
    "MATMUL_CONFIGS",
    "MAX_FUSED_M",
    "MAX_FUSED_RANK",
    "lowrank_linear",
    "lowrank_linear_fused",
    "lowrank_linear_tiled",
    "matmul_bias",
    "supports_fused",
    "supports_tiled",
    "run_fused",
    "run_tiled",
]

MAX_FUSED_M = 16
MAX_FUSED_RANK = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class FusedConfig:
    """Blocks of the fused decode kernel for M ≤ ``max_m``."""

    max_m: int
    block_m: int
    block_r: int
    block_k: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class MatmulConfig:
    """Blocks of the tiled matmul for M ≤ ``max_m``."""

    max_m: int
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


FUSED_CONFIGS: tuple[FusedConfig, ...] = (
    FusedConfig(max_m=1, block_m=1, block_r=8, block_k=256, block_n=128),
    FusedConfig(max_m=16, block_m=16, block_r=16, block_k=128, block_n=64),
)
MATMUL_CONFIGS: tuple[MatmulConfig, ...] = (
    MatmulConfig(max_m=16, block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3),
    MatmulConfig(max_m=64, block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4),
    MatmulConfig(max_m=256, block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    MatmulConfig(max_m=2**62, block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
)


@triton.jit
def _lowrank_fused_kernel(
    x_ptr, v_ptr, u_ptr, b_ptr, out_ptr,
    M, N, K, R, n_per_prog,
    stride_xm, stride_vr, stride_un, stride_om,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (rank block, N slice, M block): h = x V[ρ]ᵀ in registers, out += h U[:, ρ]ᵀ."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    # int64 rows: row × stride passes 2^31 at e.g. 16k prefill tokens × a 128k-vocab lm_head
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_ty = x_ptr.dtype.element_ty
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        v = tl.load(
            v_ptr + offs_r[:, None] * stride_vr + offs_k[None, :],
            mask=mask_r[:, None] & mask_k[None, :], other=0.0,
        ).to(x_ty)
        if BLOCK_M >= 16:
            h = mma(x, tl.trans(v), h, DOT_PRECISION, INTERP_BF16)
        else:
            h += tl.sum(x.to(tl.float32)[:, None, :] * v.to(tl.float32)[None, :, :], axis=2)
    hq = round_to(h, x_ty, INTERP_BF16)  # the intermediate as two matmuls would store it
    n_start = pid_n * n_per_prog
    n_end = tl.minimum(n_start + n_per_prog, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        u = tl.load(
            u_ptr + offs_n[:, None] * stride_un + offs_r[None, :],
            mask=mask_n[:, None] & mask_r[None, :], other=0.0,
        ).to(x_ty)
        if BLOCK_M >= 16:
            y = mma(hq, tl.trans(u), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                    DOT_PRECISION, INTERP_BF16)
        else:
            y = tl.sum(hq.to(tl.float32)[:, None, :] * u.to(tl.float32)[None, :, :], axis=2)
        if HAS_BIAS:
            b = tl.load(b_ptr + offs_n, mask=mask_n & (pid_r == 0), other=0.0)
            y += round_to(b.to(tl.float32), x_ty, INTERP_BF16).to(tl.float32)[None, :]
        tl.atomic_add(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y,
            mask=mask_m[:, None] & mask_n[None, :], sem="relaxed",
        )


@triton.jit
def _matmul_bias_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c = a bᵀ + bias (a: M × K, b: N × K), fp32 accumulation, c in a's dtype."""
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
    a_ty = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_k[None, :],
            mask=mask_n[:, None] & mask_k[None, :], other=0.0,
        ).to(a_ty)
        acc = mma(a, tl.trans(b), acc, DOT_PRECISION, INTERP_BF16)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += round_to(bias.to(tl.float32), a_ty, INTERP_BF16).to(tl.float32)[None, :]
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :],
        round_to(acc, c_ptr.dtype.element_ty, INTERP_BF16),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _flags(x: Tensor) -> dict[str, object]:
    return {
        "DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",
        "INTERP_BF16": interp_bf16(x),
    }


def matmul_bias(
    a: Tensor, b: Tensor, bias: Tensor | None = None, *, config: MatmulConfig | None = None
) -> Tensor:
    """``a @ bᵀ + bias`` for 2-D ``a`` (M × K) and ``b`` (N × K), output in ``a.dtype``."""
    a = a.contiguous()
    b = b.to(a.dtype).contiguous()  # rounded by torch (the interpreter's bf16 cast truncates)
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    cfg = config or next(c_ for c_ in MATMUL_CONFIGS if M <= c_.max_m)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _matmul_bias_kernel[grid](
        a, b, bias if bias is not None else a, c, M, N, K,
        a.stride(0), b.stride(0), c.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=8, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_flags(a),
    )
    return c


def lowrank_linear_tiled(
    x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None,
    *, config: MatmulConfig | None = None,
) -> Tensor:
    """Two tiled matmuls: h = x Vᵀ (stored in ``x.dtype``), y = h Uᵀ + b."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    h = matmul_bias(x2, V, None, config=config)
    y = matmul_bias(h, U, None if bias is None else bias.contiguous(), config=config)
    return y.reshape(*x.shape[:-1], U.shape[0])


def lowrank_linear_fused(
    x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None,
    *, config: FusedConfig | None = None, n_split: int | None = None,
) -> Tensor:
    """One-launch decode kernel (see module docstring). ``n_split`` (N slices per rank block)
    defaults to enough programs for the machine; ``config`` overrides the M-based choice."""
    K = x.shape[-1]
    N, R = U.shape
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    U = U.to(x.dtype).contiguous()  # factors are used in x.dtype (see reference)
    V = V.to(x.dtype).contiguous()
    out = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    if M and N:
        cfg = config or next(c for c in FUSED_CONFIGS if M <= c.max_m)
        r_blocks = triton.cdiv(R, cfg.block_r)
        m_blocks = triton.cdiv(M, cfg.block_m)
        n_blocks = triton.cdiv(N, cfg.block_n)
        if n_split is None:
            # Each N slice recomputes its rank block's h (V re-read from L2): keep slices few.
            n_split = min(8, triton.cdiv(num_sms(x.device), r_blocks * m_blocks))
        n_split = max(1, min(n_split, n_blocks))
        n_per_prog = triton.cdiv(n_blocks, n_split) * cfg.block_n
        n_split = triton.cdiv(N, n_per_prog)
        _lowrank_fused_kernel[(r_blocks, n_split, m_blocks)](
            x2, V, U, bias if bias is not None else U, out,
            M, N, K, R, n_per_prog,
            x2.stride(0), V.stride(0), U.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r,
            BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(x),
        )
    y = out if x.dtype == torch.float32 else out.to(x.dtype)
    return y.reshape(*x.shape[:-1], N)


def _fused_shape_reason(x: Tensor, U: Tensor) -> str:
    M = x.numel() // max(x.shape[-1], 1)
    if M > MAX_FUSED_M:
        return f"M={M} rows > {MAX_FUSED_M} (the fused kernel is for decode)"
    if U.shape[1] > MAX_FUSED_RANK:
        return f"rank {U.shape[1]} > {MAX_FUSED_RANK} (intermediate too large for registers)"
    return ""


def lowrank_linear(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """Fused path when M ≤ 16 and r ≤ 256, else the two tiled matmuls."""
    if not _fused_shape_reason(x, U):
        return lowrank_linear_fused(x, U, V, bias)
    return lowrank_linear_tiled(x, U, V, bias)


def supports_tiled(
    x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None
) -> tuple[bool, str]:
    """``(True, "")`` when the tiled path can run this call, else ``(False, reason)``."""
    if x.dtype not in _DTYPES:
        return False, f"x dtype {x.dtype} unsupported (float16, bfloat16, float32)"
    if x.dim() < 1 or x.shape[-1] == 0:
        return False, "x has no in_features dimension"
    if U.dim() != 2 or V.dim() != 2:
        return False, f"U and V must be 2-D, got {tuple(U.shape)} and {tuple(V.shape)}"
    if V.shape[1] != x.shape[-1]:
        return False, f"V has {V.shape[1]} columns but x has {x.shape[-1]} features"
    if U.shape[1] != V.shape[0]:
        return False, f"rank mismatch: U has {U.shape[1]} columns, V has {V.shape[0]} rows"
    if not (U.dtype.is_floating_point and V.dtype.is_floating_point):
        return False, f"U/V must be floating, got {U.dtype}/{V.dtype}"
    N = U.shape[0]
    if bias is not None and (not bias.dtype.is_floating_point or tuple(bias.shape) != (N,)):
        return False, f"bias must be floating ({N},), got {bias.dtype} {tuple(bias.shape)}"
    why = device_reason(x, _matmul_bias_kernel, {"U": U, "V": V, "bias": bias})
    return (not why), why


def supports_fused(
    x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None
) -> tuple[bool, str]:
    """Like :func:`supports_tiled`, plus M ≤ 16 rows and rank ≤ 256."""
    ok, why = supports_tiled(x, U, V, bias)
    if not ok:
        return ok, why
    why = _fused_shape_reason(x, U)
    return (not why), why


def run_fused(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """Registry entry: the ``slimfx_kernels::lowrank_linear_triton`` op (fused when shapes
    allow, which :func:`supports_fused` has checked)."""
    return torch.ops.slimfx_kernels.lowrank_linear_triton(x, U, V, bias)


def run_tiled(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """Registry entry: the same op; it takes the tiled path whenever the fused one declines."""
    return torch.ops.slimfx_kernels.lowrank_linear_triton(x, U, V, bias)
