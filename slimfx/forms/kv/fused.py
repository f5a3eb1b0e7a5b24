"""Decode steps that read a quantized KV store in place inside Hugging Face attention:
``use_fused_decode(model)``.

Registers an attention function ``"slimfx_kv_fused"`` with transformers' ``AttentionInterface``
(and ``sdpa``'s mask builder under the same name) and switches the model to it. A forward
pre-hook on every attention module looks up the cache layer the call will use
(``past_key_values.layers[layer_idx]``); when it is a :class:`~slimfx.forms.kv.cache.
QuantizedKVLayer` the layer's ``fused_decode`` flag is set, so a one-token ``update`` returns
only the 16-bit window instead of dequantizing the whole store, and the attention function
runs :meth:`QuantizedKVLayer.decode_attention` — the store read in place by the Triton kernel
``slimfx_kernels::kv_decode_attention_triton`` (its dequantization fused) or by the torch op
``kv_decode_attention_folded`` (the scales folded into the two products; the CPU's path).
``kernel=None`` picks the kernel for CUDA queries and the torch op elsewhere; ``True`` / ``False``
force one. Every other call (prefill, chunked prefill, 16-bit layers, other caches) goes to
transformers' ``sdpa`` attention unchanged.

The kernel has no mask input: a decode step whose mask hides a cached token (a left-padded
batch) runs the torch op, which applies the mask. Each attention module records the path of its
last fused step in ``last_decode_path``: ``"triton"``, ``"torch"``, or ``"torch: <why the
kernel did not run>"``. ``undo()`` on the returned handle removes the hooks and restores the
previous attention implementation.
The static cache's quantized layers (:class:`~slimfx.forms.kv.static_cache.
StaticQuantizedKVLayer`: ``StaticKVCache``, or transformers' ``StaticCache`` /
``cache_implementation="static"`` upgraded by the form's hook) take the same route: a fused-mode
one-token ``update`` writes the token without building full-length K/V, and the opaque op
``slimfx_kernels::kv_decode_attention_static`` attends over the tokens written so far (the
folded torch step, or the kernel) instead of the whole preallocation. That op keeps one graph
under ``torch.compile``, so compiled steps over a static cache read in place; a dynamic layer
stays on the plain path under ``torch.compile`` unless ``kernel=True`` (the torch op's loop over
store chunks would specialize on the growing store). Under compile the static step cannot look
at the mask's values: ``last_decode_path`` says ``"triton"`` for the kernel choice even where the
op sends a padded batch's step to the torch op. The static op reads the token count on the host,
which a CUDA graph cannot capture (transformers compiles ``generate`` over a static cache with
``mode="reduce-overhead"`` on CUDA): with ``kernel=None`` a static cache on CUDA keeps the plain
path; ``kernel=True`` / ``False`` route it (the op is tagged ``cudagraph_unsafe``, so inductor
leaves CUDA graphs out of such a step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.forms.kv.cache import QuantizedKVLayer, call_cache, hides_tokens
from slimfx.forms.kv.static_cache import StaticQuantizedKVLayer

__all__ = [
    "FUSED_ATTENTION",
    "FusedDecode",
    "fused_attention",
    "decode_step_label",
    "install_in_place_decode",
    "register_attention",
    "use_fused_decode",
]

FUSED_ATTENTION = "slimfx_kv_fused"
_LAYER_ATTR = "_slimfx_fused_layer"
_KERNEL_ATTR = "_slimfx_fused_kernel"
_PATH_ATTR = "last_decode_path"
_HANDLE_ATTR = "_slimfx_fused_decode"
#: attention-function arguments that change the attention's math, which the step lacks (logit
#: soft-capping: Gemma 2; learned sink logits: gpt-oss)
_UNSUPPORTED = ("softcap", "s_aux")


def fused_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Transformers attention-function signature (query ``(B, Hq, q_len, D)``; returns
    ``(B, q_len, Hq, D)``): one-token steps over a fused-mode quantized layer through
    ``decode_attention``, everything else through ``sdpa``."""
    layer = getattr(module, _LAYER_ATTR, None)
    if layer is not None and layer.fused_decode and query.shape[2] == 1:
        extra = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
        if extra:  # the window alone is at hand: refuse rather than attend without them
            raise ValueError(
                f"the in-place KV decode step has no {' / '.join(extra)} (this model's "
                "attention uses it): run the model without use_fused_decode"
            )
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        kernel, path = getattr(module, _KERNEL_ATTR, None), ""
        if kernel is None:
            kernel = query.is_cuda
        hides = (
            layer.step_hides_tokens
            if isinstance(layer, StaticQuantizedKVLayer)
            else hides_tokens
        )
        if kernel and hides(attention_mask):
            kernel, path = False, ": a padding mask (the kernel takes none)"
        out = layer.decode_attention(query, scale, kernel=kernel, mask=attention_mask)
        setattr(module, _PATH_ATTR, ("triton" if kernel else "torch") + path)
        return out.unsqueeze(1), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _bind_layer(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: find this call's cache layer; fused mode for a quantized one — only
    while the model's attention function is this module's (``update`` returning the window
    alone to any other function would drop the store from attention)."""
    cache = call_cache(kwargs)
    layers = getattr(cache, "layers", None) or []
    idx = module.layer_idx
    layer = layers[idx] if idx < len(layers) else None
    routed = getattr(getattr(module, "config", None), "_attn_implementation", None) == (
        FUSED_ATTENTION
    )
    # under torch.compile the plain path unless the Triton kernel was asked for: the torch
    # op's loop over store chunks would specialize on the growing store (the compiled path for
    # a quantized cache is the static cache)
    dynamic = isinstance(layer, QuantizedKVLayer)
    kernel = getattr(module, _KERNEL_ATTR, None)
    if dynamic and torch.compiler.is_compiling() and kernel is not True:
        routed = False
    static = isinstance(layer, StaticQuantizedKVLayer)
    if static and kernel is None and _on_cuda(layer):
        routed = False  # the static op reads the length on the host: no CUDA graph holds it
    quantized = dynamic or static
    if quantized:
        layer.fused_decode = routed
    setattr(module, _LAYER_ATTR, layer if quantized and routed else None)


def _on_cuda(layer: Any) -> bool:
    return bool(layer.is_initialized) and layer.device.type == "cuda"


def register_attention(name: str, fn: Any) -> None:
    """Register ``fn`` as transformers' attention function ``name``, with sdpa's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def _implementations(config: Any) -> dict[str, Any]:
    """``config``'s attention implementation and its sub-configs', in the nested form
    ``set_attn_implementation`` takes (``""``: the config's own)."""
    out: dict[str, Any] = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out[key] = _implementations(sub)
    return out


def _restore(model: nn.Module, previous: dict[str, Any]) -> None:
    """Set ``model``'s attention implementations back to ``previous``
    (:func:`_implementations`); a transformers release that takes no nested dicts (5.17)
    gets the first level as strings."""
    try:
        model.set_attn_implementation(previous)
    except (ValueError, TypeError):
        flat = {k: v[""] if isinstance(v, dict) else v for k, v in previous.items()}
        model.set_attn_implementation(flat)


@contextmanager
def attention_function(model: nn.Module, name: str, fn: Any) -> Iterator[None]:
    """Within the block, ``model`` (a Hugging Face model) runs the attention function ``fn``
    (registered as ``name``); its previous ones — each sub-model's (a multimodal model's text
    and vision parts may differ) — are restored afterwards, also on an error."""
    previous = _implementations(model.config)
    register_attention(name, fn)
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        _restore(model, previous)


def _register() -> None:
    register_attention(FUSED_ATTENTION, fused_attention)


@dataclass
class FusedDecode:
    """Handle of :func:`use_fused_decode`: the hooked attention modules; ``undo()``."""

    model: nn.Module
    previous: Any
    modules: list[nn.Module] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def undo(self) -> None:
        """Remove the hooks and restore the model's previous attention implementation."""
        for h in self.handles:
            h.remove()
        for m in self.modules:
            layer = getattr(m, _LAYER_ATTR, None)
            if layer is not None:
                layer.fused_decode = False
            for attr in (_LAYER_ATTR, _KERNEL_ATTR, _PATH_ATTR):
                if hasattr(m, attr):
                    delattr(m, attr)
        self.model.set_attn_implementation(self.previous)
        self.handles, self.modules = [], []
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)


