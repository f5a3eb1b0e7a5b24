"""Sentence embeddings of an encoder (sentence-transformers style) and their agreement.

For token states ``h[t]`` (last hidden layer) and attention mask ``m[t]`` of one sentence,

    e = normalize( Σ_t m[t] h[t] / Σ_t m[t] ),

the mean-pooling-then-L2 recipe of all-MiniLM-L6-v2. Comparing a compressed encoder to the
original then reads as the per-sentence cosine ``cos(e, ê)`` (1 is identical).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["embedding_cosine", "mean_pool", "sentence_embeddings", "sentences"]

# A space after ., ! or ? (or after one of them plus a closing quote/bracket) before a capital.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of ``hidden (b, t, d)`` over the positions where ``attention_mask (b, t)`` is 1."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def sentence_embeddings(
    model: Any,
    tokenizer: Any,
    sentences: list[str],
    batch_size: int = 16,
    max_length: int = 256,
) -> Tensor:
    """L2-normalized mean-pooled embeddings, ``(len(sentences), hidden)`` float32 on CPU.

    ``max_length`` truncates long sentences (256 word pieces, as all-MiniLM-L6-v2 was used).
    The model runs under ``torch.inference_mode`` on the device of its first parameter.
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, not one string")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    out: list[Tensor] = []
    with torch.inference_mode():
        for s in range(0, len(sentences), batch_size):
            batch = tokenizer(
                list(sentences[s : s + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            result = model(**batch)
            hidden = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
            pooled = mean_pool(hidden.float(), batch["attention_mask"])
            out.append(F.normalize(pooled, dim=-1).cpu())
    if not out:
        raise ValueError("no sentences to embed")
    return torch.cat(out)


def embedding_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of matching rows of ``a`` and ``b`` (``(n, d)`` each) → ``(n,)``."""
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def sentences(text: str, n: int, min_words: int = 5, max_words: int = 60) -> list[str]:
    """The first ``n`` sentences of ``text`` with ``min_words``..``max_words`` words.

    Splits after ``.``, ``!`` or ``?`` (optionally followed by a closing quote or bracket) when
    the next sentence starts with a capital letter or digit; a heuristic that suits news and
    encyclopedic prose (abbreviations such as "Mr. Smith" are occasionally split).
    """
    picked: list[str] = []
    for paragraph in text.split("\n"):
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            sentence = " ".join(sentence.split())
            if min_words <= len(sentence.split()) <= max_words:
                picked.append(sentence)
                if len(picked) == n:
                    return picked
    raise ValueError(
        f"the text holds only {len(picked)} sentences of {min_words}-{max_words} words, "
        f"asked for {n}"
    )
