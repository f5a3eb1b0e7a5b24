"""Triton decode attention over an MLA latent cache, sequence split across programs.

    s[h, t] = scale · (q_lat[h] · c[t] + q_rope[h] · k_rope[t, g(h)]),  ctx[h] = Σ_t softmax(s) c[t]

Stage 1, grid (batch, head blocks, sequence splits): a program owns ``BLOCK_H`` query heads and
one contiguous chunk of the sequence. It walks the chunk in tiles of ``BLOCK_T`` tokens; each
latent tile (``BLOCK_T × R``) is read once and serves every head of the block twice — the
scores ``q_lat @ cᵀ`` and the context ``p @ c`` (two ``tl.dot``) — so the latent, the bulk of
the cache, is read once per head block (once in total when all heads fit one block of 16; twice
for 32 heads). The converted models' RoPE key is shared by all heads (K = 1); K > 1 reads each
head's group key. The RoPE
key is read alongside (``P`` values per token and kv head). Online
softmax (running max ``m``, sum ``l``, rescaled accumulator) in fp32; the chunk's ``m``, ``l``
and unnormalised context go to a workspace.

Stage 2, one program per (batch, head): merge the splits one R-wide row at a time,
``ctx = Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} l_s`` with ``M = max_s m_s`` (empty splits carry
``m = −∞``), rounded once to the output dtype.

int8 latent (``latent_scales`` given): the codes go through the dots in the query's dtype
(exact for |code| ≤ 127 in fp16/bf16/fp32); the per-token scale multiplies the scores after the
first dot and the probabilities before the second. ``R`` and ``P`` need not be powers of two
(padded and masked); ``P = 0`` (no RoPE key) is allowed.
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

__all__ = ["MLADecodeConfig", "pick_config", "pick_splits", "mla_decode", "supports", "run"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@dataclass(frozen=True)
class MLADecodeConfig:
    """Tile sizes: ``block_h`` query heads per program (≥ 16 for ``tl.dot``), ``block_t``
    tokens per tile."""

    block_h: int = 16
    block_t: int = 64
    num_warps: int = 4
    num_stages: int = 2


def pick_config(device: torch.device, rank: int) -> MLADecodeConfig:
    """Smaller tiles under the interpreter (tiny shapes) and for wide latents on the GPU."""
    if device.type != "cuda":
        return MLADecodeConfig(block_h=16, block_t=16, num_warps=1, num_stages=1)
    return MLADecodeConfig(block_t=64 if rank <= 256 else 32, num_warps=4 if rank <= 256 else 8)


def pick_splits(batch: int, head_blocks: int, seq: int, block_t: int, sms: int) -> int:
    """Enough programs for two waves over the SMs, each split at least two tiles long."""
    want = max(1, math.ceil(2 * sms / max(1, batch * head_blocks)))
    return max(1, min(want, math.ceil(seq / (2 * block_t))))


@triton.jit
def _mla_split_kernel(
    q_lat, q_rope, lat, lat_scales, k_rope, lengths, ws_acc, ws_ml,
    H, S, R, P, K, GROUP, SPLITS, scale,
    HAS_ROPE: tl.constexpr, INT8: tl.constexpr, CDT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, P_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr, SHARED_ROPE: tl.constexpr = False,
):
    pid_b = tl.program_id(0).to(tl.int64)  # (b·S + t)·R passes 2^31 at large batch × context
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    length = tl.load(lengths + pid_b)
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_T) * BLOCK_T
    start = pid_s * chunk
    end = tl.minimum(start + chunk, length)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    q = tl.load(
        q_lat + (pid_b * H + offs_h[:, None]) * R + offs_r[None, :],
        mask=h_mask[:, None] & r_mask[None, :], other=0.0,
    ).to(CDT)
    offs_p = tl.arange(0, P_PAD)
    p_mask = offs_p < P
    group = offs_h // GROUP
    if HAS_ROPE:
        qr = tl.load(
            q_rope + (pid_b * H + offs_h[:, None]) * P + offs_p[None, :],
            mask=h_mask[:, None] & p_mask[None, :], other=0.0,
        )
        if SHARED_ROPE:
            qr = qr.to(CDT)
        else:
            qr = qr.to(tl.float32)

    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, R_PAD), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        c = tl.load(
            lat + (pid_b * S + offs_t[:, None]) * R + offs_r[None, :],
            mask=t_mask[:, None] & r_mask[None, :], other=0,
        )
        if INT8:  # through fp32: the interpreter's direct int8 → bf16 cast is not exact
            c = c.to(tl.float32)
        c = c.to(CDT)
        s = mma(q, tl.trans(c), tl.zeros((BLOCK_H, BLOCK_T), tl.float32),
                DOT_PRECISION, INTERP_BF16)
        if INT8:
            sc = tl.load(lat_scales + pid_b * S + offs_t, mask=t_mask, other=0.0).to(tl.float32)
            s = s * sc[None, :]
        if HAS_ROPE and SHARED_ROPE:
            kr2 = tl.load(k_rope + (pid_b * S + offs_t[:, None]) * P + offs_p[None, :],
                          mask=t_mask[:, None] & p_mask[None, :], other=0.0).to(CDT)
            s = mma(qr, tl.trans(kr2), s, DOT_PRECISION, INTERP_BF16)
        elif HAS_ROPE:
            kr = tl.load(
                k_rope
                + ((pid_b * S + offs_t[None, :, None]) * K + group[:, None, None]) * P
                + offs_p[None, None, :],
                mask=t_mask[None, :, None] & p_mask[None, None, :] & h_mask[:, None, None],
                other=0.0,
            ).to(tl.float32)
            s += tl.sum(qr[:, None, :] * kr, axis=2)
        s = tl.where(t_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if INT8:
            p = p * sc[None, :]
        acc = mma(p.to(CDT), c, acc * alpha[:, None], DOT_PRECISION, INTERP_BF16)
        m = m_new

    row = (pid_b * H + offs_h) * SPLITS + pid_s
    tl.store(ws_acc + row[:, None] * R_PAD + offs_r[None, :], acc, mask=h_mask[:, None])
    tl.store(ws_ml + row * 2, m, mask=h_mask)
    tl.store(ws_ml + row * 2 + 1, l_sum, mask=h_mask)


@triton.jit
def _mla_merge_kernel(
    ws_acc, ws_ml, out, R, SPLITS,
    ODT: tl.constexpr, R_PAD: tl.constexpr, S_PAD: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    pid = tl.program_id(0)  # = b * H + h
    offs_s = tl.arange(0, S_PAD)
    s_mask = offs_s < SPLITS
    offs_r = tl.arange(0, R_PAD)
    row = pid * SPLITS + offs_s
    m = tl.load(ws_ml + row * 2, mask=s_mask, other=float("-inf"))
    l_sum = tl.load(ws_ml + row * 2 + 1, mask=s_mask, other=0.0)
    big = tl.max(m, axis=0)
    safe = tl.where(big == float("-inf"), 0.0, big)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - safe))
    den = tl.sum(l_sum * w, axis=0)
    num = tl.zeros((R_PAD,), tl.float32)
    for i in range(0, SPLITS):  # one R-wide row per split: no (splits × R) register tile
        m_i = tl.load(ws_ml + (pid * SPLITS + i) * 2)
        w_i = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - safe))
        num += w_i * tl.load(ws_acc + (pid * SPLITS + i) * R_PAD + offs_r)
    ctx = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(out + pid * R + offs_r, round_to(ctx, ODT, INTERP_BF16), mask=offs_r < R)


def mla_decode(
    q_lat: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    latent_scales: Tensor | None,
    k_rope: Tensor,
    lengths: Tensor,
    scale: float,
    *,
    num_splits: int = 0,
    config: MLADecodeConfig | None = None,
) -> Tensor:
    """Launch both stages; ``ctx`` (B, H, R) in ``q_lat.dtype``. ``num_splits=0`` picks the
    split count (:func:`pick_splits`). Call :func:`supports` first."""
    B, H, R = q_lat.shape
    S, K, P = k_rope.shape[1], k_rope.shape[2], k_rope.shape[3]
    out = torch.empty((B, H, R), dtype=q_lat.dtype, device=q_lat.device)
    if B == 0 or H == 0:
        return out
    cfg = config or pick_config(q_lat.device, R)
    head_blocks = triton.cdiv(H, cfg.block_h)
    splits = num_splits or pick_splits(B, head_blocks, S, cfg.block_t, num_sms(q_lat.device))
    r_pad = max(16, triton.next_power_of_2(R))
    ws_acc = torch.empty((B * H * splits, r_pad), dtype=torch.float32, device=q_lat.device)
    ws_ml = torch.empty((B * H * splits, 2), dtype=torch.float32, device=q_lat.device)
    q_lat, q_rope, latent, k_rope = (t.contiguous() for t in (q_lat, q_rope, latent, k_rope))
    int8 = latent_scales is not None
    scales = latent_scales.contiguous() if int8 else latent  # unused pointer when not int8
    lengths = lengths.to(device=q_lat.device, dtype=torch.int32).contiguous()
    cdt = q_lat.dtype
    interp = interp_bf16(q_lat)
    _mla_split_kernel[(B, head_blocks, splits)](
        q_lat, q_rope, latent, scales, k_rope, lengths, ws_acc, ws_ml,
        H, S, R, P, K, H // K, splits, float(scale),
        HAS_ROPE=P > 0, INT8=int8, CDT=_TL[cdt],
        BLOCK_H=cfg.block_h, BLOCK_T=cfg.block_t, R_PAD=r_pad,
        # one RoPE key shared by every head (MLA's): a (tokens × P) tile through a dot (its
        # inner size ≥ 16 on CUDA); per-group keys: a (heads × tokens × P) tile, summed
        P_PAD=max(16 if K == 1 else 2, triton.next_power_of_2(max(P, 1))),
        DOT_PRECISION="ieee" if cdt == torch.float32 else "tf32",
        INTERP_BF16=interp, SHARED_ROPE=K == 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _mla_merge_kernel[(B * H,)](
        ws_acc, ws_ml, out, R, splits,
        ODT=_TL[cdt], R_PAD=r_pad, S_PAD=max(2, triton.next_power_of_2(splits)),
        INTERP_BF16=interp, num_warps=1 if q_lat.device.type != "cuda" else 4,
    )
    return out


def supports(
    q_lat: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    latent_scales: Tensor | None,
    k_rope: Tensor,
    lengths: Tensor,
    scale: float = 1.0,
) -> tuple[bool, str]:
    """``(True, "")`` when :func:`mla_decode` can run this call, else ``(False, reason)``."""
    if q_lat.dtype not in _DTYPES:
        return False, f"q_lat dtype {q_lat.dtype} unsupported (float16, bfloat16, float32)"
    if q_lat.dim() != 3 or latent.dim() != 3 or k_rope.dim() != 4 or q_rope.dim() != 3:
        return False, "shapes must be q_lat (B,H,R), q_rope (B,H,P), latent (B,S,R), k_rope (B,S,K,P)"
    B, H, R = q_lat.shape
    if latent.shape[0] != B or latent.shape[2] != R:
        return False, f"latent {tuple(latent.shape)} does not match q_lat {tuple(q_lat.shape)}"
    if k_rope.shape[:2] != latent.shape[:2] or q_rope.shape[:2] != (B, H):
        return False, "k_rope / q_rope batch, sequence or head sizes disagree with the latent"
    if k_rope.shape[3] != q_rope.shape[2] or H % k_rope.shape[2]:
        return False, f"{H} query heads do not group over {k_rope.shape[2]} kv heads"
    if latent_scales is None and latent.dtype != q_lat.dtype:
        return False, f"latent dtype {latent.dtype} differs from q_lat {q_lat.dtype}"
    if latent_scales is not None and (
        latent.dtype != torch.int8 or latent_scales.shape != latent.shape[:2]
    ):
        return False, "an int8 latent needs int8 codes (B,S,R) and scales (B,S)"
    if R > 1024:
        return False, f"latent rank {R} > 1024 (one register tile per head block)"
    tensors = dict(q_rope=q_rope, latent=latent, latent_scales=latent_scales, k_rope=k_rope,
                   lengths=lengths)
    why = device_reason(q_lat, _mla_split_kernel, tensors)
    return (False, why) if why else (True, "")


def run(
    q_lat: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    latent_scales: Tensor | None,
    k_rope: Tensor,
    lengths: Tensor,
    scale: float = 1.0,
) -> Tensor:
    """Registry entry: the opaque ``slimfx_kernels::mla_decode_triton`` op."""
    return torch.ops.slimfx_kernels.mla_decode_triton(
        q_lat, q_rope, latent, latent_scales, k_rope, lengths, scale, 0
    )