def sdpa_cannot_run(model: nn.Module, attn: list[nn.Module]) -> str | None:
    """Why transformers' sdpa cannot run ``model``'s attention (what the fused function hands
    every call but the one-token steps): soft-capped logits (Gemma 2) or attention sinks
    (gpt-oss); ``None`` when it can."""
    from slimfx.ir.find import logit_softcap

    config = getattr(model, "config", None)
    for m in attn:
        cap = logit_softcap(m, config)
        if cap is not None:
            return f"attention logits soft-capped at {cap:g}, which sdpa does not apply"
        if isinstance(getattr(m, "sinks", None), torch.Tensor):
            return "attention sinks (learned per-head logits), which sdpa does not apply"
    return None


def use_fused_decode(model: nn.Module, kernel: bool | None = None) -> FusedDecode:
    """Run the decode steps of ``model`` (a Hugging Face decoder) over quantized cache layers
    with the store read in place (module docstring). ``kernel``: ``None`` the Triton kernel for
    CUDA queries and the torch op elsewhere; ``True`` the kernel (on the CPU only under
    ``TRITON_INTERPRET=1``); ``False`` the torch op. On a model that has it already (as
    ``optimize`` returns one) it sets ``kernel`` and returns the same handle."""
    attn = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and (hasattr(m, "o_proj") or type(m).__name__.endswith("Attention"))
    ]
    if not attn or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"{type(model).__name__}: no attention module with a layer_idx (an o_proj, or a "
            "class named …Attention): a Hugging Face decoder is needed"
        )
    why = sdpa_cannot_run(model, attn)
    if why:
        raise ValueError(f"{type(model).__name__}: {why}: use_fused_decode runs prefill by sdpa")
    current = model.config.get_text_config(decoder=True)._attn_implementation
    if current == FUSED_ATTENTION:  # installed already (optimize does): the same handle
        handle = getattr(model, _HANDLE_ATTR, None)
        if handle is None:
            raise ValueError(
                f"{type(model).__name__} runs the attention function {FUSED_ATTENTION!r} "
                "without use_fused_decode's hooks: set it back to 'sdpa' first"
            )
        for m in handle.modules:
            setattr(m, _KERNEL_ATTR, kernel)
        return handle
    previous = _implementations(model.config)
    _register()
    model.set_attn_implementation(FUSED_ATTENTION)  # first: a model that refuses is unchanged
    handle = FusedDecode(model, previous)  # each sub-model's, restored by undo()
    for m in attn:
        setattr(m, _KERNEL_ATTR, kernel)
        setattr(m, _LAYER_ATTR, None)
        handle.handles.append(m.register_forward_pre_hook(_bind_layer, with_kwargs=True))
        handle.modules.append(m)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def install_in_place_decode(model: nn.Module) -> str | None:
    """What ``optimize`` and ``load`` do with a model whose attention modules carry a quantized
    cache form: :func:`use_fused_decode` when the model runs transformers' ``sdpa`` attention
    (the function's other calls go to sdpa, so nothing else changes), else leave it. Returns
    the report's note — what runs the decode steps and why — or ``None`` (no quantized
    cache)."""
    from .cache import KV_FORM_ATTR
    from .config import KVQuantConfig

    n = sum(isinstance(getattr(m, KV_FORM_ATTR, None), KVQuantConfig) for m in model.modules())
    if not n:
        return None
    plain = (
        f"the {n} layer(s) with a quantized KV cache dequantize their whole store at every "
        "decode step"
    )
    config = getattr(model, "config", None)
    impl = config.get_text_config(decoder=True)._attn_implementation if config else None
    if impl == FUSED_ATTENTION:
        return None  # installed already (a model optimized again, or loaded into)
    if impl != "sdpa":
        attn = [m for m in model.modules() if isinstance(getattr(m, KV_FORM_ATTR, None),
                                                          KVQuantConfig)]  # fmt: skip
        why = sdpa_cannot_run(model, attn)
        if why:
            return f"{plain}: the model runs attention {impl!r} ({why}), so it cannot be read in place"
        return (
            f"{plain}: the model runs attention {impl!r}, which use_fused_decode would replace "
            "by sdpa for prefill — call slimfx.forms.kv.fused.use_fused_decode(model) to read "
            "the store in place"
        )
    try:
        use_fused_decode(model)
    except ValueError as e:
        return f"{plain}: the in-place decode step could not be installed ({e})"
    return (
        f"the {n} layer(s) with a quantized KV cache read their store in place at one-token "
        "decode steps (slimfx.forms.kv.fused.use_fused_decode: the Triton kernel on CUDA, a "
        "torch op elsewhere; static caches on the CPU too, compiled or not; each attention "
        "module's last_decode_path says which ran)"
    )


#: what runs the one-token steps over each cache form besides a quantized store
_STEP_LABELS = {
    "kv_dense": "16-bit cache",
    "kv_lowrank": "keys rebuilt from the latent, values absorbed",
    "kv_latent_quant": "latent dequantized, keys rebuilt, values absorbed",
    "mla": "over the latent (absorbed)",
}


def decode_step_label(kind: str | None, model: nn.Module) -> str:
    """The report's "decode step" of a KV entry whose form is ``kind`` on ``model``: for a
    quantized store whether it is read in place (``use_fused_decode`` installed) or
    dequantized at every step; a short description for the other forms."""
    if kind != "kv_quant":
        return _STEP_LABELS.get(str(kind), "")
    if getattr(model, _HANDLE_ATTR, None) is not None:
        return "store read in place"
    return "store dequantized every step"
