"""``lowrank_linear``: y = (x Vᵀ) Uᵀ + b with U: N × r, V: r × K.

Registers the opaque custom op ``slimfx_kernels::lowrank_linear_triton`` (fake implementation
included; triton is imported on the first real call). The op takes the fused one-launch decode
kernel when M ≤ 16 and r ≤ 256, else two tiled matmuls. ``reference.lowrank_linear_reference``
is the ground truth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.kernels import Kernel

__all__ = ["lowrank_linear_triton", "KERNELS"]


@torch.library.custom_op("slimfx_kernels::lowrank_linear_triton", mutates_args=())
def lowrank_linear_triton(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
    """Triton ``x @ Vᵀ @ Uᵀ + b`` (see ``triton_kernel``); output in ``x.dtype``."""
    from slimfx.kernels.lowrank_linear.triton_kernel import lowrank_linear

    return lowrank_linear(x, U, V, bias)


@lowrank_linear_triton.register_fake
def _(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
    torch._check(x.shape[-1] == V.shape[1], lambda: "x last dim must equal V.shape[1]")
    torch._check(U.shape[1] == V.shape[0], lambda: "U.shape[1] must equal V.shape[0] (rank)")
    return x.new_empty((*x.shape[:-1], U.shape[0]))


#: the kernels of ``slimfx::lowrank_linear``, in order of preference (the ``lowrank`` form's).
KERNELS: list[Kernel] = [
    Kernel(
        "lowrank_linear_triton_fused",
        "lowrank_linear",
        "slimfx.kernels.lowrank_linear.triton_kernel",
        supports_attr="supports_fused",
        run_attr="run_fused",
        description="one launch, rank-r intermediate kept in registers (M≤16, r≤256)",
    ),
    Kernel(
        "lowrank_linear_triton_tiled",
        "lowrank_linear",
        "slimfx.kernels.lowrank_linear.triton_kernel",
        supports_attr="supports_tiled",
        run_attr="run_tiled",
        description="two tiled Triton matmuls through a global rank-r intermediate",
    ),
]
