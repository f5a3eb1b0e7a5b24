"""Attention steps at batches not measured, priced from the measured ones vs measured.

``slimfx.cost.measure_attention`` times a few KV-cache forms of one attention shape (SmolLM2's
by default) at one context and batches 1, 2, 4, 8; then ``cost.attention_price.attention_latency``
prices each check batch from a subset of the others only (linear between two measured
batches, along the two largest beyond them, else the nearest scaled by the roofline's batch
ratio) and the roofline prices it alone. Printed: price / measured for each.

    OMP_NUM_THREADS=1 python benchmarks/attention_batches.py [--context 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, run_meta  # noqa: E402

#: (batch priced, batches it is priced from)
CHECKS = [(2, (1, 4)), (8, (1, 4)), (4, (1,)), (8, (1,))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--shape", default="smollm2", help="HIDDEN:HEADS:KV_HEADS:HEAD_DIM")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    from slimfx.cost.measure_attention import parse_attention_shapes
    from slimfx.forms.kv.config import KVDenseConfig, KVLowRankConfig, KVQuantConfig

    shape = parse_attention_shapes(a.shape)[0]
    forms = [
        KVDenseConfig(),
        KVQuantConfig(4, 4, 32, 64, 0, 4),
        KVQuantConfig(2, 2, 32, 32, 0, 4),
        KVLowRankConfig(64, 128, 1, "whitened", 4),
    ]
    forms = [f for f in forms if f.check(shape) is None]
    batches = sorted({b for b, have in CHECKS for b in (b, *have)})
    with tempfile.TemporaryDirectory(prefix="attention_batches_") as d:
        return _run(a, shape, forms, batches, Path(d))


def _run(a, shape, forms, batches, work: Path) -> int:  # noqa: ANN001
    from slimfx.cost.attention_price import attention_latency
    from slimfx.cost.measure_attention import measure_attention
    from slimfx.cost.target import MeasuredCache, estimate_attention_latency

    cache = measure_attention(
        "cpu", [shape], forms, (a.context,), work / "m.json", batches=batches, steps=a.steps,
        progress=False,
    )  # fmt: skip

    def subset(keep: tuple[int, ...]) -> MeasuredCache:
        c = MeasuredCache(work / "subset.json")
        c.entries = {k: v for k, v in cache.entries.items() if k[3] in keep}
        return c

    rows = []
    print("| form | measured " + " / ".join(f"b{b}" for b in batches) + " | "
          + " | ".join(f"b{b} from {set(h)}" for b, h in CHECKS) + " | roofline alone |")  # fmt: skip
    for d in forms:
        meas = {
            b: cache.entries[
                cache.key(*MeasuredCache.attention_key(shape, 1, a.context, b, "torch.float32", d, "cpu"))
            ]
            for b in batches
        }  # fmt: skip
        priced = {}
        for b, have in CHECKS:
            s, src = attention_latency(d, shape, "cpu", "decode", a.context, b, subset(have))
            priced[f"b{b} from {have}"] = (s / meas[b], src)
        roof = {b: estimate_attention_latency(d, shape, "cpu", "decode", a.context, b) / meas[b]
                for b in batches}  # fmt: skip
        rows.append(dict(form=d.short(), measured_s=meas, priced=priced, roofline=roof))
        print(
            f"| {d.short()} | " + " / ".join(f"{meas[b] * 1e3:.2f}" for b in batches) + " ms | "
            + " | ".join(f"{r:.2f} ({src})" for r, src in priced.values()) + " | "
            + " / ".join(f"{roof[b]:.2f}" for b in batches) + " |",
            flush=True,
        )  # fmt: skip
    dump(a.json, run_meta(context=a.context, shape=a.shape), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
