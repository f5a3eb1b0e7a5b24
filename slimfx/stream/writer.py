"""Writing a rewritten model block by block into a directory ``slimfx.load`` reads.

The layout of the save's ``slimfx.safetensors`` (every tensor's name, dtype and shape) is known
before a single block is rewritten: the solved plan applied with ``empty_like_plan`` to a meta-device
skeleton gives the rewritten model's state dict without storage. :class:`StreamedSafetensors`
writes the safetensors header for that layout first, then each tensor's bytes at its reserved
offset as its block is rewritten, so only one block's tensors are ever in memory. A tensor
shared by several names (a tied embedding) is stored once under the name ``safetensors``'
own ``save_model`` would keep (the first in sorted order).

The directory is written like ``slimfx.save`` writes one — into a temporary directory beside
the target, every file hashed into ``slimfx.json`` and fsynced, then exchanged into place in
one step (``slimfx.io``'s commit) — so an interrupted write never leaves a directory that
loads as a complete model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["StreamedSafetensors", "layout_of"]

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def layout_of(
    model: nn.Module,
) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """The stored tensors of ``model``'s state dict (name → dtype, shape) with shared tensors
    once, and the aliases (other name → stored name)."""
    groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append((name, t))
    layout, aliases = {}, {}
    for members in groups.values():
        keep = sorted(n for n, _ in members)[0]
        t = members[0][1]
        if t.dtype not in _DTYPES:
            raise TypeError(f"{keep}: dtype {t.dtype} cannot be stored in safetensors")
        layout[keep] = (t.dtype, tuple(t.shape))
        for n, _ in members:
            if n != keep:
                aliases[n] = keep
    return layout, aliases


class StreamedSafetensors:
    """A ``.safetensors`` file whose header is written first and whose tensors are written
    later, in any order, each exactly once. ``close()`` checks that every tensor was written."""

    def __init__(
        self,
        path: str | Path,
        layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name, (dtype, shape) in layout.items():
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [pos, pos + n],
            }
            self.offsets[name] = (pos, pos + n)
            pos += n
        self.layout = dict(layout)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._f.truncate(self.base + pos)
        self.written: set[str] = set()

    def write(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write each of ``tensors`` at its place; dtype and shape must match the layout."""
        for name, t in tensors.items():
            if name not in self.layout:
                raise KeyError(f"{name!r} is not a tensor of the planned layout")
            dtype, shape = self.layout[name]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"{name}: got {t.dtype} {tuple(t.shape)}, the layout says {dtype} {shape}"
                )
            if name in self.written:
                raise ValueError(f"{name} written twice")
            start, _ = self.offsets[name]
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            self._f.seek(self.base + start)
            self._f.write(memoryview(data))  # the tensor's own bytes: no copy (.tobytes())
            self.written.add(name)

    def pending(self) -> list[str]:
        """Tensors of the layout not written yet."""
        return [n for n in self.layout if n not in self.written]

    def close(self) -> None:
        """Flush, fsync and close; raises when a tensor of the layout was never written."""
        import os

        left = self.pending()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if left:
            raise RuntimeError(f"{len(left)} tensor(s) never written, e.g. {left[:3]}")

    def abort(self) -> None:
        """Close without the completeness check (the directory is being discarded)."""
        if not self._f.closed:
            self._f.close()


def stored_tensors(
    module: nn.Module, prefix: str, stored: Iterable[str]
) -> dict[str, torch.Tensor]:
    """``module``'s state-dict tensors under their full names (``prefix`` + name), only those
    the layout stores (aliases of a shared tensor are left to their stored name)."""
    keep = set(stored)
    pre = f"{prefix}." if prefix else ""
    return {pre + k: v for k, v in module.state_dict().items() if pre + k in keep}
