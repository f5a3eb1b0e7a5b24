"""``slimfx::quant_linear``: a linear whose weight is stored as integer codes, scales and zeros.

    slimfx::quant_linear(x, qweight, scales, zeros?, bias?, bits, group_size)
        = x @ deq(W)ᵀ + bias,   deq(W)[n, k] = (q[n, k] − z[n, k // G]) · s[n, k // G]

Storage (the format fixed in ``slimfx.numerics``; ir does not import numerics, so the unpacking
is repeated here): ``qweight`` uint8, int4 two codes per byte (column k in byte k // 2, low
nibble for even k), int8 one code per byte; ``scales`` (out × in/G); ``zeros`` uint8
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

__all__ = ["quant_linear", "dequantize_weight"]

_BITS = (4, 8)


def _codes(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    if bits == 4:
        q = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).flatten(-2)
        return q[:, :in_features]
    return qweight[:, :in_features]


def _centered(
    qweight: Tensor, zeros: Tensor | None, bits: int, group_size: int, in_features: int
) -> tuple[Tensor, Tensor]:
    """``(q − z)`` in fp32 (out × in) and the group index of every column."""
    q = _codes(qweight, bits, in_features).to(torch.float32)
    col_group = torch.arange(in_features, device=q.device) // group_size
    if zeros is None:
        return q - float(1 << (bits - 1)), col_group
    return q - zeros.to(torch.float32)[:, col_group], col_group


def dequantize_weight(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> Tensor:
    """The fp32 dense weight (out × in) the stored codes represent."""
    centered, col_group = _centered(qweight, zeros, bits, group_size, in_features)
    return centered * scales.to(torch.float32)[:, col_group]


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
    k = x.shape[-1]
    torch._check(bits in _BITS, lambda: f"quant_linear runs 4 or 8 bits, got {bits}")
    torch._check(qweight.dtype == torch.uint8, lambda: "qweight must be uint8")
    width = (k + 1) // 2 if bits == 4 else k
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
    centered, col_group = _centered(qweight, zeros, ctx.bits, ctx.group_size, k)
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
