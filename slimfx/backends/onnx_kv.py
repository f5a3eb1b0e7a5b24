"""ONNX Runtime decode over the KIVI-quantized KV cache (``kv_quant`` forms).

``export_onnx_kv(model, path)`` writes two kinds of graph:

- the **step graph** ``path``: ``input_ids (batch, seq)`` and, per group ``j`` of layers
  sharing a form (in the order of first appearance; one tensor per group, not per layer:
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
  not fit it, so the step dequantizes before a plain attention.
- one **flush graph** per ``kv_quant`` group, ``<stem>.flush<n>.onnx``: 16-bit window
  blocks ``(rows, H, nb, key_group, D)`` of keys and of values (the group's layers stacked on
  the batch axis) → the six store arrays of those blocks. Flushing runs as a second graph,
  not inside the step: the store grows by whole blocks only on some steps, a data-dependent
  output shape a single exported step graph cannot have (``torch.export`` needs one output
  shape rule), and the driver runs it only when a block leaves the window (every
  ``key_group`` tokens).

:class:`OrtKVDecoder` drives them: before each step it flushes, per group, the tokens that
``QuantizedKVLayer.flush`` would move (``config.quantized_tokens(n)`` of the ``n`` cached
tokens), runs the step, keeps the returned window; ``generate`` decodes greedily, the prompt in
chunks of ``prefill_chunk`` tokens. Layers in ``kv_dense`` keep a window only. Low-rank forms
(``kv_lowrank``, ``kv_latent_quant``) are refused: their attention module is rewritten to
rebuild K/V from a latent and the cached positions, which this export does not trace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from slimfx.backends import onnx_decode
from slimfx.backends.onnx_graph import WRAP, OnnxExportError, _fold_markers, _rename_axes
from slimfx.forms.kv.cache import kv_forms_of
from slimfx.forms.kv.config import KVDecision, KVDenseConfig, KVQuantConfig
from slimfx.forms.kv.numerics import _minmax
from slimfx.planning.configs import decision_from_dict
from slimfx.planning.shapes import AttentionShape

__all__ = [
    "STORE_NAMES",
    "KVExportResult",
    "OrtKVDecoder",
    "export_onnx_kv",
    "export_forms",
    "dequantize_store",
]

STORE_NAMES = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")
META_KEY = "slimfx.kv_forms"


def export_forms(
    model: nn.Module, form: KVDecision | dict[int, KVDecision] | None = None
) -> list[KVDecision]:
    """Per decoder layer, the KV form the export gives it: ``form`` for all, per layer index
    (missing: 16-bit), or ``None``: the forms the model carries (``kv_forms_of``). Raises
    :class:`OnnxExportError` for a form the export does not take."""
    layers = onnx_decode.cache_geometry(model.config)[0]
    if form is None:
        form = kv_forms_of(model)
    out: list[KVDecision] = []
    for i in range(layers):
        f = form.get(i, KVDenseConfig()) if isinstance(form, dict) else form
        if not isinstance(f, (KVQuantConfig, KVDenseConfig)):
            raise OnnxExportError(
                f"layer {i}: {f.kind} is not exported — the ONNX KV-cache step takes kv_quant "
                "and kv_dense layers; low-rank caches rebuild K/V inside a rewritten attention "
                "module from a latent and the cached positions, which this export does not trace"
            )
        out.append(f)
    return out


def _unpack(codes: Tensor, bits: int) -> Tensor:
    """uint8 packed codes → float32 code values (last dim ``·8/bits``): the layout of
    ``formats.unpack_codes`` (code ``i`` of a byte at bits ``bits·i``), computed in int32
    because the ONNX exporter types a uint8 mask constant as int8 (``BitwiseAnd`` then fails
    to load in ONNX Runtime)."""
    if bits == 8:
        return codes.float()
    c = codes.to(torch.int32)
    mask = (1 << bits) - 1
    parts = [(c >> (bits * i)) & mask for i in range(8 // bits)]
    return torch.stack(parts, dim=-1).flatten(-2).float()


def dequantize_store(
    store: Sequence[Tensor], form: KVQuantConfig, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The blocked store arrays of one layer (``STORE_NAMES`` order, ``(B, H, nb, …)``) →
    keys, values ``(B, H, nb·key_group, D)`` in ``dtype`` (float32 arithmetic, as
    ``numerics.dequantize_keys`` / ``dequantize_values``)."""
    kc, ks, km, vc, vs, vm = store
    k = _unpack(kc, form.key_bits) * ks.float().unsqueeze(-2) + km.float().unsqueeze(-2)
    v = _unpack(vc, form.value_bits)
    v = v.unflatten(-1, (-1, form.value_group))
    v = v * vs.float().unsqueeze(-1) + vm.float().unsqueeze(-1)
    return k.flatten(-3, -2).to(dtype), v.flatten(-2).flatten(-3, -2).to(dtype)


