"""Save and load a Hugging Face causal LM whose attention blocks were converted to MLA.

``save_converted(model, dir)`` writes, all or nothing:

- ``config.json`` (and ``generation_config.json`` when the model has one): the original
  architecture, from which ``load_converted`` rebuilds the model;
- ``slimfx.safetensors``: every tensor of the converted model (tied tensors stored once; not
  ``model.safetensors``, so that ``from_pretrained`` fails on the save instead of building
  the dense model with the converted attention's weights missing — version 1 saves, which
  used that name, still load);
- ``mla.json``: per converted layer its :class:`~slimfx.forms.mla.config.MLAConfig` and the
  shapes of its :class:`~slimfx.forms.mla.module.MLAAttention` (heads, kv heads, latent rank,
  RoPE entries, whether the RoPE key has a bias, ``absorb``), the model class and dtype, and
  the SHA-256 of every other file.

``load_converted(dir)`` checks the hashes, builds the architecture from ``config.json``
(``AutoModelForCausalLM.from_config``) or takes the fresh skeleton ``model=`` it is given,
replaces the listed layers' attention by empty ``MLAAttention`` shells of the recorded shapes
and loads the tensors (strict: a missing or extra tensor raises).

Atomicity: the files are written and fsynced in a temporary directory beside ``dir`` which is
then renamed into place; an existing earlier MLA save at ``dir`` is first moved aside and
removed once the new one is in place (put back by the next save or load if an interruption
left ``dir`` missing). A non-empty directory that is not an MLA save is refused unless
``overwrite=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimfx import files
from slimfx.planning.configs import decision_from_dict

from .module import MLAAttention
from .numerics import MLAWeights

__all__ = ["save_converted", "load_converted", "converted_layers", "MLA_SAVE_FORMAT"]

MLA_SAVE_FORMAT = "slimfx.mla"
MLA_SAVE_VERSION = 2
_MANIFEST = "mla.json"
_WEIGHTS = "slimfx.safetensors"  # version 1: "model.safetensors"
_OWN = {_MANIFEST, "config.json", "generation_config.json", _WEIGHTS, "model.safetensors"}


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers (not a Llama-style LM)")
    return layers


def converted_layers(model: nn.Module) -> dict[int, MLAAttention]:
    """Layer index → its :class:`MLAAttention`, for the converted layers of ``model``."""
    return {
        i: blk.self_attn for i, blk in enumerate(_layers(model))
        if isinstance(blk.self_attn, MLAAttention)
    }


def _layer_record(attn: MLAAttention) -> dict[str, Any]:
    cfg = getattr(attn, "mla_config", None)
    return {
        "config": cfg.to_dict() if cfg is not None else None,
        "num_heads": attn.num_heads,
        "num_kv_heads": attn.num_kv_heads,
        "head_dim": attn.head_dim,
        "rank": attn.rank,
        "rope_entries": attn.rope_entries,
        "rope_bias": attn.k_rope_proj.bias is not None,
        "absorb": attn.absorb,
        "latent_bits": attn.latent_bits,
        "factor_bits": attn.factor_bits,
        "q_mix_heads": attn.q_mix_heads,
    }


def _read_manifest(d: Path) -> dict[str, Any] | None:
    p = d / _MANIFEST
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(info, dict) or info.get("format") != MLA_SAVE_FORMAT:
        raise ValueError(f"{p}: not an MLA save manifest (format != {MLA_SAVE_FORMAT!r})")
    return info


def _is_mla_save(d: Path) -> bool:
    try:
        info = _read_manifest(d)
    except ValueError:
        return False
    return info is not None and all(p.name in _OWN for p in d.iterdir())


def save_converted(model: nn.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` (a Hugging Face causal LM with :class:`MLAAttention` blocks, e.g. after
    :func:`~slimfx.forms.mla.convert.convert_model`) to ``directory``, all or nothing (see the
    module docstring). A ``torch.compile`` wrapper is unwrapped. Raises ``ValueError`` for a
    model without converted layers or without a Hugging Face config, ``FileExistsError`` for a
    target it may not replace (before anything is written)."""
    from safetensors.torch import save_model

    model = getattr(model, "_orig_mod", model)
    layers = converted_layers(model)
    if not layers:
        raise ValueError("save_converted: the model has no MLAAttention block (not converted)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise ValueError("save_converted: the model has no Hugging Face config to rebuild it from")
    d = files.writable_target(directory, "save_converted", overwrite, _is_mla_save,
                              " that is not an earlier MLA save", cli=False)
    with files.writing(d) as tmp:
        save_model(model, str(tmp / _WEIGHTS))
        (tmp / "config.json").write_text(config.to_json_string())
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_string"):
            (tmp / "generation_config.json").write_text(gen.to_json_string())
        dtype = next(model.parameters()).dtype
        info: dict[str, Any] = {
            "format": MLA_SAVE_FORMAT,
            "version": MLA_SAVE_VERSION,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "dtype": str(dtype).removeprefix("torch."),
            "layers": {str(i): _layer_record(a) for i, a in sorted(layers.items())},
        }
        return files.finish(tmp, d, _MANIFEST, info)


def mla_shell(
    orig: nn.Module,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rank: int,
    rope_entries: int,
    *,
    rope_bias: bool,
    absorb: str = "auto",
    latent_bits: int = 16,
    factor_bits: int = 16,
    per_head_q_mix: bool = False,
) -> MLAAttention:
    """An :class:`MLAAttention` replacing ``orig`` with zero weights of these shapes (filled by
    loading a saved state dict): ``rope_entries`` kept RoPE entries (K·pairs), latent ``rank``."""
    H, K, d, r, N = num_heads, num_kv_heads, head_dim, rank, rope_entries
    D = orig.q_proj.in_features
    z = torch.zeros
    w = MLAWeights(
        rope_freq=z(N, dtype=torch.long),
        q_mix=z(H, K * d, d),
        w_krope=z(2 * N, D),
        b_krope=z(2 * N) if rope_bias else None,
        w_dkv=z(r, D),
        w_uk=z(K * d - 2 * N, r),
        w_uv=z(K * d, r),
        b_uv=z(K * d),
    )
    return MLAAttention(orig, w, H, K, absorb=absorb, latent_bits=latent_bits,
                        factor_bits=factor_bits, per_head_q_mix=per_head_q_mix)


def _shell(orig: nn.Module, rec: dict[str, Any]) -> MLAAttention:
    """The :func:`mla_shell` of a layer record of the manifest."""
    attn = mla_shell(
        orig, int(rec["num_heads"]), int(rec["num_kv_heads"]), int(rec["head_dim"]),
        int(rec["rank"]), int(rec["rope_entries"]), rope_bias=bool(rec["rope_bias"]),
        absorb=rec["absorb"], latent_bits=int(rec["latent_bits"]),
        factor_bits=int(rec.get("factor_bits", 16)),
        # saves before q_mix was stored per kv group hold one map per query head
        per_head_q_mix=int(rec.get("q_mix_heads", rec["num_heads"])) == int(rec["num_heads"]),
    )  # fmt: skip
    if rec.get("config") is not None:
        attn.mla_config = decision_from_dict(rec["config"])
    return attn


def load_converted(
    directory: str | Path, model: nn.Module | None = None, *, verify: bool = True
) -> nn.Module:
    """Load what :func:`save_converted` wrote, in eval mode. ``model``: a fresh instance of the
    original architecture (its weights are overwritten); by default it is built from
    ``config.json`` in the saved dtype. ``verify``: check every file's SHA-256 first (a
    mismatch raises ``ValueError`` naming the file, before anything is built)."""
    from safetensors.torch import load_model

    d = Path(directory)
    files.recover(d)
    info = _read_manifest(d)
    if info is None:
        raise FileNotFoundError(f"{d} has no {_MANIFEST}: not a directory save_converted wrote")
    if int(info.get("version", 1)) > MLA_SAVE_VERSION:
        raise ValueError(f"{d / _MANIFEST}: version {info['version']} is newer than this slimfx")
    for name, digest in info.get("files", {}).items():
        p = d / name
        if not p.is_file():
            raise ValueError(f"{p}: listed in {_MANIFEST} but missing; the save is incomplete")
        if verify and files.sha256(p) != digest:
            raise ValueError(f"{p}: SHA-256 mismatch with {_MANIFEST}: the file changed after "
                             "the save (corrupted or edited)")
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        cfg = AutoConfig.from_pretrained(d)
        dtype = getattr(torch, info.get("dtype", "float32"))
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        if (d / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(d)
    model = getattr(model, "_orig_mod", model)
    blocks = _layers(model)
    for key, rec in info["layers"].items():
        i = int(key)
        if isinstance(blocks[i].self_attn, MLAAttention):
            raise ValueError(f"load_converted: layer {i} of model= is already converted; pass "
                             "a fresh instance of the original architecture")
        blocks[i].self_attn = _shell(blocks[i].self_attn, rec)
    weights = _WEIGHTS if int(info.get("version", 1)) >= 2 else "model.safetensors"
    load_model(model, str(d / weights), strict=True)
    return model.eval()

