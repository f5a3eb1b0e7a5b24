"""The latency cache's file (``cost.target.MeasuredCache``): reading it with every entry
checked, writing it merged with what other processes wrote meanwhile (under a lock file,
through a temporary file of its own), and what each measurement records of where it was
taken."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["KEY_FIELDS", "read_cache", "write_cache", "where_measured"]

#: an entry's key fields, in ``MeasuredCache.key``'s order
KEY_FIELDS = ("op", "N", "K", "M", "dtype", "decision", "device")

Entries = dict[tuple[Any, ...], float]
Info = dict[tuple[Any, ...], dict[str, Any]]


def where_measured(device: torch.device) -> dict[str, Any]:
    """What a measurement depends on beyond its key, saved with each entry: torch's version
    and, on the CPU, its intra-op threads and the machine (``platform``)."""
    import platform

    out: dict[str, Any] = {"torch": torch.__version__}
    if device.type == "cpu":
        out["threads"] = torch.get_num_threads()
        out["machine"] = f"{platform.machine()} {platform.processor() or platform.system()}"
    return out


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created) while the block runs; no lock where ``fcntl``
    is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_cache(
    path: Path, max_version: int, key: Callable[..., tuple[Any, ...]]
) -> tuple[Entries, Info]:
    """Entries (key → seconds) and their saved info from the file at ``path``: a file that
    is not a latency cache, or an entry without its fields or with seconds that are not a
    positive number, is a ``ValueError`` naming the file (and the entry)."""

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a latency cache ({why})")

    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise bad(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}")
    version, records = data.get("version", 1), data.get("entries", [])
    if not isinstance(version, int) or not isinstance(records, list):
        raise bad("'version' must be an integer and 'entries' a list")
    if version > max_version:
        raise ValueError(f"{path}: cache version {version} is newer than {max_version}")
    entries: Entries = {}
    info: Info = {}
    for i, rec in enumerate(records):
        fields = (*KEY_FIELDS, "seconds")
        missing = [f for f in fields if not isinstance(rec, dict) or f not in rec]
        if missing:
            raise bad(f"entry {i} has no {', '.join(missing)}")
        try:
            k, secs = key(*(rec[f] for f in KEY_FIELDS)), float(rec["seconds"])
        except (TypeError, ValueError) as e:
            raise bad(f"entry {i}: {e}") from None
        if not math.isfinite(secs) or secs <= 0:
            raise bad(f"entry {i} ({k[0]} {k[5]}): seconds {rec['seconds']!r} is not a "
                      "positive number")  # fmt: skip
        entries[k] = secs
        extra = {f: v for f, v in rec.items() if f not in KEY_FIELDS and f != "seconds"}
        if extra:
            info[k] = extra
    return entries, info


def write_cache(
    path: Path, entries: Entries, info: Info, version: int, key: Callable[..., tuple[Any, ...]]
) -> tuple[Entries, Info]:
    """Write ``entries`` atomically (sorted, stable JSON) merged with what ``path`` holds now
    — entries another process wrote since are kept, ``entries`` win on the same key — under
    the lock file ``<path>.lock``, through a temporary file of this writer's own. Returns the
    merged entries and info."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_name(path.name + ".lock")):
        if path.exists():
            disk, disk_info = read_cache(path, version, key)
            entries, info = {**disk, **entries}, {**disk_info, **info}
        records = []
        for k in sorted(entries):
            rec: dict[str, Any] = dict(zip(KEY_FIELDS, k))
            rec["seconds"] = entries[k]
            rec.update(info.get(k, {}))
            records.append(rec)
        text = json.dumps({"version": version, "entries": records}, indent=1)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return entries, info
