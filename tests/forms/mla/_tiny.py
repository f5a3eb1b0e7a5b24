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


def qwen2_with_biases():
    """A 2-layer Qwen2 (6 query heads of 16 dims over 3 kv heads) whose q/k/v biases are drawn
    large (N(0, 0.5); random init leaves them at 0)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                      intermediate_size=128, num_hidden_layers=2, vocab_size=256)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for blk in model.model.layers:
            for lin in (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return model


def calib_batches(n: int = 6, length: int = 32, seed: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, length), generator=gen) for _ in range(n)]


def eval_ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
