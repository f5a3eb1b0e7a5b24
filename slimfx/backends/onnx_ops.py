"""ONNX translations of the slimfx ops, for ``torch.onnx.export(..., custom_translation_table=)``.

    slimfx::lowrank_linear(x, U, V, b)          → MatMul(MatMul(x, Vᵀ), Uᵀ) [+ Add b]
    slimfx::quant_linear(x, q, s, z, b, bits, G) → com.microsoft::MatMulNBits(x, B, s', z', b)
    slimfx::sparse24_linear(x, values, meta, b)  → MatMul(x, Sᵀ) [+ Add b]      (densified)
    slimfx::quant_lowrank_linear(…)              → MatMulNBits(x, …) + MatMul(MatMul(x, Vᵀ), Uᵀ)
    slimfx::sparse24_lowrank_linear(…)           → MatMul(x, (S + U·V)ᵀ) [+ Add b] (densified)
    slimfx::dequant_rows(codes, scale)           → DequantizeLinear(codes, scale, axis=0)
    slimfx::one_token_or(length, one, more)      → slimfx.branch::OneTokenOr(length == 1, one, more)
                                                   (made an ``If`` after the export:
                                                   :mod:`slimfx.backends.onnx_branches`)

Each form names its op's translation (``slimfx.forms``: ``Form.onnx_translation``); an op
whose form has none is not in the table, and the export refuses it with the form's reason. The
Triton-lowered ops (``slimfx_kernels::<op>_triton``) take the same arguments and get the same
translations.

**Weights are re-laid out after the export, not in the graph.** A translation runs while the
graph is built, before the exporter has attached the parameter values, so it cannot compute
``Vᵀ`` or the MatMulNBits blob itself. It emits a *fold marker* instead: a node of the private
domain ``slimfx.fold`` (``TransposeW``, ``NBitsB``, ``NBitsScales``, ``NBitsZeros``,
``Dense24T``, ``DequantT``) whose inputs are initializers. :func:`fold_markers` (called by
``export_onnx`` once the values are attached) evaluates every marker from the initializers with
:data:`FOLDERS` and replaces it by a new initializer, so no marker reaches the saved file.

MatMulNBits layout from the slimfx storage format (``slimfx.formats``): the int4 nibble order
is already MatMulNBits' (column k in byte k//2, low nibble for even k), so ``B`` is ``qweight``
reshaped to ``[N, K / block, block · bits / 8]``; scales and integer zero points are repeated
``G / block`` times along the groups when the slimfx group G is a multiple of the block (the
same numbers: every block of a group has the group's scale); 4-bit zero points are packed two
per byte (even block in the low nibble). Symmetric codes pass no zero point: MatMulNBits'
default is 2^(bits−1), slimfx's symmetric offset (8 / 128). The block is the largest power of
two ≥ 16 that divides G (ONNX Runtime's CPU kernel needs one); when there is none the weight is
exported dense (``DequantT``) and the export notes say so.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from slimfx import formats, forms
from slimfx.backends.capabilities import matmul_nbits_block
from slimfx.formats import densify24
from slimfx.formats import dequantize as dequantize_weight

__all__ = [
    "FOLD_DOMAIN",
    "BRANCH_DOMAIN",
    "MSFT_DOMAIN",
    "translations",
    "FOLDERS",
    "translation_table",
    "translation_name",
    "export_options",
    "accuracy_level",
]

FOLD_DOMAIN = "slimfx.fold"
BRANCH_DOMAIN = "slimfx.branch"
MSFT_DOMAIN = "com.microsoft"

#: Options read by the translations while one export runs (set by :func:`accuracy_level`).
export_options: dict[str, Any] = {"accuracy_level": 0}


def check_accuracy_level(level: Any) -> None:
    """``MatMulNBits``' ``accuracy_level`` is 0–4 (0: float compute; 1–4: fp32, fp16, bf16,
    int8 compute); anything else raises ``ValueError`` (ONNX Runtime ran a 9 silently)."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 4:
        raise ValueError(f"accuracy_level must be an int 0–4, got {level!r}")


@contextmanager
def accuracy_level(level: int) -> Iterator[None]:
    """Within the block, the ``MatMulNBits`` the translations emit carry ``accuracy_level``
    ``level`` (0: float compute); reset to 0 afterwards, also on an error."""
    check_accuracy_level(level)
    export_options["accuracy_level"] = int(level)
    try:
        yield
    finally:
        export_options["accuracy_level"] = 0

