"""ONNX Runtime decode over the compressed KV cache (every KV form: ``kv_quant``,
``kv_lowrank``, ``kv_latent_quant``, ``kv_dense``).

``export_onnx_kv(model, path)`` writes two kinds of graph:

- the **step graph** ``path``: ``input_ids (batch, seq)``, ``attention_mask (batch, cached +
  seq)`` (Hugging Face's padding mask, as in :mod:`slimfx.backends.onnx_decode`) and, per
  group ``j`` of layers
  sharing a form and a sliding window (a ``kv_dense`` layer on a sliding window is grouped
  apart and keeps the window's last ``window - 1`` tokens, as transformers' cache and
  ``export_onnx``'s step do; the graph's metadata names such layers, ``onnx_decode.META_WINDOWS``)
  (in the order of first appearance; one tensor per group, not per layer:
  ``torch.export`` and the ONNX translation slow down sharply with the number of dynamic
  inputs), the 16-bit window ``window_j`` ``(layers, 2, batch, kv_heads, W, head_dim)`` (keys
  at ``[:, 0]``, values at ``[:, 1]``) and, for a ``kv_quant`` group, its quantized store →
  ``logits`` and ``present_window_j`` (input window + the call's tokens). The store stays
  compressed between steps, in the layout of :mod:`slimfx.forms.kv.numerics` blocked by
  ``key_group`` tokens (``nb`` whole blocks; the same bytes as the torch
  ``QuantizedKVLayer``)::

      k_codes_j (layers, batch, H, nb, key_group, D·key_bits/8)    uint8
      k_scale_j, k_min_j (layers, batch, H, nb, D)                 float16
      v_codes_j (layers, batch, H, nb, key_group, D·value_bits/8)  uint8
      v_scale_j, v_min_j (layers, batch, H, nb, key_group, D/value_group)  float16

  Each layer's store is dequantized inside that layer's attention call (an export-time cache
  layer does it in ``update``), so ONNX Runtime holds one layer's dequantized K/V at a time.
  The graph unpacks the codes with ``BitShift``/``BitwiseAnd``, dequantizes with
  ``Cast``/``Mul``/``Add`` (``q·scale + min``: the minimum is a float, not an integer zero
  point, so ``DequantizeLinear`` does not express it) and attends over ``sink window ‖ store ‖
  recent window ‖ new tokens`` exactly as ``QuantizedKVLayer.update`` returns them. ONNX
  Runtime's ``GroupQueryAttention`` does take a uint8/int8 cache on the CPU provider, but only
  with symmetric scales per tensor or per channel fixed for the whole cache, quantizing new
  tokens itself: KIVI's per-block key ranges, per-token value ranges and float minimums do
  not fit it, so the step dequantizes before a plain attention (the query heads grouped by kv
  head, :mod:`slimfx.backends.onnx_attention`: K/V are not expanded per query head).
- one **flush graph** per group with a store, ``<stem>.flush<n>.onnx`` (``n`` counts those
  groups, low-rank ones included; each records its form, checked by the decoder); for a
  ``kv_quant`` group: 16-bit window
  blocks ``(rows, H, nb, key_group, D)`` of keys and of values (the group's layers stacked on
  the batch axis) → the six store arrays of those blocks. Flushing runs as a second graph,
  not inside the step: the store grows by whole blocks only on some steps, a data-dependent
  output shape a single exported step graph cannot have (``torch.export`` needs one output
  shape rule), and the driver runs it only when a block leaves the window (every
  ``key_group`` tokens).

Low-rank groups (``kv_lowrank``, ``kv_latent_quant``: the attention rebuilds K/V from a cached
latent) carry a latent window, a latent store and a sink buffer instead, and a latent flush
graph: :mod:`slimfx.backends.onnx_kv_latent`. :class:`~slimfx.backends.onnx_kv_decoder.OrtKVDecoder`
drives the graphs in ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from slimfx.backends import onnx_decode, onnx_ops
from slimfx.backends.onnx_attention import export_attention
from slimfx.backends.onnx_branches import lazy_branches
from slimfx.backends.onnx_graph import (
    WRAP,
    OnnxExportError,
    _fold_markers,
    _markers_by_site,
    _rename_axes,
    annotate_notes,
    densified_notes,
    export_path,
    inside_save_notes,
    linear_time_rewrites,
    save_graph,
    write_files,
)
from slimfx.backends.onnx_kv_latent import (
    LATENT_FORMS,
    ExportLatentLayer,
    LatentFlush,
    dequantize_blocks,
    dequantize_groups,
    latent_store_names,
    latent_store_shapes,
    quantize_blocks,
    quantize_groups,
)
from slimfx.forms.kv.cache import kv_forms_of
from slimfx.forms.kv.config import KVDecision, KVDenseConfig, KVLatentQuantConfig, KVQuantConfig
from slimfx.forms.kv.lowrank import LowRankKVAttention, onnx_branches
from slimfx.ir.capture import eval_mode
from slimfx.planning.shapes import AttentionShape

__all__ = [
    "STORE_NAMES",
    "KVExportResult",
    "export_onnx_kv",
    "export_forms",
    "dequantize_store",
]

STORE_NAMES = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")
META_KEY = "slimfx.kv_forms"
META_GEOMETRY = "slimfx.kv_geometry"  # [kv_heads, head_dim]


def _lowrank_modules(model: nn.Module) -> dict[int, Any]:
    """Layer index → the attention module rewritten to a low-rank KV one."""
    return {m.layer_idx: m for m in model.modules() if isinstance(m, LowRankKVAttention)}


def _factors(form: Any) -> Any:
    return getattr(form, "lowrank", form)


def export_forms(
    model: nn.Module, form: KVDecision | dict[int, KVDecision] | None = None
) -> list[KVDecision]:
    """Per decoder layer, the KV form the export gives it: ``form`` for all, per layer index
    (missing: 16-bit), or ``None``: the forms the model carries (``kv_forms_of``; a layer
    rewritten by ``apply_lowrank_kv`` without a recorded form: its module's). A low-rank form
    needs the layer's attention rewritten with factors of those ranks, and a rewritten layer
    a low-rank form; anything else raises :class:`OnnxExportError`."""
    from slimfx.backends.onnx_mla import cache_kinds

    mla, compressed = cache_kinds(model)
    if mla:
        raise OnnxExportError(
            f"layer(s) {', '.join(map(str, mla))} are MLA layers (a latent cache, not keys and "
            "values): "
            + (f"with layer(s) {', '.join(map(str, compressed))} keeping a compressed KV cache "
               "the model has no ONNX decode-step export (one graph holds either kind)"
               if compressed else
               "export the decode step with slimfx.backends.onnx_mla.export_mla_onnx")
        )
    layers = onnx_decode.cache_geometry(model.config)[0]
    lowrank = _lowrank_modules(model)
    if form is None:
        form = {i: m.form for i, m in lowrank.items()} | kv_forms_of(model)
    out: list[KVDecision] = []
    for i in range(layers):
        f = form.get(i, KVDenseConfig()) if isinstance(form, dict) else form
        mod = lowrank.get(i)
        if isinstance(f, LATENT_FORMS):
            if mod is None:
                raise OnnxExportError(
                    f"layer {i}: {f.short()} needs the layer's attention rewritten to rebuild "
                    "K/V from a latent (slimfx.optimize with a KV budget, or "
                    "slimfx.forms.kv.lowrank.apply_lowrank_kv); its k/v projections are dense"
                )
            if _factors(f) != _factors(mod.form):
                raise OnnxExportError(
                    f"layer {i}: {f.short()} does not match the layer's factors "
                    f"({_factors(mod.form).short()})"
                )
        elif mod is not None:
            raise OnnxExportError(
                f"layer {i}: its attention rebuilds K/V from a latent ({mod.form.short()}): "
                f"export it with a low-rank form of those factors, not {f.kind}"
            )
        elif not isinstance(f, (KVQuantConfig, KVDenseConfig)):
            raise OnnxExportError(f"layer {i}: {f.kind} is not exported")
        out.append(f)
    return out


def _store_names(form: KVDecision) -> list[str]:
    """The store arrays of a group in ``form`` (none: no quantized store)."""
    return list(STORE_NAMES) if isinstance(form, KVQuantConfig) else latent_store_names(form)


def _has_sink(form: KVDecision) -> bool:
    """Whether a group in ``form`` carries a sink buffer of exact K/V (low-rank forms)."""
    return isinstance(form, LATENT_FORMS) and form.sink > 0


def dequantize_store(
    store: Sequence[Tensor], form: KVQuantConfig, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The blocked store arrays of one layer (``STORE_NAMES`` order, ``(B, H, nb, …)``) →
    keys, values ``(B, H, nb·key_group, D)`` in ``dtype`` (float32 arithmetic, as
    ``numerics.dequantize_keys`` / ``dequantize_values``)."""
    k = dequantize_blocks(*store[:3], form.key_bits)
    v = dequantize_groups(*store[3:], form.value_bits, form.value_group)
    return k.flatten(-3, -2).to(dtype), v.flatten(-3, -2).to(dtype)


def _groups(
    forms: Sequence[KVDecision], windows: dict[int, int] | None = None
) -> list[tuple[KVDecision, list[int]]]:
    """Layers grouped by form and sliding window (``windows``: layer → window; such a group's
    layers hold their window's last tokens, not every token), in the order of first
    appearance: ``[(form, layers)]``."""
    windows = windows or {}
    out: list[tuple[KVDecision, list[int]]] = []
    for i, f in enumerate(forms):
        for g, layers in out:
            if g == f and windows.get(layers[0]) == windows.get(i):
                layers.append(i)
                break
        else:
            out.append((f, [i]))
    return out


class _ExportLayer(DynamicLayer):
    """The cache layer the step graph traces: its window ``(2, B, H, W, D)`` and its store
    arrays are graph inputs; ``update`` dequantizes the store *there*, in the layer's own
    attention call (so ONNX Runtime holds one layer's dequantized K/V at a time), and returns
    ``sinks ‖ store ‖ recent window ‖ new tokens`` as ``QuantizedKVLayer.update`` does."""

    def __init__(self, window: Tensor, store: Sequence[Tensor] | None, form: KVDecision) -> None:
        super().__init__()
        self.window, self.store, self.form = window, store, form
        self.keys, self.values = window[0], window[1]
        self.is_initialized = True
        self.stored = 0 if store is None else store[0].shape[2] * form.key_group
        self.new: tuple[Tensor, Tensor] | None = None

    def present(self) -> Tensor:
        """The call's keys and values ``(2, B, H, T, D)``."""
        return torch.stack(self.new)  # type: ignore[arg-type]

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):  # noqa: ANN201
        self.new = (key_states, value_states)
        kw, vw = self.window[0], self.window[1]
        if self.store is None:
            return torch.cat([kw, key_states], 2), torch.cat([vw, value_states], 2)
        k, v = dequantize_store(self.store, self.form, kw.dtype)  # type: ignore[arg-type]
        s = self.form.sink  # type: ignore[attr-defined]
        keys = torch.cat([kw[:, :, :s], k, kw[:, :, s:], key_states], dim=2)
        values = torch.cat([vw[:, :, :s], v, vw[:, :, s:], value_states], dim=2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.window.shape[3] + self.stored


class _Step(nn.Module):
    """``(ids, windows, stores, sinks) → (logits, *windows', *sinks')`` around a Hugging Face
    causal LM, per group of layers sharing a form one window tensor (``(layers, 2, B, H, W,
    D)``, or ``(layers, B, W, rk + rv)`` for a low-rank group), its store arrays and, for a
    low-rank group with sinks, its sink buffer (few graph inputs: tracing time grows with
    them)."""

    def __init__(
        self, model: nn.Module, forms: Sequence[KVDecision], windows: dict[int, int]
    ) -> None:
        super().__init__()
        setattr(self, WRAP, model)
        self.forms, self.windows = list(forms), dict(windows)
        self.groups = _groups(forms, windows)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        windows: Sequence[Tensor],
        stores: Sequence[Tensor],
        sinks: Sequence[Tensor],
    ) -> tuple[Tensor, ...]:
        from transformers.cache_utils import Cache

        model = getattr(self, WRAP)
        layers: list[Any] = [None] * len(self.forms)
        stores, sinks = iter(stores), iter(sinks)
        positions = onnx_decode.positions_of(attention_mask)  # each cached token's and new
        seen = attention_mask.shape[1] - input_ids.shape[1]
        for (f, idx), win in zip(self.groups, windows):
            st = [next(stores) for _ in _store_names(f)] or None
            sk = next(sinks) if _has_sink(f) else None
            for n, i in enumerate(idx):
                one = None if st is None else [a[n] for a in st]
                if i in self.windows:  # 16-bit, its window's last tokens (export_onnx_kv)
                    layers[i] = onnx_decode.window_layer(win[n][0], win[n][1], self.windows[i],
                                                         seen)  # fmt: skip
                elif isinstance(f, LATENT_FORMS):
                    layers[i] = ExportLatentLayer(win[n], one, None if sk is None else sk[n], f,
                                                  positions)  # fmt: skip
                else:
                    layers[i] = _ExportLayer(win[n], one, f)
        # every layer caches the same tokens (groups split them differently between window
        # and store): tell the tracer, so the one mask fits every layer
        first = layers[0]
        for la in layers:
            torch._check(la.get_seq_length() == first.get_seq_length())
        cache = Cache(layers=layers)
        kw = onnx_decode.mask_kwargs(model, attention_mask, first.get_seq_length(),
                                     input_ids.shape[1], positions)  # fmt: skip
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **kw)
        present, present_sinks = [], []
        for (f, idx), win in zip(self.groups, windows):
            if idx[0] in self.windows:  # the window layers cropped what they hold
                present.append(torch.stack([torch.stack([layers[i].keys, layers[i].values])
                                            for i in idx]))  # fmt: skip
                continue
            new = torch.stack([layers[i].present() for i in idx])
            present.append(torch.cat([win, new], dim=-2))
            if _has_sink(f):
                present_sinks.append(torch.stack([layers[i].present_sink for i in idx]))
        return (out.logits, *present, *present_sinks)


