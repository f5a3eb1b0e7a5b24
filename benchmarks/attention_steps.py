"""How well the measured attention-step prices predict steps they did not measure, against the
roofline: every default KV-cache and MLA form of one attention shape (SmolLM2-135M's by default)
timed at several contexts (``slimfx.cost.measure_attention``, one growing cache per form), then
each "held-out" context priced from the "fit" contexts only (what ``calibrate-target
--attention`` stores by default; ``slimfx.cost.attention_price.attention_latency``: linear between the two
around it, along the two largest beyond them) and by the target's roofline, both against the
measured step.

    OMP_NUM_THREADS=1 python benchmarks/attention_steps.py [--fit 1024,4096,16384]
        [--held 2048,8192] [--shape 576:9:3:64] [--target cpu] [--json out.json]

Prints, per form, the measured step at every context, the prediction / measured ratio of the
fit at each held-out context, and the roofline / measured ratio; then the spread of those
ratios over the forms (what a budget solver comparing forms sees: a common factor does not
change its choice, a spread does) and the rank agreement of each price with the measured order.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump  # noqa: E402


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[int]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for i, j in enumerate(order):
            r[j] = i
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", default="1024,4096,16384")
    ap.add_argument("--held", default="2048,8192")
    ap.add_argument("--shape", default="smollm2", help="HIDDEN:HEADS:KV_HEADS:HEAD_DIM")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    import torch

    from slimfx.cost.attention_price import attention_latency
    from slimfx.cost.measure_attention import (
        default_attention_decisions,
        measure_attention,
        parse_attention_shapes,
    )
    from slimfx.cost.target import (
        MeasuredCache,
        compute_dtype,
        estimate_attention_latency,
        target_of,
    )

    fit = [int(c) for c in a.fit.split(",")]
    held = [int(c) for c in a.held.split(",")]
    (shape,) = parse_attention_shapes(a.shape)
    tgt = target_of(a.target)
    dtype = str(compute_dtype(tgt))
    decisions = default_attention_decisions(shape)
    print(
        f"# {len(decisions)} forms of attention {shape}, target {tgt.name}, {a.device}, "
        f"torch threads {torch.get_num_threads()}; fit {fit}, held out {held}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # beside the JSON (a run cut short keeps every form it measured), else a scratch file
        path = Path(a.json).with_suffix(".cache.json") if a.json else Path(tmp) / "all.json"
        every = measure_attention(
            tgt.name, [shape], decisions, sorted({*fit, *held}), path, a.device,
            steps=a.steps, progress=False,
        )  # fmt: skip
        print(f"# measured in {time.perf_counter() - t0:.0f} s", flush=True)
        part = MeasuredCache(Path(tmp) / "fit.json")
        for k, s in every.entries.items():
            if k[2] in fit:
                part.entries[k] = s
    rows = []
    for d in decisions:
        meas = {
            c: every.get(MeasuredCache.attention_key(shape, 1, c, 1, dtype, d, tgt.name))
            for c in sorted({*fit, *held})
        }
        if any(v is None for v in meas.values()):
            continue
        row = {"form": d.short(), "measured_ms": {c: v * 1e3 for c, v in meas.items()}}
        for c in held:
            p, src = attention_latency(d, shape, tgt, "decode", c, 1, part)
            r = estimate_attention_latency(d, shape, tgt, "decode", c)
            row[f"fit/meas@{c}"] = p / meas[c]
            row[f"roof/meas@{c}"] = r / meas[c]
            row[f"src@{c}"] = src
        rows.append(row)
        ms = " ".join(f"{v:8.2f}" for v in row["measured_ms"].values())
        rat = " ".join(f"{row[f'fit/meas@{c}']:5.2f} {row[f'roof/meas@{c}']:5.2f}" for c in held)
        print(f"{d.short()[:58]:58s} {ms}   {rat}", flush=True)
    summary = {}
    for c in held:
        m = [r["measured_ms"][c] for r in rows]
        for kind in ("fit", "roof"):
            v = [r[f"{kind}/meas@{c}"] for r in rows]
            pred = [x * y for x, y in zip(v, m)]
            summary[f"{kind}@{c}"] = {
                "median_ratio": statistics.median(v),
                "min_ratio": min(v),
                "max_ratio": max(v),
                "spread": max(v) / min(v),
                "spearman": _spearman(pred, m),
            }
            s = summary[f"{kind}@{c}"]
            print(
                f"{kind:4s} @ {c:6d}: predicted / measured median {s['median_ratio']:.2f} "
                f"(range {s['min_ratio']:.2f}–{s['max_ratio']:.2f}, spread ×{s['spread']:.2f}); "
                f"rank agreement with the measured order {s['spearman']:.3f}"
            )
    if a.json:
        meta = {"shape": str(shape), "target": tgt.name, "fit": fit, "held": held,
                "summary": summary}  # fmt: skip
        dump(a.json, meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
