"""Triton 2:4 sparse linear: y = x Wᵀ + b reading only the kept half of W.

Layout read (``slimfx.numerics``): ``values`` (N × K/2), the two kept weights of each group of
four columns in column order; ``meta`` uint8 (N × ceil(K/8)), per group a nibble
``p0 | p1 << 2`` (positions in the group of the first and second kept weight), even group in
the low nibble. A tile of BLOCK_K dense columns reads BLOCK_K/2 values and BLOCK_K/8 meta
bytes per row; the nibbles are unpacked in registers (``tl.interleave`` of low and high
nibbles restores group order) and the values split into first/second kept (v0, v1).

- M = 1 (GEMV, CUDA-core FMAs): for each group the four x entries x[4g + j] are loaded once
  per tile (shared by all rows) and the entry each kept weight multiplies is gathered by a
  select on its position: y += Σ_g v0·x[4g + p0] + v1·x[4g + p1]. Half the multiply-adds of
  a dense GEMV, and only the kept weights come from memory.
- M > 1: the tile is densified in registers (W[n, 4g + j] = v0 if p0 = j, v1 if p1 = j, else
  0) and fed to ``tl.dot``. Meant for M ≤ 16; larger M runs correctly but re-reads the
  weights once per M block (on a GPU the registry prefers torch's semi-structured kernels
  there, see ``slimfx.kernels.sparse24_linear``).

Split-K over a (N blocks, K splits, M blocks) grid as in ``quant_linear``; fp32 accumulation,
output in ``x.dtype``. ``values`` is converted to ``x.dtype`` by the launcher when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimfx.kernels import device_reason
from slimfx.kernels._triton_utils import interp_bf16, mma, num_sms, round_to
from slimfx.kernels.sparse24_linear.reference import check_sparse24_args

__all__ = ["Sparse24Config", "CONFIGS", "pick_config", "sparse24_linear", "supports", "run"]


@dataclass(frozen=True)
class Sparse24Config:
    """Blocks for M ≤ ``max_m``; ``block_m == 1`` selects the gather GEMV. ``split_k=0`` picks
    the K split from the grid size."""

    max_m: int
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0

    def __post_init__(self) -> None:
        if self.block_k < 32 or self.block_k & (self.block_k - 1):
            raise ValueError("block_k must be a power of two ≥ 32 (≥ 2 meta bytes per tile)")
        if self.block_m != 1 and self.block_m < 16:
            raise ValueError("block_m must be 1 (gather GEMV) or ≥ 16 (tl.dot)")


CONFIGS: tuple[Sparse24Config, ...] = (
    Sparse24Config(max_m=1, block_m=1, block_n=64, block_k=256, num_warps=4),
    Sparse24Config(max_m=16, block_m=16, block_n=64, block_k=128, num_warps=4),
    Sparse24Config(max_m=2**62, block_m=64, block_n=64, block_k=64, num_warps=4),
)


def pick_config(M: int) -> Sparse24Config:
    """The first config whose ``max_m`` covers M."""
    return next(c for c in CONFIGS if M <= c.max_m)


@triton.jit
def _sparse24_kernel(
    x_ptr, val_ptr, meta_ptr, b_ptr, out_ptr,
    M, N, K, KV, KM, k_per_split,
    stride_xm, stride_vn, stride_mn, stride_om, stride_os,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (n block, K split, m block) reduces its K range of x Wᵀ."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    # int64 rows: row × stride passes 2^31 at e.g. 16k prefill tokens × a 128k-vocab lm_head
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ty = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        vals = tl.load(
            val_ptr + offs_n[:, None] * stride_vn + offs_v[None, :],
            mask=mask_n[:, None] & (offs_v[None, :] < KV), other=0.0,
        ).to(tl.float32)
        offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        mb = tl.load(
            meta_ptr + offs_n[:, None] * stride_mn + offs_b[None, :],
            mask=mask_n[:, None] & (offs_b[None, :] < KM), other=0,
        )
        nib = tl.interleave(mb & 0xF, mb >> 4)  # [BLOCK_N, BLOCK_K/4], one nibble per group
        p0 = nib & 3
        p1 = (nib >> 2) & 3
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2)))
        if BLOCK_M >= 16:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0,
            )
            j = tl.arange(0, 4)[None, None, :]
            dense = tl.where(p0[:, :, None] == j, v0[:, :, None], 0.0) + tl.where(
                p1[:, :, None] == j, v1[:, :, None], 0.0
            )
            w = tl.reshape(dense, (BLOCK_N, BLOCK_K)).to(x_ty)  # exact: values are x_ty
            acc = mma(x, tl.trans(w), acc, DOT_PRECISION, INTERP_BF16)
        else:
            offs_g = k0 + 4 * tl.arange(0, BLOCK_K // 4)  # first column of each group
            xm = mask_m[:, None] & (offs_g[None, :] < K)
            xrow = x_ptr + offs_m[:, None] * stride_xm + offs_g[None, :]
            x0 = tl.load(xrow, mask=xm, other=0.0).to(tl.float32)[:, None, :]
            x1 = tl.load(xrow + 1, mask=xm, other=0.0).to(tl.float32)[:, None, :]
            x2 = tl.load(xrow + 2, mask=xm, other=0.0).to(tl.float32)[:, None, :]
            x3 = tl.load(xrow + 3, mask=xm, other=0.0).to(tl.float32)[:, None, :]
            q0 = p0[None, :, :]
            q1 = p1[None, :, :]
            xa = tl.where(q0 == 0, x0, tl.where(q0 == 1, x1, tl.where(q0 == 2, x2, x3)))
            xb = tl.where(q1 == 0, x0, tl.where(q1 == 1, x1, tl.where(q1 == 2, x2, x3)))
            acc += tl.sum(v0[None, :, :] * xa + v1[None, :, :] * xb, axis=2)
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:  # the bias is used in x's dtype, as F.linear would
            b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += round_to(b, x_ty, INTERP_BF16).to(tl.float32)[None, :]
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
            round_to(acc, x_ty, INTERP_BF16), mask=out_mask,
        )
    else:
        tl.store(
            out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :],
            acc, mask=out_mask,
        )


def _split_k(cfg: Sparse24Config, M: int, N: int, K: int, device: torch.device) -> int:
    k_blocks = triton.cdiv(K, cfg.block_k)
    if cfg.split_k:
        return max(1, min(cfg.split_k, k_blocks))
    programs = triton.cdiv(N, cfg.block_n) * triton.cdiv(M, cfg.block_m)
    split = 1
    while split * 2 <= k_blocks and programs * split < 2 * num_sms(device):
        split *= 2
    return split


def sparse24_linear(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None,
    *, config: Sparse24Config | None = None,
) -> Tensor:
    """Launch the 2:4 kernel: ``x @ Wᵀ + b`` in ``x.dtype``. ``config`` overrides the M-based
    choice (tests use it to force a path). Call :func:`supports` first."""
    K = x.shape[-1]
    N = values.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    values = values.to(x.dtype).contiguous()
    meta = meta.contiguous()
    bias = None if bias is None else bias.contiguous()
    cfg = config or pick_config(M)
    split = _split_k(cfg, M, N, K, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.block_k), split) * cfg.block_k
    split = triton.cdiv(K, k_per_split)
    dst = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, cfg.block_m))
    _sparse24_kernel[grid](
        x2, values, meta, bias if bias is not None else values, dst,
        M, N, K, values.shape[1], meta.shape[1], k_per_split,
        x2.stride(0), values.stride(0), meta.stride(0), dst.stride(-2),
        dst.stride(0) if split > 1 else 0,
        HAS_BIAS=bias is not None, SPLIT_K=split,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        INTERP_BF16=interp_bf16(x),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        y = dst.sum(0)
        if bias is not None:
            y += bias.to(x.dtype).to(torch.float32)
        out = y.to(x.dtype)
    return out.reshape(*lead, N)


def supports(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None
) -> tuple[bool, str]:
    """``(True, "")`` when :func:`sparse24_linear` can run this call, else ``(False, reason)``."""
    why = check_sparse24_args(x, values, meta, bias) or device_reason(
        x, _sparse24_kernel, {"values": values, "meta": meta, "bias": bias}
    )
    return (not why), why


def run(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """Registry entry: the opaque ``slimfx_kernels::sparse24_linear_triton`` op."""
    return torch.ops.slimfx_kernels.sparse24_linear_triton(x, values, meta, bias)
