"""What runs each rewritten linear on the CPU in PyTorch, and installing the packed kernels.

    records = slimfx.prepare_cpu(model)        # optimize() and load() call it for CPU models
    records["model.layers.0.mlp.up_proj"]       # CpuRuntime(kernel="int4pack", ...)
    slimfx.release_cpu(model)                   # drop the packed copies (reference ops again)

Per form (``slimfx.ir.cpu_packed`` holds the kernels):

- weight-only int4 / int8 (and the quantized part of low-rank + quantized): the packed torch
  kernels where the layout fits (``cpu_kernel_for``), else the reference op with the reason;
- low-rank: its two GEMMs in the model's dtype (no dequantization to avoid);
- 2:4 sparse and 2:4 + low-rank: the reference op, which densifies the weight on every call —
  no CPU kernel reads the 2:4 layout, so these sites run **slower than dense** in eager (the
  record says so; a latency budget should price them with a measured cache).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from slimfx.ir import cpu_packed
from slimfx.ir.modules import SlimLinear

__all__ = [
    "CpuRuntime", "prepare_cpu", "release_cpu", "reference_ops", "cpu_runtimes", "runtime_of",
    "packed_bytes",
]


@dataclass(frozen=True)
class CpuRuntime:
    """How one rewritten linear runs on the CPU in PyTorch eager.

    ``kernel``: what runs (``"int4pack"``, ``"int8pack"``, ``"two GEMMs"``, ``"reference op"``);
    ``activations``: the dtype at the kernel boundary; ``reason``: why this and not faster;
    ``slower_than_dense``: whether this path is known to be slower than the dense layer at
    decode (the reference ops that dequantize or densify the whole weight per call; an int8
    weight of many groups in a half-precision model); ``slower_at_prefill``: whether the dense
    GEMM beats it on prefill-sized inputs (the packed kernels in a half-precision model, whose
    dense layer is itself a fast bf16 GEMM) — both measured by ``benchmarks/cpu_torch.py``."""

    kernel: str
    activations: str
    reason: str
    slower_than_dense: bool
    slower_at_prefill: bool = False

    def label(self) -> str:
        """``int4pack (bf16 activations)``-style text for reports."""
        return f"{self.kernel} ({self.activations} activations)"

    def caveat(self) -> str:
        """``"; slower than dense in eager"``-style text where dense is faster, else ``""``."""
        if self.slower_than_dense:
            return "; slower than dense in eager"
        return "; slower than dense at prefill" if self.slower_at_prefill else ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


#: int8 group count from which a half-precision model's packed int8 linear is slower than its
#: dense GEMV (12 groups of 128 measured 1.6× dense bf16 at decode; per channel 0.5×)
_MANY_GROUPS = 8


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def runtime_of(module: SlimLinear, activations: str = "auto") -> CpuRuntime:
    """The CPU runtime ``module``'s form gets (without packing anything)."""
    first = next(module.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    if hasattr(module, "qweight"):
        dtype = module.scales.dtype
        kernel, why = cpu_packed.cpu_kernel_for(
            module.bits, module.group_size, module.in_features, module.out_features
        )
        if kernel is not None:
            act = cpu_packed.act_dtype_for(dtype, activations)
            if act != dtype:
                why += (f"; activations rounded to {_dtype_name(act)} at the boundary (the "
                        f"kernel is slower than dense with {_dtype_name(dtype)} ones)")
            half = dtype in (torch.bfloat16, torch.float16)
            slow = False
            groups = module.in_features // module.group_size
            if half and kernel == "int8pack" and groups >= _MANY_GROUPS:
                slow = True
                why += (f"; one kernel call per group ({groups} groups): slower than the dense "
                        f"{_dtype_name(dtype)} GEMV at decode")
            if half:
                why += (f"; the dense {_dtype_name(dtype)} GEMM beats the packed kernel on "
                        "prefill-sized inputs")
            if hasattr(module, "U"):
                kernel, why = f"{kernel} + two GEMMs", why + "; the low-rank part as two GEMMs"
            return CpuRuntime(kernel, _dtype_name(act), why, slow, half)
        return CpuRuntime(
            "reference op", _dtype_name(dtype),
            f"{why}: the whole weight is dequantized on every call", True,
        )
    if module.decision_kind == "lowrank":
        return CpuRuntime("two GEMMs", _dtype_name(dtype), "x·Vᵀ then ·Uᵀ (F.linear twice)", False)
    return CpuRuntime(
        "reference op", _dtype_name(dtype),
        f"no CPU kernel reads the {module.decision_kind} layout: the weight is densified on "
        "every call",
        True,
    )


def prepare_cpu(
    model: nn.Module,
    *,
    activations: str = "auto",
    dequant_rows: int | None = cpu_packed.DEFAULT_DEQUANT_ROWS,
) -> dict[str, CpuRuntime]:
    """Pack every quantized linear of ``model`` that lives on the CPU for its torch CPU kernel
    (``slimfx.ir.cpu_packed``) and return what runs each rewritten linear, by module name.

    ``activations``: ``"auto"`` (fp32 models' kernels run on bf16 activations, half models in
    their dtype), ``"model"`` (the model's dtype: exact up to accumulation order, slow for fp32)
    or ``"bf16"``. ``dequant_rows``: rows from which a call dequantizes into a scratch weight
    and runs one GEMM instead (prefill; ``None``, the default, never — see ``cpu_packed``). Idempotent; modules on another device are left alone."""
    cpu_packed.act_dtype_for(torch.float32, activations)  # validates the policy
    if dequant_rows is not None and not (isinstance(dequant_rows, int) and dequant_rows >= 1):
        raise ValueError(f"dequant_rows must be None or an int ≥ 1, got {dequant_rows!r}")
    out: dict[str, CpuRuntime] = {}
    for name, m in model.named_modules():
        if not isinstance(m, SlimLinear):
            continue
        rt = runtime_of(m, activations)
        m.__dict__.pop("_cpu_packed", None)
        dev = next(iter(m.buffers()), next(iter(m.parameters()), None))
        if dev is not None and dev.device.type != "cpu":
            out[name] = CpuRuntime(
                "reference op", _dtype_name(dev.dtype),
                f"on {dev.device.type}: the packed kernels are CPU-only (backend='triton' "
                "lowers to GPU kernels)", False,
            )
            continue
        out[name] = rt
        if not hasattr(m, "qweight") or rt.kernel == "reference op":
            continue
        m.__dict__["_cpu_packed"] = cpu_packed.pack_quant(
            m.qweight, m.scales, m.zeros, m.bits, m.group_size, m.in_features,
            activations=activations, dequant_rows=dequant_rows,
        )
    return out


def release_cpu(model: nn.Module) -> int:
    """Drop every packed copy in ``model`` (its linears run the reference ops again); returns
    how many were dropped."""
    n = 0
    for m in model.modules():
        if isinstance(m, SlimLinear) and m.__dict__.pop("_cpu_packed", None) is not None:
            n += 1
    return n


@contextmanager
def reference_ops(model: nn.Module) -> Iterator[None]:
    """Inside: ``model``'s rewritten linears run their reference ops (the exact dequantized
    product; the packed kernels round fp32 activations to bf16); after, the same packed copies
    are back, also after an error."""
    held = {}
    for m in model.modules():
        if isinstance(m, SlimLinear) and "_cpu_packed" in m.__dict__:
            held[m] = m.__dict__.pop("_cpu_packed")
    try:
        yield
    finally:
        for m, packed in held.items():
            m.__dict__["_cpu_packed"] = packed


def cpu_runtimes(model: nn.Module) -> dict[str, CpuRuntime]:
    """What runs each rewritten linear now: the packed kernel where one is installed, else the
    reference path (without installing anything)."""
    out: dict[str, CpuRuntime] = {}
    for name, m in model.named_modules():
        if not isinstance(m, SlimLinear):
            continue
        packed = m.__dict__.get("_cpu_packed")
        if packed is None and hasattr(m, "qweight"):
            out[name] = CpuRuntime(
                "reference op", _dtype_name(m.scales.dtype),
                "no packed kernel installed (slimfx.prepare_cpu installs them): the whole "
                "weight is dequantized on every call", True,
            )
            continue
        out[name] = runtime_of(m, packed.policy if packed is not None else "auto")
    return out


def packed_bytes(model: nn.Module) -> int:
    """Bytes the packed copies add to ``model``'s memory (beside the stored codes)."""
    total = 0
    for m in model.modules():
        packed = m.__dict__.get("_cpu_packed") if isinstance(m, SlimLinear) else None
        if packed is not None:
            total += sum(t.numel() * t.element_size()
                         for t in packed.kernel_tensors() if t is not None)
    return total
