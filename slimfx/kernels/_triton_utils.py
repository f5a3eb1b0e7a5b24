"""Triton helpers shared by the kernel folders (imports triton: load only from a
``triton_kernel`` module).

Two interpreter artefacts (Triton 3.7 ``TRITON_INTERPRET=1``) are corrected here so CPU tests
check the numerics the GPU computes: bf16 tensors are stored as raw uint16 bits and
``tl.dot`` multiplies those bits as integers, and fp32 → bf16 casts truncate instead of
rounding to nearest even. ``interp_bf16(x)`` is true exactly when both would bite; kernels
pass it as the ``INTERP_BF16`` constexpr, which is False on CUDA (no extra instructions there).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["mma", "round_to", "interp_bf16", "num_sms"]


def interp_bf16(x: torch.Tensor) -> bool:
    """Whether this call runs bf16 data through the CPU interpreter (see module docstring)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 4 for the CPU interpreter, so tiny test shapes
    still exercise the split heuristics."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sms(index)
    return 4


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (``a``, ``b`` of one dtype). Under the
    interpreter bf16 operands are upcast (exact), giving what the GPU's bf16 dot gives."""
    if INTERP_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def round_to(v, DTYPE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 ``v`` → ``DTYPE`` rounding to nearest even (what the GPU's cast does). Under the
    interpreter the bf16 rounding is done on the bits, after which its truncating cast is
    exact."""
    if INTERP_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DTYPE)
    else:
        return v.to(DTYPE)
