"""slimfx: make trained PyTorch models smaller and faster by compiler-style graph rewriting.

    model = slimfx.optimize(model, budget=0.5, calibration=batches)
    print(slimfx.report_of(model))
"""

# every form's decision kind registered, so Plan.load reads KV-cache and MLA decisions in a
# fresh process (the registry and configs only: light)
from slimfx import forms  # noqa: E402,I001
from slimfx.planning.configs import (
    DenseConfig,
    LowRankConfig,
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)
from slimfx.planning.plan import Plan
from slimfx.planning.problem import Budget, InfeasibleBudgetError

__version__ = "0.1.0"

__all__ = [
    "optimize",
    "report_of",
    "report_of_compiled",
    "save",
    "load",
    "Plan",
    "Budget",
    "InfeasibleBudgetError",
    "DenseConfig",
    "LowRankConfig",
    "QuantConfig",
    "Sparse24Config",
    "LowRankQuantConfig",
    "Sparse24LowRankConfig",
    "Report",
    "forms",
    "register_form",
    "backend",
    "calibrate_target",
    "prepare_cpu",
    "release_cpu",
]


def __getattr__(name: str):  # lazy: keep `import slimfx` light (no transformers, no export)
    if name in ("optimize", "report_of"):
        from slimfx import api

        return getattr(api, name)
    if name == "report_of_compiled":  # the report of a slimfx torch.compile backend
        from slimfx.backends.compile import report_of_compiled

        return report_of_compiled
    if name in ("save", "load"):
        from slimfx import io

        return getattr(io, name)
    if name == "backend":  # torch.compile backend with a budget (slimfx.compile_api)
        from slimfx.compile_api import backend

        return backend
    if name in ("export_onnx", "ort_session"):  # ONNX export / ONNX Runtime (slimfx.backends.onnx)
        from slimfx.backends import onnx

        return getattr(onnx, name)
    if name == "calibrate_target":  # measured kernel times for a target (slimfx.latency_calibration)
        from slimfx.latency_calibration import calibrate_target

        return calibrate_target
    if name in ("forms", "register_form"):  # the form registry (slimfx.forms)
        import slimfx.forms as forms

        return forms if name == "forms" else forms.register_form
    if name in ("prepare_cpu", "release_cpu"):  # packed CPU kernels; the report follows
        from slimfx import api

        return getattr(api, name)
    if name == "Report":
        from slimfx.report import Report

        return Report
    raise AttributeError(f"module 'slimfx' has no attribute {name!r}")
