"""What every benchmark records next to its numbers: the command, the machine and the date,
and the JSON file of ``{"meta": …, "rows": […]}`` it writes with ``--json``."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # run from a checkout where slimfx is not installed (the GPU machine)
    sys.path.append(_ROOT)


def run_meta(**extra: Any) -> dict[str, Any]:
    """The command line, machine and UTC date of this run, plus ``extra``."""
    return {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        **extra,
    }


def copy_bandwidth(torch: Any, device: Any, bench: Any, mib: int = 256) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) measured now with ``bench``
    (a callable → µs per call): the bandwidth limit the decode benchmarks hold their bytes
    against, on the card that runs them rather than a published figure."""
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / (bench(lambda: dst.copy_(src)) * 1e-6)


def dump(path: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write ``{"meta": meta, "rows": rows}`` to ``path`` (nothing when ``path`` is empty)."""
    if path:
        with open(path, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def chosen(configs: dict[str, Any], indices: str) -> list[str]:
    """The labels of ``configs`` at ``--configs``' comma-separated 0-based indices (every
    label when ``indices`` is empty)."""
    labels = list(configs)
    return [labels[int(i)] for i in indices.split(",")] if indices else labels
