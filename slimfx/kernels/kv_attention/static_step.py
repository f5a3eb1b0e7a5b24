"""One decode step over a *static* quantized KV cache, the store read in place.

A static layer (``slimfx.forms.kv.static_cache``) preallocates its store, a 16-bit ring window
and a sink buffer for ``max_cache_len`` tokens, so that a compiled step has one shape. Its plain
step dequantizes the whole preallocated store and gathers full-length K/V at every call —
``max_cache_len`` tokens of work whatever the context reached. This op is opaque to
``torch.export`` / ``torch.compile`` (``torch.library.custom_op`` with a fake implementation: a
compiled step keeps its one graph), and inside it reads the tokens written so far only:

- ``n0`` (a 0-d tensor: the tokens before the call; the call's token is already written) gives
  the store rows quantized so far, ``n_q`` (the static layer's rule, whole blocks), and the
  window positions ``sink + n_q … n0``, read from ring slots ``position mod W``;
- the attention runs over ``sinks ‖ store[:n_q] ‖ window`` — positions ``0 … n0`` in order, so
  the first ``n0 + 1`` columns of the static mask are already in the layer's order — through
  the CPU's folded step (:func:`.folded.kv_decode_attention_folded`) or, with ``kernel`` and a
  mask that hides none of those tokens, the Triton kernel (CUDA; on the CPU only under
  ``TRITON_INTERPRET=1``). A padded batch's mask hides tokens: it runs the folded step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kv_decode_attention_static", "static_read_plan"]


def static_read_plan(
    n0: int, sink: int, residual: int, block: int, window: int
) -> tuple[int, int, list[int]]:
    """``(sinks, n_q, slots)`` after a call that found ``n0`` tokens and wrote one more: the
    sink rows to read, the store rows quantized (the static layer's rule), and the ring slots
    of the window positions ``sink + n_q … n0`` in order."""
    n = n0 + 1
    n_q = max(0, (n0 - sink - residual) // block) * block
    sinks = min(sink, n)
    slots = [p % window for p in range(sink + n_q, n)]
    return sinks, n_q, slots


#: the op reads the token count on the host (``int(n0)``): a CUDA graph cannot capture it
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op(
    "slimfx_kernels::kv_decode_attention_static", mutates_args=(), tags=_TAGS
)
def kv_decode_attention_static(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_min: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_min: Tensor,
    ring_k: Tensor,
    ring_v: Tensor,
    sink_k: Tensor,
    sink_v: Tensor,
    n0: Tensor,
    mask: Tensor | None,
    key_bits: int,
    value_bits: int,
    key_group: int,
    value_group: int,
    sink: int,
    residual: int,
    scaling: float,
    kernel: bool,
) -> Tensor:
    """Attention ``(B, Hq, D)`` in ``q.dtype`` of query ``q`` ``(B, Hq, D)`` over the tokens a
    static quantized layer holds after writing the call's token (module docstring). The store
    arrays are the layer's whole preallocation (``room`` token rows, ``room / key_group`` key
    blocks); ``ring_*`` ``(B, Hkv, W, D)``; ``sink_*`` ``(B, Hkv, max(sink, 1), D)``; ``mask``:
    the static decode mask ``(B, 1, 1, max_cache_len)`` (bool or additive) or ``None``."""
    from .folded import hides_tokens, kv_decode_attention_folded

    sinks, n_q, slots = static_read_plan(
        int(n0), sink, residual, key_group, ring_k.shape[2]
    )
    idx = torch.tensor(slots, dtype=torch.long, device=ring_k.device)
    k_win = torch.cat([sink_k[:, :, :sinks], ring_k.index_select(2, idx)], 2)
    v_win = torch.cat([sink_v[:, :, :sinks], ring_v.index_select(2, idx)], 2)
    nb = n_q // key_group
    store = (
        k_codes[:, :, :n_q], k_scale[:, :, :nb], k_min[:, :, :nb],
        v_codes[:, :, :n_q], v_scale[:, :, :n_q], v_min[:, :, :n_q],
    )  # fmt: skip
    n = sinks + n_q + len(slots)
    if mask is not None:
        mask = mask[..., -1:, :n]
    args = (q, *store, k_win, v_win, key_bits, value_bits, key_group, value_group, scaling)
    if kernel and not hides_tokens(mask):
        from .triton_kernel import kv_decode_attention

        return kv_decode_attention(*args)
    return kv_decode_attention_folded(*args, mask=mask, sink=sinks)


@kv_decode_attention_static.register_fake
def _(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_min: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_min: Tensor,
    ring_k: Tensor,
    ring_v: Tensor,
    sink_k: Tensor,
    sink_v: Tensor,
    n0: Tensor,
    mask: Tensor | None,
    key_bits: int,
    value_bits: int,
    key_group: int,
    value_group: int,
    sink: int,
    residual: int,
    scaling: float,
    kernel: bool,
) -> Tensor:
    torch._check(q.dim() == 3, lambda: "q must be (B, Hq, D)")
    torch._check(ring_k.dim() == 4, lambda: "the ring must be (B, Hkv, W, D)")
    return torch.empty_like(q)
