"""``kv_attention``: one decode step of attention over a KIVI-style quantized KV cache.

Registers the opaque custom op ``slimfx_kernels::kv_decode_attention_triton`` (fake
implementation included; ``triton_op`` is not used because it fails under the interpreter);
the Triton launcher is imported on the first real call. ``reference.kv_decode_attention_reference``
is the ground truth; ``reference`` documents the storage layout. ``KERNELS`` is what the
``kv_quant`` form names (``slimfx.kernels.kernels_of("kv_attention")``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.kernels import Kernel

__all__ = ["kv_decode_attention_triton", "KERNELS"]


@torch.library.custom_op("slimfx_kernels::kv_decode_attention_triton", mutates_args=())
def kv_decode_attention_triton(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_min: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_min: Tensor,
    k_win: Tensor,
    v_win: Tensor,
    key_bits: int,
    value_bits: int,
    key_group: int,
    value_group: int,
    scaling: float,
) -> Tensor:
    """Triton decode attention (see ``triton_kernel``); output ``(B, Hq, D)`` in ``q.dtype``."""
    from slimfx.kernels.kv_attention.triton_kernel import kv_decode_attention

    return kv_decode_attention(
        q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_win, v_win,
        key_bits, value_bits, key_group, value_group, scaling,
    )


@kv_decode_attention_triton.register_fake
def _(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_min: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_min: Tensor,
    k_win: Tensor,
    v_win: Tensor,
    key_bits: int,
    value_bits: int,
    key_group: int,
    value_group: int,
    scaling: float,
) -> Tensor:
    torch._check(q.dim() == 3, lambda: "q must be (B, Hq, D)")
    torch._check(k_win.dim() == 4, lambda: "the window must be (B, Hkv, Nw, D)")
    return torch.empty_like(q)


KERNELS: list[Kernel] = [
    Kernel(
        "kv_attention_triton_split",
        "kv_attention",
        "slimfx.kernels.kv_attention.triton_kernel",
        supports_attr="supports_call",
        description="split-sequence decode attention, dequantization fused, GQA rows per program",
    ),
]
