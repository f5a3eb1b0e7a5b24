"""The work directory of a streamed run: what each finished block left, so a killed run resumes.

    <work>/state.json        the run's fingerprint (checkpoint, calibration, options)
    <work>/block_00007.pt    block 7's sites and priced options
    <work>/stats_00007.pt    block 7's Gram matrices and token counts
    <work>/in_00008.pt       the calibration activations entering block 8

Each file is written to a temporary name, fsynced and renamed into place, and a block's
statistics are written before the activations of the next block, so a run killed at any point
finds a consistent prefix: blocks ``< k`` done and the inputs of block ``k``. A work directory
whose fingerprint differs (another checkpoint, calibration or option) is cleared of these files.
Only these files are ever deleted: a directory holding anything else (a user's scratch folder)
is refused, and after a successful run the directory itself goes only if this class created it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["WorkDir", "fingerprint"]


def fingerprint(parts: dict[str, Any], batches: Sequence[torch.Tensor]) -> str:
    """A SHA-256 over the run's options (``parts``, JSON) and the calibration token ids."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


#: the names a work directory's own files have (``state.json``, ``<kind>_<i>.pt``, their
#: ``.tmp`` while being written)
_OWN = re.compile(r"(state\.json|[a-z][a-z0-9-]*_\d{5}\.pt)(\.tmp)?")


class WorkDir:
    """Block statistics and activations of one streamed run (see the module docstring)."""

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.cleared = False
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"work={str(self.path)!r} is a file, not a directory")
        foreign = sorted(p.name for p in self._entries() if not _OWN.fullmatch(p.name))
        if foreign:
            raise ValueError(
                f"work={str(self.path)!r} holds files a streamed run did not write "
                f"({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}): give a new or "
                "empty directory (the work directory is cleared when it is stale and removed "
                "after the run)"
            )
        state = self.path / "state.json"
        created = not self.path.exists()
        if state.is_file():
            try:
                old = json.loads(state.read_text())
                same, created = old.get("key") == key, bool(old.get("created", True))
            except (ValueError, AttributeError):
                same = False
            if not same:
                self._clear()
                self.cleared = True
        self.created = created
        self.path.mkdir(parents=True, exist_ok=True)
        if not state.is_file():
            body = json.dumps({"key": key, "created": created})
            self._atomic(state, lambda p: p.write_text(body))

    def _entries(self) -> list[Path]:
        return list(self.path.iterdir()) if self.path.is_dir() else []

    def _clear(self) -> None:
        """Delete this class's own files (only those: see ``_OWN``)."""
        for p in self._entries():
            if _OWN.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)

    @staticmethod
    def _atomic(path: Path, write: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _file(self, kind: str, i: int) -> Path:
        return self.path / f"{kind}_{i:05d}.pt"

    def save(self, kind: str, i: int, obj: Any) -> None:
        """Write ``obj`` as ``<kind>_<i>.pt`` atomically."""
        self._atomic(self._file(kind, i), lambda p: torch.save(obj, p))

    def load(self, kind: str, i: int) -> Any:
        """What :meth:`save` wrote (our own files: full unpickling)."""
        return torch.load(self._file(kind, i), weights_only=False)

    def has(self, kind: str, i: int) -> bool:
        return self._file(kind, i).is_file()

    def drop(self, kind: str, i: int) -> None:
        self._file(kind, i).unlink(missing_ok=True)

    def resume_point(self, n_blocks: int, inputs: str = "in") -> int:
        """The first block to compute: blocks before it have statistics and its inputs are
        stored as ``<inputs>_<k>.pt`` (0 when nothing usable is there)."""
        k = 0
        while k < n_blocks and self.has("block", k):
            k += 1
        while k > 0 and not self.has(inputs, k):  # in_<n> holds the last block's outputs
            k -= 1
        return k

    def remove(self) -> None:
        """Delete the run's files (after a successful write), and the directory where this
        class created it and nothing else is left in it."""
        self._clear()
        if self.created and self.path.is_dir() and not self._entries():
            with contextlib.suppress(OSError):  # another rank removed it (or wrote into it)
                self.path.rmdir()
