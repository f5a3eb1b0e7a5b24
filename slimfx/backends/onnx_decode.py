"""A causal LM's decode step as one ONNX graph: tokens + KV cache in, logits + KV cache out.

``export_onnx(model, path, (ids,), kv_cache=True)`` exports a Hugging Face causal LM as

    input_ids (batch, seq), past_key_i / past_value_i (batch, kv_heads, past_seq, head_dim)
        → logits (batch, seq, vocab), present_key_i / present_value_i (…, past_seq + seq, …)

for every layer ``i``. One graph serves prefill (``past_seq = 0``: the cache inputs are empty)
and decode (``seq = 1`` after a prefill), so ONNX Runtime runs a real KV-cache decode step
instead of re-reading the whole prefix. Rows of a batch share one length (no padding mask:
positions are ``past_seq … past_seq + seq − 1``).

:class:`OrtModel` (``slimfx.backends.onnx``) recognises such a graph: ``ort_model(ids)`` feeds
an empty cache and returns the logits, ``ort_model.step(ids, past)`` returns logits and the new
cache, and ``ort_model.generate(ids, max_new_tokens)`` decodes greedily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DecodeStep",
    "cache_geometry",
    "empty_past",
    "io_names",
    "is_kv_graph",
]

PAST_KEY, PAST_VALUE = "past_key_", "past_value_"
PRESENT_KEY, PRESENT_VALUE = "present_key_", "present_value_"


def cache_geometry(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a Hugging Face decoder config."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None)
    # Falcon's new decoder architecture caches keys expanded to every head; its multi-query
    # default (and GPTBigCode's) caches one
    if kv_heads is None and getattr(config, "new_decoder_architecture", False):
        kv_heads = heads
    if kv_heads is None and getattr(config, "multi_query", False):
        kv_heads = 1
    kv_heads = int(kv_heads or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, int(head_dim)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names of a decode-step export with ``layers`` layers."""
    ins, outs = ["input_ids"], ["logits"]
    for i in range(layers):
        ins += [f"{PAST_KEY}{i}", f"{PAST_VALUE}{i}"]
        outs += [f"{PRESENT_KEY}{i}", f"{PRESENT_VALUE}{i}"]
    return ins, outs


def empty_past(config: Any, batch: int, length: int = 0, dtype=torch.float32) -> list[Tensor]:
    """A cache of ``length`` positions (zeros), flat as ``[k_0, v_0, k_1, v_1, …]``."""
    layers, kv_heads, head_dim = cache_geometry(config)
    return [torch.zeros(batch, kv_heads, length, head_dim, dtype=dtype) for _ in range(2 * layers)]


class DecodeStep(nn.Module):
    """``(ids, k_0, v_0, …) → (logits, k'_0, v'_0, …)`` around a Hugging Face causal LM.

    The wrapped model sits under the attribute name ``wrap_name`` so that the export can strip
    that prefix from module paths (site names stay those of the user's model).
    """

    def __init__(self, model: nn.Module, wrap_name: str) -> None:
        super().__init__()
        self._wrap_name = wrap_name
        setattr(self, wrap_name, model)
        self.layers = cache_geometry(model.config)[0]

    def forward(self, input_ids: Tensor, past: Sequence[Tensor]) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        model = getattr(self, self._wrap_name)
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        # full layers, not the config's sliding ones: a sliding layer crops itself in a Python
        # branch the trace would freeze at the example's length; the mask applies the window
        cache = DynamicCache(ddp_cache_data=pairs)
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        present: list[Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def is_kv_graph(input_names: Sequence[str]) -> bool:
    """True when a graph's inputs are those of a decode-step export."""
    return len(input_names) > 1 and input_names[1] == f"{PAST_KEY}0"


def empty_feeds(session: Any, batch: int) -> dict[str, np.ndarray]:
    """Empty cache inputs for an ONNX Runtime session of a decode-step graph, in the element
    type each input declares (``tensor(float)``, ``tensor(float16)``)."""
    feeds = {}
    for inp in session.get_inputs()[1:]:
        _, kv_heads, _, head_dim = inp.shape
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        feeds[inp.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
    return feeds