_TYPES = [
    f"tensor({t})"
    for t in ("float", "float16", "bfloat16", "double", "uint8", "int8", "int32", "int64", "bool")
]
_ATTR = {int: OpSchema.AttrType.INT, str: OpSchema.AttrType.STRING}


def _schema(domain: str, name: str, inputs: list[tuple[str, bool]], attrs: dict[str, type]) -> Op:
    """An onnxscript ``Op`` for an op ONNX's schema registry does not know (contrib / markers).

    The schema lives only in this object; nothing is registered globally."""
    opt, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    params = [
        OpSchema.FormalParameter(n, f"T{i}", "", param_option=opt if optional else single)
        for i, (n, optional) in enumerate(inputs)
    ]
    schema = OpSchema(
        name,
        domain,
        1,
        "",
        inputs=params,
        outputs=[OpSchema.FormalParameter("Y", "TY", "")],
        type_constraints=[(f"T{i}", _TYPES, "") for i in range(len(inputs))] + [("TY", _TYPES, "")],
        attributes=[OpSchema.Attribute(a, _ATTR[t], "") for a, t in attrs.items()],
    )
    return Op(Opset(domain, 1), name, schema)


_MATMUL_NBITS = _schema(
    MSFT_DOMAIN,
    "MatMulNBits",
    [
        ("A", False),
        ("B", False),
        ("scales", False),
        ("zero_points", True),
        ("g_idx", True),
        ("bias", True),
    ],
    {"K": int, "N": int, "bits": int, "block_size": int, "accuracy_level": int},
)
_TRANSPOSE_W = _schema(FOLD_DOMAIN, "TransposeW", [("W", False)], {})
_NBITS_B = _schema(
    FOLD_DOMAIN, "NBitsB", [("qweight", False)], {"bits": int, "block_size": int, "K": int}
)
_NBITS_SCALES = _schema(FOLD_DOMAIN, "NBitsScales", [("scales", False)], {"repeat": int, "to": int})
_NBITS_ZEROS = _schema(FOLD_DOMAIN, "NBitsZeros", [("zeros", False)], {"bits": int, "repeat": int})
_DENSE24_T = _schema(
    FOLD_DOMAIN,
    "Dense24T",
    [("values", False), ("meta", False), ("U", True), ("V", True)],
    {"K": int},
)
_DEQUANT_T = _schema(
    FOLD_DOMAIN,
    "DequantT",
    [("qweight", False), ("scales", False), ("zeros", True)],
    {"bits": int, "group_size": int, "K": int, "to": int},
)


# ----------------------------------------------------------------------------- translations


def _in_features(x: Any, fallback: int) -> int:
    k = x.shape[-1] if x.shape is not None else None
    return int(k) if isinstance(k, int) else fallback


def _dtype_code(x: Any) -> int:
    return int(x.dtype) if x.dtype is not None else 1  # 1 = FLOAT


def _add_bias(y: Any, bias: Any) -> Any:
    return y if bias is None else op.Add(y, bias)


def _lowrank_branch(x: Any, U: Any, V: Any) -> Any:
    return op.MatMul(op.MatMul(x, _TRANSPOSE_W(V)), _TRANSPOSE_W(U))


