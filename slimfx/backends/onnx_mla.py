"""ONNX export of a causal LM converted to multi-head latent attention, with the latent cache.

``export_mla_onnx(model, "m.onnx", ids)`` writes one decode-step graph (the contract of
``export_onnx(..., kv_cache=True)`` in ``slimfx.backends.onnx_decode``)::

    input_ids (batch, seq), attention_mask (batch, past_seq + seq), past_key_i, past_value_i[,
    past_scale_i]
        → logits, present_key_i, present_value_i[, present_scale_i]

where, for a layer converted to MLA (:class:`~slimfx.forms.mla.module.MLAAttention`), the cache
is the *latent cache* — ``past_key_i`` the latent ``c = W_dkv x`` (batch, 1, past_seq, r) and
``past_value_i`` the rotated RoPE key shared by every query head (batch, 1, past_seq, 2N), the
slots the block fills in the torch caches; an int8-latent block (``latent_bits=8``) stores in
``past_key_i`` the int8 codes and in ``past_scale_i`` one scale per token (batch, 1, past_seq,
1), as ``MLALatentCache(latent_bits=8)`` does; a layer left unconverted keeps its keys and
values (batch, kv_heads, past_seq, head_dim). One graph serves prefill (empty cache) and
per-token decode; :class:`LatentOrtModel` (``latent_ort_session``) runs it (``step``,
``generate``; a graph without int8 layers also runs in the plain ``OrtModel``), padded
batches under their ``attention_mask`` as there.

Inside, every converted block is the absorbed form written with plain ops: the query projection
and the per-head key-space map (MatMul), RoPE on the kept entries (Gather of cos/sin, Mul, Add),
the latent and RoPE-key projections (MatMul), ``q_lat = q_nope W_uk`` (MatMul), scores
``q_rope k_ropeᵀ + q_lat cᵀ`` (two MatMul over the latent cache: keys and values are never
rebuilt), the model's causal and padding mask, Softmax, ``ctx = p c`` (MatMul over the
latent), the value up-projection per kv head (MatMul) and ``o_proj`` (MatMul). The int8 latent
is quantized (per-token scale, Round, Clip, Cast) and dequantized (Cast, Mul) in the graph
exactly as in torch. A block with int8 factors (``factor_bits=8``) runs the products over the
hidden states and each q_mix map as 8-bit ``MatMulNBits`` over the codes, and dequantizes
``k_up`` / ``v_up`` (``DequantizeLinear``; :class:`MLAExportBlock`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimfx import formats
from slimfx.backends import onnx_decode, onnx_ops
from slimfx.backends.capabilities import matmul_nbits_block
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
from slimfx.backends.ort import OrtModel
from slimfx.forms.mla.cache import MLALatentLayer
from slimfx.forms.mla.module import MLAAttention, quantize_latent
from slimfx.ir import ops_quant  # noqa: F401  (registers slimfx::quant_linear)
from slimfx.ir.capture import eval_mode

__all__ = [
    "cache_kinds",
    "CacheInput",
    "LatentDecodeStep",
    "LatentOrtModel",
    "MLAExportBlock",
    "MLAOnnxExport",
    "empty_latent_past",
    "export_blocks",
    "export_mla_onnx",
    "latent_cache_layout",
    "latent_ort_session",
]


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise OnnxExportError(f"{type(model).__name__} has no .model.layers (not a Llama-style LM)")
    return layers


def cache_kinds(model: nn.Module) -> tuple[list[int], list[int]]:
    """``(MLA layers, layers with a compressed KV cache)`` of ``model`` by layer index: the
    two kinds of compressed cache, which the two decode-step exports hold one each
    (``export_mla_onnx``, ``onnx_kv.export_onnx_kv``)."""
    from slimfx.forms.kv.cache import kv_forms_of
    from slimfx.forms.kv.config import KVDenseConfig
    from slimfx.forms.kv.lowrank import LowRankKVAttention

    mla = sorted(m.layer_idx for m in model.modules() if isinstance(m, MLAAttention))
    kv = {i for i, f in kv_forms_of(model).items() if not isinstance(f, KVDenseConfig)}
    kv |= {m.layer_idx for m in model.modules() if isinstance(m, LowRankKVAttention)}
    return mla, sorted(kv - set(mla))


@dataclass(frozen=True)
class CacheInput:
    """One cache tensor of the graph: ``name`` (``past_key_3``; the output is
    ``present_key_3``), its shape ``(batch, heads, past_seq, width)`` and element type."""

    name: str
    heads: int
    width: int
    dtype: torch.dtype


def _kind(attn: nn.Module) -> str:
    if not isinstance(attn, MLAAttention):
        return "kv"
    return "mla8" if attn.latent_bits == 8 else "mla"


def latent_cache_layout(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[CacheInput]:
    """The graph's cache tensors in input order (``dtype``: the model's float type). Per layer
    ``i``: an MLA block has ``past_key_i`` (the latent, (1, r)) and ``past_value_i`` (the RoPE
    key, (1, 2N)); an int8-latent block holds in ``past_key_i`` the int8 codes and adds
    ``past_scale_i`` (one scale per token, (1, 1)); another block ``past_key_i`` and
    ``past_value_i`` of (kv_heads, head_dim)."""
    _, kv_heads, head_dim = onnx_decode.cache_geometry(model.config)
    out: list[CacheInput] = []
    for i, blk in enumerate(_layers(model)):
        a, kind = blk.self_attn, _kind(blk.self_attn)
        if kind == "kv":
            out += [CacheInput(f"past_key_{i}", kv_heads, head_dim, dtype),
                    CacheInput(f"past_value_{i}", kv_heads, head_dim, dtype)]
            continue
        out += [CacheInput(f"past_key_{i}", 1, a.rank, torch.int8 if kind == "mla8" else dtype),
                CacheInput(f"past_value_{i}", 1, 2 * a.rope_entries, dtype)]
        if kind == "mla8":
            out.append(CacheInput(f"past_scale_{i}", 1, 1, dtype))
    return out


def empty_latent_past(
    model: nn.Module, batch: int, length: int = 0, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """A cache of ``length`` positions (zeros) in the graph's layout
    (:func:`latent_cache_layout`), flat in input order."""
    return [torch.zeros(batch, c.heads, length, c.width, dtype=c.dtype)
            for c in latent_cache_layout(model, dtype)]


class LatentDecodeStep(nn.Module):
    """``(ids, past…) → (logits, present…)`` around a causal LM with MLA blocks, the cache
    laid out as :func:`latent_cache_layout` says: each layer's tensors become a cache layer
    (``DynamicLayer``; ``MLALatentLayer(8)`` for an int8 latent) that the blocks update."""

    def __init__(self, model: nn.Module, wrap_name: str) -> None:
        super().__init__()
        self._wrap_name = wrap_name
        setattr(self, wrap_name, model)
        self.kinds = [_kind(blk.self_attn) for blk in _layers(model)]
        # layers left on a sliding window keep its last tokens (MLA refuses such layers)
        self.windows = onnx_decode.model_windows(model)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, past: Sequence[Tensor]
    ) -> tuple[Tensor, ...]:
        from transformers.cache_utils import Cache, DynamicLayer

        model = getattr(self, self._wrap_name)
        seen = attention_mask.shape[1] - input_ids.shape[1]  # tokens before the call
        layers: list[Any] = []
        k = 0
        for i, kind in enumerate(self.kinds):
            if kind == "mla8":
                codes, rope, scales = past[k:k + 3]
                k += 3
                layer = MLALatentLayer(latent_bits=8)
                layer.lazy_initialization(rope, rope)
                layer.latent_codes, layer.latent_scales = codes, scales
                layer.keys, layer.values = codes, rope
            elif kind == "kv" and i in self.windows:
                layer = onnx_decode.window_layer(past[k], past[k + 1], self.windows[i], seen)
                k += 2
            else:
                a, b = past[k:k + 2]
                k += 2
                layer = DynamicLayer()
                layer.lazy_initialization(a, b)
                layer.keys, layer.values = a, b
            if i not in self.windows:  # every other layer holds every token seen
                torch._check(layer.keys.shape[2] == seen)
            layers.append(layer)
        cache = Cache(layers=layers)
        kw = onnx_decode.mask_kwargs(model, attention_mask, seen, input_ids.shape[1])
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **kw)
        present: list[Tensor] = []
        for kind, layer in zip(self.kinds, cache.layers):
            if kind == "mla8":
                present += [layer.latent_codes, layer.values, layer.latent_scales]
            else:
                present += [layer.keys, layer.values]
        return (out.logits, *present)


class LatentOrtModel(OrtModel):
    """:class:`~slimfx.backends.ort.OrtModel` for a graph :func:`export_mla_onnx` wrote:
    the empty cache of a prefill is built from the graph's declared cache inputs (int8 codes
    included), so ``step`` and ``generate`` run any latent layout."""

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """The cache inputs of a prefill, empty, in each input's declared type (int8 codes
        included)."""
        return onnx_decode.empty_feeds(self.session, batch, int8=True)


class MLAExportBlock(nn.Module):
    """The absorbed form of an :class:`MLAAttention` in export-friendly ops (module docstring).

    Same call contract as the block it wraps (``forward(hidden_states, position_embeddings,
    attention_mask, past_key_values)``); it attends under the model's 4-D ``attention_mask``
    (causal and padding; a query that sees no token — a padding position — gets zero weights,
    as the export's other attention does), or without one causally over the cache (queries at
    the last ``seq`` positions)."""

    def __init__(self, mla: MLAAttention) -> None:
        super().__init__()
        self.mla = mla
        # the value up-projection and q_mix are read from the block (int8 factors through
        # ``slimfx::dequant_rows``: the graph keeps their codes) and laid out in the graph.
        # With int8 factors, the products over the hidden states (latent, RoPE key rows) and
        # each stored q_mix map run as 8-bit MatMulNBits where the input width has a block
        # (``nbits``): the codes in slimfx's int8 linear format (code + 128, one scale per
        # row), which ONNX Runtime multiplies without a dequantized copy. k_up / v_up stay
        # DequantizeLinear + MatMul: as MatMulNBits (widths padded to 16, one product per kv
        # head) SmolLM2's decode step measured 57.0 vs 53.0 ms (benchmarks/RESULTS.md)
        self.nbits: dict[str, int] = {}
        if mla.factor_bits != 8:
            return
        keep = {"persistent": False}
        D, d = mla.kv_down.in_features, mla.head_dim
        mats = {"kv_down": mla.kv_down, "k_rope_proj": mla.k_rope_proj}
        for name, f in mats.items():
            if f.out_features and matmul_nbits_block(D) is not None:
                self.register_buffer(f"{name}_q", _uint8(f.codes), **keep)
                self.register_buffer(f"{name}_s", f.scale[:, None].clone(), **keep)
                self.nbits[name] = D
        if matmul_nbits_block(d) is not None:
            S = mla.q_mix_heads  # codes (S·K·d, d), one scale per row
            codes, scale = mla.q_mix_rows.codes.view(S, -1, d), mla.q_mix_rows.scale.view(S, -1)
            for s in range(S):
                self.register_buffer(f"q_mix{s}_q", _uint8(codes[s]), **keep)
                self.register_buffer(f"q_mix{s}_s", scale[s][:, None].clone(), **keep)
            self.nbits["q_mix"] = d

    def _q8(self, x: Tensor, name: str, bias: Tensor | None = None) -> Tensor:
        """``x`` times the int8 rows of buffer pair ``name`` (slimfx::quant_linear: 8 bits, one
        group per row; MatMulNBits in the graph)."""
        q, s = getattr(self, f"{name}_q"), getattr(self, f"{name}_s")
        return torch.ops.slimfx.quant_linear(x, q, s.to(x.dtype), None, bias, 8, q.shape[1])

    def _queries(self, hidden_states: Tensor) -> Tensor:
        """``q'`` (B, H, T, K·d): every head's query mapped into the shared key space, one
        product per stored map (a kv group's query heads stacked as its rows)."""
        m = self.mla
        B, T, _ = hidden_states.shape
        H, d, S = m.num_heads, m.head_dim, m.q_mix_heads
        q = m.q_proj(hidden_states).view(B, T, S, H // S, d)
        if "q_mix" in self.nbits:  # one 8-bit product per stored map
            out = torch.stack([self._q8(q[:, :, s], f"q_mix{s}") for s in range(S)], dim=1)
        else:  # (B, S, G·T, d) @ (S, d, K·d)
            rows = q.permute(0, 2, 3, 1, 4).reshape(B, S, -1, d)
            out = torch.matmul(rows, m.stored_query_mix().transpose(1, 2))
            out = out.view(B, S, H // S, T, -1).transpose(2, 3)
        # out: (B, S, T, G, K·d) → (B, H, T, K·d)
        return out.permute(0, 1, 3, 2, 4).reshape(B, H, T, -1)

    def _hidden_product(self, name: str, hidden_states: Tensor) -> Tensor:
        """The block's projection ``name`` (latent or RoPE key rows) of the hidden states."""
        if name in self.nbits:
            return self._q8(hidden_states, name, getattr(self.mla, name).bias)
        return getattr(self.mla, name)(hidden_states)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: Any | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """Absorbed latent attention (module docstring); returns ``(output, None)``."""
        m = self.mla
        if position_embeddings is None:
            raise ValueError("MLAExportBlock needs position_embeddings (cos, sin) from the model")
        B, T, _ = hidden_states.shape
        H, K, d, n2 = m.num_heads, m.num_kv_heads, m.head_dim, 2 * m.rope_entries
        cos, sin = position_embeddings
        r = m.rank
        w_uv = m.v_up.weight.view(K, d, r).transpose(1, 2)  # (K, r, d): per kv head
        b_uv = m.v_up.bias.view(K, 1, d)
        q = self._queries(hidden_states)  # (B, H, T, K·d): the shared key space
        q_rope = m._rope(q[..., :n2], cos, sin)
        q_lat = torch.matmul(q[..., n2:], m.k_up.weight)  # (B, H, T, r)
        k_rope = m._rope(self._hidden_product("k_rope_proj", hidden_states)[:, None], cos, sin)
        latent = self._hidden_product("kv_down", hidden_states)[:, None]  # (B, 1, T, r)
        if m.latent_bits == 8:
            codes, scales = quantize_latent(latent)
            latent = codes.to(latent.dtype) * scales
        if past_key_values is not None:
            latent, k_rope = past_key_values.update(latent, k_rope, m.layer_idx)
        S = latent.shape[2]
        scores = torch.matmul(q_lat, latent.transpose(-1, -2))
        if n2:
            scores = scores + torch.matmul(q_rope, k_rope.transpose(-1, -2))
        if attention_mask is None:
            q_pos = torch.arange(T, device=latent.device) + (S - T)
            mask = torch.arange(S, device=latent.device)[None, :] <= q_pos[:, None]  # (T, S)
        else:
            mask = attention_mask[:, :, -T:, :S]  # (B | 1, 1, T, S)
        scores = scores * m.scaling
        if mask.dtype == torch.bool:
            probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1)
            # a padding query that sees no token: zero weights, not NaN (which the cache's
            # padding values would carry into the next layers' real tokens)
            probs = probs * mask.any(-1, keepdim=True)
        else:
            probs = torch.softmax(scores + mask, dim=-1)
        ctx = torch.matmul(probs, latent)  # (B, H, T, r): attention over the latent
        ctx = ctx.reshape(B, K, (H // K) * T, r)  # a kv head's query heads, stacked
        v = (torch.matmul(ctx, w_uv) + b_uv).reshape(B, H, T, d)  # (B, H, T, d)
        return m.o_proj(v.transpose(1, 2).reshape(B, T, H * d)), None


def _uint8(codes: Tensor) -> Tensor:
    """Symmetric int8 codes in slimfx's int8 linear format (``slimfx.formats``): the code plus
    the symmetric zero point, as uint8."""
    shifted = codes.to(torch.int16) + formats.symmetric_offset(8)
    return formats.pack_codes(shifted.to(torch.uint8), 8)


@contextmanager
def export_blocks(model: nn.Module) -> Iterator[list[int]]:
    """Swap every :class:`MLAAttention` of ``model`` for its :class:`MLAExportBlock` for the
    duration of the ``with`` (the original blocks are put back, also on an error); yields the
    converted layer indices."""
    blocks = _layers(model)
    orig = {
        i: blk.self_attn for i, blk in enumerate(blocks) if isinstance(blk.self_attn, MLAAttention)
    }
    try:
        for i, a in orig.items():
            blocks[i].self_attn = MLAExportBlock(a)
        yield sorted(orig)
    finally:
        for i, a in orig.items():
            blocks[i].self_attn = a


@dataclass
class MLAOnnxExport:
    """What :func:`export_mla_onnx` wrote: ``path``, ``file_bytes``, ONNX ``op_counts``, the
    converted ``mla_layers``, the graph's cache tensors (:func:`latent_cache_layout`), the
    cache's bytes per token as the graph stores it (all layers) and ``seconds``."""

    path: Path
    file_bytes: int
    op_counts: dict[str, int]
    mla_layers: list[int]
    cache_layout: list[CacheInput]
    cache_bytes_per_token: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def export_mla_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_ids: Tensor,
    *,
    opset: int | None = None,
    accuracy_level: int = 0,
) -> MLAOnnxExport:
    """Export the decode step of ``model`` (a Hugging Face Llama-style causal LM with
    :class:`MLAAttention` blocks) with its latent cache to ``path`` (module docstring).
    ``accuracy_level``: of the ``MatMulNBits`` that linears a weights budget quantized become
    (as in ``export_onnx``; 0: float compute, 4: int8 activations).

    ``example_ids``: (batch, seq) token ids to trace with (batch and sequence axes and the cache
    length stay dynamic). Raises :class:`OnnxExportError` for a model without MLA blocks or
    with bfloat16 weights (ONNX Runtime's CPU provider has no bfloat16 MatMul)."""
    onnx_ops.check_accuracy_level(accuracy_level)

    from slimfx.backends.onnx import _check_translatable

    t0 = time.perf_counter()
    if not any(isinstance(b.self_attn, MLAAttention) for b in _layers(model)):
        raise OnnxExportError("export_mla_onnx: the model has no MLAAttention block; use "
                              "slimfx.backends.onnx.export_onnx(..., kv_cache=True)")
    compressed = cache_kinds(model)[1]
    if compressed:  # the graph would hold their caches 16-bit: refuse rather than widen them
        raise OnnxExportError(
            f"layer(s) {', '.join(map(str, compressed))} keep a compressed KV cache, which the "
            "MLA export's 16-bit cache of the other layers would not hold: a model mixing MLA "
            "layers with compressed KV caches has no ONNX decode-step export"
        )
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if dtype == torch.bfloat16:
        raise OnnxExportError("bfloat16 weights: onnxruntime's CPU provider has no bfloat16 "
                              "MatMul; export model.float() (or .half()) instead")
    ids = example_ids.long()
    ids = ids[None] if ids.dim() == 1 else ids
    ids = ids.repeat(2 if ids.shape[0] < 2 else 1, 2 if ids.shape[1] < 2 else 1)  # no 0/1 axes
    layout = latent_cache_layout(model, dtype)
    wrapped = LatentDecodeStep(model, WRAP)
    past = empty_latent_past(model, ids.shape[0], length=3, dtype=dtype)
    for k, c in enumerate(layout):  # a window layer's own length (onnx_decode)
        w = wrapped.windows.get(_layer_of(c.name))
        past[k] = past[k][:, :, : onnx_decode.example_past_length(w)]
    mask = onnx_decode.example_mask(ids.shape[0], onnx_decode.example_past_length(None)
                                    + ids.shape[1])  # fmt: skip
    auto = torch.export.Dim.AUTO
    shapes: Any = ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    in_names = ["input_ids", onnx_decode.MASK, *(c.name for c in layout)]
    out_names = ["logits", *(c.name.replace("past_", "present_", 1) for c in layout)]
    path = export_path(path)
    with eval_mode(model), export_blocks(model) as mla_layers, torch.no_grad():
        program = torch.export.export(
            wrapped, (ids, mask, tuple(past)), dynamic_shapes=shapes, strict=False
        )
        _check_translatable(program)  # linears a weights budget rewrote (q/o, MLP): their ops
        kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
        with onnx_ops.accuracy_level(accuracy_level), linear_time_rewrites():
            onnx_prog = torch.onnx.export(
                program, (), dynamo=True, input_names=in_names, output_names=out_names,
                custom_translation_table=onnx_ops.translation_table(), optimize=True,
                verbose=False, **kwargs,
            )
    notes = densified_notes(_markers_by_site(onnx_prog.model))
    _fold_markers(onnx_prog.model.graph)
    _rename_axes(onnx_prog.model, _axis_names(onnx_prog.model, wrapped.windows))
    onnx_prog.model.metadata_props.update(onnx_decode.windows_meta(wrapped.windows))
    def write(tmp: Path) -> None:  # weights beside it past the threshold (protobuf's 2 GB)
        save_graph(onnx_prog.model, tmp / path.name)

    write_files(path, write, stale=lambda p: p.name == path.name + ".data")
    counts = Counter(n.op_type for n in onnx_prog.model.graph.all_nodes())
    per_token = sum(c.heads * c.width * torch.empty((), dtype=c.dtype).element_size()
                    for c in layout)
    wide = [c for c in layout if c.dtype.is_floating_point and c.dtype.itemsize > 2]
    if wide:  # a float32 model: its latent and RoPE keys are held at 4 bytes, priced at 2
        notes.append(
            f"the graph holds the latent cache in {wide[0].dtype} like the model "
            f"({per_token} B/token over all layers), where slimfx's report prices it at 16 "
            "bits: ONNX Runtime's cache is that much larger than the report's"
        )
    notes += inside_save_notes(path)
    annotate_notes(model, path, notes)
    return MLAOnnxExport(
        path=path,
        file_bytes=sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data"))
                       if p.exists()),
        op_counts=dict(counts),
        mla_layers=mla_layers,
        cache_layout=layout,
        cache_bytes_per_token=per_token,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


def _layer_of(name: str) -> int:
    """The layer of a cache input (``past_key_3`` → 3)."""
    return int(name.rsplit("_", 1)[1])


def _axis_names(ir_model: Any, windows: dict[int, int]) -> dict[str, str]:
    """Symbol → readable name for the graph inputs' dynamic axes (batch, seq, past_seq; a
    sliding-window layer's past its own, as in ``export_onnx``)."""
    import onnx_ir as ir

    names: dict[str, str] = {}
    for k, v in enumerate(ir_model.graph.inputs):
        past = onnx_decode.past_axis(windows.get(_layer_of(v.name)) if k > 1 else None)
        axes = (("batch", "seq") if k == 0 else ("batch", "total") if k == 1
                else ("batch", None, past, None))  # fmt: skip
        if v.shape is not None and len(v.shape) != len(axes):
            continue
        for axis, dim in zip(axes, v.shape or ()):
            if axis and isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                names.setdefault(dim.value, axis)
    return names



def latent_ort_session(path: str | os.PathLike[str], threads: int | None = None) -> LatentOrtModel:
    """Open a graph :func:`export_mla_onnx` wrote with ONNX Runtime on CPU (see
    :func:`slimfx.backends.ort.ort_session`)."""
    return LatentOrtModel(path, threads=threads)
