"""``slimfx::quant_linear``: a linear whose weight is stored as integer codes, scales and zeros.

    slimfx::quant_linear(x, qweight, scales, zeros?, bias?, bits, group_size)
        = x @ deq(W)ᵀ + bias,   deq(W)[n, k] = (q[n, k] − z[n, k // G]) · s[n, k // G]

Storage (``slimfx.formats``): ``qweight`` uint8, int4 two codes per byte (column k in byte
k // 2, low nibble for even k), int8 one code per byte; ``scales`` (out × in/G); ``zeros`` uint8
(out × in/G), or ``None`` for symmetric codes whose zero point is 2^(bits−1) (8 / 128).
``group_size`` G is ``in_features`` for a per-channel weight. in_features is ``x.shape[-1]``.

Reference semantics (the kernels follow them): the weight is dequantized in fp32, rounded to
``x.dtype``, then ``F.linear`` in ``x.dtype``. Autograd flows to ``x``, ``scales`` and ``bias``
(the codes and zero points are integers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimfx.formats import RUNTIME_BITS, centered_codes, packed_width
from slimfx.formats import dequantize as dequantize_weight

__all__ = ["quant_linear", "dequantize_weight", "check_quant_args"]


def check_quant_args(
    k: int, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
    op: str = "quant_linear",
) -> None:
    """``torch._check`` that the codes, scales and zeros fit ``k`` inputs in the format."""
    torch._check(bits in RUNTIME_BITS, lambda: f"{op} runs 4 or 8 bits, got {bits}")
    torch._check(qweight.dtype == torch.uint8, lambda: "qweight must be uint8")
    width = packed_width(bits, k)
    torch._check(
        qweight.shape[1] == width,
        lambda: f"qweight has {qweight.shape[1]} columns, expected {width} for in={k}",
    )
    torch._check(group_size > 0, lambda: "group_size must be positive")
    torch._check(
        scales.shape[0] == qweight.shape[0] and scales.shape[1] * group_size >= k,
        lambda: "scales must be out × ceil(in / group_size)",
    )
    if zeros is not None:
        torch._check(zeros.shape == scales.shape, lambda: "zeros must have the scales' shape")


@torch.library.custom_op("slimfx::quant_linear", mutates_args=())
def quant_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group_size: int,
) -> Tensor:
    """``x @ deq(W)ᵀ + bias`` for weight-only int4 / int8 codes (see the module docstring)."""
    w = dequantize_weight(qweight, scales, zeros, bits, group_size, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@quant_linear.register_fake
def _(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group_size: int,
) -> Tensor:
    check_quant_args(x.shape[-1], qweight, scales, zeros, bits, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, qweight, scales, zeros, bias, bits, group_size = inputs
    ctx.save_for_backward(x, qweight, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    x, qweight, scales, zeros = ctx.saved_tensors
    k = x.shape[-1]
    centered, col_group = centered_codes(qweight, zeros, ctx.bits, ctx.group_size, k)
    gx = gs = gb = None
    if ctx.needs_input_grad[0]:
        w = centered * scales.to(torch.float32)[:, col_group]
        gx = grad @ w.to(grad.dtype)
    if ctx.needs_input_grad[2]:
        g2 = grad.reshape(-1, grad.shape[-1]).to(torch.float32)
        gw = g2.T @ x.reshape(-1, k).to(torch.float32)  # dL/dW (out × in)
        gs = torch.zeros(scales.shape, dtype=torch.float32, device=scales.device)
        gs.index_add_(1, col_group, gw * centered)  # dW[n, k]/ds[n, g] = q − z in group g
        gs = gs.to(scales.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return gx, None, gs, None, gb, None, None


quant_linear.register_autograd(_backward, setup_context=_setup)
