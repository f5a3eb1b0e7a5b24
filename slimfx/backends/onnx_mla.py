"""ONNX export of a causal LM converted to multi-head latent attention, with the latent cache.

``export_mla_onnx(model, "m.onnx", ids)`` writes one decode-step graph (the same contract as
``export_onnx(..., kv_cache=True)`` in ``slimfx.backends.onnx_decode``)::

    input_ids (batch, seq), past_key_i, past_value_i → logits, present_key_i, present_value_i

where, for a layer converted to MLA (:class:`~slimfx.forms.mla.module.MLAAttention`), the cache
pair is the *latent cache* — ``past_key_i`` the latent ``c = W_dkv x`` (batch, 1, past_seq, r)
and ``past_value_i`` the rotated RoPE key shared by every query head (batch, 1, past_seq, 2N) —
the slots the block fills in the torch caches; a layer left unconverted keeps its keys and
values (batch, kv_heads, past_seq, head_dim). One graph serves prefill (empty cache) and
per-token decode, so :class:`slimfx.backends.ort.OrtModel` runs it unchanged (``step``,
``generate``). Rows of a batch share one length (no padding mask).

Inside, every converted block is the absorbed form written with plain ops: the query projection
and the per-head key-space map (MatMul), RoPE on the kept entries (Gather of cos/sin, Mul, Add),
the latent and RoPE-key projections (MatMul), ``q_lat = q_nope W_uk`` (MatMul), scores
``q_rope k_ropeᵀ + q_lat cᵀ`` (two MatMul over the latent cache: keys and values are never
rebuilt), a causal mask from positions, Softmax, ``ctx = p c`` (MatMul over the latent), the
value up-projection per head (MatMul) and ``o_proj`` (MatMul). An int8-latent block
(``latent_bits=8``) rounds its latent in the graph (per-token scale) exactly as in torch; the
graph's cache then holds the dequantized latent in the model's float type (the int8 storage is
not exported yet).
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

import torch
from torch import Tensor, nn

from slimfx.backends import onnx_decode
from slimfx.backends.onnx_graph import WRAP, OnnxExportError, _rename_axes
from slimfx.forms.mla.module import MLAAttention, quantize_latent

__all__ = [
    "MLAOnnxExport",
    "MLAExportBlock",
    "empty_latent_past",
    "export_blocks",
    "export_mla_onnx",
    "latent_cache_geometry",
]


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise OnnxExportError(f"{type(model).__name__} has no .model.layers (not a Llama-style LM)")
    return layers


def latent_cache_geometry(model: nn.Module) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer, ``((heads, width) of past_key_i, (heads, width) of past_value_i)``: ``(1, r)``
    and ``(1, 2N)`` for an MLA block, ``(kv_heads, head_dim)`` twice for another block."""
    _, kv_heads, head_dim = onnx_decode.cache_geometry(model.config)
    out = []
    for blk in _layers(model):
        a = blk.self_attn
        if isinstance(a, MLAAttention):
            out.append(((1, a.rank), (1, 2 * a.rope_entries)))
        else:
            out.append(((kv_heads, head_dim), (kv_heads, head_dim)))
    return out


