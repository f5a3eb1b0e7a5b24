"""Multi-head latent attention (MLA): convert a trained GQA/MHA block, training-free.

- :mod:`.config`    ``MLAConfig``: the decision (latent rank, kept RoPE pairs, fit) and its bytes
- :mod:`.numerics`  partial-RoPE pair selection and the joint key/value latent fit
- :mod:`.module`    ``MLAAttention``: the replacement block, unabsorbed (prefill) and absorbed
- :mod:`.cache`     latent caches for ``generate()`` (dynamic, int8 latent, static)
- :mod:`.convert`   ``describe_block`` (the block's site, or why not), calibration capture and
                    ``convert_model``
- :mod:`.candidates` ``mla_candidates`` (per rank: config, block-output error, costs) and
                    ``apply_mla`` for the budget solver
- :mod:`.measured`  ``LayerReplay``: an option's price as the measured KL of converting one
                    block (the solver's MLA errors), ``rescale`` onto the proxy's scale
- :mod:`.save`      ``save_converted`` / ``load_converted``: the converted model on disk
- :mod:`.deepseek`  ``export_deepseek_v3``: the converted model as a DeepSeek-V3 checkpoint
                    transformers loads with the same logits

The cache classes import transformers; import :mod:`.cache` directly when needed.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name → submodule; imported on first access so that ``slimfx.forms`` can register the
#: form (``.form`` → ``.config``, no torch) without importing torch, transformers or ``ir``.
_EXPORTS = {
    "AttentionCalib": "numerics",
    "MLAAttention": "module",
    "MLAConfig": "config",
    "MLAContext": "candidates",
    "MLAConversion": "convert",
    "DeepSeekExport": "deepseek",
    "deepseek_v3_model": "deepseek",
    "export_deepseek_v3": "deepseek",
    "MLAWeights": "numerics",
    "LayerReplay": "measured",
    "apply_mla": "candidates",
    "attention_calib": "convert",
    "capture_attention_inputs": "convert",
    "convert_model": "convert",
    "describe_block": "convert",
    "fit_mla": "numerics",
    "load_converted": "save",
    "mla_candidates": "candidates",
    "save_converted": "save",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
