"""How long ``export_onnx_kv`` takes on SmolLM2 with a low-rank (latent) KV cache, exported
as before (each low-rank layer's one-token choice a ``torch.cond``, the fake-tensor cache on,
the exporter's optimizer with all its rewrite rules) vs now (``onnx_kv.step_tracing``: both
paths traced as plain code and picked by ``slimfx::one_token_or``, made an ONNX ``If`` after
the export, the fake-tensor cache off; ``onnx_graph.linear_time_rewrites``: the optimizer
without its rules of several output nodes, whose matching is quadratic in the graph's size) —
and that the two graphs compute the same logits in ONNX Runtime.

SmolLM2-135M (real weights, fp32), every attention layer rewritten to the 1/8 latent ``latent
k88 v136 int4 ch k48v72@int2 g64 s4`` with factors fitted on 8 × 256 tokens of the news corpus
(once, in this process); ``--layers`` keeps the first N decoder layers (default: all 30). The
two exports run **at the same time** in two worker processes of one thread each (the timings
share the machine's state; on a machine with fewer than two free cores they slow each other
alike). Each worker prints its wall time split into tracing the step (``torch.export``), its
ONNX translation (decompositions, translation, optimizer, save) and the flush graph. Then both
step graphs decode the same 40-token prompt and 8 greedy one-token steps in ONNX Runtime:
largest |logit difference| and whether the tokens agree, and the ``If`` nodes of each.

    python benchmarks/onnx_export_time.py [--layers 30] [--work DIR] [--json f]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, run_meta  # noqa: E402
from kv_ort_decode import FORM  # noqa: E402  (the 1/8 latent)

MODES = ("before", "now")


def _model(work: Path, layers: int):  # noqa: ANN202
    """SmolLM2 cut to ``layers`` decoder layers, its attention rewritten to the latent form
    with the factors saved in ``work`` (fitted there first when missing)."""
    import torch

    from slimfx.forms.kv.config import KVLatentQuantConfig
    from slimfx.forms.kv.lowrank import apply_lowrank_kv
    from slimfx.ir.find import inspect_attention_sites
    from slimfx.models import load_smollm2

    model, tok = load_smollm2()
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    form = KVLatentQuantConfig(**FORM)
    sites, _ = inspect_attention_sites(model)
    path = work / f"factors_{layers}.pt"
    if not path.exists():
        from slimfx.data.text import calibration_batches
        from slimfx.forms.kv.calibrate import attention_grams, fit_site

        batches = calibration_batches(tok, name="news", n=8, seq_len=256)
        grams = attention_grams(model, sites, batches)
        torch.save({s.fqn: fit_site(model, s, grams[s.fqn], form) for s in sites}, path)
    apply_lowrank_kv(model, sites, {s.fqn: form for s in sites}, torch.load(path))
    return model, tok, form


def _worker(mode: str, work: Path, layers: int) -> dict:
    """Export in ``mode``; the phases' wall seconds."""
    import torch

    from slimfx.backends import onnx_kv

    torch.set_num_threads(1)
    model, _, form = _model(work, layers)
    if mode == "before":  # torch.cond, fake-tensor cache on, every rewrite rule
        onnx_kv.step_tracing = contextlib.nullcontext
        onnx_kv.linear_time_rewrites = contextlib.nullcontext
    spans: dict[str, list[float]] = {"trace": [], "onnx": []}

    def timed(key: str, fn):  # noqa: ANN001, ANN202
        def run(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans[key].append(time.perf_counter() - t)

        return run

    torch.export.export = timed("trace", torch.export.export)
    onnx_kv._to_onnx = timed("onnx", onnx_kv._to_onnx)
    t = time.perf_counter()
    onnx_kv.export_onnx_kv(model, work / f"{mode}.onnx", form)
    total = time.perf_counter() - t
    # the step graph is traced and translated first, the flush graph after it
    return dict(mode=mode, total_s=total, trace_step_s=spans["trace"][0],
                onnx_step_s=spans["onnx"][0],
                flush_s=sum(spans["trace"][1:]) + sum(spans["onnx"][1:]))  # fmt: skip


def _decode(work: Path, layers: int) -> dict:
    """Both graphs over the same prompt and greedy steps: logits apart, tokens, If nodes."""
    import numpy as np
    import onnx
    import torch

    from slimfx.backends.onnx_kv_decoder import OrtKVDecoder
    from slimfx.data.text import corpus_tokens, split_tokens
    from slimfx.models import load_smollm2

    _, tok = load_smollm2()
    _, held = split_tokens(corpus_tokens(tok, "news"))
    prompt = held[:40].unsqueeze(0)
    out: dict = {}
    for mode in MODES:
        dec = OrtKVDecoder(work / f"{mode}.onnx", threads=1)
        dec.reset(1)
        logits, ids, toks = [dec.step(prompt)], prompt, []
        for _ in range(8):
            nxt = torch.tensor([[int(np.argmax(logits[-1][0, -1]))]])
            toks.append(int(nxt))
            logits.append(dec.step(nxt))
            ids = torch.cat([ids, nxt], 1)
        g = onnx.load(str(work / f"{mode}.onnx"), load_external_data=False).graph
        out[mode] = dict(logits=logits, tokens=toks, ifs=sum(n.op_type == "If" for n in g.node))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(out["before"]["logits"],
                                                         out["now"]["logits"]))  # fmt: skip
    return dict(max_logit_diff=diff, tokens_equal=out["before"]["tokens"] == out["now"]["tokens"],
                if_nodes={m: out[m]["ifs"] for m in MODES})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--work", default="", help="folder for factors and graphs (default: temp)")
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="onnx_export_time_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.worker:
        print("RESULT " + json.dumps(_worker(a.worker, work, a.layers)), flush=True)
        return 0
    _model(work, a.layers)  # the factors, fitted once before the timed workers
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {
        m: subprocess.Popen(
            [sys.executable, __file__, "--worker", m, "--layers", str(a.layers), "--work",
             str(work)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for m in MODES
    }  # fmt: skip
    rows = []
    for m, p in procs.items():
        out, err = p.communicate()
        if p.returncode:
            print(f"{m}: failed\n{err[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]))
    check = _decode(work, a.layers)
    print(f"SmolLM2, {a.layers} layers, latent KV on every layer; the two exports side by side")
    print("| step graph traced | total s | trace step s | ONNX step s | flush graph s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['total_s']:.0f} | {r['trace_step_s']:.0f} | "
              f"{r['onnx_step_s']:.0f} | {r['flush_s']:.0f} |")  # fmt: skip
    b, n = rows
    print(f"now / before: total {n['total_s'] / b['total_s']:.2f}x, trace "
          f"{n['trace_step_s'] / b['trace_step_s']:.2f}x, ONNX "
          f"{n['onnx_step_s'] / b['onnx_step_s']:.2f}x")
    print(f"ONNX Runtime, 40-token prompt + 8 greedy steps: max |logit diff| "
          f"{check['max_logit_diff']:.1e}, tokens equal {check['tokens_equal']}, If nodes "
          f"{check['if_nodes']}")
    dump(a.json, run_meta(layers=a.layers, form=FORM), [*rows, check])
    return 0


if __name__ == "__main__":
    sys.exit(main())
