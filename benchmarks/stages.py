"""Time and resident memory per stage of the in-memory ``slimfx.optimize`` of SmolLM2 (issue 13).

``make demo``'s configuration (``examples/demo.py``): SmolLM2-135M-Instruct, budget 0.3,
``--n-calib`` windows of ``--seq-len`` tokens of the lee news text (16 × 256), the default
families, the default sensitivity ("geo"). Prints one Markdown row per stage — seconds, resident
MB before / after, the stage's own peak and its growth over what it was handed — the seconds
of each candidate family, and writes ``--json`` with the plan (to compare two runs' plans with
``--compare``) and a digest of every rewritten tensor.

    OMP_NUM_THREADS=1 python benchmarks/stages.py [--budget 0.3] [--n-calib 16]
        [--seq-len 256] [--json out.json] [--compare before.json]

The high-water mark is reset before every stage (``/proc/self/clear_refs``), so a stage's peak
is its own (``slimfx.stages.MemoryInstrument``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of ``model``."""
    h = hashlib.sha256()
    for name, t in sorted(
        {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
    ):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", default=None)
    p.add_argument("--compare", default=None, help="a previous --json: same plan and weights?")
    a = p.parse_args()

    import slimfx
    from slimfx.data.text import calibration_batches
    from slimfx.models import load_smollm2
    from slimfx.stages import rss_mb

    torch.manual_seed(0)
    floor = rss_mb()
    model, tok = load_smollm2()
    calib = calibration_batches(tok, name="lee", n=a.n_calib, seq_len=a.seq_len)
    loaded = rss_mb()
    t0 = time.perf_counter()
    small = slimfx.optimize(model, a.budget, calibration=calib, progress=False)
    wall = time.perf_counter() - t0
    after = rss_mb()
    rep = slimfx.report_of(small)
    mem: dict[str, dict[str, float]] = rep.meta.get("stage_memory_mb", {})
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "args": vars(a),
        "wall_s": wall,
        "rss_mb": {"import": floor, "loaded": loaded, "after": after},
        "timings": rep.timings,
        "memory": mem,
        "candidate_seconds": rep.meta.get("candidate_seconds", {}),
        "plan": rep.meta["plan"],
        "digest": digest(small),
    }
    print(f"optimize: {wall:.1f} s; RSS MB import {floor}, loaded {loaded}, after {after}")
    print("| stage | s | RSS before MB | RSS after MB | peak MB | growth MB |")
    print("|---|---|---|---|---|---|")
    for name, secs in rep.timings.items():
        m = mem.get(name)
        if m is None:
            print(f"| {name} | {secs:.1f} | | | | |")
            continue
        print(
            f"| {name} | {secs:.1f} | {m['rss_before']:.0f} | {m['rss_after']:.0f} | "
            f"{m['peak']:.0f} | {m['peak'] - m['rss_before']:.0f} |"
        )
    print("candidates by family (s):", out["candidate_seconds"])
    print("digest", out["digest"])
    if a.compare:
        ref = json.loads(Path(a.compare).read_text())
        print(
            "same plan:",
            ref["plan"] == out["plan"],
            "| same weights:",
            ref["digest"] == out["digest"],
        )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
