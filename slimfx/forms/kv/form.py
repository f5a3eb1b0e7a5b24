"""The KV-cache forms in the registry: ``kv_dense``, ``kv_quant``, ``kv_lowrank``,
``kv_latent_quant`` (one :class:`~slimfx.forms.registry.Form` each, ``site_kind="attention"``).

Registered when ``slimfx.forms`` is imported; this module imports only the registry and the
configs (no torch). What a KV form has is its config (priced per ``AttentionShape``), the
replacement attention module of the low-rank forms and the decode-attention kernels of the
quantized cache; every other piece is ``NotSupported`` with the reason a caller reports.
"""

from __future__ import annotations

from slimfx.forms.registry import Form, NotSupported, register_form

from .config import KVDenseConfig, KVLatentQuantConfig, KVLowRankConfig, KVQuantConfig

__all__ = ["KV_DENSE", "KV_QUANT", "KV_LOWRANK", "KV_LATENT_QUANT", "NO_RULE"]

#: why the module swap and the graph rewrite refuse a KV decision
NO_RULE = (
    "attention sites are not rewritten by the module swap or the graph rewrite yet: a KV-cache "
    "form is applied by its cache (slimfx.forms.kv.cache.KVCache; apply_lowrank_kv for the "
    "low-rank k/v projections)"
)
_NO_OP = NotSupported(
    "no slimfx op: the cache stores and reads the compressed keys and values itself"
)
_NO_WEIGHT = NotSupported("the form compresses the KV cache at run time, not a weight matrix")
_FIT = NotSupported(
    "k/v factors are fitted per attention site on attention-block inputs "
    "(slimfx.forms.kv.calibrate.fit_site), not from one weight and its Gram"
)
_CACHE_ONLY = NotSupported("no module: the form lives in the cache (slimfx.forms.kv.cache)")
_ONNX = NotSupported("ONNX translation of KV-cache forms: not yet")
_ONNX_PROBE = NotSupported("ONNX export of KV-cache forms: not yet")
_LOWER = NotSupported("no graph-level Triton lowering of attention sites yet")
_NO_KERNELS = NotSupported("no decode-attention kernel over this cache yet (torch path only)")
_TIMED = NotSupported("calibrate-target times linear layouts only")


def _form(kind: str, config: type, label: str, colour: str, **pieces: object) -> Form:
    base: dict[str, object] = dict(
        op=_NO_OP,
        factorize=_NO_WEIGHT,
        reconstruct=_NO_WEIGHT,
        module=_CACHE_ONLY,
        rule=NotSupported(NO_RULE),
        onnx_translation=_ONNX,
        onnx_probe=_ONNX_PROBE,
        triton_lowering=_LOWER,
        kernels=_NO_KERNELS,
        timed=_TIMED,
    )
    base.update(pieces)
    return register_form(
        Form(kind=kind, config=config, label=label, colour=colour, site_kind="attention", **base)  # type: ignore[arg-type]
    )


KV_DENSE = _form(
    "kv_dense",
    KVDenseConfig,
    "kv dense",
    "#c7c7c7",
    module=NotSupported("the model's own 16-bit cache: nothing to build"),
    kernels=NotSupported("the model's own attention reads the 16-bit cache"),
)
KV_QUANT = _form(
    "kv_quant",
    KVQuantConfig,
    "kv quant",
    "#8c564b",
    kernels="slimfx.kernels.kv_attention:KERNELS",
    kernel_op="kv_attention",
)
KV_LOWRANK = _form(
    "kv_lowrank",
    KVLowRankConfig,
    "kv lowrank",
    "#bcbd22",
    factorize=_FIT,
    reconstruct=_FIT,
    module="slimfx.forms.kv.lowrank:LowRankKVAttention",
)
KV_LATENT_QUANT = _form(
    "kv_latent_quant",
    KVLatentQuantConfig,
    "kv latent quant",
    "#9edae5",
    factorize=_FIT,
    reconstruct=_FIT,
    module="slimfx.forms.kv.lowrank:LowRankKVAttention",
)
