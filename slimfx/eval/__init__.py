"""Quality measurements on real data: perplexity of causal LMs, sentence-embedding agreement.
Nothing here imports the rest of slimfx."""

from __future__ import annotations

from .embeddings import embedding_cosine, mean_pool, sentence_embeddings, sentences
from .perplexity import nll_of_logits_fn, perplexity, perplexity_of_logits_fn

__all__ = [
    "embedding_cosine",
    "mean_pool",
    "nll_of_logits_fn",
    "perplexity",
    "perplexity_of_logits_fn",
    "sentence_embeddings",
    "sentences",
]