def _quant_branch(
    x: Any, qweight: Any, scales: Any, zeros: Any, bias: Any, bits: int, G: int | None
) -> Any:
    """MatMulNBits (or a densified MatMul when no valid block exists) of ``x`` and the codes."""
    width = int(qweight.shape[1])
    K = _in_features(x, width * 8 // bits)  # whole packed chunks (the rules check it)
    G = K if G is None else int(G)
    N = int(qweight.shape[0])
    block = matmul_nbits_block(G)
    if block is None:  # no power of two ≥ 16 divides G: ORT's MatMulNBits cannot take it
        w_t = _DEQUANT_T(qweight, scales, zeros, bits=bits, group_size=G, K=K, to=_dtype_code(x))
        return _add_bias(op.MatMul(x, w_t), bias)
    b = _NBITS_B(qweight, bits=bits, block_size=block, K=K)
    s = _NBITS_SCALES(scales, repeat=G // block, to=_dtype_code(x))
    z = None if zeros is None else _NBITS_ZEROS(zeros, bits=bits, repeat=G // block)
    attrs = {"K": K, "N": N, "bits": bits, "block_size": block}
    if export_options.get("accuracy_level"):
        attrs["accuracy_level"] = int(export_options["accuracy_level"])
    return _MATMUL_NBITS(x, b, s, z, None, bias, **attrs)


def lowrank_linear_onnx(x: Any, U: Any, V: Any, bias: Any = None) -> Any:
    """``x Vᵀ Uᵀ + b`` as two MatMul (+ Add)."""
    return _add_bias(_lowrank_branch(x, U, V), bias)


def quant_linear_onnx(
    x: Any, qweight: Any, scales: Any, zeros: Any, bias: Any, bits: int, group_size: int | None
) -> Any:
    """``x deq(W)ᵀ + b`` as ``com.microsoft::MatMulNBits``."""
    return _quant_branch(x, qweight, scales, zeros, bias, int(bits), group_size)


def sparse24_linear_onnx(x: Any, values: Any, meta: Any, bias: Any = None) -> Any:
    """``x Sᵀ + b`` with S densified (ONNX Runtime has no 2:4 kernel)."""
    K = _in_features(x, 2 * int(values.shape[1]))
    return _add_bias(op.MatMul(x, _DENSE24_T(values, meta, None, None, K=K)), bias)


def quant_lowrank_linear_onnx(
    x: Any,
    qweight: Any,
    scales: Any,
    zeros: Any,
    U: Any,
    V: Any,
    bias: Any,
    bits: int,
    group_size: int | None,
) -> Any:
    """MatMulNBits(x) + MatMul(MatMul(x, Vᵀ), Uᵀ); the bias rides on MatMulNBits."""
    y = _quant_branch(x, qweight, scales, zeros, bias, int(bits), group_size)
    return op.Add(y, _lowrank_branch(x, U, V))


def sparse24_lowrank_linear_onnx(
    x: Any, values: Any, meta: Any, U: Any, V: Any, bias: Any = None
) -> Any:
    """``x (S + U V)ᵀ + b`` as one dense MatMul: the 2:4 part is dense anyway, so folding the
    low-rank term into it costs no bytes and saves two MatMul."""
    K = _in_features(x, 2 * int(values.shape[1]))
    return _add_bias(op.MatMul(x, _DENSE24_T(values, meta, U, V, K=K)), bias)


def dequant_rows_onnx(codes: Any, scale: Any) -> Any:
    """int8 rows × one scale per row: ``DequantizeLinear`` along axis 0 (the codes stay int8
    initializers; the exporter's optimizer and ONNX Runtime keep DequantizeLinear unfolded)."""
    return op.DequantizeLinear(codes, scale, axis=0)


_ONE_TOKEN_OR = _schema(BRANCH_DOMAIN, "OneTokenOr", [("cond", False), ("one", False),
                                                      ("more", False)], {})  # fmt: skip


def one_token_or_onnx(length: Any, one: Any, more: Any) -> Any:
    """A marker node of ``slimfx.branch`` over ``length == 1``; the export replaces it by an
    ``If`` (:func:`slimfx.backends.onnx_branches.lazy_branches`)."""
    return _ONE_TOKEN_OR(op.Equal(length, op.Constant(value_int=1)), one, more)


#: slimfx ops that belong to no linear form, with their translations
_OTHER_TRANSLATIONS: dict[str, Callable[..., Any]] = {
    "dequant_rows": dequant_rows_onnx,
    "one_token_or": one_token_or_onnx,
}


def translations() -> dict[str, Callable[..., Any]]:
    """Op name (without namespace or ``_triton`` suffix) → translation, for every registered
    form that has one, and the slimfx ops outside the forms (``dequant_rows``)."""
    return {
        **{
            f.op_name: f.get("onnx_translation")
            for f in forms.forms()
            if f.has("op") and f.has("onnx_translation")
        },
        **_OTHER_TRANSLATIONS,
    }


def why_untranslated(name: str) -> str:
    """Why slimfx op ``name`` has no ONNX translation (its form's reason, or no form)."""
    form = forms.form_of_op(name)
    if form is None:
        return f"no registered form runs slimfx::{name}"
    return form.why_not("onnx_translation") or f"slimfx::{name} has a translation"


_NAMESPACES = ("slimfx", "slimfx_kernels")


def translation_name(target: object) -> str | None:
    """The :func:`translations` key for a slimfx op overload, or ``None`` when it has none."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in _NAMESPACES:
        return None
    name = target._schema.name.split("::", 1)[1].removesuffix("_triton")
    if name in _OTHER_TRANSLATIONS:
        return name
    form = forms.form_of_op(name)
    return name if form is not None and form.has("onnx_translation") else None


def _bound(fn: Callable[..., Any], overload: torch._ops.OpOverload) -> Callable[..., Any]:
    """``fn`` called with the overload's arguments bound by name (positions may differ
    between the slimfx op and its Triton twin)."""
    params = [
        inspect.Parameter(
            a.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=a.default_value if a.has_default_value() else inspect.Parameter.empty,
        )
        for a in overload._schema.arguments
    ]
    sig = inspect.Signature(params)

    def translate(*args: Any, **kwargs: Any) -> Any:
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        return fn(**b.arguments)

    translate.__name__ = f"{fn.__name__}_{overload._schema.name.replace('::', '_')}"
    translate.__signature__ = sig  # type: ignore[attr-defined]
    return translate


def translation_table() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """``{op overload: translation}`` for every registered slimfx / slimfx_kernels op that has
    one (the argument to ``torch.onnx.export(custom_translation_table=...)``)."""
    import slimfx.ir  # noqa: F401  (registers the slimfx ops)

    known = translations()
    table: dict[torch._ops.OpOverload, Callable[..., Any]] = {}
    for ns in _NAMESPACES:
        namespace = getattr(torch.ops, ns)
        for name in known:
            for candidate in (name, f"{name}_triton"):
                if not hasattr(namespace, candidate):
                    continue
                packet = getattr(namespace, candidate)
                for ov_name in packet.overloads():
                    ov = getattr(packet, ov_name)
                    table[ov] = _bound(known[name], ov)
    return table


# ----------------------------------------------------------------------------- folding


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _np_dtype(code: int) -> np.dtype:
    from onnx.helper import tensor_dtype_to_np_dtype

    return tensor_dtype_to_np_dtype(code)


def _fold_transpose(ins: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    return np.ascontiguousarray(ins[0].T)


def _fold_nbits_b(ins: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    q, bits, block, K = ins[0], attrs["bits"], attrs["block_size"], attrs["K"]
    if K % block:
        raise ValueError(f"in_features {K} is not a multiple of the MatMulNBits block {block}")
    return np.ascontiguousarray(q).reshape(q.shape[0], K // block, block * bits // 8)


def _fold_scales(ins: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    s = np.repeat(ins[0], attrs["repeat"], axis=1).astype(_np_dtype(attrs["to"]))
    return s.reshape(-1)


def _fold_zeros(ins: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    # MatMulNBits packs its zero points like the codes (two 4-bit ones per byte, even first)
    z = np.repeat(ins[0].astype(np.uint8), attrs["repeat"], axis=1)
    return formats.pack_codes(_t(z), attrs["bits"]).numpy().reshape(-1)


def _fold_dense24(ins: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    values, meta, U, V = (list(ins) + [None, None])[:4]
    w = densify24(_t(values), _t(meta), attrs["K"])  # fp32, the reference's formation
    if U is not None and V is not None:
        w = w + _t(U).float() @ _t(V).float()
    return np.ascontiguousarray(w.to(_t(values).dtype).T.numpy())


def _fold_dequant(ins: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    q, s, z = (list(ins) + [None])[:3]
    w = dequantize_weight(
        _t(q), _t(s), None if z is None else _t(z), attrs["bits"], attrs["group_size"], attrs["K"]
    )
    return np.ascontiguousarray(w.numpy().astype(_np_dtype(attrs["to"])).T)


#: marker op type → (numpy evaluation, suffix of the new initializer's name).
FOLDERS: dict[str, tuple[Callable[[list[np.ndarray | None], dict[str, Any]], np.ndarray], str]] = {
    "TransposeW": (_fold_transpose, ".T"),
    "NBitsB": (_fold_nbits_b, ".nbits_B"),
    "NBitsScales": (_fold_scales, ".nbits_scales"),
    "NBitsZeros": (_fold_zeros, ".nbits_zero_points"),
    "Dense24T": (_fold_dense24, ".dense_T"),
    "DequantT": (_fold_dequant, ".dense_T"),
}
