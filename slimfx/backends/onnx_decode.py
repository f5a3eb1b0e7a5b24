"""A causal LM's decode step as one ONNX graph: tokens + KV cache in, logits + KV cache out.

``export_onnx(model, path, (ids,), kv_cache=True)`` exports a Hugging Face causal LM as

    input_ids (batch, seq), attention_mask (batch, past_seq + seq),
    past_key_i / past_value_i (batch, kv_heads, past_seq, head_dim)
        → logits (batch, seq, vocab), present_key_i / present_value_i (…, past_seq + seq, …)

for every layer ``i``. One graph serves prefill (``past_seq = 0``: the cache inputs are empty)
and decode (``seq = 1`` after a prefill), so ONNX Runtime runs a real KV-cache decode step
instead of re-reading the whole prefix. ``attention_mask`` is Hugging Face's: 1 for a token,
0 for padding, over the cached positions and the call's; a batch of prompts of different
lengths is left-padded to one length, as for ``generate()``. The graph derives the positions
from it as ``generate()`` does (the running count of tokens; :func:`mask_kwargs`), so padded
rows compute what each prompt alone would, and an all-ones mask is an unpadded batch.

A sliding-window layer (Mistral's, Gemma 2/3's local layers, gpt-oss's) keeps only the last
``window - 1`` tokens, as transformers' cache does: its ``past_key_i`` has its own length
axis (``window_<W>_past``), the graph's metadata names those layers (:data:`META_WINDOWS`),
and the cache then stays at the window the report prices. Once every layer's window is full
the cache no longer tells how many tokens came before; the mask does (:func:`past_length`).

:class:`OrtModel` (``slimfx.backends.onnx``) recognises such a graph: ``ort_model(ids)`` feeds
an empty cache and returns the logits, ``ort_model.step(ids, past, attention_mask)`` returns
logits and the new cache, and ``ort_model.generate(ids, max_new_tokens, attention_mask)``
decodes greedily. (A graph exported before the mask input existed runs unpadded batches.)
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DecodeStep",
    "MASK",
    "META_WINDOWS",
    "PAST_KEY",
    "cache_geometry",
    "cache_inputs",
    "check_left_padded",
    "check_mask",
    "empty_past",
    "example_mask",
    "example_past_length",
    "greedy",
    "io_names",
    "is_kv_graph",
    "mask_feed",
    "mask_kwargs",
    "model_windows",
    "past_axis",
    "past_length",
    "positions_of",
    "window_layer",
    "windows_meta",
    "windows_of",
]

#: the graph's metadata key of its sliding-window layers: ``{"layer": window}`` as JSON
META_WINDOWS = "slimfx.kv_windows"
PAST_KEY, PAST_VALUE = "past_key_", "past_value_"
PRESENT_KEY, PRESENT_VALUE = "present_key_", "present_value_"
MASK = "attention_mask"


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
    ins, outs = ["input_ids", MASK], ["logits"]
    for i in range(layers):
        ins += [f"{PAST_KEY}{i}", f"{PAST_VALUE}{i}"]
        outs += [f"{PRESENT_KEY}{i}", f"{PRESENT_VALUE}{i}"]
    return ins, outs


def mask_kwargs(
    model: nn.Module,
    attention_mask: Tensor,
    past_length: Any,
    seq: Any,
    positions: Tensor | None = None,
) -> dict:
    """The keyword arguments a step call gives ``model`` for a padding ``attention_mask``
    ``(batch, past_length + seq)``: the mask, and where the model's forward takes
    ``position_ids`` those ``generate()`` derives — the running count of tokens, padding at 0 —
    for the call's ``seq`` positions (a model without the argument, e.g. BLOOM's ALiBi, reads
    the mask itself; ``positions``: every token's, :func:`positions_of` the mask, when the
    caller has them). The mask's length is tied to the cache's for the export."""
    torch._check(attention_mask.shape[1] == past_length + seq)
    kw: dict[str, Tensor] = {"attention_mask": attention_mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        pos = positions_of(attention_mask) if positions is None else positions
        kw["position_ids"] = pos[:, past_length:]
    return kw


def positions_of(attention_mask: Tensor) -> Tensor:
    """Every token's position id under a padding mask, as ``generate()`` derives them: the
    running count of tokens before it; padding at 0."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def example_mask(batch: int, length: int) -> Tensor:
    """An export's example mask: all ones but the first position of row 0 (padding), so the
    trace takes the padded path wherever a model checks for padding."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 0] = 0
    return mask


def check_mask(attention_mask: Any, batch: int, length: int) -> np.ndarray:
    """A step's ``attention_mask`` as the int64 ``(batch, length)`` array the graphs take
    (``None``: all ones), or a ``ValueError`` saying what is wrong with it."""
    if attention_mask is None:
        return np.ones((batch, length), np.int64)
    m = attention_mask
    arr = m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m)
    if arr.shape != (batch, length):
        raise ValueError(
            f"attention_mask has shape {tuple(arr.shape)}; this step needs ({batch}, {length}): "
            "a column for every cached token and every token of the call"
        )
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("attention_mask holds values other than 0 and 1")
    return arr.astype(np.int64)


def check_left_padded(mask: np.ndarray) -> np.ndarray:
    """``mask`` (a prompt's, from :func:`check_mask`) if every row ends in a token, else a
    ``ValueError``: generation appends after the last column, so a row padded on the right
    would continue from padding."""
    bad = np.flatnonzero(mask[:, -1] == 0)
    if bad.size:
        raise ValueError(
            f"attention_mask row(s) {', '.join(map(str, bad[:8]))} do not end in tokens: "
            "generation continues after the last column, so pad prompts on the left "
            "(tokenizer.padding_side = 'left')"
        )
    return mask


def greedy(
    step: Any,
    seq: np.ndarray,
    mask: np.ndarray,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """Greedy decoding as ``generate(do_sample=False)`` does it: ``step(ids, mask)`` gives the
    logits of ``ids`` after what it holds, under the padding ``mask`` of every token so far;
    first the prompt ``seq`` (batch, len) with its ``mask`` (:func:`check_left_padded`), then
    one token a call. A row that emitted one of ``eos_token_id`` continues with
    ``pad_token_id`` (``None``: the first end token), and decoding stops once every row has;
    ``eos_token_id=None``: no end token, ``max_new_tokens`` for every row (``generate()`` reads
    the model's generation config; pass ``model.generation_config.eos_token_id`` to match it).
    Returns prompt + new tokens."""
    check_left_padded(mask)
    eos = np.asarray([] if eos_token_id is None else eos_token_id, np.int64).reshape(-1)
    pad = int(eos[0]) if pad_token_id is None and eos.size else pad_token_id
    done = np.zeros(seq.shape[0], bool)
    logits = step(seq, mask)
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1).astype(np.int64)
        nxt = np.where(done, pad if pad is not None else nxt, nxt)[:, None]
        done |= np.isin(nxt[:, 0], eos)
        seq = np.concatenate([seq, nxt], axis=1)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        if done.all() or i + 1 == max_new_tokens:  # the last token needs no further step
            break
        logits = step(nxt, mask)
    return seq


def empty_past(config: Any, batch: int, length: int = 0, dtype=torch.float32) -> list[Tensor]:
    """A cache of ``length`` positions (zeros), flat as ``[k_0, v_0, k_1, v_1, …]``."""
    layers, kv_heads, head_dim = cache_geometry(config)
    return [torch.zeros(batch, kv_heads, length, head_dim, dtype=dtype) for _ in range(2 * layers)]


def window_layer(keys: Tensor, values: Tensor, window: int, seen: Any) -> Any:
    """A traceable stand-in for transformers' ``DynamicSlidingWindowLayer`` holding ``keys`` /
    ``values`` (at most the last ``window - 1`` of the ``seen`` tokens before the call): the
    call attends over those and its own tokens, and the layer keeps the last ``window - 1``,
    as transformers' does — in symbolic sizes, where transformers' layer branches in Python on
    the length (a branch the trace would freeze at the example's)."""
    return _window_layer_class()(keys, values, window, seen)


@functools.cache
def _window_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class WindowLayer(DynamicLayer):
        is_sliding = True

        def __init__(self, keys: Tensor, values: Tensor, window: int, seen: Any) -> None:
            super().__init__()
            self.keys, self.values, self.is_initialized = keys, values, True
            self.dtype, self.device = keys.dtype, keys.device
            self.sliding_window, self.seen = window, seen

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kw: Any):  # noqa: ANN202
            k = torch.cat([self.keys, key_states], dim=-2)
            v = torch.cat([self.values, value_states], dim=-2)
            n = k.shape[-2]
            start = torch.sym_max(n - (self.sliding_window - 1), 0)
            self.keys, self.values = k.narrow(-2, start, n - start), v.narrow(-2, start, n - start)
            return k, v

        def get_seq_length(self) -> Any:
            return self.seen

        def get_mask_sizes(self, query: Any, *args: Any) -> tuple[Any, Any]:
            # transformers 5 passes the query length; earlier versions the cache positions
            q = query.shape[0] if isinstance(query, Tensor) else query
            held = self.keys.shape[-2]
            return held + q, self.seen - held

    return WindowLayer


def past_axis(window: int | None) -> str:
    """The name of a cache input's length axis: ``past_seq`` (every token seen), a window
    layer's ``window_<W>_past`` (its own size: ONNX Runtime takes equal names for equal sizes)."""
    return "past_seq" if window is None else f"window_{window}_past"


def example_past_length(window: int | None) -> int:
    """The export's example cache length of a layer: distinct for full and window layers (a
    window layer holds fewer tokens than were seen, so its length is its own graph axis)."""
    return 3 if window is None else 2


class DecodeStep(nn.Module):
    """``(ids, k_0, v_0, …) → (logits, k'_0, v'_0, …)`` around a Hugging Face causal LM.

    The wrapped model sits under the attribute name ``wrap_name`` so that the export can strip
    that prefix from module paths (site names stay those of the user's model). A sliding-window
    layer (``windows``: layer → window) keeps the last ``window - 1`` tokens, as transformers'
    cache does (:func:`window_layer`); the others every token.
    """

    def __init__(self, model: nn.Module, wrap_name: str, windows: dict[int, int]) -> None:
        super().__init__()
        self._wrap_name = wrap_name
        setattr(self, wrap_name, model)
        self.layers = cache_geometry(model.config)[0]
        self.windows = dict(windows)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, past: Sequence[Tensor]
    ) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        model = getattr(self, self._wrap_name)
        seq = input_ids.shape[1]
        seen = attention_mask.shape[1] - seq  # tokens before the call
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        cache = DynamicCache(ddp_cache_data=pairs)
        for i, window in self.windows.items():
            cache.layers[i] = window_layer(past[2 * i], past[2 * i + 1], window, seen)
        for i in range(self.layers):
            if i not in self.windows:  # a full layer holds every token seen
                torch._check(past[2 * i].shape[2] == seen)
        kw = mask_kwargs(model, attention_mask, seen, seq)
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **kw)
        present: list[Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def model_windows(model: nn.Module) -> dict[int, int]:
    """Layer → sliding window of ``model``'s layers whose cache keeps only its window."""
    from slimfx.forms.kv.cache import sliding_layers

    return sliding_layers(model.config.get_text_config(decoder=True))


def windows_meta(windows: dict[int, int]) -> dict[str, str]:
    """The graph metadata naming a step's window layers (:data:`META_WINDOWS`; read back by
    :func:`windows_of`)."""
    return {META_WINDOWS: json.dumps(windows)}


def windows_of(session: Any) -> dict[int, int]:
    """Layer → window of a decode-step graph's sliding-window layers (whose cache inputs hold
    at most ``window - 1`` tokens), from its metadata; none in a graph exported before them
    (its layers keep every token)."""
    raw = session.get_modelmeta().custom_metadata_map.get(META_WINDOWS)
    return {int(k): int(v) for k, v in json.loads(raw).items()} if raw else {}


def past_length(
    past_lengths: Sequence[int], windows: dict[int, int], mask_length: int | None, seq: int
) -> int:
    """Tokens before a step call, from each layer's cache length (``past_lengths``, one per
    layer) and, where one is given, the length of the call's mask: a full layer holds all of
    them (:func:`check_mask` then checks the mask against it); window layers alone say it only
    until their windows are full (then the mask must). A ``ValueError`` when the layers
    disagree, or the mask with window layers alone."""
    full = sorted({n for i, n in enumerate(past_lengths) if i not in windows})
    held = [(i, n, windows[i]) for i, n in enumerate(past_lengths) if i in windows]
    if len(full) > 1:
        raise ValueError(f"the cache's full layers hold different lengths {full}")
    if full or not held:
        seen = full[0] if full else 0
    elif mask_length is not None:
        seen = mask_length - seq
    elif all(n < w - 1 for _, n, w in held):
        return held[0][1]  # no window is full yet: each holds every token seen
    else:
        raise ValueError(
            "every layer keeps a sliding window and it is full, so the cache does not say how "
            "many tokens came before: pass attention_mask (batch, tokens so far + seq)"
        )
    for i, n, w in held:
        if n != min(seen, w - 1):
            why = (f"attention_mask has {mask_length} columns for a call of {seq}"
                   if not full else f"the full layers hold {seen}")  # fmt: skip
            raise ValueError(
                f"layer {i} keeps a sliding window of {w} (the last {w - 1} tokens) and holds "
                f"{n}, but {why} (it would hold {min(max(seen, 0), w - 1)})"
            )
    return seen


def is_kv_graph(input_names: Sequence[str]) -> bool:
    """True when a graph's inputs are those of a decode-step export (with or without the
    mask input of :data:`MASK`)."""
    names = cache_inputs(input_names)
    return bool(names) and names[0] == f"{PAST_KEY}0"


def cache_inputs(input_names: Sequence[str]) -> list[str]:
    """A decode-step graph's cache inputs, in order: every input after the ids but the mask."""
    return [n for n in input_names[1:] if n != MASK]


def mask_feed(input_names: Sequence[str], mask: np.ndarray, graph: str) -> dict[str, np.ndarray]:
    """The feed of a step's ``mask`` (:func:`check_mask`) to the graph ``graph`` with
    ``input_names``: the mask input's; a graph exported before it existed takes none, and
    refuses a mask with padding rather than dropping it."""
    if MASK in input_names:
        return {MASK: mask}
    if not mask.all():
        raise ValueError(
            f"{graph} has no attention_mask input (exported by an earlier slimfx): it runs "
            "unpadded batches only; export it again for padded ones"
        )
    return {}


def empty_feeds(session: Any, batch: int, int8: bool = False) -> dict[str, np.ndarray]:
    """Empty cache inputs for an ONNX Runtime session of a decode-step graph, in the element
    type each input declares (``tensor(float)``, ``tensor(float16)``; ``tensor(int8)`` — an
    int8 latent's codes — with ``int8``, else fed as float)."""
    types = {"tensor(float16)": np.float16, **({"tensor(int8)": np.int8} if int8 else {})}
    feeds = {}
    for inp in session.get_inputs()[1:]:
        if inp.name == MASK:
            continue
        _, kv_heads, _, head_dim = inp.shape
        dtype = types.get(inp.type, np.float32)
        feeds[inp.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
    return feeds
