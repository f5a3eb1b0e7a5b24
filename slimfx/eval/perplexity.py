"""Perplexity of a causal LM on fixed, non-overlapping token windows.

For windows ``x`` of shape ``(n, L)`` every window is scored on its own: position ``t`` of
the logits predicts token ``t + 1``, so each window contributes ``L - 1`` predicted tokens
(tokens ``1 .. L-1`` given their prefix; token 0 has no context and is not scored). With
``NLL = -Σ log softmax(logits[i, t])[x[i, t+1]]`` summed over all windows and positions,

    perplexity = exp(NLL / (n · (L - 1))).

Log-probabilities are computed in float32 whatever the model's dtype. ``perplexity(...,
decode=True)`` computes the same logits as ``generate()`` would: one token per forward through
the model's own cache (a fresh ``DynamicCache`` per batch of windows, which a model with a
compressed KV cache upgrades to its forms), so the cache's compression is part of the score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["nll_of_logits_fn", "perplexity", "perplexity_of_logits_fn"]

LogitsFn = Callable[[Tensor], Any]


def _as_logits(out: Any) -> Tensor:
    """Logits from a model output: ``.logits``, the first element of a tuple, or an array."""
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if not isinstance(out, Tensor):
        raise TypeError(f"expected logits as a tensor or numpy array, got {type(out).__name__}")
    return out


def nll_of_logits_fn(
    fn: LogitsFn,
    windows: Tensor,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "perplexity",
) -> tuple[float, int]:
    """``(summed NLL in nats, number of predicted tokens)`` of ``fn`` over ``windows``.

    ``fn`` maps a ``(b, L)`` LongTensor of ids to ``(b, L, vocab)`` logits (tensor, numpy
    array or an object with ``.logits``). Runs under ``torch.inference_mode``.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (n, L) with L >= 2, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = windows.long()
    total = 0.0
    count = 0
    starts = range(0, windows.shape[0], batch_size)
    with torch.inference_mode():
        for s in tqdm(starts, desc=desc, disable=not progress, unit="batch", leave=False):
            ids = windows[s : s + batch_size]
            logits = _as_logits(fn(ids))
            if logits.shape[:2] != ids.shape:
                raise ValueError(
                    f"logits of shape {tuple(logits.shape)} do not match ids {tuple(ids.shape)}"
                )
            pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            target = ids[:, 1:].reshape(-1).to(pred.device)
            total += F.cross_entropy(pred, target, reduction="sum").item()
            count += target.numel()
    return total, count


def perplexity_of_logits_fn(
    fn: LogitsFn, windows: Tensor, batch_size: int = 4, progress: bool = True
) -> float:
    """Perplexity of any callable ``ids (b, L) → logits (b, L, vocab)`` (e.g. an ONNX Runtime
    session wrapped to take and return arrays) over non-overlapping ``windows``."""
    total, count = nll_of_logits_fn(fn, windows, batch_size=batch_size, progress=progress)
    return math.exp(total / count)


def _decoded_logits(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """Logits of ``ids`` ``(b, L)`` one token per forward through a fresh ``DynamicCache``;
    the last position, which scores nothing, is left 0."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    steps = [
        _as_logits(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True))
        for t in range(ids.shape[1] - 1)
    ]
    return torch.cat([*steps, torch.zeros_like(steps[-1])], dim=1)


def perplexity(
    model: torch.nn.Module,
    windows: Tensor,
    batch_size: int = 4,
    progress: bool = True,
    decode: bool = False,
) -> float:
    """Perplexity of a causal LM (any module whose forward takes ids and returns logits, such
    as a Hugging Face ``*ForCausalLM``) over ``windows`` of shape ``(n, L)``.

    The model runs in eval mode with ``config.use_cache`` off; both settings are restored
    afterwards. Windows are moved to the device of the model's first parameter. ``decode``:
    the logits of token-by-token decoding through the model's own cache (module docstring) —
    ``L − 1`` forwards per batch instead of one.
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    config = getattr(model, "config", None)
    had_cache = getattr(config, "use_cache", None)
    was_training = model.training
    if had_cache is not None:
        config.use_cache = False
    model.eval()
    try:
        if decode:
            fn = lambda ids: _decoded_logits(model, ids.to(device))  # noqa: E731
        else:
            fn = lambda ids: model(ids.to(device))  # noqa: E731
        return perplexity_of_logits_fn(fn, windows, batch_size=batch_size, progress=progress)
    finally:
        model.train(was_training)
        if had_cache is not None:
            config.use_cache = had_cache
