"""What every benchmark records next to its numbers: the command, the machine and the date,
and the JSON file of ``{"meta": …, "rows": […]}`` it writes with ``--json``."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from typing import Any


def run_meta(**extra: Any) -> dict[str, Any]:
    """The command line, machine and UTC date of this run, plus ``extra``."""
    return {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        **extra,
    }


def dump(path: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write ``{"meta": meta, "rows": rows}`` to ``path`` (nothing when ``path`` is empty)."""
    if path:
        with open(path, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
