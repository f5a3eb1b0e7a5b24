"""ONNX Runtime sessions for models that ``slimfx.backends.onnx.export_onnx`` wrote.

    ort_model = ort_session("model.onnx", threads=4)
    logits = ort_model(ids)                       # torch in → torch out; numpy → numpy
    tokens = ort_model.generate(ids, 20)          # a kv_cache=True export: greedy, with the cache
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from slimfx.backends import onnx_decode

__all__ = ["OrtModel", "ort_session"]


def _ids_array(ids: Tensor | np.ndarray) -> np.ndarray:
    """Token ids as the (batch, seq) int64 array the graphs take."""
    arr = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    return arr.astype(np.int64).reshape(-1, arr.shape[-1])


class OrtModel:
    """An ONNX Runtime session (CPU provider, all graph optimizations) called like a model.

    ``ort_model(ids)`` feeds the positional inputs to the graph inputs in order and returns the
    first output — torch tensors in, a torch tensor out; numpy arrays in, a numpy array out —
    so it plugs into ``slimfx.eval.perplexity_of_logits_fn(ort_model, windows)``.
    ``ort_model.session`` is the ``onnxruntime.InferenceSession``.

    A decode-step graph (``export_onnx(..., kv_cache=True)``) takes ``ort_model(ids[,
    attention_mask])`` with an empty cache; ``step(ids, past, attention_mask)`` returns
    ``(logits, present)`` and ``generate(ids, n, attention_mask)`` decodes greedily with the
    cache (``kv_cache`` is True for such a graph); a padded batch's mask is Hugging Face's.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.path = Path(path)
        self.session = inference_session(path, threads, providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.kv_cache = onnx_decode.is_kv_graph(self.input_names)
        #: layer → sliding window of the step's layers that keep only their window
        self.windows = onnx_decode.windows_of(self.session) if self.kv_cache else {}

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs for ``feeds`` (input name → array), as ``session.run`` returns them."""
        return self.session.run(None, dict(feeds))

    def step(
        self,
        ids: Tensor | np.ndarray,
        past: Sequence[np.ndarray] | None = None,
        attention_mask: Tensor | np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decode-step call: ``(logits, present)`` for ``ids`` after the cache ``past``
        (``None``: empty, i.e. prefill). ``present`` is the next call's ``past``.
        ``attention_mask`` ``(batch, past_seq + seq)``: 1 for a token, 0 for padding, over
        the cached tokens and the call's — a padded batch passes it on every call (``None``:
        no padding anywhere; the step keeps nothing between calls, ``generate`` carries it).
        A model whose every layer keeps a sliding window needs it once the windows are full
        (``past_seq`` is then the tokens seen, more than the cache holds; ``self.windows``)."""
        if not self.kv_cache:
            raise ValueError(
                f"{self.path.name} has no KV-cache inputs; export it with kv_cache=True"
            )
        arr = _ids_array(ids)
        cache_names = onnx_decode.cache_inputs(self.input_names)
        if past is None:
            feeds = self.empty_cache(arr.shape[0])
        else:
            if len(past) != len(cache_names):
                raise ValueError(
                    f"past has {len(past)} tensors, the graph takes {len(cache_names)}"
                )
            feeds = dict(zip(cache_names, past))
        feeds[self.input_names[0]] = arr
        seq = arr.shape[1]
        lengths = [feeds[n].shape[2] for n in cache_names  # each layer's (keys or latent)
                   if n.startswith(onnx_decode.PAST_KEY)]
        mask_len = None if attention_mask is None else np.shape(attention_mask)[-1]
        past_len = onnx_decode.past_length(lengths, self.windows, mask_len, seq)
        mask = onnx_decode.check_mask(attention_mask, arr.shape[0], past_len + seq)
        feeds.update(onnx_decode.mask_feed(self.input_names, mask, self.path.name))
        out = self.session.run(None, feeds)
        return out[0], out[1:]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """The cache inputs of a prefill: each empty, as the graph declares it."""
        return onnx_decode.empty_feeds(self.session, batch)

    def generate(
        self,
        ids: Tensor | np.ndarray,
        max_new_tokens: int,
        attention_mask: Tensor | np.ndarray | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> Tensor | np.ndarray:
        """Greedy decoding with the KV cache: the prompt in one prefill call, then one token a
        call; returns prompt + new tokens (torch in → torch out). ``attention_mask`` (batch,
        seq): the prompts' padding, as for ``generate()`` (left-padded: the new tokens follow
        each prompt's last token). With ``eos_token_id``, a row that ended continues with
        ``pad_token_id`` and decoding stops when every row has ended, as ``generate()`` does
        (``onnx_decode.greedy``)."""
        seq = _ids_array(ids)
        held: list[Any] = [None]

        def step(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
            logits, held[0] = self.step(x, held[0], attention_mask=mask)
            return logits

        mask = onnx_decode.check_mask(attention_mask, *seq.shape)
        out = onnx_decode.greedy(step, seq, mask, max_new_tokens, eos_token_id, pad_token_id)
        return torch.from_numpy(out) if isinstance(ids, Tensor) else out

    def __call__(self, *inputs: Tensor | np.ndarray) -> Tensor | np.ndarray:
        if self.kv_cache and len(inputs) in (1, 2):  # ids[, attention_mask]
            out = self.step(inputs[0], attention_mask=inputs[1] if len(inputs) == 2 else None)[0]
            return torch.from_numpy(out) if isinstance(inputs[0], Tensor) else out
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"the graph takes {len(self.input_names)} input(s) {self.input_names}, "
                f"got {len(inputs)}"
            )
        as_torch = any(isinstance(x, Tensor) for x in inputs)
        arrays = [
            x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x) for x in inputs
        ]
        arrays = [a.astype(np.int64) if a.dtype.kind in "iu" else a for a in arrays]
        out = self.session.run(self.output_names[:1], dict(zip(self.input_names, arrays)))[0]
        return torch.from_numpy(out) if as_torch else out

    def __repr__(self) -> str:
        return (
            f"OrtModel({str(self.path)!r}, inputs={self.input_names}, outputs={self.output_names})"
        )


def inference_session(
    path: str | os.PathLike[str],
    threads: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path`` with every graph optimization on and
    ``threads`` intra-op threads (one inter-op thread) when given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def ort_session(path: str | os.PathLike[str], threads: int | None = None) -> OrtModel:
    """Open an exported model with ONNX Runtime on CPU (graph optimizations on).

    ``threads``: intra-op threads (ONNX Runtime's default — one per physical core — when
    ``None``). The same in plain ONNX Runtime, without slimfx::

        import numpy as np, onnxruntime as ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 4
        sess = ort.InferenceSession("model.onnx", opts, providers=["CPUExecutionProvider"])
        logits = sess.run(["logits"], {"input_ids": ids.astype(np.int64)})[0]

    MatMulNBits is an ONNX Runtime contrib op (``com.microsoft`` domain): runtimes other than
    ONNX Runtime may not run the quantized sites.
    """
    return OrtModel(path, threads=threads)
