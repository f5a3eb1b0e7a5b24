"""Resident memory of ``optimize``'s stages (and the streamed path's): readings of
``/proc/self/status`` around each stage with the high-water mark reset at its start
(``MemoryInstrument``), and the heap's free pages handed back to the system between stages
(``trim_heap``, ``TrimAfter``). Linux / glibc; elsewhere nothing is recorded or trimmed."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from typing import Any

from slimfx.passes.base import PassResult

__all__ = ["MemoryInstrument", "TrimAfter", "rss_mb", "trim_heap"]


def rss_mb() -> dict[str, float] | None:
    """This process's resident memory now (``rss``), its high-water mark (``hwm``) and the
    anonymous part of ``rss`` (``anon``: what the process allocated, not file pages such as
    a memory-mapped checkpoint's weights touched for the first time) in MB
    (``/proc/self/status``); ``None`` where that file does not exist (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for key, name in (("VmRSS", "rss"), ("VmHWM", "hwm"), ("RssAnon", "anon")):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m is None:
            if name == "anon":  # before Linux 4.5
                continue
            return None
        out[name] = int(m.group(1)) / 1024.0
    return out


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``): large
    tensors freed by a stage otherwise stay in this process's resident memory, cached by the
    allocator for reuse. ``False`` where there is no glibc (nothing done)."""
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC is False:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC: Any = None


def _reset_peak() -> bool:
    """Reset the high-water mark to the current resident size (Linux ≥ 4.0: ``5`` written to
    ``/proc/self/clear_refs``); ``False`` where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryInstrument:
    """Resident memory around each stage, in MB (``memory``: stage name → ``rss_before``,
    ``rss_after`` and ``peak``, the process's highest resident size during the stage; and
    ``anon_before`` / ``anon_after``, the anonymous part, where the kernel reports it).

    The peak is the stage's own where the high-water mark can be reset before it
    (``/proc/self/clear_refs``; ``peak_is_stage``), else the process's peak so far. A stage's
    growth is ``peak - rss_before``: what it held at once over what it was handed. Records
    nothing where ``/proc/self/status`` is missing.

    ``peak_mb``: the process's highest resident size so far, stages and the time between them
    — the high-water mark is read before each reset. (After a reset, ``getrusage``'s
    ``ru_maxrss`` only knows the peak since then; it also carries the high-water mark of the
    process that started this one through ``fork`` + ``exec``: neither is this run's peak.)"""

    def __init__(self) -> None:
        self.memory: dict[str, dict[str, float]] = {}
        self._before: dict[str, float] | None = None
        self.peak_is_stage = True
        self._peak = 0.0

    @property
    def peak_mb(self) -> float | None:
        """The process's peak resident MB so far (``None`` without ``/proc/self/status``)."""
        now = rss_mb()
        return None if now is None else round(max(self._peak, now["hwm"]), 1)

    def before(self, pass_name: str, obj: Any) -> None:
        seen = rss_mb()  # the peak since the last reset: between stages, or before the first
        if seen is not None:
            self._peak = max(self._peak, seen["hwm"])
        self.peak_is_stage = _reset_peak() and self.peak_is_stage
        self._before = rss_mb()

    def after(self, pass_name: str, obj: Any, result: PassResult) -> None:
        now = rss_mb()
        if now is None or self._before is None:
            return
        self._peak = max(self._peak, now["hwm"])
        rec = {
            "rss_before": round(self._before["rss"], 1),
            "rss_after": round(now["rss"], 1),
            "peak": round(now["hwm"], 1),
        }
        if "anon" in now and "anon" in self._before:
            rec["anon_before"] = round(self._before["anon"], 1)
            rec["anon_after"] = round(now["anon"], 1)
        self.memory[pass_name] = rec


class TrimAfter:
    """After each stage, the heap's free pages go back to the system (``trim_heap``): what a
    stage freed (calibration's probe deltas and activations, apply's temporaries) no longer
    counts in the resident memory of the stages after it."""

    def before(self, pass_name: str, obj: Any) -> None:
        pass

    def after(self, pass_name: str, obj: Any, result: PassResult) -> None:
        trim_heap()
