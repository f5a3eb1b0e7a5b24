"""Latency budgets on ONNX Runtime CPU: the roofline's plan vs the plan from measured ORT times.

    .venv/bin/python benchmarks/ort_measured.py [--latency-budgets 0.8,0.6] [--threads 2]
        [--accuracy-level 0] [--cache /tmp/slimfx_ort_cache.json] [--windows 4]
        [--reps 5] [--decode-reps 30] [--out DIR] [--json out.json]

SmolLM2-135M-Instruct, fp32, exported with ``kv_cache=True`` and run by ONNX Runtime's CPU
provider. The question: when a user asks for ``Budget(latency=L)`` with ``backend="onnx"``,
does the model come back faster by the factor slimfx predicted?

1. **calibrate**: ``slimfx.calibrate_target("ort-cpu", backend="onnx")`` times every form the
   default families offer (dense, low-rank ladder, int8 / int4 MatMulNBits layouts) for the
   four transformer-block shapes, as one-linear ONNX exports in ONNX Runtime (weights spread
   over 64 MiB of copies so caches do not flatter them). Reused when ``--cache`` already holds
   them.
2. **plan once**: ``slimfx.api.plan_model`` (Fisher-weighted errors, families lowrank, int8,
   int4, int4_gptq, ``backend="onnx"``, ``exclude=["lm_head"]``: the tied head stays dense)
   builds the candidates; their latencies are the roofline's. ``slimfx.cost.candidates.reprice``
   prices the same options from the cache. Each budget is solved on both problems.
3. **measure**: each plan is applied with the one set of calibration Grams, exported, and run
   side by side with the dense export (sessions timed round-robin; medians): decode = one
   KV-cache step after a 256-token cache, prefill = one (1, 256) forward, perplexity on held-out
   news windows.

Columns: ``roofline says`` / ``cache says`` — the plan's summed linear latency as a fraction
of dense under each price list (the budget binds the one it was solved with); ``decode ×dense``
— measured whole-model speed-up (attention, norms and the dense lm_head are included, so it is
diluted relative to the linears alone).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_latency import _ort_version, time_sessions  # noqa: E402

#: SmolLM2-135M's transformer-block linear shapes (in, out): q/o, k/v, gate/up, down
BLOCK_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def linear_ratio(problem, decisions) -> float:  # noqa: ANN001
    """Summed latency of the chosen options / summed dense latency, under ``problem``'s prices."""
    num = den = 0.0
    for so in problem.sites:
        num += so.options[so.index_of(decisions[so.name])].latency_s
        den += so.dense_latency_s
    return num / den


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency-budgets", default="0.8,0.6")
    p.add_argument("--families", default="lowrank,int8,int4,int4_gptq")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accuracy-level", type=int, default=0)
    p.add_argument("--cache", default="/tmp/slimfx_ort_cache.json")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-reps", type=int, default=30)
    p.add_argument("--out", default="/tmp/slimfx_ort_measured")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import slimfx
    from slimfx import api
    from slimfx.backends.onnx import export_onnx
    from slimfx.backends.ort import ort_session
    from slimfx.cost.candidates import reprice
    from slimfx.cost.target import MeasuredCache
    from slimfx.data.text import calibration_batches, heldout_windows
    from slimfx.eval.perplexity import perplexity_of_logits_fn
    from slimfx.models import load_smollm2
    from slimfx.passes.swap import apply_plan
    from slimfx.planning.problem import Budget
    from slimfx.planning.solve import solve

    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    target = "ort-cpu"

    # ---- 1. calibrate (or reuse)
    cache = MeasuredCache(a.cache)
    have = {(k[2], k[3]) for k in cache.entries if k[6] == target}
    todo = [s for s in BLOCK_SHAPES if s not in have]
    if todo:
        cache = slimfx.calibrate_target(
            target, out=a.cache, backend="onnx", shapes=todo, threads=a.threads,
            accuracy_level=a.accuracy_level, progress=False,
        )
    levels = {cache.info.get(k, {}).get("accuracy_level") for k in cache.entries}
    if levels != {a.accuracy_level}:
        raise SystemExit(f"{a.cache} holds accuracy levels {levels}, asked {a.accuracy_level}")
    log(f"cache: {cache.describe(target)}", t0)

    # ---- 2. plan once, price twice
    model, tok = load_smollm2()
    calib = calibration_batches(tok, "lee", n=a.n_calib, seq_len=256)
    windows = heldout_windows(tok, "lee", n=max(a.windows, 3), seq_len=256)
    budgets = [float(x) for x in a.latency_budgets.split(",")]
    pl = api.plan_model(
        model, Budget(latency=budgets[0]), calibration=calib, target=target, backend="onnx",
        families=tuple(a.families.split(",")), exclude=["lm_head"], fisher=True,
        progress=False,
    )
    roof = pl.problem
    meas = reprice(roof, pl.sites, target=target, cache=cache)
    log(f"planned: {len(pl.sites)} sites; measured prices {meas.meta['latency_sources']}", t0)
    grams = pl.grams()

    plans: dict[str, dict] = {}
    for L in budgets:
        for name, prob in (("roofline", roof), ("measured", meas)):
            sol = solve(prob, Budget(latency=L))
            dec = {s.name: sol.decision(s.name) for s in prob.sites}
            picks = Counter(d.kind if d.kind != "quant" else f"int{d.bits}" for d in dec.values())
            plans[f"lat={L} {name}"] = {
                "decisions": dec,
                "budget": L,
                "priced_by": name,
                "roofline_says": linear_ratio(roof, dec),
                "cache_says": linear_ratio(meas, dec),
                "bytes": sum(
                    so.options[so.index_of(dec[so.name])].bytes for so in prob.sites
                ) / prob.dense_bytes,
                "picks": ", ".join(f"{k} {v}" for k, v in sorted(picks.items())),
            }

    # ---- 3. apply, export, time
    example = (calib[0][:, :16],)
    paths = {"dense": export_onnx(model, out / "dense.onnx", example, kv_cache=True,
                                  accuracy_level=a.accuracy_level).path}
    for name, info in plans.items():
        plan = slimfx.Plan(info["decisions"], {s.fqn: s.shape for s in pl.sites})
        new, _ = apply_plan(model, plan, pl.sites, grams, inplace=False, strict=True,
                            progress=False)
        fname = name.replace("=", "").replace(" ", "_") + ".onnx"
        paths[name] = export_onnx(new, out / fname, example, kv_cache=True,
                                  accuracy_level=a.accuracy_level).path
        del new
        log(f"{name} exported ({info['picks']})", t0)
    del model

    sessions = {k: ort_session(v, threads=a.threads) for k, v in paths.items()}
    pre, dec_ms = time_sessions(sessions, windows, 256, a.reps, a.decode_reps)
    rows = []
    for k, s in sessions.items():
        ppl = perplexity_of_logits_fn(s, windows[: a.windows], batch_size=1, progress=False)
        info = plans.get(k, {"budget": 1.0, "priced_by": "-", "roofline_says": 1.0,
                             "cache_says": 1.0, "bytes": 1.0, "picks": "dense"})
        rows.append({
            "variant": k,
            **{f: info[f] for f in ("budget", "priced_by", "roofline_says", "cache_says",
                                    "bytes", "picks")},
            "prefill_ms": statistics.median(pre[k]),
            "token_ms": statistics.median(dec_ms[k]),
            "ppl": ppl,
        })
    d = rows[0]
    lines = [
        f"SmolLM2-135M-Instruct (fp32), ONNX Runtime {_ort_version()} CPU provider, "
        f"accuracy_level {a.accuracy_level}, {a.threads} threads, "
        f"{platform.processor() or platform.machine()}, {datetime.date.today().isoformat()}; "
        f"cache: {cache.describe(target)}; ppl on {a.windows}×256 held-out news tokens; "
        f"medians of {a.reps} prefill / {a.decode_reps} decode-step runs",
        "",
        "| variant | priced by | roofline says | cache says | bytes vs 16-bit | decode ms/token "
        "| decode ×dense | prefill ms | prefill ×dense | ppl | forms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['priced_by']} | {r['roofline_says']:.3f} "
            f"| {r['cache_says']:.3f} | {r['bytes']:.3f} | {r['token_ms']:.2f} "
            f"| {d['token_ms'] / r['token_ms']:.2f} | {r['prefill_ms']:.1f} "
            f"| {d['prefill_ms'] / r['prefill_ms']:.2f} | {r['ppl']:.3f} | {r['picks']} |"
        )
    print("\n".join(lines))
    log("done", t0)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
