"""ONNX Runtime CPU latency and perplexity of SmolLM2-135M: dense vs slimfx vs ORT's own int4.

    .venv/bin/python benchmarks/ort_latency.py [--budgets 0.8,0.5,0.3] [--threads 2]
        [--windows 4] [--reps 5] [--decode-reps 30] [--past 256]
        [--families lowrank,int4,int8,int4_gptq] [--no-fisher]
        [--accuracy-level 0] [--out DIR] [--json out.json]

Variants, all exported from the same fp32 model and run side by side in one process:

- ``dense``: ``export_onnx`` of the unmodified model (MatMul on fp32 weights);
- ``slimfx b=<budget>``: ``slimfx.optimize(model, budget, families=…, backend="onnx",
  exclude=["lm_head"], fisher=True)`` on news calibration text (8 windows of 256 tokens),
  exported with ``export_onnx`` (low-rank → two MatMul, int4/int8 → MatMulNBits);
  ``backend="onnx"`` keeps 2:4 out (ORT would run it dense). The budget is a fraction of the
  16-bit bytes of the 210 transformer-block linears: ``lm_head`` shares its weight with the
  embedding, stays dense in every variant (the ORT quantizer cannot see it either: its weight
  reaches MatMul through a Transpose) and would make 0.3 infeasible (a compressed lm_head
  keeps a dense copy);
- ``ort int4 b<32|128>``: ONNX Runtime's ``MatMulNBitsQuantizer`` (RTN, asymmetric, 4 bits)
  applied to the dense ONNX file — the peer at about the same bytes as slimfx's lowest budget
  (int4 + a 16-bit scale + a 4-bit zero point per block: 4.63 bits/weight at block 32 = 0.29
  of 16-bit, 4.16 at block 128 = 0.26).

Measured per variant (ONNX Runtime CPU provider, all graph optimizations, ``--threads``
intra-op threads, sessions timed round-robin so machine noise hits all variants alike;
medians):

- ``prefill``: one forward of a (1, 256) input;
- ``decode``: one KV-cache decode step — a (1, 1) input after a 256-token cache — of the
  same graph: every variant is exported with ``kv_cache=True`` (``input_ids, past_key_i,
  past_value_i → logits, present_key_i, present_value_i``), so prefill is that graph with an
  empty cache and decode is a real per-token step reading the cache, as a deployment runs it;
- ``ppl``: perplexity on the first ``--windows`` held-out news windows of 256 tokens
  (``slimfx.eval.perplexity_of_logits_fn`` over the ORT session);
- ``MB``: the ONNX file on disk (fp32 floats; the tied embedding / lm_head stays dense).

Ratios ``×dense`` are dense time / variant time (> 1 is faster). A markdown table is printed;
``--json`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_sessions(
    sessions: dict, windows: torch.Tensor, past: int, reps: int, decode_reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Prefill and decode-step milliseconds per KV-cache session, timed round-robin so that
    drift and neighbours' load hit every variant alike: prefill = window 0 with an empty cache,
    decode = one token after ``past`` tokens of window 1 (window 2's first token)."""
    prefill_ids = windows[:1].numpy()
    ctx = windows[1:2, :past].numpy()
    one = windows[2:3, :1].numpy()  # any next token: timing only
    caches = {}
    for k, s in sessions.items():  # warm up (first runs allocate and pre-pack); fill caches
        s.step(prefill_ids)
        caches[k] = s.step(ctx)[1]
        s.step(one, caches[k])
    pre: dict[str, list[float]] = {k: [] for k in sessions}
    dec: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            pre[k].append(_median_ms(lambda s=s: s.step(prefill_ids), 1))
    for _ in range(decode_reps):
        for k, s in sessions.items():
            dec[k].append(_median_ms(lambda s=s, c=caches[k]: s.step(one, c), 1))
    return pre, dec


def _peer(dense_path: Path, out: Path, block: int, accuracy_level: int) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        onnx.load(str(dense_path)),
        block_size=block,
        is_symmetric=False,
        accuracy_level=accuracy_level or None,
    )
    q.process()
    q.model.save_model_to_file(str(out), False)
    return out


