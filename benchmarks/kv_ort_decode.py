"""ONNX Runtime one-token decode steps over the 1/8 latent cache: the step graph whose
low-rank layers absorb the value up-projection at one-token calls (an ``If`` on the call
length) vs the same graph with values rebuilt on every call, vs the 16-bit cache — exported from
one model, timed side by side in one process (alternating calls, median of the timed steps).

A SmolLM2-shaped Llama (hidden 576, 9 heads / 3 kv heads × 64, MLP 1536) with random weights
and ``--layers`` layers (a speed benchmark: only shapes matter), every layer's attention
rewritten to the default 1/8 latent ``latent k88 v136 int4 ch k48v72@int2 g64 s4`` (factors
fitted on random tokens). The prompt is prefilled in calls of 512 tokens, then ``--steps``
one-token calls are timed (the first two dropped). Also printed: the largest logit difference
between the two latent graphs (same function, another summation order). ``--int8-factors``
adds the absorbed graph of the same factors stored as int8 rows (``factor_bits=8``: the
down-projections, up-projections and the sinks' k/v projections dequantized in the graph).

    OMP_NUM_THREADS=1 python benchmarks/kv_ort_decode.py --contexts 2048 8192 16384 [--int8-factors]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, run_meta  # noqa: E402

FORM = dict(key_rank=88, value_rank=136, groups=1, method="whitened", bits=4, group=64,
            residual=0, sink=4, axis="channel", low_bits=2, key_low=48, value_low=72)  # fmt: skip


def _export(folder: Path, layers: int, int8_factors: bool = False) -> dict[str, Path]:
    """dense / rebuilt / absorbed (/ absorbed with int8 factors) step graphs of one random
    model."""
    import copy
    import dataclasses

    import torch

    from slimfx.backends.onnx_kv import export_onnx_kv
    from slimfx.forms.kv.calibrate import attention_grams, fit_site
    from slimfx.forms.kv.config import KVDenseConfig, KVLatentQuantConfig
    from slimfx.forms.kv.lowrank import LowRankKVAttention, apply_lowrank_kv
    from slimfx.ir.find import inspect_attention_sites
    from slimfx.models import tiny_llama

    cfg = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
               vocab_size=2048, num_hidden_layers=layers, max_position_embeddings=40000)  # fmt: skip
    paths = {"dense": folder / "dense.onnx"}
    export_onnx_kv(tiny_llama(seed=0, **cfg), paths["dense"], KVDenseConfig())
    form = KVLatentQuantConfig(**FORM)
    model = tiny_llama(seed=0, **cfg)
    sites, _ = inspect_attention_sites(model)
    g = torch.Generator().manual_seed(0)
    grams = attention_grams(model, sites, [torch.randint(0, 2048, (1, 128), generator=g)] * 4)
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], form) for s in sites}
    if int8_factors:
        f8, m8 = dataclasses.replace(form, factor_bits=8), copy.deepcopy(model)
        apply_lowrank_kv(m8, sites, {s.fqn: f8 for s in sites}, factors)
        paths["absorbed_f8"] = folder / "absorbed_f8.onnx"
        export_onnx_kv(m8, paths["absorbed_f8"], f8)
    apply_lowrank_kv(model, sites, {s.fqn: form for s in sites}, factors)
    for name, absorb in (("rebuilt", False), ("absorbed", True)):
        LowRankKVAttention.absorb_decode = absorb
        try:
            t = time.perf_counter()
            paths[name] = folder / f"{name}.onnx"
            export_onnx_kv(model, paths[name], form)
            print(f"exported {name} in {time.perf_counter() - t:.0f} s", flush=True)
        finally:
            LowRankKVAttention.absorb_decode = True
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--work", default="", help="folder for the exports (default: a temp dir)")
    ap.add_argument("--json", default="")
    ap.add_argument("--int8-factors", action="store_true", help="also the int8-factor graph")
    a = ap.parse_args(argv)
    import numpy as np
    import torch

    from slimfx.backends.onnx_kv_decoder import OrtKVDecoder

    folder = Path(a.work or tempfile.mkdtemp(prefix="kv_ort_decode_"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = _export(folder, a.layers, a.int8_factors)
    decs = {k: OrtKVDecoder(p, threads=1) for k, p in paths.items()}
    rows = []
    print("| context | dense ms/step | rebuilt | absorbed | absorbed / rebuilt | absorbed / dense "
          f"| max logit diff |{' absorbed, int8 factors |' if a.int8_factors else ''}")
    for C in a.contexts:
        ids = torch.randint(0, 2048, (1, C), generator=torch.Generator().manual_seed(C))
        last = {}
        for k, d in decs.items():
            d.reset(1)
            for c in ids.split(512, 1):
                last[k] = d.step(c)
        times: dict[str, list[float]] = {k: [] for k in decs}
        tok = torch.tensor([[7]])
        for _ in range(a.steps):
            for k, d in decs.items():  # alternating: the same machine state for each
                t = time.perf_counter()
                last[k] = d.step(tok)
                times[k].append(time.perf_counter() - t)
        ms = {k: 1e3 * float(np.median(v[2:])) for k, v in times.items()}
        diff = float(np.abs(last["rebuilt"] - last["absorbed"]).max())
        row = dict(context=C, **{f"ms_{k}": v for k, v in ms.items()}, max_logit_diff=diff)
        rows.append(row)
        f8 = (f" | {ms['absorbed_f8']:.1f} ({ms['absorbed_f8'] / ms['absorbed']:.2f}× absorbed)"
              if "absorbed_f8" in ms else "")  # fmt: skip
        print(f"| {C} | {ms['dense']:.1f} | {ms['rebuilt']:.1f} | {ms['absorbed']:.1f} | "
              f"{ms['absorbed'] / ms['rebuilt']:.2f} | {ms['absorbed'] / ms['dense']:.2f} | "
              f"{diff:.1e}{f8} |", flush=True)
        dump(a.json, run_meta(layers=a.layers, form=FORM), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
