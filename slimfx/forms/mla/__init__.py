"""Multi-head latent attention (MLA): convert a trained GQA/MHA block, training-free.

- :mod:`.config`    ``MLAConfig``: the decision (latent rank, kept RoPE pairs, fit) and its bytes
- :mod:`.numerics`  partial-RoPE pair selection and the joint key/value latent fit
- :mod:`.module`    ``MLAAttention``: the replacement block, unabsorbed (prefill) and absorbed
- :mod:`.cache`     latent caches for ``generate()`` (dynamic, int8 latent, static)
- :mod:`.convert`   ``describe_block`` (the block's site, or why not), calibration capture and
                    ``convert_model``

The cache classes import transformers; import :mod:`.cache` directly when needed.
"""

from __future__ import annotations

from .config import MLAConfig
from .convert import (
    MLAConversion,
    attention_calib,
    capture_attention_inputs,
    convert_model,
    describe_block,
)
from .module import MLAAttention
from .numerics import AttentionCalib, MLAWeights, fit_mla

__all__ = [
    "AttentionCalib",
    "MLAAttention",
    "MLAConfig",
    "MLAConversion",
    "MLAWeights",
    "attention_calib",
    "capture_attention_inputs",
    "convert_model",
    "describe_block",
    "fit_mla",
]
