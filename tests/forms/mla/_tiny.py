"""Tiny random Llama models and inputs for the MLA tests (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")


def tiny_gqa_llama(kv_heads: int, seed: int = 0, **overrides):
    """6 query heads of 16 dims (hidden 96) over ``kv_heads`` kv heads, 2 layers."""
    from slimfx.models import tiny_llama

    kw = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=kv_heads,
              intermediate_size=128, max_position_embeddings=128, pad_token_id=None)
    kw.update(overrides)
    return tiny_llama(seed=seed, **kw)


def calib_batches(n: int = 6, length: int = 32, seed: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, length), generator=gen) for _ in range(n)]


def eval_ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
