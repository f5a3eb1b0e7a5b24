"""A tiny Llama checkpoint directory and its calibration, shared by the streaming tests."""

from __future__ import annotations

from pathlib import Path

import torch

LAYERS = 3


def build(tie: bool = True, seed: int = 0):
    """A 3-layer tiny Llama (hidden 64, vocab 256), seeded."""
    from slimfx.models import tiny_llama

    return tiny_llama(seed=seed, tie_word_embeddings=tie, num_hidden_layers=LAYERS)


def save_checkpoint(path: Path, tie: bool = True, shard: str | None = None) -> Path:
    """``build(tie)`` saved with ``save_pretrained`` (``shard``: ``max_shard_size``)."""
    kw = {"max_shard_size": shard} if shard else {}
    build(tie).save_pretrained(path, **kw)
    return path


def calibration(n: int = 5, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches of random token ids (1 × ``seq``)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, seq), generator=g) for _ in range(n)]
