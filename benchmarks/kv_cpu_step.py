"""One decode-attention step over a quantized KV cache on the CPU: the store read in place
(``kv_decode_attention_folded``, what ``use_fused_decode`` runs on the CPU) vs the plain path
(the store dequantized, then SDPA — what ``QuantizedKVLayer.update`` + transformers' sdpa do)
vs SDPA over a dense float32 cache of the same length, side by side in one run.

Per form (KIVI widths with the default groups), context and batch: one query token per sequence,
SmolLM2's attention by default (9 query heads, 3 kv heads, head_dim 64), random codes and
float16 scales/minimums, a 16-bit window of ``--window`` tokens. The folded op is checked against
the reference first. Times are medians of ``--reps`` calls (wall clock, ``--threads`` intra-op
threads). Ratios: each path's step over the dense step measured in the same loop.

    OMP_NUM_THREADS=1 python benchmarks/kv_cpu_step.py [--contexts 1024,4096,8192,16384]
        [--batches 1,4] [--heads 9,3,64] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, run_meta  # noqa: E402

#: (name, key bits, value bits, key group, value group): the widths of the default candidates
FORMS = [
    ("int8 gk32 gv64", 8, 8, 32, 64),
    ("int4 gk32 gv64", 4, 4, 32, 64),
    ("k4v2 gk32 gv32", 4, 2, 32, 32),
    ("int2 gk32 gv32", 2, 2, 32, 32),
]


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,4096,8192,16384")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--heads", default="9,3,64", help="query heads, kv heads, head_dim")
    ap.add_argument("--window", type=int, default=8, help="16-bit tokens besides the store")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default="")
    return ap.parse_args(argv)


def _store(B, H, D, n, kb, vb, kg, vg, g):  # noqa: ANN001, ANN202
    import torch

    def codes(bits: int) -> torch.Tensor:
        return torch.randint(0, 256, (B, H, n, D * bits // 8), dtype=torch.uint8, generator=g)

    def f16(*shape: int, lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) * (hi - lo) + lo).half()

    return [
        codes(kb), f16(B, H, n // kg, D, lo=0.01, hi=0.2), f16(B, H, n // kg, D, lo=-1.5, hi=-0.5),
        codes(vb), f16(B, H, n, D // vg, lo=0.01, hi=0.2), f16(B, H, n, D // vg, lo=-1.5, hi=-0.5),
    ]  # fmt: skip


def _row(form: tuple, ctx: int, B: int, heads: tuple[int, int, int], a: argparse.Namespace):  # noqa: ANN201
    """Median ms of the three paths for one form / context / batch, and the in-place step's
    relative error against the reference."""
    import torch
    import torch.nn.functional as F

    from slimfx.kernels.kv_attention.folded import kv_decode_attention_folded
    from slimfx.kernels.kv_attention.reference import (
        dequantize_store,
        kv_decode_attention_reference,
    )

    name, kb, vb, kg, vg = form
    Hq, H, D = heads
    scale = D**-0.5
    g = torch.Generator().manual_seed(ctx + B)
    n = (ctx - a.window) // kg * kg
    store = _store(B, H, D, n, kb, vb, kg, vg, g)
    kw, vw = (torch.randn(B, H, ctx - n, D, generator=g) for _ in range(2))
    q = torch.randn(B, Hq, D, generator=g)
    kd, vd = (torch.randn(B, H, ctx, D, generator=g) for _ in range(2))
    consts = (kb, vb, kg, vg, scale)
    ref = kv_decode_attention_reference(q, *store, kw, vw, *consts)
    got = kv_decode_attention_folded(q, *store, kw, vw, *consts)
    err = float((got - ref).abs().max() / ref.abs().max())
    if err > 1e-4:
        raise SystemExit(f"{name} @ {ctx}: in-place step off the reference ({err})")

    def dense() -> None:
        F.scaled_dot_product_attention(q[:, :, None], kd, vd, scale=scale, enable_gqa=True)

    def plain() -> None:
        k, v = dequantize_store(*store, kb, vb, kg, vg)
        k, v = torch.cat([k, kw], 2), torch.cat([v, vw], 2)
        F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)

    def in_place() -> None:
        kv_decode_attention_folded(q, *store, kw, vw, *consts)

    fns = {"dense": dense, "plain": plain, "in_place": in_place}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(a.reps):  # interleaved: the three see the same machine state
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return dict(form=name, context=ctx, batch=B, ms=ms, rel_err=err)


def main(argv: list[str] | None = None) -> int:
    import torch

    a = _args(argv)
    torch.set_num_threads(a.threads)
    heads = tuple(int(x) for x in a.heads.split(","))
    rows = []
    print("| form | context | batch | dense SDPA | plain (dequantize + SDPA) | in place | "
          "plain / dense | in place / dense | in place / plain |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for ctx in (int(c) for c in a.contexts.split(",")):
        for B in (int(b) for b in a.batches.split(",")):
            for form in FORMS:
                if heads[2] % form[4]:
                    print(f"{form[0]}: value group {form[4]} does not divide head_dim {heads[2]}")
                    continue
                r = _row(form, ctx, B, heads, a)
                rows.append(r)
                ms = r["ms"]
                print(
                    f"| {r['form']} | {ctx} | {B} | {ms['dense']:.2f} ms | {ms['plain']:.2f} ms "
                    f"| {ms['in_place']:.2f} ms | {ms['plain'] / ms['dense']:.2f} | "
                    f"{ms['in_place'] / ms['dense']:.2f} | {ms['in_place'] / ms['plain']:.2f} |",
                    flush=True,
                )
    if a.json:
        dump(a.json, run_meta(threads=a.threads, heads=a.heads), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
