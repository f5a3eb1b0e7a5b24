"""One decode step (cache update + attention) of one layer over a *static* KV cache — what a
``torch.compile``'d ``generate`` runs — eager and compiled with inductor, side by side:

- ``dense``: transformers' ``StaticLayer`` (16-bit K/V of ``max_cache_len`` tokens) + SDPA under
  the static mask;
- ``plain <form>``: ``StaticQuantizedKVLayer.update`` (the whole preallocated store
  dequantized, full-length K/V gathered) + SDPA under the static mask;
- ``in place <form>``: the same layer in fused mode (``use_fused_decode``'s path): the token
  written, then ``decode_attention`` — the opaque op ``kv_decode_attention_static`` reads the
  tokens written so far, the store in place;
- ``dynamic dense``: ``DynamicLayer`` + SDPA over the tokens so far (transformers' default
  eager cache), for reference.

The layer is filled to ``context`` tokens with ``max_cache_len = context + --room``; every timed
call writes one more token. SmolLM2's attention by default (9 query heads, 3 kv heads,
head_dim 64), float32, random K/V. The in-place step is checked against the plain one first.
Times: medians of ``--reps`` calls, the variants interleaved; compiled with
``torch.compile(fullgraph=True, dynamic=False)`` (inductor), compile time excluded.

    OMP_NUM_THREADS=1 python benchmarks/kv_static_step.py [--contexts 1024,8192]
        [--forms int4,int8] [--room 512] [--no-compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, run_meta  # noqa: E402

#: name → (key bits, value bits, key group, value group, residual, sink): the default candidates'
FORMS = {
    "int8": (8, 8, 32, 64, 32, 4),
    "int4": (4, 4, 32, 64, 32, 4),
    "k4v2": (4, 2, 32, 32, 32, 4),
    "int2": (2, 2, 32, 32, 32, 4),
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,8192")
    ap.add_argument("--forms", default="int4,int8")
    ap.add_argument("--heads", default="9,3,64", help="query heads, kv heads, head_dim")
    ap.add_argument("--room", type=int, default=512, help="max_cache_len − context")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument("--json", default="")
    return ap.parse_args(argv)


def _steps(ctx: int, forms: list[str], heads: tuple[int, int, int], room: int):  # noqa: ANN202
    """name → step function (new q, k, v → attention output) over a layer holding ``ctx``
    tokens; the plain / in-place pair of each form share one filled layer (copied)."""
    import torch
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicLayer, StaticLayer

    from slimfx.forms.kv.config import KVQuantConfig
    from slimfx.forms.kv.static_cache import StaticQuantizedKVLayer

    Hq, H, D = heads
    M, scale = ctx + room, D**-0.5
    g = torch.Generator().manual_seed(ctx)
    k0, v0 = (torch.randn(1, H, ctx, D, generator=g) for _ in range(2))

    def sdpa_over(layer, full: bool):  # noqa: ANN001, ANN202
        def step(q, k, v):  # noqa: ANN001, ANN202
            K, V = layer.update(k, v)
            mask = None
            if full:  # the static mask: the tokens written so far
                n = layer.cumulative_length if hasattr(layer, "cumulative_length") else None
                mask = (torch.arange(M) < n).view(1, 1, 1, M)
            return F.scaled_dot_product_attention(
                q, K, V, attn_mask=mask, scale=scale, enable_gqa=True
            )

        return step

    def in_place(layer):  # noqa: ANN001, ANN202
        layer.fused_decode = True

        def step(q, k, v):  # noqa: ANN001, ANN202
            layer.update(k, v)
            mask = (torch.arange(M) < layer.cumulative_length).view(1, 1, 1, M)
            return layer.decode_attention(q, scale, mask=mask).unsqueeze(2)

        return step

    dense = StaticLayer(M)
    dense.update(k0, v0)
    dyn = DynamicLayer()
    dyn.update(k0.clone(), v0.clone())
    out = {"dense": sdpa_over(dense, True), "dynamic dense": sdpa_over(dyn, False)}
    for f in forms:
        cfg = KVQuantConfig(*FORMS[f])
        layer = StaticQuantizedKVLayer(cfg, M)
        layer.update(k0, v0)
        out[f"plain {f}"] = sdpa_over(copy.deepcopy(layer), True)
        out[f"in place {f}"] = in_place(layer)
    return out


def _check(steps: dict, forms: list[str], heads: tuple[int, int, int]) -> float:
    """The in-place step against the plain one on the same token (both layers advance)."""
    import torch

    Hq, H, D = heads
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, Hq, 1, D, generator=g), *(torch.randn(1, H, 1, D, generator=g) for _ in range(2))
    err = 0.0
    for f in forms:
        a, b = steps[f"plain {f}"](q, k, v), steps[f"in place {f}"](q, k, v)
        err = max(err, float((a - b).abs().max() / a.abs().max()))
    if err > 1e-4:
        raise SystemExit(f"in-place step off the plain one ({err})")
    return err


def _time(fns: dict, heads: tuple[int, int, int], reps: int) -> dict[str, float]:
    import torch

    Hq, H, D = heads
    g = torch.Generator().manual_seed(2)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(reps):
            q, k, v = torch.randn(1, Hq, 1, D, generator=g), *(torch.randn(1, H, 1, D, generator=g) for _ in range(2))
            for name, f in fns.items():
                t0 = time.perf_counter()
                f(q, k, v)
                times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    import torch

    a = _args(argv)
    torch.set_num_threads(a.threads)
    heads = tuple(int(x) for x in a.heads.split(","))
    forms = [f for f in a.forms.split(",") if f]
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise SystemExit(f"unknown forms {unknown}; known: {sorted(FORMS)}")
    rows = []
    print("| context | max_cache_len | variant | eager ms | ×dense eager | compiled ms | "
          "×dense compiled | compile s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for ctx in (int(c) for c in a.contexts.split(",")):
        with torch.no_grad():
            steps = _steps(ctx, forms, heads, a.room)
            err = _check(steps, forms, heads)
            compiled, compile_s = {}, {}
            if not a.no_compile:
                for name, f in steps.items():
                    if name == "dynamic dense":  # its shapes grow every step
                        continue
                    torch._dynamo.reset()
                    c = torch.compile(f, fullgraph=True, dynamic=False)
                    t0 = time.perf_counter()
                    Hq, H, D = heads
                    c(torch.randn(1, Hq, 1, D), torch.randn(1, H, 1, D), torch.randn(1, H, 1, D))
                    compile_s[name] = time.perf_counter() - t0
                    compiled[name] = c
        eager = _time(steps, heads, a.reps)
        comp = _time(compiled, heads, a.reps) if compiled else {}
        for name, ms in eager.items():
            c = comp.get(name)
            row = dict(
                context=ctx, max_cache_len=ctx + a.room, variant=name, eager_ms=ms,
                compiled_ms=c, compile_s=compile_s.get(name), rel_err=err,
            )  # fmt: skip
            rows.append(row)
            cs = (f"{c:.2f} | {c / comp['dense']:.2f} | {compile_s[name]:.0f}"
                  if c is not None else "— | — | —")  # fmt: skip
            print(f"| {ctx} | {ctx + a.room} | {name} | {ms:.2f} | {ms / eager['dense']:.2f} "
                  f"| {cs} |", flush=True)  # fmt: skip
    if a.json:
        dump(a.json, run_meta(threads=a.threads, heads=a.heads, room=a.room), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
