"""Run one slimfx linear in ONNX Runtime, for measured latencies of the ``onnx`` backend.

``OnnxLinearRunner(threads=2, accuracy_level=0)`` is a runner for
``slimfx.cost.measure.measure_target``: given a built module (dense ``nn.Linear`` or a slimfx
swap module) it exports it with :func:`slimfx.backends.onnx.export_onnx` — the same
translation a whole model gets (low-rank → two MatMul, int4/int8 → MatMulNBits) — opens an
ONNX Runtime session and returns ``fn(x)`` that runs the session on ``x`` (tokens × in, float32).
So a measured entry times the exact ops a deployed model runs, at the accuracy level and thread
count it runs with; both are saved with the entry.

A form that ONNX Runtime would run dense (2:4, a quantized group with no power-of-two block)
raises ``ValueError``: ``measure_target`` skips it, and the roofline prices it — the onnx
backend does not offer those forms anyway (``slimfx.backends.capabilities``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimfx.backends.onnx import export_onnx
from slimfx.backends.ort import OrtModel

__all__ = ["OnnxLinearRunner"]


class OnnxLinearRunner:
    """``runner(module) -> (fn, info)``: ``fn(x)`` runs the module's ONNX export in ONNX
    Runtime; ``info`` names the runtime, its version, the accuracy level, the threads and the
    ops the export holds. ``workdir``: where the one-linear ``.onnx`` files are kept; when
    ``None`` each goes to a temporary folder and is deleted once its session is open."""

    def __init__(
        self,
        threads: int | None = None,
        accuracy_level: int = 0,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        import onnxruntime

        self.threads = threads
        self.accuracy_level = int(accuracy_level)
        self._tmp = tempfile.TemporaryDirectory(prefix="slimfx_ort_") if workdir is None else None
        self.workdir = Path(self._tmp.name if self._tmp is not None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.version = onnxruntime.__version__
        self._n = 0

    def __call__(self, module: nn.Module) -> tuple[Callable[[Tensor], Any], dict[str, Any]]:
        params = list(module.parameters())
        if params and params[0].dtype != torch.float32:
            raise ValueError(
                f"ONNX Runtime timings run float32 weights (its CPU provider has no "
                f"{params[0].dtype} MatMul); measure with dtype=torch.float32"
            )
        in_f = _in_features(module)
        self._n += 1
        path = self.workdir / f"linear_{self._n}.onnx"
        example = torch.zeros(2, in_f)  # ≥ 2 rows, so the token axis stays symbolic
        # exported as a child: a bare module's buffers (2:4's ``meta``) would clash with the
        # exported graph module's own attributes
        res = export_onnx(_Holder(module), path, (example,), accuracy_level=self.accuracy_level)
        dense = [h for h in res.sites.values() if "densified" in h]
        if dense:
            raise ValueError(f"ONNX Runtime runs this form dense: {dense[0]}")
        sess = OrtModel(path, threads=self.threads)
        if self._tmp is not None:  # the session holds the graph: keep disk use to one form
            for f in (res.path, res.data_path):
                if f is not None:
                    f.unlink(missing_ok=True)
        name = sess.input_names[0]

        def fn(x: Tensor, run=sess.session.run, name=name) -> Any:
            return run(None, {name: np.ascontiguousarray(x.detach().cpu().numpy())})

        ops = {k: v for k, v in sorted(res.op_counts.items()) if "MatMul" in k}
        info = {
            "runtime": f"onnxruntime {self.version}",
            "accuracy_level": self.accuracy_level,
            "threads": self.threads,
            "ops": ", ".join(f"{k} {v}" for k, v in ops.items()),
        }
        return fn, info


class _Holder(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.linear = module

    def forward(self, x: Tensor) -> Any:
        return self.linear(x)


def _in_features(module: nn.Module) -> int:
    n = getattr(module, "in_features", None)
    if not isinstance(n, int):
        raise ValueError(f"{type(module).__name__} has no in_features: not a linear")
    return n
