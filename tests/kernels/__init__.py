"""Kernel tests: every Triton kernel against its plain-torch reference on tiny shapes.

Importing this package sets ``TRITON_INTERPRET=1`` when no CUDA device is present, before any
kernel module is imported: triton decides at ``@triton.jit`` time whether a kernel is
interpreted, so the variable must be set before the ``triton_kernel`` modules load. With CUDA
(and the variable unset) the same tests run compiled on the GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: max |y − ref| allowed, as a fraction of max |ref|. Kernel and reference both accumulate in
#: fp32 (in different orders) and round the result once to the output dtype, so they may land
#: one ulp apart — 2^-10 (fp16) / 2^-7 (bf16) of the largest output at worst — and the M = 1
#: paths keep the dequantized weight in fp32 where the reference rounds it to x.dtype. Two ulps
#: of headroom; fp32 differs only by summation order (~1e-7 seen).
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_scaled(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Same shape and dtype, and max |y − ref| ≤ REL_TOL[dtype] · max |ref|."""
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert y.dtype == ref.dtype, (y.dtype, ref.dtype)
    y64, r64 = y.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.isfinite(y64).all(), "kernel output has NaN/inf"
    scale = r64.abs().max().item()
    err = (y64 - r64).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"max err {err:.3g} > {REL_TOL[dtype]:g} · {scale:.3g}"


def triton_skip_reason() -> str:
    """Why the Triton kernels cannot be tested here ('' when they can)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton not installed ({e}); the Triton kernels are untestable here"
    if DEVICE.type == "cpu" and not INTERPRET:
        return "no CUDA and TRITON_INTERPRET disabled"
    if DEVICE.type == "cpu":
        from slimfx.kernels import interpreter_reason

        return interpreter_reason()
    return ""


def kernels_interpreted_or_cuda(jit_fn: object) -> str:
    """'' if ``jit_fn`` can run on DEVICE; else why (a kernel module imported before
    TRITON_INTERPRET was set, e.g. by an earlier test module, is compiled for the GPU)."""
    interpreted = type(jit_fn).__name__ == "InterpretedFunction"
    if DEVICE.type == "cpu" and not interpreted:
        return (
            "Triton kernels were imported before TRITON_INTERPRET=1 was set (set it in "
            "tests/conftest.py or on the command line)"
        )
    return ""
