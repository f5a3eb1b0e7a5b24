"""The work directory of a streamed run: what each finished block left, so a killed run resumes.

    <work>/state.json        the run's fingerprint (checkpoint, calibration, options)
    <work>/block_00007.pt    block 7's sites, Gram matrices, token counts and priced options
    <work>/in_00008.pt       the calibration activations entering block 8

Each file is written to a temporary name, fsynced and renamed into place, and a block's
statistics are written before the activations of the next block, so a run killed at any point
finds a consistent prefix: blocks ``< k`` done and the inputs of block ``k``. A work directory
whose fingerprint differs (another checkpoint, calibration or option) is cleared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


class WorkDir:
    """Block statistics and activations of one streamed run (see the module docstring)."""

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.cleared = False
        state = self.path / "state.json"
        if state.is_file():
            try:
                same = json.loads(state.read_text()).get("key") == key
            except ValueError:
                same = False
            if not same:
                shutil.rmtree(self.path)
                self.cleared = True
        self.path.mkdir(parents=True, exist_ok=True)
        if not state.is_file():
            self._atomic(state, lambda p: p.write_text(json.dumps({"key": key})))

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
        """Delete the work directory (after a successful write)."""
        shutil.rmtree(self.path, ignore_errors=True)
