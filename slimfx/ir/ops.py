"""The slimfx op vocabulary: ``torch.library`` custom ops named for what they compute.

Each op has a CPU/reference implementation and a fake (meta) implementation, so a rewritten
model runs on CPU, exports with torch.export, and can be lowered by op name. Backend names
never appear in op names. Kernels register faster implementations in ``slimfx.kernels``.
Each form names its op (``slimfx.forms``: ``Form.op``); :func:`slimfx_ops` registers them all.

    slimfx::lowrank_linear(x, U, V, bias?)   = x @ Vᵀ @ Uᵀ + bias      U: out×r, V: r×in
    slimfx::dequant_rows(codes, scale)      = codes · scale[:, None]   codes: int8 R×n, scale: R
    slimfx::one_token_or(length, one, more) = one if length == 1 else more

``dequant_rows`` belongs to no linear form: the int8 rows of MLA and of the low-rank caches
(``slimfx.ir.int8_rows``) call it while a model is exported, so the ONNX graph carries their
int8 codes into a ``DequantizeLinear`` (which neither the exporter's optimizer nor ONNX
Runtime folds away).

``one_token_or`` belongs to no form either: an ONNX export of a low-rank KV model computes a
layer's one-token path and its longer-call path and picks by the call length
(:class:`~slimfx.forms.kv.lowrank.LowRankKVAttention`); the export turns the pick into an ONNX
``If`` whose branches hold the nodes each path alone needs
(:mod:`slimfx.backends.onnx_branches`), so ONNX Runtime runs only the chosen path. Tracing the
two paths as plain code is faster than tracing a ``torch.cond`` over them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lowrank_linear", "dequant_rows", "one_token_or", "slimfx_ops"]


@torch.library.custom_op("slimfx::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ Vᵀ @ Uᵀ + bias``: a linear whose weight is the rank-r product ``U @ V``."""
    y = torch.nn.functional.linear(torch.nn.functional.linear(x, V), U, bias)
    return y


@lowrank_linear.register_fake
def _(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    torch._check(x.shape[-1] == V.shape[1], lambda: "x last dim must equal V.shape[1]")
    torch._check(U.shape[1] == V.shape[0], lambda: "U.shape[1] must equal V.shape[0] (rank)")
    return x.new_empty((*x.shape[:-1], U.shape[0]))


def _lowrank_setup(ctx, inputs, output):  # noqa: ANN001
    x, U, V, bias = inputs
    ctx.save_for_backward(x, U, V)
    ctx.has_bias = bias is not None


def _lowrank_backward(ctx, grad):  # noqa: ANN001
    x, U, V = ctx.saved_tensors
    h = torch.nn.functional.linear(x, V)  # … × r
    g_h = grad @ U  # … × r
    gx = g_h @ V
    gU = grad.reshape(-1, grad.shape[-1]).T @ h.reshape(-1, h.shape[-1])
    gV = g_h.reshape(-1, g_h.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return gx, gU, gV, gb


lowrank_linear.register_autograd(_lowrank_backward, setup_context=_lowrank_setup)


@torch.library.custom_op("slimfx::dequant_rows", mutates_args=())
def dequant_rows(codes: Tensor, scale: Tensor) -> Tensor:
    """Symmetric int8 rows back to floats: ``codes (R, n) · scale (R,)`` per row."""
    return codes.to(scale.dtype) * scale[:, None]


@dequant_rows.register_fake
def _(codes: Tensor, scale: Tensor) -> Tensor:
    torch._check(codes.dim() == 2 and scale.dim() == 1, lambda: "codes (R, n), scale (R,)")
    torch._check(codes.shape[0] == scale.shape[0], lambda: "one scale per row of codes")
    return codes.new_empty(codes.shape, dtype=scale.dtype)


@torch.library.custom_op("slimfx::one_token_or", mutates_args=())
def one_token_or(length: int, one: Tensor, more: Tensor) -> Tensor:
    """A copy of ``one`` when ``length == 1``, else of ``more`` (same shape and dtype)."""
    if one.shape != more.shape or one.dtype != more.dtype:
        raise ValueError(
            f"one_token_or: one {tuple(one.shape)} {one.dtype} and more {tuple(more.shape)} "
            f"{more.dtype} differ"
        )
    return (one if length == 1 else more).clone()


@one_token_or.register_fake
def _(length: int, one: Tensor, more: Tensor) -> Tensor:
    torch._check(one.dim() == more.dim(), lambda: "one and more: the same rank")
    torch._check(one.dtype == more.dtype, lambda: "one and more: the same dtype")
    for a, b in zip(one.shape, more.shape):
        torch._check(a == b, lambda: "one and more: the same shape")
    return one.new_empty(one.shape)


def slimfx_ops() -> dict[str, object]:
    """Op name → ``torch.ops`` packet of every registered form's op (importing, and so
    registering, each one)."""
    from slimfx import forms

    return {f.op_name: f.op_packet() for f in forms.forms() if f.has("op")}