class _Flush(nn.Module):
    """Window blocks ``(B, H, nb, key_group, D)`` of keys and values → the store arrays of
    those blocks: the quantization of ``numerics.quantize_keys`` / ``quantize_values`` (its
    ``_minmax``), blocked, packed (``onnx_kv_latent.quantize_blocks`` / ``quantize_groups``)."""

    def __init__(self, form: KVQuantConfig) -> None:
        super().__init__()
        self.form = form

    def forward(self, keys: Tensor, values: Tensor) -> tuple[Tensor, ...]:
        f = self.form  # keys per channel over each block, values per token per group
        k = quantize_blocks(keys, f.key_bits, 3)
        return (*k, *quantize_groups(values, f.value_bits, f.value_group))


def _names(groups: Sequence[tuple[KVDecision, list[int]]]) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids", onnx_decode.MASK], ["logits"]
    for j in range(len(groups)):
        ins.append(f"window_{j}")
        outs.append(f"present_window_{j}")
    for j, (f, _) in enumerate(groups):
        ins += [f"{n}_{j}" for n in _store_names(f)]
    for j, (f, _) in enumerate(groups):
        if _has_sink(f):
            ins.append(f"sink_{j}")
            outs.append(f"present_sink_{j}")
    return ins, outs


def quant_store_shapes(
    form: KVQuantConfig, lead: tuple[int, ...], D: int, nb: int
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """``(shape, dtype)`` of a ``kv_quant`` store's arrays (``STORE_NAMES`` order) of ``nb``
    blocks after the ``lead`` axes ``(layers, batch, kv_heads)``."""
    g, vg, u8, f16 = form.key_group, form.value_group, torch.uint8, torch.float16
    return [
        ((*lead, nb, g, D * form.key_bits // 8), u8),
        ((*lead, nb, D), f16),
        ((*lead, nb, D), f16),
        ((*lead, nb, g, D * form.value_bits // 8), u8),
        ((*lead, nb, g, D // vg), f16),
        ((*lead, nb, g, D // vg), f16),
    ]


def _to_onnx(
    program: Any,
    path: Path,
    ins: list[str],
    outs: list[str],
    axes: dict[str, str],
    meta: dict[str, str],
) -> list[str]:
    """Write one graph; returns the notes of the sites it exports dense (``densified_notes``)."""
    with linear_time_rewrites():
        prog = torch.onnx.export(
            program,
            (),
            dynamo=True,
            custom_translation_table=onnx_ops.translation_table(),
            input_names=ins,
            output_names=outs,
            optimize=True,
            verbose=False,
        )
    model = prog.model
    lazy_branches(model)
    notes = densified_notes(_markers_by_site(model))
    _fold_markers(model.graph)
    _rename_axes(model, axes)
    model.metadata_props.update(meta)
    save_graph(model, path)  # weights beside it past the threshold (protobuf's 2 GB)
    return notes


@contextlib.contextmanager
def step_tracing() -> Iterator[None]:
    """How the step graph is traced (``benchmarks/onnx_export_time.py`` times it against a
    ``torch.cond`` traced with the fake-tensor cache on): a low-rank layer's two paths as plain
    code picked by ``slimfx::one_token_or`` (:func:`~slimfx.forms.kv.lowrank.onnx_branches`;
    the ``If`` is made after the export, :mod:`slimfx.backends.onnx_branches`), and
    fake-tensor caching off — with this many symbolic sizes a cache hit rebuilds its output's
    symbolic strides, slower than running the op's meta function again."""
    with onnx_branches(), torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        yield


def _axis_names(program: Any, n_inputs: int, axes: Sequence[Sequence[str | None]]) -> dict:
    names: dict[str, str] = {}
    ph = [n for n in program.graph.nodes if n.op == "placeholder"][-n_inputs:]
    for node, ax in zip(ph, axes):
        val = node.meta.get("val")
        for axis, dim in zip(ax, () if val is None else val.shape):
            if axis and isinstance(dim, torch.SymInt):
                names.setdefault(str(dim), axis)
    return names


@dataclass
class KVExportResult:
    """What :func:`export_onnx_kv` wrote: the step graph, the flush graphs (one per group of
    layers whose form has a store — ``kv_quant``, ``kv_latent_quant`` — in the order of
    ``flush_forms``) and the per-layer forms."""

    path: Path
    flush_paths: list[Path]
    forms: list[KVDecision]
    flush_forms: list[KVDecision] = field(default_factory=list)
    #: what the graphs do not export as the report prices it (2:4 sites exported dense, …)
    notes: list[str] = field(default_factory=list)


def export_onnx_kv(
    model: nn.Module,
    path: str | os.PathLike[str],
    form: KVDecision | dict[int, KVDecision] | None = None,
    accuracy_level: int = 0,
) -> KVExportResult:
    """Export a Hugging Face causal LM's decode step over its compressed KV cache (module
    docstring) to ``path`` and its flush graphs next to it. ``form``: as
    :func:`export_forms` (``None``: the forms the model carries). Batch, sequence, window and
    store lengths stay dynamic. ``accuracy_level``: as ``export_onnx``'s (the step graph's
    ``MatMulNBits``). The model (float32 or float16 weights) is left unchanged."""
    onnx_ops.check_accuracy_level(accuracy_level)
    path = export_path(path)
    forms = export_forms(model, form)
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise OnnxExportError(
            "bfloat16 weights: onnxruntime's CPU provider has no bfloat16 MatMul; export "
            "model.float() instead"
        )
    _, H, D = onnx_decode.cache_geometry(model.config)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    slide = onnx_decode.model_windows(model)
    for i, f in enumerate(forms):
        why = f.check(AttentionShape(H * D, H, H, D, sliding_window=slide.get(i)))
        if why:
            raise OnnxExportError(f"layer {i}: {f.short()}: {why}")
    groups = _groups(forms, slide)
    # example sizes ≥ 2 (torch.export specializes axes of 0 and 1), each window longer than
    # its sink tokens (a window sliced at the sink would otherwise be specialized), the same
    # cached length in every group (window + NB blocks)
    B, NB = 2, 2
    stored = [_example_stored(f, NB) for f, _ in groups]
    total = max(n + getattr(f, "sink", 0) + 3 for (f, _), n in zip(groups, stored))
    ids = torch.randint(0, 8, (B, 2))
    windows, stores, sinks = [], [], []
    win_shapes, store_shapes = [], []
    for (f, idx), n in zip(groups, stored):
        L = len(idx)
        if isinstance(f, LATENT_FORMS):
            windows.append(torch.randn(L, B, total - n, f.key_rank + f.value_rank, dtype=dtype))
            win_shapes.append({1: AUTO, 2: AUTO})
            if isinstance(f, KVLatentQuantConfig):
                stores += [_random(shape, dt) for shape, dt in latent_store_shapes(f, (L, B), n)]
            if _has_sink(f):
                sinks.append(torch.randn(L, 2, B, H, f.sink, D, dtype=dtype))
        else:  # a window group's own length: it holds fewer tokens than were seen
            held = onnx_decode.example_past_length(slide[idx[0]]) if idx[0] in slide else total - n
            windows.append(torch.randn(L, 2, B, H, held, D, dtype=dtype))
            win_shapes.append({2: AUTO, 4: AUTO})
            if isinstance(f, KVQuantConfig):
                stores += [_random(sh, dt) for sh, dt in quant_store_shapes(f, (L, B, H), D, NB)]
        store_shapes += [_store_dynamic(f)] * len(_store_names(f))
    mask = onnx_decode.example_mask(B, total + ids.shape[1])
    shapes = (
        {0: AUTO, 1: AUTO},
        {0: AUTO, 1: AUTO},
        tuple(win_shapes),
        tuple(store_shapes),
        tuple({2: AUTO} for _ in sinks),
    )
    step = _Step(model, forms, slide)
    with eval_mode(model), torch.no_grad(), export_attention(model), step_tracing():
        program = torch.export.export(
            step,
            (ids, mask, tuple(windows), tuple(stores), tuple(sinks)),
            dynamic_shapes=shapes,
            strict=False,
        )
    ins, outs = _names(groups)
    # one name per symbol: ORT plans buffers as if equal names were equal sizes
    axes: list[tuple] = [("batch", "seq"), ("batch", "total")]
    for j, (f, _) in enumerate(groups):
        latent = isinstance(f, LATENT_FORMS)
        axes.append((None, "batch", f"window_{j}") if latent else
                    (None, None, "batch", None, f"window_{j}"))  # fmt: skip
    for j, (f, _) in enumerate(groups):
        axes += [_store_axis_names(f, f"blocks_{j}")] * len(_store_names(f))
    axes += [(None, None, "batch")] * len(sinks)
    meta = {META_KEY: json.dumps([f.to_dict() for f in forms]), META_GEOMETRY: json.dumps([H, D]),
            **onnx_decode.windows_meta(slide)}
    graphs = [(program, path.name, ins, outs, _axis_names(program, len(ins), axes), meta)]

    flush_forms = [f for f, _ in groups if _store_names(f)]
    flush_paths = []
    for j, f in enumerate(flush_forms):
        if isinstance(f, KVLatentQuantConfig):
            n = _example_stored(f, NB)
            lat = tuple(torch.randn(B, n, r, dtype=dtype) for r in (f.key_rank, f.value_rank))
            flush, f_ins = LatentFlush(f), ["key_latent", "value_latent"]
            f_axes_in = [("batch", "tokens")] * 2
        else:
            lat = tuple(torch.randn(B, H, NB, f.key_group, D, dtype=dtype) for _ in range(2))
            flush, f_ins = _Flush(f), ["key_blocks", "value_blocks"]
            f_axes_in = [("batch", None, "blocks")] * 2
        shp = tuple({i: AUTO for i, a in enumerate(f_axes_in[0]) if a} for _ in lat)
        with torch.no_grad():
            prog = torch.export.export(flush, lat, dynamic_shapes=shp, strict=False)
        fpath = path.with_name(f"{path.stem}.flush{j}.onnx")
        f_axes = _axis_names(prog, 2, f_axes_in)
        f_meta = {META_KEY: json.dumps(f.to_dict())}
        graphs.append((prog, fpath.name, f_ins, _store_names(f), f_axes, f_meta))
        flush_paths.append(fpath)

    # a previous export's flush graphs (and their external data); nothing else of the folder
    flush_name = re.compile(rf"{re.escape(path.stem)}\.flush\d+\.onnx(\.data)?")

    notes: list[str] = []

    def write(tmp: Path) -> None:
        with onnx_ops.accuracy_level(accuracy_level):
            for prog, name, *rest in graphs:
                notes.extend(n for n in _to_onnx(prog, tmp / name, *rest) if n not in notes)

    # the step graph renamed last; the decoder checks each flush's form; a previous export's
    # extra flush graphs are removed
    write_files(path, write, stale=lambda p: bool(flush_name.fullmatch(p.name))
                or p.name == path.name + ".data")
    notes += inside_save_notes(path)
    annotate_notes(model, path, notes)
    return KVExportResult(path, flush_paths, forms, flush_forms, notes)


AUTO = torch.export.Dim.AUTO


def _example_stored(form: KVDecision, nb: int) -> int:
    """Tokens in an example store of ``nb`` blocks (0: no store)."""
    if isinstance(form, KVQuantConfig):
        return form.key_group * nb
    return form.group * nb if isinstance(form, KVLatentQuantConfig) else 0


def _store_dynamic(form: KVDecision) -> dict[int, Any]:
    """torch.export's dynamic axes of a group's store arrays (batch, blocks)."""
    return {1: AUTO, 2: AUTO} if isinstance(form, LATENT_FORMS) else {1: AUTO, 3: AUTO}


def _store_axis_names(form: KVDecision, blocks: str) -> tuple[str | None, ...]:
    """The ONNX axis names of a group's store arrays (``blocks``: the block axis's)."""
    return (None, "batch", blocks) if isinstance(form, LATENT_FORMS) else (None, "batch", None, blocks)


def _random(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=dtype)
    return torch.rand(shape, dtype=dtype)
