"""slimfx.backends: run a rewritten model — torch.compile backend, Triton lowering, ONNX.

Lazy: ``import slimfx.backends`` imports nothing heavy; a name is imported from its module on
first access. Each backend adds its names to ``_LAZY`` (name → module).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # torch.compile backend (slimfx.backends.compile)
    "plan_backend": "slimfx.backends.compile",
    "slimfx_backend": "slimfx.backends.compile",
    "SlimfxBackend": "slimfx.backends.compile",
    "report_of_compiled": "slimfx.backends.compile",
    # Triton lowering (slimfx.backends.triton_lowering)
    "lower_to_triton": "slimfx.backends.triton_lowering",
    "unlower": "slimfx.backends.triton_lowering",
    # ONNX export and ONNX Runtime (slimfx.backends.onnx); capabilities per backend
    **dict.fromkeys(("export_onnx", "ExportResult", "OnnxExportError"), "slimfx.backends.onnx"),
    **dict.fromkeys(("ort_session", "OrtModel"), "slimfx.backends.ort"),
    **dict.fromkeys(("supports", "check_plan"), "slimfx.backends.capabilities"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slimfx.backends' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