class MLAExportBlock(nn.Module):
    """The absorbed form of an :class:`MLAAttention` in export-friendly ops (module docstring).

    Same call contract as the block it wraps (``forward(hidden_states, position_embeddings,
    attention_mask, past_key_values)``); the mask it uses is the causal one over the cache
    (queries at the last ``seq`` positions), HF's ``attention_mask`` is ignored."""

    def __init__(self, mla: MLAAttention) -> None:
        super().__init__()
        self.mla = mla
        K, H, d, r = mla.num_kv_heads, mla.num_heads, mla.head_dim, mla.rank
        w_uv = mla.v_up.weight.detach().reshape(K, d, r).repeat_interleave(H // K, dim=0)
        b_uv = mla.v_up.bias.detach().reshape(K, 1, d).repeat_interleave(H // K, dim=0)
        # per query head: value up-projection (H, r, d) and bias (H, 1, d), laid out for MatMul
        self.register_buffer("w_uv_heads", w_uv.transpose(1, 2).contiguous(), persistent=False)
        self.register_buffer("b_uv_heads", b_uv.contiguous(), persistent=False)
        self.register_buffer(
            "q_mix_t", mla.q_mix.detach().transpose(1, 2).contiguous(), persistent=False
        )

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
        H, d, n2 = m.num_heads, m.head_dim, 2 * m.rope_entries
        cos, sin = position_embeddings
        q = m.q_proj(hidden_states).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        q = torch.matmul(q, self.q_mix_t)  # (B, H, T, K·d): the shared key space
        q_rope = m._rope(q[..., :n2], cos, sin)
        q_lat = torch.matmul(q[..., n2:], m.k_up.weight)  # (B, H, T, r)
        k_rope = m._rope(m.k_rope_proj(hidden_states)[:, None], cos, sin)  # (B, 1, T, 2N)
        latent = m.kv_down(hidden_states)[:, None]  # (B, 1, T, r)
        if m.latent_bits == 8:
            codes, scales = quantize_latent(latent)
            latent = codes.to(latent.dtype) * scales
        if past_key_values is not None:
            latent, k_rope = past_key_values.update(latent, k_rope, m.layer_idx)
        S = latent.shape[2]
        scores = torch.matmul(q_lat, latent.transpose(-1, -2))
        if n2:
            scores = scores + torch.matmul(q_rope, k_rope.transpose(-1, -2))
        q_pos = torch.arange(T, device=latent.device) + (S - T)
        causal = torch.arange(S, device=latent.device)[None, :] <= q_pos[:, None]  # (T, S)
        scores = (scores * m.scaling).masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, latent)  # (B, H, T, r): attention over the latent
        v = torch.matmul(ctx, self.w_uv_heads) + self.b_uv_heads  # (B, H, T, d)
        return m.o_proj(v.transpose(1, 2).reshape(B, T, H * d)), None


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
    converted ``mla_layers``, the cache geometry per layer (``latent_cache_geometry``), the
    cache's bytes per token in the file's float type (all layers) and ``seconds``."""

    path: Path
    file_bytes: int
    op_counts: dict[str, int]
    mla_layers: list[int]
    cache_geometry: list[tuple[tuple[int, int], tuple[int, int]]]
    cache_bytes_per_token: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def export_mla_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_ids: Tensor,
    *,
    opset: int | None = None,
) -> MLAOnnxExport:
    """Export the decode step of ``model`` (a Hugging Face Llama-style causal LM with
    :class:`MLAAttention` blocks) with its latent cache to ``path`` (module docstring).

    ``example_ids``: (batch, seq) token ids to trace with (batch and sequence axes and the cache
    length stay dynamic). Raises :class:`OnnxExportError` for a model without MLA blocks or
    with bfloat16 weights (ONNX Runtime's CPU provider has no bfloat16 MatMul)."""
    import onnx
    import onnx_ir as ir

    t0 = time.perf_counter()
    if not any(isinstance(b.self_attn, MLAAttention) for b in _layers(model)):
        raise OnnxExportError("export_mla_onnx: the model has no MLAAttention block; use "
                              "slimfx.backends.onnx.export_onnx(..., kv_cache=True)")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if dtype == torch.bfloat16:
        raise OnnxExportError("bfloat16 weights: onnxruntime's CPU provider has no bfloat16 "
                              "MatMul; export model.float() (or .half()) instead")
    ids = example_ids.long()
    ids = ids[None] if ids.dim() == 1 else ids
    ids = ids.repeat(2 if ids.shape[0] < 2 else 1, 2 if ids.shape[1] < 2 else 1)  # no 0/1 axes
    geometry = latent_cache_geometry(model)
    past = empty_latent_past(model, ids.shape[0], length=3, dtype=dtype)
    wrapped = onnx_decode.DecodeStep(model, WRAP)
    auto = torch.export.Dim.AUTO
    shapes: Any = ({0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    in_names, out_names = onnx_decode.io_names(len(geometry))
    flags = {m: m.training for m in model.modules()}
    path = Path(path)
    try:
        model.eval()
        with export_blocks(model) as mla_layers, torch.no_grad():
            program = torch.export.export(
                wrapped, (ids, tuple(past)), dynamic_shapes=shapes, strict=False
            )
            kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
            onnx_prog = torch.onnx.export(
                program, (), dynamo=True, input_names=in_names, output_names=out_names,
                optimize=True, verbose=False, **kwargs,
            )
    finally:
        for m, flag in flags.items():
            m.training = flag
    _rename_axes(onnx_prog.model, _axis_names(onnx_prog.model))
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(onnx_prog.model, path)
    onnx.checker.check_model(str(path))
    counts = Counter(n.op_type for n in onnx_prog.model.graph.all_nodes())
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = sum(ha * wa + hb * wb for (ha, wa), (hb, wb) in geometry) * elem
    notes = []
    if any(getattr(b.self_attn, "latent_bits", 16) == 8 for b in _layers(model)):
        notes.append("int8-latent blocks: the graph's cache holds the dequantized latent in the "
                     "model's float type (the int8 codes and scales are not exported yet)")
    return MLAOnnxExport(
        path=path,
        file_bytes=path.stat().st_size,
        op_counts=dict(counts),
        mla_layers=mla_layers,
        cache_geometry=geometry,
        cache_bytes_per_token=per_token,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


def _axis_names(ir_model: Any) -> dict[str, str]:
    """Symbol → readable name for the graph inputs' dynamic axes (batch, seq, past_seq)."""
    import onnx_ir as ir

    names: dict[str, str] = {}
    for k, v in enumerate(ir_model.graph.inputs):
        axes = ("batch", "seq") if k == 0 else ("batch", None, "past_seq", None)
        for axis, dim in zip(axes, v.shape or ()):
            if axis and isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                names.setdefault(dim.value, axis)
    return names


def empty_latent_past(model: nn.Module, batch: int, length: int = 0,
                      dtype: torch.dtype = torch.float32) -> Sequence[Tensor]:
    """A cache of ``length`` positions (zeros) in the graph's layout, ``[past_key_0,
    past_value_0, …]`` (see :func:`latent_cache_geometry`)."""
    out: list[Tensor] = []
    for (ha, wa), (hb, wb) in latent_cache_geometry(model):
        out += [torch.zeros(batch, ha, length, wa, dtype=dtype),
                torch.zeros(batch, hb, length, wb, dtype=dtype)]
    return out
