"""Kernel registry: several implementations per slimfx op, each with a ``supports()`` that says
why not.

``KERNELS[op_name]`` lists the implementations of one semantic op (``quant_linear``,
``lowrank_linear``, ``sparse24_linear``) in order of preference. A :class:`Kernel` is a name, a
``supports(x, **tensors) -> (bool, reason)`` predicate and a ``run(x, **tensors)`` callable.
:func:`select` returns the first kernel that accepts a call and the reasons the others declined,
so a backend can fall back to the op's reference implementation and say why.

Triton is imported lazily: ``import slimfx.kernels`` works without triton (every Triton kernel
then declines with ``"triton is not installed"``). Importing this package registers the opaque
``slimfx_kernels::<op>_triton`` custom ops (their fake implementations need no triton), so a
graph that calls them exports and compiles wherever slimfx is importable.

Per-op folders hold ``reference.py`` (plain torch ground truth from the storage format, see
``slimfx.numerics``) and ``triton_kernel.py`` (docstring, configs, ``@triton.jit`` kernels,
launcher, ``supports``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = [
    "Kernel",
    "KERNELS",
    "select",
    "triton_available",
    "device_reason",
    "interpret_mode",
]

SupportsFn = Callable[..., tuple[bool, str]]
RunFn = Callable[..., Tensor]


def triton_available() -> tuple[bool, str]:
    """Whether ``import triton`` works; the reason when it does not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f"triton is not installed ({type(e).__name__}: {e})"
    return True, ""


def interpret_mode() -> bool:
    """Whether ``TRITON_INTERPRET`` is set now (Triton then runs kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no")


def device_reason(x: Tensor, jit_fn: Any, tensors: dict[str, Tensor | None]) -> str:
    """Empty string when ``jit_fn`` (a Triton kernel) can run on ``x``'s device, else why not.

    On CPU the kernel must have been created under ``TRITON_INTERPRET=1``: triton decides at
    ``@triton.jit`` time, so setting the variable after the kernel module was imported is not
    enough. All other tensors must live on ``x``'s device.
    """
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            return f"{name} on {t.device} but x on {x.device}"
    if x.device.type == "cuda":
        if type(jit_fn).__name__ == "InterpretedFunction":
            return "x on cuda but the Triton kernels were built under TRITON_INTERPRET"
        return ""
    if x.device.type == "cpu":
        if type(jit_fn).__name__ == "InterpretedFunction":
            return ""
        if not interpret_mode():
            return "x on cpu and TRITON_INTERPRET is not set"
        return (
            "x on cpu but the Triton kernels were compiled without TRITON_INTERPRET "
            "(set it before the kernel module is imported)"
        )
    return f"device {x.device.type} unsupported (Triton runs on cuda, or cpu when interpreted)"


@dataclass(frozen=True)
class Kernel:
    """One implementation of a slimfx op.

    ``module``/``supports_attr``/``run_attr`` name the callables; they are imported on first use
    so that listing kernels never imports triton.
    """

    name: str
    op: str
    module: str
    supports_attr: str = "supports"
    run_attr: str = "run"
    description: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def _resolve(self, attr: str) -> Callable[..., Any]:
        if attr not in self._cache:
            mod = importlib.import_module(self.module)
            self._cache[attr] = getattr(mod, attr)
        return self._cache[attr]

    def supports(self, x: Tensor, **tensors: Any) -> tuple[bool, str]:
        """``(True, "")`` when this kernel can run the call, else ``(False, reason)``."""
        ok, why = triton_available()
        if not ok and self.module.endswith("triton_kernel"):
            return False, why
        try:
            fn = self._resolve(self.supports_attr)
        except ImportError as e:
            return False, f"cannot import {self.module}: {e}"
        return fn(x, **tensors)

    def run(self, x: Tensor, **tensors: Any) -> Tensor:
        """Run the kernel; call :meth:`supports` first (``run`` does not re-check)."""
        return self._resolve(self.run_attr)(x, **tensors)


KERNELS: dict[str, list[Kernel]] = {
    "quant_linear": [
        Kernel(
            "quant_linear_triton",
            "quant_linear",
            "slimfx.kernels.quant_linear.triton_kernel",
            description="int4/int8 weight-only; split-K GEMV for M≤16, tiled matmul above",
        ),
    ],
    "lowrank_linear": [
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
    ],
    "sparse24_linear": [
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
    ],
}


def select(op_name: str, x: Tensor, **tensors: Any) -> tuple[Kernel | None, list[str]]:
    """The first kernel of ``op_name`` that supports this call, and ``"name: reason"`` for each
    kernel before it that declined (all of them when none accepts)."""
    if op_name not in KERNELS:
        return None, [f"no kernels registered for op {op_name!r}; known: {sorted(KERNELS)}"]
    reasons: list[str] = []
    for kernel in KERNELS[op_name]:
        ok, why = kernel.supports(x, **tensors)
        if ok:
            return kernel, reasons
        reasons.append(f"{kernel.name}: {why}")
    return None, reasons


# Registering the custom ops (fake implementations included) needs no triton.
from slimfx.kernels import lowrank_linear, quant_linear, sparse24_linear  # noqa: E402,F401
