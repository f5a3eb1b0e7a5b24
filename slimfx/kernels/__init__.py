"""Kernel registry: several implementations per slimfx op, each with a ``supports()`` that says
why not.

Each form names the kernels of its op (``slimfx.forms``: ``Form.kernels``, the ``KERNELS`` list
of the op's folder here) in order of preference; :func:`kernels_of` asks the registry. A
:class:`Kernel` is a name, a
``supports(x, **tensors) -> (bool, reason)`` predicate and a ``run(x, **tensors)`` callable.
:func:`select` returns the first kernel that accepts a call and the reasons the others declined,
so a backend can fall back to the op's reference implementation and say why.

Triton is imported lazily: ``import slimfx.kernels`` works without triton (every Triton kernel
then declines with ``"triton is not installed"``). Importing this package imports every form's
kernel folder, registering the opaque ``slimfx_kernels::<op>_triton`` custom ops (their fake
implementations need no triton), so a graph that calls them exports and compiles wherever
slimfx is importable.

Per-op folders hold ``__init__.py`` (the kernel op and the ``KERNELS`` list), ``reference.py``
(plain torch ground truth from the storage format, ``slimfx.formats``) and ``triton_kernel.py``
(docstring, configs, ``@triton.jit`` kernels, launcher, ``supports``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from slimfx import forms

__all__ = [
    "Kernel",
    "kernels_of",
    "select",
    "triton_available",
    "device_reason",
    "interpret_mode",
    "interpreter_reason",
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


#: the first Triton release whose interpreter runs these kernels on CPU tensors
INTERPRETER_MIN = (3, 7)


def interpreter_reason() -> str:
    """Why Triton's interpreter cannot run slimfx's kernels here ('' when it can): before 3.7
    it cannot run a loop whose bounds come from the program id (every split loop here); the
    same kernels compile and run on a GPU with those releases."""
    import triton

    try:
        version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:  # a development build: assume it can
        return ""
    if version >= INTERPRETER_MIN:
        return ""
    return (
        f"Triton {triton.__version__}'s interpreter cannot run loops bounded by the program "
        "id, which these kernels use: interpreting them on the CPU needs triton ≥ "
        f"{'.'.join(map(str, INTERPRETER_MIN))} (compiled on a GPU they run with this release)"
    )


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
            return interpreter_reason()
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


def kernels_of(op_name: str) -> list[Kernel]:
    """The kernels of slimfx op ``op_name`` in order of preference (its form's ``kernels``;
    empty when no form has that op or its form has no kernels)."""
    form = forms.form_of_op(op_name)
    if form is None or not form.has("kernels"):
        return []
    return list(form.get("kernels"))


def select(op_name: str, x: Tensor, **tensors: Any) -> tuple[Kernel | None, list[str]]:
    """The first kernel of ``op_name`` that supports this call, and ``"name: reason"`` for each
    kernel before it that declined (all of them when none accepts)."""
    form = forms.form_of_op(op_name)
    if form is None or not form.has("kernels"):
        known = sorted(f.op_name or f.kernel_op for f in forms.forms() if f.has("kernels"))
        why = "" if form is None else f" ({form.why_not('kernels')})"
        return None, [f"no kernels registered for op {op_name!r}{why}; known: {known}"]
    reasons: list[str] = []
    for kernel in kernels_of(op_name):
        ok, why = kernel.supports(x, **tensors)
        if ok:
            return kernel, reasons
        reasons.append(f"{kernel.name}: {why}")
    return None, reasons


# Registering the kernel ops (fake implementations included) needs no triton.
for _form in forms.forms():
    if _form.has("kernels"):
        _form.get("kernels")
