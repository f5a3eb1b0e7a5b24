"""ONNX Runtime's side of the compressed-KV decode export (:mod:`slimfx.backends.onnx_kv`).

:class:`OrtKVDecoder` drives the step graph and the flush graphs: before each step it flushes,
per group of layers sharing a form, the tokens that the torch cache layer's ``flush`` would
move (``config.quantized_tokens(n)`` of the ``n`` cached tokens), runs the step, keeps the
returned windows (and a low-rank group's sink buffer); ``generate`` decodes greedily, the
prompt in chunks of ``prefill_chunk`` tokens. Layers in ``kv_dense`` keep a 16-bit window only
(on a sliding-window layer, the step graph keeps its last ``window - 1`` tokens there),
``kv_lowrank`` layers a latent window (and the sink buffer), the quantized forms a window and a
store. Each flush graph must carry the form of its group (checked when the decoder opens it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from slimfx.backends import onnx_decode
from slimfx.backends.onnx_kv import (
    META_GEOMETRY,
    META_KEY,
    _groups,
    _has_sink,
    _store_names,
    quant_store_shapes,
)
from slimfx.backends.onnx_kv_latent import LATENT_FORMS, latent_store_shapes
from slimfx.backends.ort import inference_session
from slimfx.forms.kv.config import KVDecision, KVLatentQuantConfig, KVQuantConfig
from slimfx.planning.configs import decision_from_dict

__all__ = ["OrtKVDecoder"]

_NP = {torch.uint8: np.uint8, torch.float16: np.float16}


def _flush_session(path: Path, form: KVDecision, threads: int | None) -> Any:
    """The flush graph at ``path``, checked to be the one exported for ``form`` (a set whose
    files come from different exports would quantize with another form's settings)."""
    sess = inference_session(path, threads)
    got = sess.get_modelmeta().custom_metadata_map.get(META_KEY)
    if got is None or decision_from_dict(json.loads(got)) != form:
        have = "no form" if got is None else decision_from_dict(json.loads(got)).short()
        raise ValueError(
            f"{path.name} was exported for {have}, but the step graph's group needs "
            f"{form.short()}: the files come from different exports; export again"
        )
    return sess


def _geometry(meta: dict[str, str], inputs: list[Any]) -> tuple[int, int]:
    """(kv_heads, head_dim): recorded by the export, or — in a graph exported before it was
    recorded, which held 16-bit windows only — read off the first window input's shape."""
    if META_GEOMETRY in meta:
        H, D = json.loads(meta[META_GEOMETRY])
        return int(H), int(D)
    for i in inputs:
        if i.name.startswith("window_") and len(i.shape) == 6:
            return int(i.shape[3]), int(i.shape[5])
    raise ValueError(f"the graph records no {META_GEOMETRY!r} and has no 16-bit window input")


class OrtKVDecoder:
    """Greedy decoding in ONNX Runtime with the cache held compressed (module docstring).

    ``step(ids)`` runs one call (any number of tokens) after the cached ones and returns the
    logits ``(batch, seq, vocab)``; ``flush()`` moves the tokens that left the window into the
    store as the next step would; ``reset()`` empties the cache; ``generate(ids, n,
    prefill_chunk)`` decodes greedily. The arrays held between steps, per group of layers
    sharing a form (``groups``): ``windows[j]`` (``(layers, 2, batch, H, W, D)``; a low-rank
    group's ``(layers, batch, W, rk + rv)``), ``stores[j]`` (its store arrays, ``None``
    without a store) and ``sinks[j]`` (a low-rank group's sink buffer, else ``None``);
    ``layer_window(i)`` / ``layer_store(i)`` / ``layer_sink(i)`` give one layer's;
    ``cache_nbytes()`` their bytes, ``seq_length`` the cached tokens, ``attention_mask`` their
    padding mask (a batch of prompts of different lengths runs left-padded under it)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = inference_session(self.path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map  # not onnx.load: no 2nd copy
        self.forms: list[KVDecision] = [decision_from_dict(d) for d in json.loads(meta[META_KEY])]
        self.groups = _groups(self.forms, onnx_decode.windows_of(self.session))
        self.flush_sessions: dict[int, Any] = {}
        n = 0
        for j, (f, _) in enumerate(self.groups):
            if _store_names(f):
                fpath = self.path.with_name(f"{self.path.stem}.flush{n}.onnx")
                self.flush_sessions[j], n = _flush_session(fpath, f, threads), n + 1
        inp = self.session.get_inputs()
        self.input_names = [i.name for i in inp]
        win = next(i for i in inp if i.name.startswith("window_"))
        self.dtype = np.float16 if win.type == "tensor(float16)" else np.float32
        self.kv_heads, self.head_dim = _geometry(meta, inp)
        self._where = {i: (j, n) for j, (_, idx) in enumerate(self.groups) for n, i in
                       enumerate(idx)}  # fmt: skip
        self.reset()

    def reset(self, batch: int = 1) -> None:
        """Empty the cache for a batch of ``batch`` rows."""
        H, D = self.kv_heads, self.head_dim
        self.batch, self.seq_length = batch, 0
        self.attention_mask = np.ones((batch, 0), np.int64)
        self.windows, self.stores, self.sinks = [], [], []
        self.n_stored = [0] * len(self.groups)
        for f, idx in self.groups:
            L = len(idx)
            latent = isinstance(f, LATENT_FORMS)
            width = f.key_rank + f.value_rank if latent else 0
            shape = (L, batch, 0, width) if latent else (L, 2, batch, H, 0, D)
            self.windows.append(np.zeros(shape, self.dtype))
            sink = (L, 2, batch, H, f.sink, D) if _has_sink(f) else None
            self.sinks.append(None if sink is None else np.zeros(sink, self.dtype))
            if isinstance(f, KVLatentQuantConfig):
                shapes = latent_store_shapes(f, (L, batch), 0)
                self.stores.append([np.zeros(s, _NP[dt]) for s, dt in shapes])
            elif isinstance(f, KVQuantConfig):
                shapes = quant_store_shapes(f, (L, batch, H), D, 0)
                self.stores.append([np.zeros(s, _NP[dt]) for s, dt in shapes])
            else:
                self.stores.append(None)

    def layer_window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``i``'s 16-bit window: keys, values ``(batch, H, W, D)``; a low-rank
        layer's key and value latents ``(batch, W, rank)``."""
        j, n = self._where[i]
        f, w = self.groups[j][0], self.windows[j][n]
        if isinstance(f, LATENT_FORMS):
            return w[..., : f.key_rank], w[..., f.key_rank :]
        return w[0], w[1]

    def layer_store(self, i: int) -> list[np.ndarray] | None:
        """Layer ``i``'s store arrays (the group's store names, batch first)."""
        j, n = self._where[i]
        st = self.stores[j]
        return None if st is None else [a[n] for a in st]

    def layer_sink(self, i: int) -> np.ndarray | None:
        """Layer ``i``'s sink buffer ``(2, batch, H, sink, D)`` (low-rank layers with sinks)."""
        j, n = self._where[i]
        return None if self.sinks[j] is None else self.sinks[j][n]

    def layer_stored_tokens(self, i: int) -> int:
        """Tokens in layer ``i``'s quantized store."""
        return self.n_stored[self._where[i][0]]

    def flush(self) -> None:
        """Move the window tokens the torch cache layer's ``flush`` would move into the store
        (one flush-graph run per group, its layers stacked on the batch axis)."""
        for j, (f, _) in enumerate(self.groups):
            if j not in self.flush_sessions:
                continue
            move = f.quantized_tokens(self.seq_length) - self.n_stored[j]
            if move <= 0:
                continue
            s, w = f.sink, self.windows[j]
            if isinstance(f, LATENT_FORMS):
                L, B, _, _ = w.shape
                blk = w[:, :, s : s + move].reshape(L * B, move, -1)
                feeds = {"key_latent": blk[..., : f.key_rank],
                         "value_latent": blk[..., f.key_rank :]}  # fmt: skip
                axis = 2
            else:
                L, _, B, H, _, D = w.shape
                g = f.key_group
                blk = w[..., s : s + move, :].reshape(L, 2, B, H, move // g, g, D)
                feeds = {
                    "key_blocks": blk[:, 0].reshape(L * B, H, move // g, g, D),
                    "value_blocks": blk[:, 1].reshape(L * B, H, move // g, g, D),
                }
                axis = 3
            new = self.flush_sessions[j].run(None, feeds)
            old = self.stores[j]
            assert old is not None
            self.stores[j] = [
                np.concatenate([a, b.reshape(L, B, *b.shape[1:])], axis=axis)
                for a, b in zip(old, new)
            ]
            self.n_stored[j] += move
            self.windows[j] = np.concatenate([w[..., :s, :], w[..., s + move :, :]], axis=-2)

    def step(
        self, ids: Tensor | np.ndarray, attention_mask: Tensor | np.ndarray | None = None
    ) -> np.ndarray:
        """Logits of ``ids`` (batch, seq) after the cached tokens; the cache then holds them.
        ``attention_mask`` ``(batch, cached + seq)``: Hugging Face's padding mask over the
        cached tokens and the call's (``None``: the mask held so far, the call's tokens real)."""
        arr = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        arr = arr.astype(np.int64).reshape(-1, arr.shape[-1])
        if arr.shape[0] != self.batch:
            raise ValueError(f"batch {arr.shape[0]} ≠ the cache's {self.batch}: call reset()")
        if attention_mask is None:
            new = np.ones((self.batch, arr.shape[1]), np.int64)
            attention_mask = np.concatenate([self.attention_mask, new], axis=1)
        mask = onnx_decode.check_mask(attention_mask, self.batch, self.seq_length + arr.shape[1])
        feeds = {"input_ids": arr, **onnx_decode.mask_feed(self.input_names, mask, self.path.name)}
        self.flush()
        names = iter(onnx_decode.cache_inputs(self.input_names))
        held = [*self.windows, *(a for st in self.stores for a in st or ())]
        held += [sk for sk in self.sinks if sk is not None]
        for a in held:
            feeds[next(names)] = a
        out = self.session.run(None, feeds)
        n = len(self.windows)
        self.windows = out[1 : 1 + n]
        sinks = iter(out[1 + n :])
        self.sinks = [None if sk is None else next(sinks) for sk in self.sinks]
        self.seq_length += arr.shape[1]
        self.attention_mask = mask
        return out[0]

    def generate(
        self,
        ids: Tensor | np.ndarray,
        max_new_tokens: int,
        prefill_chunk: int | None = None,
        attention_mask: Tensor | np.ndarray | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> Tensor | np.ndarray:
        """Greedy decoding from a fresh cache: the prompt in calls of ``prefill_chunk`` tokens
        (``None``: one call), then one token a call; returns prompt + new tokens (torch in →
        torch out, as ``OrtModel.generate``).
        ``attention_mask`` (batch, prompt length): the prompts' padding, as for
        ``generate()`` (left-padded); ``eos_token_id`` / ``pad_token_id`` as
        ``OrtModel.generate``'s."""
        seq = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        seq = seq.astype(np.int64).reshape(-1, seq.shape[-1])
        mask = onnx_decode.check_mask(attention_mask, *seq.shape)
        self.reset(seq.shape[0])
        chunk = prefill_chunk or seq.shape[1]

        def step(x: np.ndarray, m: np.ndarray) -> np.ndarray:
            if self.seq_length:
                return self.step(x, m)
            for a in range(0, x.shape[1], chunk):  # the prompt
                logits = self.step(x[:, a : a + chunk], m[:, : a + chunk])
            return logits

        out = onnx_decode.greedy(step, seq, mask, max_new_tokens, eos_token_id, pad_token_id)
        return torch.from_numpy(out) if isinstance(ids, Tensor) else out

    def store_nbytes(self) -> int:
        """Bytes of the quantized store arrays held now."""
        return sum(a.nbytes for st in self.stores for a in (st or ()))

    def window_nbytes(self) -> int:
        """Bytes of the 16-bit (model dtype) windows held now."""
        return sum(w.nbytes for w in self.windows)

    def sink_nbytes(self) -> int:
        """Bytes of the low-rank groups' sink buffers (model dtype)."""
        return sum(sk.nbytes for sk in self.sinks if sk is not None)

    def cache_nbytes(self) -> int:
        """Bytes of every cache array held between steps."""
        return self.store_nbytes() + self.window_nbytes() + self.sink_nbytes()