def _groups(forms: Sequence[KVDecision]) -> list[tuple[KVDecision, list[int]]]:
    """Layers grouped by form, in the order of first appearance: ``[(form, layers)]``."""
    out: list[tuple[KVDecision, list[int]]] = []
    for i, f in enumerate(forms):
        for g, layers in out:
            if g == f:
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
    """``(ids, windows, stores) → (logits, *windows')`` around a Hugging Face causal LM, one
    window tensor ``(layers, 2, B, H, W, D)`` and six store tensors ``(layers, B, H, nb, …)``
    per group of layers sharing a form (few graph inputs: tracing time grows with them)."""

    def __init__(self, model: nn.Module, forms: Sequence[KVDecision]) -> None:
        super().__init__()
        setattr(self, WRAP, model)
        self.forms = list(forms)
        self.groups = _groups(forms)

    def forward(
        self, input_ids: Tensor, windows: Sequence[Tensor], stores: Sequence[Tensor]
    ) -> tuple[Tensor, ...]:
        from transformers.cache_utils import Cache

        model = getattr(self, WRAP)
        layers: list[_ExportLayer | None] = [None] * len(self.forms)
        j = 0
        for (f, idx), win in zip(self.groups, windows):
            st = None
            if isinstance(f, KVQuantConfig):
                st, j = stores[j : j + 6], j + 6
            for n, i in enumerate(idx):
                layers[i] = _ExportLayer(win[n], None if st is None else [a[n] for a in st], f)
        # every layer caches the same tokens (groups split them differently between window
        # and store): tell the tracer, so the one mask fits every layer
        first = layers[0]
        for la in layers:
            torch._check(la.get_seq_length() == first.get_seq_length())  # type: ignore[union-attr]
        cache = Cache(layers=layers)
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        present = []
        for (_, idx), win in zip(self.groups, windows):
            new = torch.stack([torch.stack(layers[i].new) for i in idx])  # type: ignore[union-attr, arg-type]
            present.append(torch.cat([win, new], dim=-2))
        return (out.logits, *present)


