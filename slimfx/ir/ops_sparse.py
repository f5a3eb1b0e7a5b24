"""2:4 sparse and combined (core + low-rank) linears as slimfx custom ops.

    slimfx::sparse24_linear(x, values, meta, bias?)
        = x @ Sᵀ + bias
    slimfx::quant_lowrank_linear(x, qweight, scales, zeros?, U, V, bias?, bits, group_size)
        = x @ deq(Q)ᵀ + (x @ Vᵀ) @ Uᵀ + bias
    slimfx::sparse24_lowrank_linear(x, values, meta, U, V, bias?)
        = x @ Sᵀ + (x @ Vᵀ) @ Uᵀ + bias

Storage (``slimfx.formats``, which also unpacks and dequantizes):
``values`` (out × in/2) the two kept weights of every group of four columns in column order;
``meta`` uint8 (out × in/8), per group two 2-bit positions (first kept in bits 0-1, second in
bits 2-3), two groups per byte, the even group in the low nibble; S is the dense matrix they
encode. ``U`` (out × r), ``V`` (r × in). in_features is ``x.shape[-1]`` (a multiple of 8).

Reference semantics (as ``quant_linear``): the sparse / dequantized weight is formed in fp32,
rounded to ``x.dtype``, then ``F.linear`` in ``x.dtype``; the low-rank branch runs in
``x.dtype``. Autograd flows to ``x``, ``values``, ``scales``, ``U``, ``V`` and ``bias`` (the
codes, zero points and metadata are integers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimfx.formats import densify24
from slimfx.formats import positions24 as sparse24_positions
from slimfx.ir.ops_quant import check_quant_args, dequantize_weight

__all__ = [
    "sparse24_linear",
    "quant_lowrank_linear",
    "sparse24_lowrank_linear",
    "sparse24_positions",
    "densify24",
]


def _check_sparse(x: Tensor, values: Tensor, meta: Tensor) -> None:
    k = x.shape[-1]
    torch._check(k % 8 == 0, lambda: f"2:4 needs in_features % 8 == 0, got {k}")
    torch._check(meta.dtype == torch.uint8, lambda: "meta must be uint8")
    torch._check(
        values.dim() == 2 and values.shape[1] * 2 == k, lambda: "values must be out × in/2"
    )
    torch._check(
        meta.dim() == 2 and meta.shape[0] == values.shape[0] and meta.shape[1] * 8 == k,
        lambda: "meta must be out × in/8",
    )


def _check_lowrank(x: Tensor, out_f: int, U: Tensor, V: Tensor) -> None:
    torch._check(V.dim() == 2 and V.shape[1] == x.shape[-1], lambda: "V must be r × in")
    torch._check(
        U.dim() == 2 and U.shape[0] == out_f and U.shape[1] == V.shape[0],
        lambda: "U must be out × r",
    )


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _bias(bias: Tensor | None, x: Tensor) -> Tensor | None:
    return None if bias is None else bias.to(x.dtype)


def _lowrank_grads(  # noqa: ANN202
    ctx,
    grad: Tensor,
    x: Tensor,
    U: Tensor,
    V: Tensor,
    iu: int,
    iv: int,  # noqa: ANN001
):
    """(gx contribution, gU, gV) of the branch x Vᵀ Uᵀ."""
    g_h = grad @ U.to(grad.dtype)  # … × r
    gx = g_h @ V.to(grad.dtype)
    gU = gV = None
    if ctx.needs_input_grad[iu]:
        h = F.linear(x, V.to(x.dtype))
        gU = (_rows(grad).T @ _rows(h).to(grad.dtype)).to(U.dtype)
    if ctx.needs_input_grad[iv]:
        gV = (_rows(g_h).T @ _rows(x).to(grad.dtype)).to(V.dtype)
    return gx, gU, gV


def _values_grad(grad: Tensor, x: Tensor, meta: Tensor, values: Tensor) -> Tensor:
    gw = _rows(grad).to(torch.float32).T @ _rows(x).to(torch.float32)  # out × in
    return gw.gather(1, sparse24_positions(meta, x.shape[-1])).to(values.dtype)


# --------------------------------------------------------------------------- sparse24_linear


@torch.library.custom_op("slimfx::sparse24_linear", mutates_args=())
def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ Sᵀ + bias`` for a 2:4 sparse weight S stored as ``values`` / ``meta``."""
    w = densify24(values, meta, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, _bias(bias, x))


