"""Shared fixtures: tiny, seeded models and inputs that every test layer can afford."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def tiny_llama() -> nn.Module:
    """A 2-layer LlamaForCausalLM (hidden 64, 4 heads, 2 kv heads, vocab 256, tied lm_head).

    Seeded, eval mode, float32. Built fresh per test (≈50 ms) so tests may mutate it.
    """
    transformers = pytest.importorskip("transformers")  # the hf extra is optional
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    return model


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    """(2, 16) token ids in [0, 256)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 16), generator=gen)


@pytest.fixture
def tiny_mlp() -> nn.Sequential:
    """Linear(16→32, bias) → ReLU → Linear(32→32, no bias) → ReLU → Linear(32→8, bias)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 32, bias=False),
        nn.ReLU(),
        nn.Linear(32, 8),
    ).eval()
