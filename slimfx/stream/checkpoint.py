"""A Hugging Face checkpoint directory read one tensor at a time, and a model skeleton on meta.

A checkpoint directory holds ``config.json`` and the weights as ``model.safetensors`` or as
shards listed by ``model.safetensors.index.json``. :class:`Checkpoint` maps every tensor name
to its shard and reads a tensor with ``safetensors.safe_open`` only when asked, so nothing but
the tensors of the module being materialized is ever in memory.

:meth:`Checkpoint.skeleton` builds the model from its config on the meta device (no storage),
checks every parameter and persistent buffer against the checkpoint — a missing tensor, a
missing shard file or a shape mismatch raises :class:`CheckpointError` naming it, before any
work — and :meth:`Checkpoint.materialize` / :func:`release` load and free one submodule.
Buffers a checkpoint does not store (rotary inverse frequencies) are rebuilt by constructing
their module again from the config on the CPU.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Checkpoint", "CheckpointError", "release"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
#: safetensors' names of the floating dtypes (a float parameter stored otherwise is refused)
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be streamed: what is wrong and where."""


class Checkpoint:
    """The tensors of a checkpoint directory, by name, read lazily.

    - ``path``: the directory (``config.json`` + ``model.safetensors`` or an index and shards).
    - ``dtype``: cast floating tensors to this dtype on read (``None``: as stored).
    """

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        self.path = Path(path)
        self.dtype = dtype
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path}: no config.json (not a Hugging Face checkpoint)")
        self.files = self._index()
        self._headers: dict[str, dict[str, Any]] = {}

    def _index(self) -> dict[str, str]:
        """tensor name → shard file name; a listed shard that does not exist raises. Where
        both are present, ``model.safetensors`` wins over the index, as ``from_pretrained``
        reads them."""
        index = self.path / _INDEX
        single = self.path / _SINGLE
        if index.is_file() and not single.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from e
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(
                    f"{self.path}: shard file(s) listed in {_INDEX} are missing: "
                    f"{', '.join(missing)}"
                )
            return dict(weight_map)
        if not single.is_file():
            if (self.path / "slimfx.json").is_file():
                raise CheckpointError(
                    f"{self.path}: a slimfx save (already rewritten), not a checkpoint; "
                    "stream the dense original, or slimfx.load this one"
                )
            raise CheckpointError(f"{self.path}: no {_SINGLE} and no {_INDEX}")
        with self._open(_SINGLE) as f:
            return {k: _SINGLE for k in f.keys()}

    @contextlib.contextmanager
    def _open(self, file: str) -> Iterator[Any]:
        """``safe_open`` of a shard; a file that is not safetensors (truncated, emptied) is a
        :class:`CheckpointError` naming it."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path / file), framework="pt") as f:
                yield f
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path / file}: not a readable safetensors file ({e})") from e

    def _header(self, name: str) -> tuple[tuple[int, ...], str]:
        """The stored shape and safetensors dtype name (``F32``, ``BF16``, ``I8`` …) of tensor
        ``name``, read from its shard's header only."""
        file = self.files[name]
        head = self._headers.get(file)
        if head is None:
            with self._open(file) as f:
                head = self._headers[file] = {
                    k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()
                }
        if name not in head:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is not in {file}, where {_INDEX} places it"
            )
        return head[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name`` (read from the shard header only)."""
        return self._header(name)[0]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, read shard by shard (each opened once)."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise CheckpointError(f"{self.path}: tensor {n!r} is not in the checkpoint")
            by_file.setdefault(self.files[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with self._open(file) as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if self.dtype is not None and t.is_floating_point():
                        t = t.to(self.dtype)
                    out[k] = t
        return out

    def file_stamps(self) -> list[tuple[str, int, int]]:
        """``(file, size, mtime_ns)`` of every weights file: what a resume's fingerprint
        compares (the names alone missed weights saved again under the same names)."""
        out = []
        for f in sorted(set(self.files.values())):
            st = (self.path / f).stat()
            out.append((f, st.st_size, st.st_mtime_ns))
        return out

    def config(self) -> Any:
        """The model's ``transformers`` config."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    def stored_dtype(self) -> torch.dtype:
        """The dtype of the first floating tensor as stored (the skeleton's dtype)."""
        for name in self.files:
            t = self.read([name])[name]
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def skeleton(self) -> nn.Module:
        """The causal LM of ``config.json`` on the meta device (tied weights tied), checked
        against the checkpoint: every parameter and persistent buffer must be stored (under
        its own name or a tied alias) with the module's shape."""
        from transformers import AutoModelForCausalLM

        cfg = self.config()
        dtype = self.dtype or self.stored_dtype()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.eval()
        self.check(model)
        return model

    def check(self, model: nn.Module) -> None:
        """Raise :class:`CheckpointError` listing every tensor of ``model`` that the
        checkpoint lacks or stores with another shape."""
        missing, wrong = [], []
        for names, t in _tensors(model):
            stored = next((n for n in names if n in self.files), None)
            if stored is None:
                missing.append(names[0])
            elif self.shape(stored) != tuple(t.shape):
                wrong.append(f"shape mismatch: {stored}: checkpoint {self.shape(stored)}, "
                             f"model {tuple(t.shape)}")  # fmt: skip
            elif t.is_floating_point() and self._header(stored)[1] not in _FLOAT_DTYPES:
                wrong.append(f"type mismatch: {stored}: stored as {self._header(stored)[1]}, "
                             f"the model's {names[0]} is {t.dtype}")  # fmt: skip
        if missing or wrong:
            lines = [f"missing: {m}" for m in missing[:10]] + wrong[:10]
            raise CheckpointError(
                f"{self.path} does not match its config.json ({len(missing)} tensor(s) missing, "
                f"{len(wrong)} shape or type mismatch(es)); nothing was written:\n  "
                + "\n  ".join(lines)
            )

    def materialize(self, model: nn.Module, prefix: str, skip: Iterable[str] = ()) -> nn.Module:
        """Load the submodule ``prefix`` of ``model`` (``""``: the whole model) onto the CPU
        from the checkpoint, except the submodules named in ``skip`` (full names); returns
        it. Tensors already loaded stay; tied tensors keep their tie (one tensor, set under
        every name)."""
        module = model.get_submodule(prefix) if prefix else model
        pre = f"{prefix}." if prefix else ""
        skipped = tuple(f"{s}." for s in skip)
        for names, t in _tensors(module):
            if t.device.type != "meta" or all((pre + n).startswith(skipped) for n in names):
                continue
            full = [pre + n for n in names]
            stored = next((n for n in full if n in self.files), None)
            if stored is None:
                raise CheckpointError(f"{self.path}: tensor {full[0]!r} is not in the checkpoint")
            value = self.read([stored])[stored]
            if value.is_floating_point() and value.dtype != t.dtype:  # as from_pretrained
                value = value.to(t.dtype)  # e.g. fp32 norms in a bf16 checkpoint
            for n in names:
                _set_tensor(module, n, value, isinstance(t, nn.Parameter))
        _rebuild_buffers(module, model, skipped)
        return module


def _tensors(module: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """Each distinct parameter / persistent buffer of ``module`` with all its names."""
    seen: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), ([], p))[0].append(name)
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for b_name, b in mod.named_buffers(recurse=False):
            if b is None or b_name in mod._non_persistent_buffers_set:
                continue
            full = f"{mod_name}.{b_name}" if mod_name else b_name
            seen.setdefault(id(b), ([], b))[0].append(full)
    return [(sorted(set(names), key=names.index), t) for names, t in seen.values()]


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, param: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if param:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _rebuild_buffers(module: nn.Module, model: nn.Module, skipped: tuple[str, ...]) -> None:
    """Non-persistent buffers still on meta (not stored in a checkpoint): build the module
    that owns them again on the CPU from the model's config and take its buffers."""
    cfg = getattr(model, "config", None)
    for name, mod in module.named_modules():
        if skipped and f"{name}.".startswith(skipped):
            continue
        meta = [
            b for b in mod._non_persistent_buffers_set
            if mod._buffers.get(b) is not None and mod._buffers[b].device.type == "meta"
        ]  # fmt: skip
        if not meta:
            continue
        try:
            fresh = type(mod)(config=cfg)
        except TypeError as e:
            raise CheckpointError(
                f"cannot stream {type(model).__name__}: buffer(s) {meta} of {name or 'the model'} "
                f"are not stored in the checkpoint and {type(mod).__name__}(config=...) cannot "
                f"rebuild them ({e})"
            ) from e
        for b in meta:
            mod._buffers[b] = fresh._buffers[b]
        for attr, v in vars(fresh).items():  # e.g. attention_scaling computed with the buffers
            if not attr.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)):
                setattr(mod, attr, v)


def refuse_mixed_attention(model: nn.Module) -> None:
    """Refuse a model whose layers attend differently (``config.layer_types``: full and
    sliding-window layers, as Qwen2 with ``max_window_layers``): the streamed run captures
    block 0's arguments once and passes its attention mask to every block, so the others'
    statistics — and the weights written — would be wrong."""
    types = list(getattr(model.config, "layer_types", None) or ())
    if len(set(types)) > 1:
        counts = ", ".join(f"{t} ×{types.count(t)}" for t in dict.fromkeys(types))
        raise CheckpointError(
            f"{type(model).__name__}: its layers attend differently ({counts}); the streamed "
            "optimize passes block 0's attention mask to every block, so it refuses such "
            "models: optimize them in memory (slimfx.optimize)"
        )


def release(module: nn.Module) -> None:
    """Free a materialized submodule's storage: every parameter and buffer back to meta, and
    the heap's free pages back to the system (``stages.trim_heap``), so that what one block
    freed does not stay resident while the next is loaded."""
    from slimfx.stages import trim_heap

    module.to("meta")
    trim_heap()
