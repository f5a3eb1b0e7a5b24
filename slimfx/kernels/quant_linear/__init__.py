"""``quant_linear``: y = x @ deq(W)ᵀ + b for int4/int8 weight-only codes.

Registers the opaque custom op ``slimfx_kernels::quant_linear_triton`` (fake implementation
included); the Triton launcher is imported on the first real call, so defining the op needs no
triton. ``reference.quant_linear_reference`` is the ground truth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.formats import RUNTIME_BITS
from slimfx.kernels import Kernel

__all__ = ["quant_linear_triton", "KERNELS"]


@torch.library.custom_op("slimfx_kernels::quant_linear_triton", mutates_args=())
def quant_linear_triton(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group_size: int | None,
) -> Tensor:
    """Triton ``x @ deq(W)ᵀ + b`` (see ``triton_kernel``); output in ``x.dtype``."""
    from slimfx.kernels.quant_linear.triton_kernel import quant_linear

    return quant_linear(x, qweight, scales, zeros, bias, bits, group_size)


@quant_linear_triton.register_fake
def _(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group_size: int | None,
) -> Tensor:
    torch._check(bits in RUNTIME_BITS, lambda: f"bits {bits} unsupported (4 or 8)")
    torch._check(qweight.dim() == 2, lambda: "qweight must be 2-D")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


#: the kernels of ``slimfx::quant_linear``, in order of preference (the ``quant`` form's).
KERNELS: list[Kernel] = [
    Kernel(
        "quant_linear_triton",
        "quant_linear",
        "slimfx.kernels.quant_linear.triton_kernel",
        description="int4/int8 weight-only; split-K GEMV for M≤16, tiled matmul above",
    ),
]
