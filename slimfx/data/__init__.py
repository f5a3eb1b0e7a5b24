"""Real text corpora (from the gensim wheel's test data) and token windows for calibration
and evaluation. Nothing here imports the rest of slimfx."""

from __future__ import annotations

from .text import (
    CALIBRATION_FRACTION,
    CORPORA,
    calibration_batches,
    corpus,
    corpus_tokens,
    heldout_windows,
    news_text,
    split_tokens,
    token_windows,
    wiki_text,
    wikitext_to_prose,
)

__all__ = [
    "CALIBRATION_FRACTION",
    "CORPORA",
    "calibration_batches",
    "corpus",
    "corpus_tokens",
    "heldout_windows",
    "news_text",
    "split_tokens",
    "token_windows",
    "wiki_text",
    "wikitext_to_prose",
]