def _count(path: Path) -> dict[str, int]:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="0.8,0.5,0.3")
    p.add_argument("--families", default="lowrank,int4,int8,int4_gptq")
    p.add_argument("--no-fisher", action="store_true", help="unweighted solver errors")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=4, help="held-out windows for perplexity")
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="prefill repetitions per variant")
    p.add_argument("--decode-reps", type=int, default=30, help="decode-step repetitions")
    p.add_argument("--past", type=int, default=256, help="cache length before the decode step")
    p.add_argument("--accuracy-level", type=int, default=0, help="MatMulNBits accuracy_level")
    p.add_argument("--out", default="/tmp/slimfx_ort_latency", help="folder for the .onnx files")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import slimfx
    from slimfx.backends.onnx import export_onnx
    from slimfx.backends.ort import ort_session
    from slimfx.data.text import calibration_batches, heldout_windows
    from slimfx.eval.perplexity import perplexity_of_logits_fn
    from slimfx.models import load_smollm2

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_smollm2()
    calib = calibration_batches(tok, "lee", n=a.n_calib, seq_len=256)
    windows = heldout_windows(tok, "lee", n=max(a.windows, 3), seq_len=256)
    if not 1 <= a.past <= 256:
        raise SystemExit("--past must be in 1..256 (one held-out window)")
    example = (calib[0][:, :16],)

    paths: dict[str, Path] = {}
    info: dict[str, dict] = {}
    t0 = time.perf_counter()
    res = export_onnx(
        model, out / "dense.onnx", example, accuracy_level=a.accuracy_level, kv_cache=True
    )
    paths["dense"] = res.path
    info["dense"] = {"budget": 1.0, "bits": 16.0, "sites": "dense"}
    print(f"[{time.perf_counter() - t0:6.0f} s] dense exported", file=sys.stderr, flush=True)
    for b in [float(x) for x in a.budgets.split(",")]:
        new = slimfx.optimize(
            model,
            b,
            calibration=calib,
            families=tuple(a.families.split(",")),
            backend="onnx",
            exclude=["lm_head"],
            fisher=not a.no_fisher,
            progress=False,
        )
        rep = slimfx.report_of(new)
        name = f"slimfx b={b}"
        res = export_onnx(
            new,
            out / f"slimfx_{b}.onnx",
            example,
            accuracy_level=a.accuracy_level,
            kv_cache=True,
        )
        paths[name] = res.path
        kinds: dict[str, int] = {}
        for s in rep.sites:
            k = s.decision.get("kind", "dense")
            kinds[k] = kinds.get(k, 0) + 1
        info[name] = {
            "budget": rep.totals["bytes_ratio"],
            "bits": rep.totals["bits_per_weight"],
            "sites": ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
        }
        del new
        print(f"[{time.perf_counter() - t0:6.0f} s] {name} exported", file=sys.stderr, flush=True)
    for block in (32, 128):
        name = f"ort int4 b{block}"
        paths[name] = _peer(
            paths["dense"], out / f"ort_int4_b{block}.onnx", block, a.accuracy_level
        )
        bits = 4 + 16 / block + 4 / block
        info[name] = {"budget": round(bits / 16, 3), "bits": round(bits, 2), "sites": "MatMulNBits"}
    print(f"[{time.perf_counter() - t0:6.0f} s] peers quantized", file=sys.stderr, flush=True)
    del model

    sessions = {k: ort_session(v, threads=a.threads) for k, v in paths.items()}
    pre, dec = time_sessions(sessions, windows, a.past, a.reps, a.decode_reps)
    rows = []
    for k, s in sessions.items():
        ppl = perplexity_of_logits_fn(s, windows[: a.windows], batch_size=1, progress=False)
        rows.append(
            {
                "variant": k,
                **info[k],
                "file_mb": round(paths[k].stat().st_size / 1e6, 1),
                "prefill_ms": round(statistics.median(pre[k]), 1),
                "token_ms": round(statistics.median(dec[k]), 2),
                "ppl": round(ppl, 3),
                "ops": {o: c for o, c in _count(paths[k]).items() if "MatMul" in o},
            }
        )
    d = rows[0]
    lines = [
        f"SmolLM2-135M-Instruct (fp32 export), ONNX Runtime {_ort_version()} CPU provider, "
        f"{a.threads} threads, {platform.processor() or platform.machine()}, "
        f"{datetime.date.today().isoformat()}; perplexity on {a.windows}×256 held-out "
        f"news tokens; medians of {a.reps} prefill / {a.decode_reps} decode-step runs "
        f"(1 token after a {a.past}-token KV cache)",
        "",
        "| variant | bytes vs 16-bit | bits/w | file MB | prefill 1×256 ms | ×dense "
        "| decode ms/token | ×dense | ppl | MatMulNBits / MatMul | sites |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['budget']:.3f} | {r['bits']:.2f} | {r['file_mb']:.1f} "
            f"| {r['prefill_ms']:.1f} | {d['prefill_ms'] / r['prefill_ms']:.2f} "
            f"| {r['token_ms']:.2f} | {d['token_ms'] / r['token_ms']:.2f} | {r['ppl']:.3f} "
            f"| {r['ops'].get('MatMulNBits', 0)} / {r['ops'].get('MatMul', 0)} | {r['sites']} |"
        )
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
