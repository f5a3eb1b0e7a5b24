"""The MLA form in the registry (``mla``, ``site_kind="attention"``).

Registered when ``slimfx.forms`` is imported; this module imports only the registry and the
config (no torch). The form has its config (priced per ``AttentionShape``), its replacement
block (:class:`~slimfx.forms.mla.module.MLAAttention`) and its decode kernel
(``slimfx.kernels.mla_decode``); every other piece is ``NotSupported`` with the reason.
"""

from __future__ import annotations

from slimfx.forms.registry import Form, NotSupported, register_form

from .config import MLAConfig

__all__ = ["MLA", "NO_RULE"]

#: why the module swap and the graph rewrite refuse an MLA decision
NO_RULE = (
    "attention sites are not rewritten by the module swap or the graph rewrite yet: an MLA "
    "decision is applied by slimfx.forms.mla.convert.convert_model"
)
_FIT = NotSupported(
    "the joint key/value latent is fitted per attention block from its k/v/q/o projections "
    "and calibration statistics (slimfx.forms.mla.numerics.fit_mla), not from one weight"
)

_ONNX = (
    "export_onnx translating an MLA block: not yet; the converted model's decode step with "
    "its latent cache is exported by slimfx.backends.onnx_mla.export_mla_onnx"
)

MLA = register_form(
    Form(
        kind="mla",
        config=MLAConfig,
        label="mla",
        colour="#e377c2",
        op=NotSupported("no slimfx op: MLAAttention runs torch ops and the mla_decode kernel"),
        factorize=_FIT,
        reconstruct=_FIT,
        module="slimfx.forms.mla.module:MLAAttention",
        rule=NotSupported(NO_RULE),
        onnx_translation=NotSupported(_ONNX),
        onnx_probe=NotSupported(_ONNX),
        triton_lowering=NotSupported("no graph-level Triton lowering of attention sites yet"),
        kernels="slimfx.kernels.mla_decode:KERNELS",
        timed=NotSupported("calibrate-target times linear layouts only"),
        site_kind="attention",
        kernel_op="mla_decode",
    )
)
