"""``sparse24_linear``: y = x Wᵀ + b with W 2:4 sparse (``values`` + 2-bit ``meta``).

Registers the opaque custom op ``slimfx_kernels::sparse24_linear_triton`` (fake implementation
included; triton is imported on the first real call), and holds the prefill path that needs no
triton: torch's semi-structured sparse tensors (CUTLASS / cuSPARSELt), CUDA only.
``reference.sparse24_linear_reference`` is the ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from slimfx.kernels import Kernel
from slimfx.kernels.sparse24_linear.reference import check_sparse24_args, densify_sparse24

__all__ = [
    "sparse24_linear_triton",
    "supports_semi_structured",
    "run_semi_structured",
    "SEMI_STRUCTURED_MIN_M",
    "KERNELS",
]

#: Below this many rows the Triton GEMV serves the call (decode); from here the tensor-core
#: semi-structured kernels (prefill).
SEMI_STRUCTURED_MIN_M = 17


@torch.library.custom_op("slimfx_kernels::sparse24_linear_triton", mutates_args=())
def sparse24_linear_triton(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    """Triton 2:4 ``x @ Wᵀ + b`` (see ``triton_kernel``); output in ``x.dtype``."""
    from slimfx.kernels.sparse24_linear.triton_kernel import sparse24_linear

    return sparse24_linear(x, values, meta, bias)


@sparse24_linear_triton.register_fake
def _(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    torch._check(x.shape[-1] == 2 * values.shape[1], lambda: "x last dim must be 2·values cols")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def supports_semi_structured(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None
) -> tuple[bool, str]:
    """Whether torch's semi-structured sparse matmul can run this call (CUDA, sm80+, fp16/bf16,
    weight N×K a multiple of 32×64, M ≥ 17)."""
    why = check_sparse24_args(x, values, meta, bias)
    if why:
        return False, why
    if not torch.cuda.is_available():
        return False, "CUDA not available (torch semi-structured sparsity is GPU-only)"
    if x.device.type != "cuda":
        return False, f"x on {x.device}; torch semi-structured sparsity needs cuda"
    cap = torch.cuda.get_device_capability(x.device)
    if cap < (8, 0):
        return False, f"compute capability {cap[0]}.{cap[1]} < 8.0 (no sparse tensor cores)"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False, f"x dtype {x.dtype} unsupported by the semi-structured path (fp16/bf16)"
    M = x.numel() // x.shape[-1]
    if M < SEMI_STRUCTURED_MIN_M:
        return False, f"M={M} rows < {SEMI_STRUCTURED_MIN_M}: decode is served by the GEMV"
    N, K = values.shape[0], x.shape[-1]
    if N % 32 or K % 64:
        return False, f"weight {N}×{K} is not a multiple of 32×64 (torch semi-structured shapes)"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError as e:
        return False, f"torch.sparse.to_sparse_semi_structured unavailable: {e}"
    return True, ""


# values tensor → (meta version, values version, dtype, compressed weight). Keyed weakly by the
# tensor's identity: compressing costs a dense round trip, so it is done once per weight.
_COMPRESSED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _compressed_weight(
    values: Tensor, meta: Tensor, in_features: int, dtype: torch.dtype
) -> Tensor:
    from torch.sparse import to_sparse_semi_structured

    key = (meta.data_ptr(), meta._version, values._version, dtype)
    hit = _COMPRESSED.get(values)
    if hit is not None and hit[0] == key:
        return hit[1]
    dense = densify_sparse24(values, meta, in_features).to(dtype).contiguous()
    w = to_sparse_semi_structured(dense)
    _COMPRESSED[values] = (key, w)
    return w


def run_semi_structured(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``F.linear`` on torch's compressed 2:4 weight (compressed once per weight, cached)."""
    w = _compressed_weight(values, meta, x.shape[-1], x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


#: the kernels of ``slimfx::sparse24_linear``, in order of preference (the ``sparse24`` form's).
KERNELS: list[Kernel] = [
    Kernel(
        "sparse24_linear_semi_structured",
        "sparse24_linear",
        "slimfx.kernels.sparse24_linear",
        supports_attr="supports_semi_structured",
        run_attr="run_semi_structured",
        description="torch to_sparse_semi_structured (CUTLASS/cuSPARSELt), prefill, CUDA",
    ),
    Kernel(
        "sparse24_linear_triton_gemv",
        "sparse24_linear",
        "slimfx.kernels.sparse24_linear.triton_kernel",
        description="2:4 GEMV on kept values + 2-bit indices (any M; tl.dot for M>1)",
    ),
]