@sparse24_linear.register_fake
def _(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    _check_sparse(x, values, meta)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _sparse_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _sparse_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    x, values, meta = ctx.saved_tensors
    k = x.shape[-1]
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = grad @ densify24(values, meta, k).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        gv = _values_grad(grad, x, meta, values)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        gb = _rows(grad).sum(0).to(ctx.bias_dtype)
    return gx, gv, None, gb


sparse24_linear.register_autograd(_sparse_backward, setup_context=_sparse_setup)


# ---------------------------------------------------------------------- quant_lowrank_linear


@torch.library.custom_op("slimfx::quant_lowrank_linear", mutates_args=())
def quant_lowrank_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    U: Tensor,
    V: Tensor,
    bias: Tensor | None,
    bits: int,
    group_size: int,
) -> Tensor:
    """``x @ deq(Q)ᵀ + x @ Vᵀ @ Uᵀ + bias``: a quantized weight plus a low-rank correction."""
    w = dequantize_weight(qweight, scales, zeros, bits, group_size, x.shape[-1]).to(x.dtype)
    y = F.linear(x, w, _bias(bias, x))
    return y + F.linear(F.linear(x, V.to(x.dtype)), U.to(x.dtype))


@quant_lowrank_linear.register_fake
def _(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    U: Tensor,
    V: Tensor,
    bias: Tensor | None,
    bits: int,
    group_size: int,
) -> Tensor:
    k = x.shape[-1]
    check_quant_args(k, qweight, scales, zeros, bits, group_size, "quant_lowrank_linear")
    _check_lowrank(x, qweight.shape[0], U, V)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _ql_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, qweight, scales, zeros, U, V, bias, bits, group_size = inputs
    ctx.save_for_backward(x, qweight, scales, zeros, U, V)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _ql_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    x, qweight, scales, zeros, U, V = ctx.saved_tensors
    k = x.shape[-1]
    ones = torch.ones(scales.shape, dtype=torch.float32, device=scales.device)
    centered = dequantize_weight(qweight, ones, zeros, ctx.bits, ctx.group_size, k)  # q − z
    col_group = torch.arange(k, device=x.device) // ctx.group_size
    gl, gU, gV = _lowrank_grads(ctx, grad, x, U, V, 4, 5)
    gx = gs = gb = None
    if ctx.needs_input_grad[0]:
        w = centered * scales.to(torch.float32)[:, col_group]
        gx = grad @ w.to(grad.dtype) + gl
    if ctx.needs_input_grad[2]:
        gw = _rows(grad).to(torch.float32).T @ _rows(x).to(torch.float32)
        gs = torch.zeros(scales.shape, dtype=torch.float32, device=scales.device)
        gs.index_add_(1, col_group, gw * centered)
        gs = gs.to(scales.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
        gb = _rows(grad).sum(0).to(ctx.bias_dtype)
    return gx, None, gs, None, gU, gV, gb, None, None


quant_lowrank_linear.register_autograd(_ql_backward, setup_context=_ql_setup)


# ------------------------------------------------------------------- sparse24_lowrank_linear


@torch.library.custom_op("slimfx::sparse24_lowrank_linear", mutates_args=())
def sparse24_lowrank_linear(
    x: Tensor, values: Tensor, meta: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``x @ Sᵀ + x @ Vᵀ @ Uᵀ + bias``: a 2:4 sparse weight plus a low-rank correction."""
    w = densify24(values, meta, x.shape[-1]).to(x.dtype)
    y = F.linear(x, w, _bias(bias, x))
    return y + F.linear(F.linear(x, V.to(x.dtype)), U.to(x.dtype))


@sparse24_lowrank_linear.register_fake
def _(
    x: Tensor, values: Tensor, meta: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None
) -> Tensor:
    _check_sparse(x, values, meta)
    _check_lowrank(x, values.shape[0], U, V)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _sl_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, values, meta, U, V, bias = inputs
    ctx.save_for_backward(x, values, meta, U, V)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _sl_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    x, values, meta, U, V = ctx.saved_tensors
    k = x.shape[-1]
    gl, gU, gV = _lowrank_grads(ctx, grad, x, U, V, 3, 4)
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = grad @ densify24(values, meta, k).to(grad.dtype) + gl
    if ctx.needs_input_grad[1]:
        gv = _values_grad(grad, x, meta, values)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        gb = _rows(grad).sum(0).to(ctx.bias_dtype)
    return gx, gv, None, gU, gV, gb


sparse24_lowrank_linear.register_autograd(_sl_backward, setup_context=_sl_setup)