def _pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``(..., D)`` → packed bytes ``(..., D·bits/8)``, the layout of
    ``numerics.pack_codes``, computed in int32 (see :func:`_unpack`)."""
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.to(torch.int32).unflatten(-1, (-1, per))
    out = c[..., 0]
    for i in range(1, per):
        out = out | (c[..., i] << (bits * i))
    return out.to(torch.uint8)


class _Flush(nn.Module):
    """Window blocks ``(B, H, nb, key_group, D)`` of keys and values → the store arrays of
    those blocks: the quantization of ``numerics.quantize_keys`` / ``quantize_values`` (its
    ``_minmax``), blocked, packed by :func:`_pack`."""

    def __init__(self, form: KVQuantConfig) -> None:
        super().__init__()
        self.form = form

    def forward(self, keys: Tensor, values: Tensor) -> tuple[Tensor, ...]:
        f = self.form
        kq, ks, km = _minmax(keys, f.key_bits, dim=3)  # per channel over each block
        vq, vs, vm = _minmax(values.unflatten(-1, (-1, f.value_group)), f.value_bits, dim=-1)
        return (
            _pack(kq, f.key_bits), ks.squeeze(3), km.squeeze(3),
            _pack(vq.flatten(-2), f.value_bits), vs.squeeze(-1), vm.squeeze(-1),
        )  # fmt: skip


def _names(groups: Sequence[tuple[KVDecision, list[int]]]) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids"], ["logits"]
    for j in range(len(groups)):
        ins.append(f"window_{j}")
        outs.append(f"present_window_{j}")
    for j, (f, _) in enumerate(groups):
        if isinstance(f, KVQuantConfig):
            ins += [f"{n}_{j}" for n in STORE_NAMES]
    return ins, outs


def _example_store(form: KVQuantConfig, L: int, B: int, H: int, D: int, nb: int) -> list:
    g, vg = form.key_group, form.value_group
    u8, f16 = torch.uint8, torch.float16
    return [
        torch.randint(0, 256, (L, B, H, nb, g, D * form.key_bits // 8), dtype=u8),
        torch.rand(L, B, H, nb, D, dtype=f16),
        torch.rand(L, B, H, nb, D, dtype=f16),
        torch.randint(0, 256, (L, B, H, nb, g, D * form.value_bits // 8), dtype=u8),
        torch.rand(L, B, H, nb, g, D // vg, dtype=f16),
        torch.rand(L, B, H, nb, g, D // vg, dtype=f16),
    ]


def _to_onnx(
    program: Any, path: Path, ins: list[str], outs: list[str], axes: dict[str, str], meta: str
) -> None:
    import onnx
    import onnx_ir as ir

    from slimfx.backends import onnx_ops

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
    _fold_markers(model.graph)
    _rename_axes(model, axes)
    model.metadata_props[META_KEY] = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path)
    onnx.checker.check_model(str(path))


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
    """What :func:`export_onnx_kv` wrote: the step graph, the flush graphs (one per distinct
    ``kv_quant`` config, in the order of ``flush_forms``) and the per-layer forms."""

    path: Path
    flush_paths: list[Path]
    forms: list[KVDecision]
    flush_forms: list[KVQuantConfig] = field(default_factory=list)


def export_onnx_kv(
    model: nn.Module,
    path: str | os.PathLike[str],
    form: KVDecision | dict[int, KVDecision] | None = None,
) -> KVExportResult:
    """Export a Hugging Face causal LM's decode step over the quantized KV cache (module
    docstring) to ``path`` and its flush graphs next to it. ``form``: as
    :func:`export_forms` (``None``: the forms the model carries). Batch, sequence, window and
    store lengths stay dynamic. The model (float32 or float16 weights) is left unchanged."""
    path = Path(path)
    forms = export_forms(model, form)
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise OnnxExportError(
            "bfloat16 weights: onnxruntime's CPU provider has no bfloat16 MatMul; export "
            "model.float() instead"
        )
    _, H, D = onnx_decode.cache_geometry(model.config)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    for i, f in enumerate(forms):
        why = f.check(AttentionShape(H * D, H, H, D))
        if why:
            raise OnnxExportError(f"layer {i}: {f.short()}: {why}")
    groups = _groups(forms)
    # example sizes ≥ 2 (torch.export specializes axes of 0 and 1), each window longer than
    # its sink tokens (a window sliced at the sink would otherwise be specialized), the same
    # cached length in every group (window + NB blocks)
    B, NB = 2, 2
    quant = [isinstance(f, KVQuantConfig) for f, _ in groups]
    blocks = [f.key_group * NB if q else 0 for (f, _), q in zip(groups, quant)]  # type: ignore[attr-defined]
    sinks = [f.sink if q else 0 for (f, _), q in zip(groups, quant)]  # type: ignore[attr-defined]
    total = max(b + s + 3 for b, s in zip(blocks, sinks))
    ids = torch.randint(0, 8, (B, 2))
    windows = tuple(
        torch.randn(len(idx), 2, B, H, total - b, D, dtype=dtype)
        for (_, idx), b in zip(groups, blocks)
    )
    stores: list[Tensor] = []
    for (f, idx), q in zip(groups, quant):
        if q:
            stores += _example_store(f, len(idx), B, H, D, NB)  # type: ignore[arg-type]
    auto = torch.export.Dim.AUTO
    shapes = (
        {0: auto, 1: auto},
        tuple({2: auto, 4: auto} for _ in windows),
        tuple({1: auto, 3: auto} for _ in stores),
    )
    step = _Step(model, forms)
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            program = torch.export.export(
                step, (ids, windows, tuple(stores)), dynamic_shapes=shapes, strict=False
            )
    finally:
        for m, flag in flags.items():
            m.training = flag
    ins, outs = _names(groups)
    # one name per symbol: ORT plans buffers as if equal names were equal sizes
    axes: list[tuple] = [("batch", "seq")]
    axes += [(None, None, "batch", None, f"window_{j}") for j in range(len(groups))]
    axes += [
        (None, "batch", None, f"blocks_{j}") for j, q in enumerate(quant) if q for _ in STORE_NAMES
    ]
    meta = json.dumps([f.to_dict() for f in forms])
    _to_onnx(program, path, ins, outs, _axis_names(program, len(ins), axes), meta)

    flush_forms: list[KVQuantConfig] = []
    for f in forms:
        if isinstance(f, KVQuantConfig) and f not in flush_forms:
            flush_forms.append(f)
    flush_paths = []
    for j, f in enumerate(flush_forms):
        blocks = tuple(torch.randn(B, H, NB, f.key_group, D, dtype=dtype) for _ in range(2))
        shp = tuple({0: auto, 2: auto} for _ in blocks)
        with torch.no_grad():
            prog = torch.export.export(_Flush(f), blocks, dynamic_shapes=shp, strict=False)
        fpath = path.with_name(f"{path.stem}.flush{j}.onnx")
        f_ins = ["key_blocks", "value_blocks"]
        f_axes = _axis_names(prog, 2, [("batch", None, "blocks")] * 2)
        _to_onnx(prog, fpath, f_ins, list(STORE_NAMES), f_axes, json.dumps(f.to_dict()))
        flush_paths.append(fpath)
    return KVExportResult(path, flush_paths, forms, flush_forms)


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtKVDecoder:
    """Greedy decoding in ONNX Runtime with the cache held compressed (module docstring).

    ``step(ids)`` runs one call (any number of tokens) after the cached ones and returns the
    logits ``(batch, seq, vocab)``; ``flush()`` moves the tokens that left the window into the
    store as the next step would; ``reset()`` empties the cache; ``generate(ids, n,
    prefill_chunk)`` decodes greedily. The arrays held between steps, per group of layers
    sharing a form (``groups``): ``windows[j]`` ``(layers, 2, batch, H, W, D)`` and
    ``stores[j]`` (six arrays ``(layers, batch, H, nb, …)``, ``None`` for 16-bit layers);
    ``layer_window(i)`` / ``layer_store(i)`` give one layer's; ``cache_nbytes()`` their bytes,
    ``seq_length`` the cached tokens."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = _session(self.path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map  # not onnx.load: no 2nd copy
        self.forms: list[KVDecision] = [decision_from_dict(d) for d in json.loads(meta[META_KEY])]
        self.groups = _groups(self.forms)
        self.flush_sessions: dict[int, Any] = {}
        n = 0
        for j, (f, _) in enumerate(self.groups):
            if isinstance(f, KVQuantConfig):
                fpath = self.path.with_name(f"{self.path.stem}.flush{n}.onnx")
                self.flush_sessions[j], n = _session(fpath, threads), n + 1
        inp = self.session.get_inputs()
        self.input_names = [i.name for i in inp]
        self.dtype = np.float16 if inp[1].type == "tensor(float16)" else np.float32
        _, _, _, self.kv_heads, _, self.head_dim = inp[1].shape
        self._where = {i: (j, n) for j, (_, idx) in enumerate(self.groups) for n, i in
                       enumerate(idx)}  # fmt: skip
        self.reset()

    def reset(self, batch: int = 1) -> None:
        """Empty the cache for a batch of ``batch`` rows."""
        H, D = self.kv_heads, self.head_dim
        self.batch, self.seq_length = batch, 0
        self.windows = [
            np.zeros((len(idx), 2, batch, H, 0, D), self.dtype) for _, idx in self.groups
        ]
        self.stores: list[list[np.ndarray] | None] = []
        self.n_stored = [0] * len(self.groups)
        for f, idx in self.groups:
            if not isinstance(f, KVQuantConfig):
                self.stores.append(None)
                continue
            g, vg, lead = f.key_group, f.value_group, (len(idx), batch, H, 0)
            self.stores.append([
                np.zeros((*lead, g, D * f.key_bits // 8), np.uint8),
                np.zeros((*lead, D), np.float16),
                np.zeros((*lead, D), np.float16),
                np.zeros((*lead, g, D * f.value_bits // 8), np.uint8),
                np.zeros((*lead, g, D // vg), np.float16),
                np.zeros((*lead, g, D // vg), np.float16),
            ])  # fmt: skip

    def layer_window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``i``'s 16-bit window: keys, values ``(batch, H, W, D)``."""
        j, n = self._where[i]
        return self.windows[j][n, 0], self.windows[j][n, 1]

    def layer_store(self, i: int) -> list[np.ndarray] | None:
        """Layer ``i``'s store arrays (``STORE_NAMES`` order, ``(batch, H, nb, …)``)."""
        j, n = self._where[i]
        st = self.stores[j]
        return None if st is None else [a[n] for a in st]

    def layer_stored_tokens(self, i: int) -> int:
        """Tokens in layer ``i``'s quantized store."""
        return self.n_stored[self._where[i][0]]

    def flush(self) -> None:
        """Move the window tokens ``QuantizedKVLayer.flush`` would move into the store (one
        flush-graph run per group, its layers stacked on the batch axis)."""
        for j, (f, _) in enumerate(self.groups):
            if not isinstance(f, KVQuantConfig):
                continue
            move = f.quantized_tokens(self.seq_length) - self.n_stored[j]
            if move <= 0:
                continue
            s, g, w = f.sink, f.key_group, self.windows[j]
            L, _, B, H, _, D = w.shape
            blk = w[..., s : s + move, :].reshape(L, 2, B, H, move // g, g, D)
            feeds = {
                "key_blocks": blk[:, 0].reshape(L * B, H, move // g, g, D),
                "value_blocks": blk[:, 1].reshape(L * B, H, move // g, g, D),
            }
            new = self.flush_sessions[j].run(None, feeds)
            old = self.stores[j]
            assert old is not None
            self.stores[j] = [
                np.concatenate([a, b.reshape(L, B, *b.shape[1:])], axis=3) for a, b in zip(old, new)
            ]
            self.n_stored[j] += move
            self.windows[j] = np.concatenate([w[..., :s, :], w[..., s + move :, :]], axis=-2)

    def step(self, ids: Tensor | np.ndarray) -> np.ndarray:
        """Logits of ``ids`` (batch, seq) after the cached tokens; the cache then holds them."""
        arr = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        arr = arr.astype(np.int64).reshape(-1, arr.shape[-1])
        if arr.shape[0] != self.batch:
            raise ValueError(f"batch {arr.shape[0]} ≠ the cache's {self.batch}: call reset()")
        self.flush()
        feeds: dict[str, np.ndarray] = {"input_ids": arr}
        names = iter(self.input_names[1:])
        for w in self.windows:
            feeds[next(names)] = w
        for st in self.stores:
            for a in st or ():
                feeds[next(names)] = a
        out = self.session.run(None, feeds)
        self.windows = out[1:]
        self.seq_length += arr.shape[1]
        return out[0]

    def generate(
        self, ids: Tensor | np.ndarray, max_new_tokens: int, prefill_chunk: int | None = None
    ) -> np.ndarray:
        """Greedy decoding from a fresh cache: the prompt in calls of ``prefill_chunk`` tokens
        (``None``: one call), then one token a call; returns prompt + new tokens."""
        seq = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        seq = seq.astype(np.int64).reshape(-1, seq.shape[-1])
        self.reset(seq.shape[0])
        chunk = prefill_chunk or seq.shape[1]
        for a in range(0, seq.shape[1], chunk):
            logits = self.step(seq[:, a : a + chunk])
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            seq = np.concatenate([seq, nxt], axis=1)
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)
        return seq

    def store_nbytes(self) -> int:
        """Bytes of the quantized store arrays held now."""
        return sum(a.nbytes for st in self.stores for a in (st or ()))

    def window_nbytes(self) -> int:
        """Bytes of the 16-bit (model dtype) windows held now."""
        return sum(w.nbytes for w in self.windows)

    def cache_nbytes(self) -> int:
        """Bytes of every cache array held between steps."""
        return self.store_nbytes() + self.window_nbytes()
