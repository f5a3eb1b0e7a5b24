"""Triton decode attention over a KIVI-style quantized KV cache (layout: ``reference``).

One decode step: ``q`` ``(B, Hq, D)`` attends to the quantized store (``Ns`` tokens) and the
16-bit window (``Nw`` tokens). Stage 1, grid ``(B·Hkv, S + 1)``: program ``(b·Hkv + h, s)``
takes the ``Hq/Hkv`` query heads that read kv head ``h`` as the rows of one tile (each cached
row is read once per group of query heads, GQA), and for ``s < S`` walks the ``s``-th chunk of
the store in blocks of ``BLOCK_N`` tokens: it loads the packed codes, unpacks them in registers
(byte ``d·bits/8``, shift ``(d mod 8/bits)·bits``), applies the per-(block, channel) key scale
and minimum and the per-(token, channel group) value scale and minimum, and folds the block into
an online softmax (running max ``m``, sum ``l``, unnormalized ``acc`` in float32). Program
``s = S`` does the same over the 16-bit window. Each program writes ``(m, l, acc)`` for its
rows; stage 2 (:func:`merge_partials`, torch) rescales the partials by ``exp(m_s − max m)`` and
normalizes. ``S`` is picked so that ``B·Hkv·S`` is about twice the SM count (the long-context
split), with chunks a multiple of ``BLOCK_N``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimfx.kernels import device_reason
from slimfx.kernels._triton_utils import num_sms

__all__ = [
    "kv_decode_attention",
    "supports",
    "supports_call",
    "run",
    "pick_splits",
    "merge_partials",
    "BLOCK_N",
]

BLOCK_N = 32
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _online(scores, vals, m_i, l_i, acc):
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vals[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _kv_decode_split_kernel(
    Q, KC, KS, KM, VC, VS, VM, KW, VW, PO, PM, PL,
    n_store, n_win, chunk, scaling,
    NSPLIT,  # a runtime int: as a constant, every new split count (every 32 tokens at first
    # in a decode loop) would compile the kernel again
    HKV: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
    KB: tl.constexpr, VB: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    rows = tl.arange(0, REP_P)
    row_ok = rows < REP
    dcol = tl.arange(0, D)
    qrow = bh * REP + rows  # (b·Hkv + h)·REP + r = b·Hq + query head
    q = tl.load(Q + qrow[:, None] * D + dcol[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32) * scaling
    m_i = tl.full([REP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([REP_P], tl.float32)
    acc = tl.zeros([REP_P, D], tl.float32)
    if s < NSPLIT:
        KPB: tl.constexpr = 8 // KB
        VPB: tl.constexpr = 8 // VB
        start = s * chunk
        end = tl.minimum(start + chunk, n_store)
        for n0 in range(start, end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            ok = toks < end
            tok_row = bh * n_store + toks
            kb = tl.load(
                KC + tok_row[:, None] * (D // KPB) + (dcol // KPB)[None, :],
                mask=ok[:, None], other=0,
            )
            kq = (kb >> ((dcol % KPB) * KB).to(tl.uint8)[None, :]) & ((1 << KB) - 1)
            srow = bh * (n_store // KG) + toks // KG
            ks = tl.load(KS + srow[:, None] * D + dcol[None, :], mask=ok[:, None], other=0.0)
            km = tl.load(KM + srow[:, None] * D + dcol[None, :], mask=ok[:, None], other=0.0)
            k = kq.to(tl.float32) * ks.to(tl.float32) + km.to(tl.float32)
            vb = tl.load(
                VC + tok_row[:, None] * (D // VPB) + (dcol // VPB)[None, :],
                mask=ok[:, None], other=0,
            )
            vq = (vb >> ((dcol % VPB) * VB).to(tl.uint8)[None, :]) & ((1 << VB) - 1)
            voff = tok_row[:, None] * (D // VG) + (dcol // VG)[None, :]
            vs = tl.load(VS + voff, mask=ok[:, None], other=0.0)
            vm = tl.load(VM + voff, mask=ok[:, None], other=0.0)
            v = vq.to(tl.float32) * vs.to(tl.float32) + vm.to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_i, l_i, acc = _online(scores, v, m_i, l_i, acc)
    else:
        for n0 in range(0, n_win, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            ok = toks < n_win
            off = (bh * n_win + toks)[:, None] * D + dcol[None, :]
            k = tl.load(KW + off, mask=ok[:, None], other=0.0).to(tl.float32)
            v = tl.load(VW + off, mask=ok[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_i, l_i, acc = _online(scores, v, m_i, l_i, acc)
    part = qrow * (NSPLIT + 1) + s
    tl.store(PO + part[:, None] * D + dcol[None, :], acc, mask=row_ok[:, None])
    tl.store(PM + part, m_i, mask=row_ok)
    tl.store(PL + part, l_i, mask=row_ok)


def pick_splits(batch: int, kv_heads: int, n_store: int, device: torch.device) -> int:
    """Store chunks per (sequence, kv head): enough programs for twice the SMs, none empty."""
    blocks = triton.cdiv(n_store, BLOCK_N)
    if blocks == 0:
        return 1
    target = max(1, 2 * num_sms(device) // max(1, batch * kv_heads))
    return max(1, min(blocks, target))


def merge_partials(po: Tensor, pm: Tensor, pl: Tensor) -> Tensor:
    """Stage 2: ``(…, S+1, D)`` unnormalized partials with their maxima and sums → ``(…, D)``."""
    m = pm.amax(dim=-1, keepdim=True)
    w = torch.exp(pm - m)  # an empty split has m = −inf → weight 0
    return (po * w.unsqueeze(-1)).sum(-2) / (pl * w).sum(-1, keepdim=True)


def supports(
    q: Tensor, k_codes: Tensor, k_win: Tensor, key_bits: int, value_bits: int, key_group: int,
    value_group: int,
) -> tuple[bool, str]:
    """``(True, "")`` when :func:`kv_decode_attention` can run this call, else why not."""
    if q.dtype not in _DTYPES:
        return False, f"q dtype {q.dtype} unsupported"
    if q.dim() != 3 or k_win.dim() != 4:
        return False, "q must be (B, Hq, D) and the window (B, Hkv, Nw, D)"
    D = q.shape[-1]
    if D & (D - 1) or D < 16:
        return False, f"head_dim {D} must be a power of two ≥ 16"
    if key_bits not in (2, 4, 8) or value_bits not in (2, 4, 8):
        return False, "bits must be 2, 4 or 8"
    if D % value_group:
        return False, f"head_dim {D} is not divisible by the value group {value_group}"
    if k_codes.shape[2] % key_group:
        return False, f"the store's {k_codes.shape[2]} tokens are not whole key groups"
    if q.shape[1] % k_win.shape[1]:
        return False, "query heads are not a multiple of kv heads"
    if k_win.shape[2] < 1:
        return False, "the 16-bit window is empty (it holds at least the current token)"
    why = device_reason(q, _kv_decode_split_kernel, {"k_codes": k_codes, "k_win": k_win})
    return (not why), why


def kv_decode_attention(
    q: Tensor, k_codes: Tensor, k_scale: Tensor, k_min: Tensor, v_codes: Tensor,
    v_scale: Tensor, v_min: Tensor, k_win: Tensor, v_win: Tensor, key_bits: int,
    value_bits: int, key_group: int, value_group: int, scaling: float,
) -> Tensor:
    """Decode attention ``(B, Hq, D)`` over the quantized store and the 16-bit window."""
    ok, why = supports(q, k_codes, k_win, key_bits, value_bits, key_group, value_group)
    if not ok:
        raise ValueError(f"kv_decode_attention: {why}")
    B, Hq, D = q.shape
    Hkv, Ns, Nw = k_win.shape[1], k_codes.shape[2], k_win.shape[2]
    rep = Hq // Hkv
    S = pick_splits(B, Hkv, Ns, q.device)
    chunk = triton.cdiv(triton.cdiv(Ns, S), BLOCK_N) * BLOCK_N if Ns else BLOCK_N
    po = torch.empty(B, Hq, S + 1, D, device=q.device, dtype=torch.float32)
    pm = torch.empty(B, Hq, S + 1, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    c = [t.contiguous() for t in (q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_win, v_win)]
    _kv_decode_split_kernel[(B * Hkv, S + 1)](
        *c, po, pm, pl, Ns, Nw, chunk, float(scaling), S,
        HKV=Hkv, REP=rep, REP_P=max(2, triton.next_power_of_2(rep)), D=D,
        KB=key_bits, VB=value_bits, KG=key_group, VG=value_group, BLOCK_N=BLOCK_N,
    )
    return merge_partials(po, pm, pl).to(q.dtype)


def supports_call(q: Tensor, **tensors: object) -> tuple[bool, str]:
    """Registry entry (``slimfx.kernels.Kernel``): :func:`supports` for a call given by the
    op's argument names (``k_codes=…, k_win=…, key_bits=…``; the others are ignored)."""
    keys = ("k_codes", "k_win", "key_bits", "value_bits", "key_group", "value_group")
    missing = [k for k in keys if k not in tensors]
    if missing:
        return False, f"missing arguments {missing}"
    return supports(q, *(tensors[k] for k in keys))  # type: ignore[arg-type]


def run(q: Tensor, **tensors: object) -> Tensor:
    """Registry entry: the opaque ``slimfx_kernels::kv_decode_attention_triton`` op, arguments
    by name."""
    names = (
        "k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_win", "v_win",
        "key_bits", "value_bits", "key_group", "value_group", "scaling",
    )
    return torch.ops.slimfx_kernels.kv_decode_attention_triton(q, *(tensors[n] for n in names))
