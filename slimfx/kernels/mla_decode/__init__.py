"""``mla_decode``: one decode step of multi-head latent attention over the latent cache.

Registers the opaque custom op ``slimfx_kernels::mla_decode_triton`` (fake implementation
included); the Triton launcher is imported on the first real call, so defining the op needs no
triton. ``reference.mla_decode_reference`` is the ground truth and states the semantics.
``KERNELS`` is what the ``mla`` form names (``slimfx.kernels.kernels_of("mla_decode")``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.kernels import Kernel

__all__ = ["mla_decode_triton", "KERNELS"]


@torch.library.custom_op("slimfx_kernels::mla_decode_triton", mutates_args=())
def mla_decode_triton(
    q_lat: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    latent_scales: Tensor | None,
    k_rope: Tensor,
    lengths: Tensor,
    scale: float,
    num_splits: int = 0,
) -> Tensor:
    """Triton split-sequence MLA decode (see ``triton_kernel``); ``ctx`` in ``q_lat.dtype``."""
    from slimfx.kernels.mla_decode.triton_kernel import mla_decode

    return mla_decode(
        q_lat, q_rope, latent, latent_scales, k_rope, lengths, scale, num_splits=num_splits
    )


@mla_decode_triton.register_fake
def _(
    q_lat: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    latent_scales: Tensor | None,
    k_rope: Tensor,
    lengths: Tensor,
    scale: float,
    num_splits: int = 0,
) -> Tensor:
    torch._check(q_lat.dim() == 3, lambda: "q_lat must be (B, H, R)")
    torch._check(latent.dim() == 3, lambda: "latent must be (B, S, R)")
    return q_lat.new_empty(q_lat.shape)


KERNELS: list[Kernel] = [
    Kernel(
        "mla_decode_triton_split",
        "mla_decode",
        "slimfx.kernels.mla_decode.triton_kernel",
        description="split-sequence absorbed MLA decode over the (int8) latent, merge kernel",
    ),
]
