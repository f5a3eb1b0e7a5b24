"""The built-in forms: dense, lowrank, quant, sparse24, lowrank_quant, sparse24_lowrank.

Each is one :class:`~slimfx.forms.registry.Form`; pieces from other layers are named by
``"module:attribute"`` and imported when first asked for (see ``slimfx.forms.registry``).
"""

from __future__ import annotations

from slimfx.forms.registry import Form, NotSupported, register_form
from slimfx.planning.configs import (
    DenseConfig,
    LowRankConfig,
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)

__all__ = ["DENSE", "LOWRANK", "QUANT", "SPARSE24", "LOWRANK_QUANT", "SPARSE24_LOWRANK"]

_NUM = "slimfx.numerics"
_ONNX = "slimfx.backends.onnx_ops"
_PROBE = "slimfx.backends.capabilities"
_LOWER = "slimfx.backends.triton_lowering"
_NATIVE = NotSupported("dense is nn.Linear itself: it needs no slimfx piece")
_NO_24_ORT = "onnxruntime has no 2:4 kernel"

DENSE = register_form(
    Form(
        kind="dense",
        config=DenseConfig,
        label="dense",
        colour="#999999",
        op=_NATIVE,
        native="nn.Linear",
        factorize=f"{_NUM}:factorize_dense",
        reconstruct=f"{_NUM}:reconstruct_dense",
        module=_NATIVE,
        rule=_NATIVE,
        onnx_translation=_NATIVE,
        onnx_probe=_NATIVE,
        triton_lowering=_NATIVE,
        kernels=_NATIVE,
        timed="slimfx.cost.measure:timed_dense",
    )
)

LOWRANK = register_form(
    Form(
        kind="lowrank",
        config=LowRankConfig,
        label="lowrank",
        colour="#1f77b4",
        op="slimfx.ir.ops:lowrank_linear",
        factorize=f"{_NUM}.lowrank:factorize_lowrank",
        reconstruct=f"{_NUM}.lowrank:reconstruct_lowrank",
        module="slimfx.ir.modules:LowRankLinear",
        rule="slimfx.passes.rules.lowrank:RULE",
        onnx_translation=f"{_ONNX}:lowrank_linear_onnx",
        onnx_probe=f"{_PROBE}:onnx_lowrank",
        triton_lowering=f"{_LOWER}:LOWRANK",
        kernels="slimfx.kernels.lowrank_linear:KERNELS",
        timed="slimfx.cost.candidates:timed_lowrank",
        families={"lowrank": "slimfx.cost.candidates:lowrank_candidates"},
    )
)

QUANT = register_form(
    Form(
        kind="quant",
        config=QuantConfig,
        label="quant",
        colour="#ff7f0e",
        op="slimfx.ir.ops_quant:quant_linear",
        factorize=f"{_NUM}.quant:factorize_quant",
        reconstruct=f"{_NUM}.quant:reconstruct_quant",
        module="slimfx.ir.modules_quant:QuantLinear",
        rule="slimfx.passes.rules.quant:RULE",
        onnx_translation=f"{_ONNX}:quant_linear_onnx",
        onnx_probe=f"{_PROBE}:onnx_quant",
        triton_lowering=f"{_LOWER}:QUANT",
        kernels="slimfx.kernels.quant_linear:KERNELS",
        timed="slimfx.cost.family_quant:timed_quant",
        families={
            "int8": "slimfx.cost.family_quant:int8_candidates",
            "int4": "slimfx.cost.family_quant:int4_candidates",
            "int4_gptq": "slimfx.cost.family_quant:int4_gptq_candidates",
        },
    )
)

SPARSE24 = register_form(
    Form(
        kind="sparse24",
        config=Sparse24Config,
        label="sparse24",
        colour="#2ca02c",
        op="slimfx.ir.ops_sparse:sparse24_linear",
        factorize=f"{_NUM}.sparse:factorize_sparse24",
        reconstruct=f"{_NUM}.sparse:reconstruct_sparse24",
        module="slimfx.ir.modules_sparse:Sparse24Linear",
        rule="slimfx.passes.rules.sparse:RULE",
        onnx_translation=f"{_ONNX}:sparse24_linear_onnx",
        onnx_probe=NotSupported(f"no: priced as dense — {_NO_24_ORT} (exported dense)"),
        triton_lowering=f"{_LOWER}:SPARSE24",
        kernels="slimfx.kernels.sparse24_linear:KERNELS",
        timed=NotSupported("2:4 is opt-in and pays only on GPUs: time it by passing decisions="),
        families={"sparse24": "slimfx.cost.family_sparse:sparse24_candidates"},
    )
)

LOWRANK_QUANT = register_form(
    Form(
        kind="lowrank_quant",
        config=LowRankQuantConfig,
        label="lowrank_quant",
        colour="#d62728",
        op="slimfx.ir.ops_sparse:quant_lowrank_linear",
        factorize=f"{_NUM}.combo:factorize_lowrank_quant",
        reconstruct=f"{_NUM}.combo:reconstruct_lowrank_quant",
        module="slimfx.ir.modules_sparse:LowRankQuantLinear",
        rule="slimfx.passes.rules.combo:LOWRANK_QUANT_RULE",
        onnx_translation=f"{_ONNX}:quant_lowrank_linear_onnx",
        onnx_probe=f"{_PROBE}:onnx_quant",
        triton_lowering=NotSupported(
            "no Triton kernel for slimfx::quant_lowrank_linear (it runs the CPU reference)"
        ),
        kernels=NotSupported("no Triton kernel for slimfx::quant_lowrank_linear"),
        timed=NotSupported("combined forms are opt-in: time them by passing decisions="),
        families={"lowrank_quant": "slimfx.cost.family_sparse:lowrank_quant_candidates"},
    )
)

SPARSE24_LOWRANK = register_form(
    Form(
        kind="sparse24_lowrank",
        config=Sparse24LowRankConfig,
        label="sparse24_lowrank",
        colour="#9467bd",
        op="slimfx.ir.ops_sparse:sparse24_lowrank_linear",
        factorize=f"{_NUM}.combo:factorize_sparse24_lowrank",
        reconstruct=f"{_NUM}.combo:reconstruct_sparse24_lowrank",
        module="slimfx.ir.modules_sparse:Sparse24LowRankLinear",
        rule="slimfx.passes.rules.combo:SPARSE24_LOWRANK_RULE",
        onnx_translation=f"{_ONNX}:sparse24_lowrank_linear_onnx",
        onnx_probe=NotSupported(f"no: priced as dense — {_NO_24_ORT} (exported dense)"),
        triton_lowering=NotSupported(
            "no Triton kernel for slimfx::sparse24_lowrank_linear (it runs the CPU reference)"
        ),
        kernels=NotSupported("no Triton kernel for slimfx::sparse24_lowrank_linear"),
        timed=NotSupported("combined forms are opt-in: time them by passing decisions="),
        families={"sparse24_lowrank": "slimfx.cost.family_sparse:sparse24_lowrank_candidates"},
    )
)
