"""ONNX Runtime decode over the KIVI-quantized KV cache (``kv_quant`` forms).

``export_onnx_kv(model, path)`` writes two kinds of graph:

- the **step graph** ``path``: ``input_ids (batch, seq)``, per layer the 16-bit window
  ``window_key_i`` / ``window_value_i`` ``(batch, kv_heads, window, head_dim)`` and, for a
  ``kv_quant`` layer, its quantized store → ``logits`` and the updated windows
  ``present_window_key_i`` / ``present_window_value_i`` (input window + the call's tokens).
  The store stays compressed between steps, in the layout of :mod:`slimfx.forms.kv.numerics`
  blocked by ``key_group`` tokens (``nb`` whole blocks; the same bytes as the torch
  ``QuantizedKVLayer``)::

      k_codes_i (batch, H, nb, key_group, D·key_bits/8)  uint8    k_scale_i, k_min_i (batch, H, nb, D)
      v_codes_i (batch, H, nb, key_group, D·value_bits/8) uint8   v_scale_i, v_min_i
                                                     (batch, H, nb, key_group, D/value_group) float16

  The graph unpacks the codes with ``BitShift``/``BitwiseAnd``, dequantizes with
  ``Cast``/``Mul``/``Add`` (``q·scale + min``: the minimum is a float, not an integer zero
  point, so ``DequantizeLinear`` does not express it) and attends over ``sink window ‖ store ‖
  recent window ‖ new tokens`` exactly as ``QuantizedKVLayer.update`` returns them. ONNX
  Runtime's ``GroupQueryAttention`` does take a uint8/int8 cache on the CPU provider, but only
  with symmetric scales per tensor or per channel fixed for the whole cache, quantizing new
  tokens itself: KIVI's per-block key ranges, per-token value ranges and float minimums do
  not fit it, so the step dequantizes before a plain attention.
- one **flush graph** per distinct ``kv_quant`` config, ``<stem>.flush<j>.onnx``: 16-bit
  window blocks ``(batch, H, nb, key_group, D)`` of keys and of values → the six store arrays
  of those blocks. Flushing runs as a second graph, not inside the step: the store grows by
  whole blocks only on some steps, a data-dependent output shape a single exported step
  graph cannot have (``torch.export`` needs one output shape rule), and the driver runs it
  only when a block leaves the window (every ``key_group`` tokens).

:class:`OrtKVDecoder` drives them: before each step it flushes, per layer, the tokens that
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
    """The blocked store arrays (``STORE_NAMES`` order) → keys, values ``(B, H, nb·key_group,
    D)`` in ``dtype`` (float32 arithmetic, as ``numerics.dequantize_keys``/``_values``)."""
    kc, ks, km, vc, vs, vm = store
    k = _unpack(kc, form.key_bits) * ks.float().unsqueeze(3) + km.float().unsqueeze(3)
    v = _unpack(vc, form.value_bits)
    v = v.unflatten(-1, (-1, form.value_group))
    v = v * vs.float().unsqueeze(-1) + vm.float().unsqueeze(-1)
    return k.flatten(2, 3).to(dtype), v.flatten(-2).flatten(2, 3).to(dtype)


class _Step(nn.Module):
    """``(ids, windows, stores) → (logits, *windows')`` around a Hugging Face causal LM."""

    def __init__(self, model: nn.Module, forms: Sequence[KVDecision]) -> None:
        super().__init__()
        setattr(self, WRAP, model)
        self.forms = list(forms)

    def forward(
        self, input_ids: Tensor, windows: Sequence[Tensor], stores: Sequence[Tensor]
    ) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        model = getattr(self, WRAP)
        pairs, j = [], 0
        for i, f in enumerate(self.forms):
            kw, vw = windows[2 * i], windows[2 * i + 1]
            if isinstance(f, KVQuantConfig):
                k, v = dequantize_store(stores[j : j + 6], f, kw.dtype)
                j += 6
                s = f.sink
                kw = torch.cat([kw[:, :, :s], k, kw[:, :, s:]], dim=2)
                vw = torch.cat([vw[:, :, :s], v, vw[:, :, s:]], dim=2)
            pairs.append((kw, vw))
        # every layer caches the same tokens (their windows and stores split them differently
        # when the forms' blocks differ): tell the tracer so the one mask fits every layer
        for kw, vw in pairs:
            torch._check(kw.shape[2] == pairs[0][0].shape[2])
            torch._check(vw.shape[2] == kw.shape[2])
        cache = DynamicCache(ddp_cache_data=pairs, config=model.config)
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        seq = input_ids.shape[1]
        new: list[Tensor] = []
        for i, layer in enumerate(out.past_key_values.layers):
            new.append(torch.cat([windows[2 * i], layer.keys[:, :, -seq:]], dim=2))
            new.append(torch.cat([windows[2 * i + 1], layer.values[:, :, -seq:]], dim=2))
        return (out.logits, *new)


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


def _names(forms: Sequence[KVDecision]) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids"], ["logits"]
    for i in range(len(forms)):
        ins += [f"window_key_{i}", f"window_value_{i}"]
        outs += [f"present_window_key_{i}", f"present_window_value_{i}"]
    for i, f in enumerate(forms):
        if isinstance(f, KVQuantConfig):
            ins += [f"{n}_{i}" for n in STORE_NAMES]
    return ins, outs


def _empty_store(form: KVQuantConfig, B: int, H: int, D: int, nb: int) -> list[Tensor]:
    g = form.key_group
    u8, f16 = torch.uint8, torch.float16
    return [
        torch.randint(0, 256, (B, H, nb, g, D * form.key_bits // 8), dtype=u8),
        torch.rand(B, H, nb, D, dtype=f16),
        torch.rand(B, H, nb, D, dtype=f16),
        torch.randint(0, 256, (B, H, nb, g, D * form.value_bits // 8), dtype=u8),
        torch.rand(B, H, nb, g, D // form.value_group, dtype=f16),
        torch.rand(B, H, nb, g, D // form.value_group, dtype=f16),
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
    # example sizes ≥ 2 (torch.export specializes axes of 0 and 1), each window longer than
    # its sink tokens (a window sliced at the sink would otherwise be specialized), the same
    # cached length in every layer (window + NB blocks)
    B, NB = 2, 2
    blocks = [f.key_group * NB if isinstance(f, KVQuantConfig) else 0 for f in forms]
    sinks = [f.sink if isinstance(f, KVQuantConfig) else 0 for f in forms]
    total = max(b + s + 3 for b, s in zip(blocks, sinks))
    for i, f in enumerate(forms):
        why = f.check(AttentionShape(H * D, H, H, D))
        if why:
            raise OnnxExportError(f"layer {i}: {f.short()}: {why}")
    ids = torch.randint(0, 8, (B, 2))
    windows = tuple(torch.randn(B, H, total - b, D, dtype=dtype) for b in blocks for _ in range(2))
    stores: list[Tensor] = []
    for f in forms:
        if isinstance(f, KVQuantConfig):
            stores += _empty_store(f, B, H, D, NB)
    auto = torch.export.Dim.AUTO
    shapes = (
        {0: auto, 1: auto},
        tuple({0: auto, 2: auto} for _ in windows),
        tuple({0: auto, 2: auto} for _ in stores),
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
    ins, outs = _names(forms)
    # one name per symbol: ORT plans buffers as if equal names were equal sizes
    axes: list[tuple] = [("batch", "seq")]
    axes += [("batch", None, f"window_{i}", None) for i in range(len(forms)) for _ in "kv"]
    axes += [
        ("batch", None, f"blocks_{i}")
        for i, f in enumerate(forms)
        if isinstance(f, KVQuantConfig)
        for _ in STORE_NAMES
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
    logits ``(batch, seq, vocab)``; ``flush()`` moves the tokens out of the window as the next
    step would; ``reset()`` empties the cache; ``generate(ids, n,
    prefill_chunk)``; ``store`` / ``windows`` are the arrays held between steps (per layer),
    ``cache_nbytes()`` their bytes and ``seq_length`` the cached tokens."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnx

        self.path = Path(path)
        self.session = _session(self.path, threads)
        meta = {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False)
                .metadata_props}  # fmt: skip
        self.forms: list[KVDecision] = [decision_from_dict(d) for d in json.loads(meta[META_KEY])]
        self.flush_sessions: dict[KVQuantConfig, Any] = {}
        j = 0
        for f in self.forms:
            if isinstance(f, KVQuantConfig) and f not in self.flush_sessions:
                self.flush_sessions[f] = _session(self.path.with_name(f"{self.path.stem}.flush{j}.onnx"),
                                         threads)  # fmt: skip
                j += 1
        inp = self.session.get_inputs()
        self.input_names = [i.name for i in inp]
        self.dtype = np.float16 if inp[1].type == "tensor(float16)" else np.float32
        _, self.kv_heads, _, self.head_dim = inp[1].shape
        self.reset()

    def reset(self, batch: int = 1) -> None:
        """Empty the cache for a batch of ``batch`` rows."""
        H, D = self.kv_heads, self.head_dim
        self.batch, self.seq_length = batch, 0
        self.windows = [
            [np.zeros((batch, H, 0, D), self.dtype) for _ in range(2)] for _ in self.forms
        ]
        self.store: list[list[np.ndarray] | None] = []
        self.n_stored = [0] * len(self.forms)
        for f in self.forms:
            if not isinstance(f, KVQuantConfig):
                self.store.append(None)
                continue
            g, vg = f.key_group, f.value_group
            self.store.append([
                np.zeros((batch, H, 0, g, D * f.key_bits // 8), np.uint8),
                np.zeros((batch, H, 0, D), np.float16),
                np.zeros((batch, H, 0, D), np.float16),
                np.zeros((batch, H, 0, g, D * f.value_bits // 8), np.uint8),
                np.zeros((batch, H, 0, g, D // vg), np.float16),
                np.zeros((batch, H, 0, g, D // vg), np.float16),
            ])  # fmt: skip

    def flush(self) -> None:
        """Move the window tokens ``QuantizedKVLayer.flush`` would move into the store."""
        for i, f in enumerate(self.forms):
            if not isinstance(f, KVQuantConfig):
                continue
            move = f.quantized_tokens(self.seq_length) - self.n_stored[i]
            if move <= 0:
                continue
            s, g = f.sink, f.key_group
            kw, vw = self.windows[i]
            B, H, _, D = kw.shape
            blocks = [w[:, :, s : s + move].reshape(B, H, move // g, g, D) for w in (kw, vw)]
            new = self.flush_sessions[f].run(
                None, {"key_blocks": blocks[0], "value_blocks": blocks[1]}
            )
            self.store[i] = [np.concatenate([a, b], axis=2) for a, b in zip(self.store[i], new)]
            self.n_stored[i] += move
            self.windows[i] = [np.concatenate([w[:, :, :s], w[:, :, s + move :]], 2)
                               for w in (kw, vw)]  # fmt: skip

    def step(self, ids: Tensor | np.ndarray) -> np.ndarray:
        """Logits of ``ids`` (batch, seq) after the cached tokens; the cache then holds them."""
        arr = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        arr = arr.astype(np.int64).reshape(-1, arr.shape[-1])
        if arr.shape[0] != self.batch:
            raise ValueError(f"batch {arr.shape[0]} ≠ the cache's {self.batch}: call reset()")
        self.flush()
        feeds: dict[str, np.ndarray] = {"input_ids": arr}
        names = iter(self.input_names[1:])
        for kw, vw in self.windows:
            feeds[next(names)], feeds[next(names)] = kw, vw
        for st in self.store:
            for a in st or ():
                feeds[next(names)] = a
        out = self.session.run(None, feeds)
        self.windows = [[out[1 + 2 * i], out[2 + 2 * i]] for i in range(len(self.forms))]
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
        return sum(a.nbytes for st in self.store for a in (st or ()))

    def window_nbytes(self) -> int:
        """Bytes of the 16-bit (model dtype) windows held now."""
        return sum(w.nbytes for pair in self.windows for w in pair)

    def cache_nbytes(self) -> int:
        """Bytes of every cache array held between steps."""
        return self.store_nbytes() + self.window_nbytes()
