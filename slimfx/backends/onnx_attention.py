"""The attention the decode-step exports trace: grouped-query attention without copying the
cache.

Traced through transformers' ``sdpa`` function, a GQA layer's step becomes, in the exported
graph, ``Expand`` of K and V to every query head (``repeat_kv``: the cache copied ``Hq/Hkv``
times) and a ``Transpose`` of the expanded keys before the score ``MatMul`` (the cache copied
again, with a strided read; ONNX Runtime did not fuse it into the product). Profiled in ONNX
Runtime at 8k cached tokens (a SmolLM2-shaped layer, 9 query / 3 kv heads), those copies took
~55% of a dense step and ~30% of an int4 one; the two products ~15%.

:func:`grouped_attention` (transformers' attention-function signature) instead groups the query
heads by kv head — ``q (B, Hkv, rep·Tq, D) @ kᵀ (B, Hkv, D, Tk)`` — so K and V are read as
cached, ``kᵀ`` a transpose ONNX Runtime folds into the product (``FusedMatMul`` with
``transB``), and the mask broadcast over the ``rep`` query heads of a group. Numerically it is
softmax attention as sdpa computes it (another summation order). :func:`export_attention` puts it
in place for the duration of an export and restores the model's attention function.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EXPORT_ATTENTION", "grouped_attention", "export_attention"]

EXPORT_ATTENTION = "slimfx_onnx_grouped"


def grouped_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    apply_softcap: bool = True,
    s_aux: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Softmax attention of ``query`` ``(B, Hq, Tq, D)`` over ``key`` / ``value`` ``(B, Hkv,
    Tk, D)`` (``Hq`` a multiple of ``Hkv``; query head ``h`` reads kv head ``h // (Hq/Hkv)``)
    under ``attention_mask`` (bool, ``True`` = attend, or additive; ``(B | 1, 1, Tq, ≥ Tk)``);
    without a mask a causal module's queries are the last ``Tq`` positions. Returns ``(B, Tq,
    Hq, D)`` as transformers' attention functions do. ``softcap`` (Gemma 2's logit soft-cap:
    ``cap·tanh(s/cap)`` of the scaled scores, before the mask) is applied when
    ``apply_softcap`` — the model's own attention function applies it
    (:func:`export_attention`). ``s_aux`` (GPT-OSS's learned sinks, one logit per query
    head) joins each softmax as a column of its own that takes weight and no value, as the
    model's eager function computes it. ``dropout`` is not applied (export runs in eval
    mode)."""
    B, Hq, Tq, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    rep = Hq // Hkv
    scale = D**-0.5 if scaling is None else scaling
    q = (query * scale).reshape(B, Hkv, rep * Tq, D)
    s = torch.matmul(q, key.transpose(-1, -2)).view(B, Hkv, rep, Tq, Tk)
    if softcap is not None and apply_softcap:
        s = torch.tanh(s / softcap) * softcap
    mask = attention_mask
    if mask is None and getattr(module, "is_causal", True):
        i = torch.arange(Tq, device=query.device)[:, None] + (Tk - Tq)
        mask = (torch.arange(Tk, device=query.device)[None, :] <= i)[None, None]
    seen = None
    if mask is not None:
        m = mask[:, :, :, :Tk].unsqueeze(2)  # (B | 1, 1, 1, Tq, Tk): every head of a group
        if m.dtype == torch.bool:  # a query that sees no token gets 0, as sdpa gives it
            s = s.masked_fill(~m, torch.finfo(s.dtype).min)
            seen = m.any(-1, keepdim=True)
        else:
            s = s + m
    if s_aux is None:
        p = torch.softmax(s, dim=-1)
    else:  # query head h = kv head h // rep, its r-th: the sink logits laid out likewise
        sink = s_aux.to(s.dtype).view(1, Hkv, rep, 1, 1).expand(B, Hkv, rep, Tq, 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :Tk]
    if seen is not None:
        p = p * seen
    p = p.view(B, Hkv, rep * Tq, Tk)
    out = torch.matmul(p, value).view(B, Hq, Tq, D)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def export_attention(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` (a Hugging Face model; anything else is left alone) runs
    :func:`grouped_attention`; its previous attention function is restored afterwards, also
    when the export fails."""
    if getattr(model, "config", None) is None or not hasattr(model, "set_attn_implementation"):
        yield
        return
    from slimfx.forms.kv.fused import attention_function
    from slimfx.forms.kv.simulate import applies_softcap

    # a soft-cap the model's function ignores (transformers 5.17's sdpa) stays unapplied
    cap = applies_softcap(getattr(model.config, "_attn_implementation", None))
    with attention_function(model, EXPORT_ATTENTION,
                            functools.partial(grouped_attention, apply_softcap=cap)):  # fmt: skip
        yield
