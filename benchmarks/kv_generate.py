"""SmolLM2-135M ``generate()`` with the KV caches: greedy tokens vs dense, cache bytes, time.

A prompt of ``--prompt`` tokens of the news corpus's held-out half, ``--new`` greedy tokens,
batch 1, fp32 on the CPU. For each cache: the tokens (equal to the ``DynamicCache`` run or the
index of the first difference), the bytes of the tensors the cache holds afterwards (exact
``nbytes``), prefill seconds and
decode milliseconds per token (bf16 by default, so 16-bit entries take 2 bytes as in the
configs' pricing; the low-rank factors are fitted in fp32 first). The torch caches dequantize their whole store every step (the
fused Triton kernel is the GPU path), so their decode is expected to be slower than dense.

    python benchmarks/kv_generate.py [--prompt 1024] [--new 32] [--dtype bfloat16] [--json f]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers.cache_utils import DynamicCache

from slimfx.data.text import calibration_batches, corpus_tokens, split_tokens
from slimfx.forms.kv.cache import KVCache
from slimfx.forms.kv.calibrate import attention_grams, fit_site
from slimfx.forms.kv.config import KVLowRankConfig, KVQuantConfig
from slimfx.forms.kv.lowrank import apply_lowrank_kv
from slimfx.ir.find import inspect_attention_sites
from slimfx.models import load_smollm2


def _run(model, ids, make_cache, new):  # noqa: ANN001, ANN202
    """``generate`` of 1 token (the prefill) and of ``new`` tokens, each on a fresh cache;
    decode time per token = the difference over ``new − 1`` steps."""
    kw = {"do_sample": False}
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, past_key_values=make_cache(), max_new_tokens=1, **kw)
        prefill = time.perf_counter() - t0
        cache = make_cache()
        t0 = time.perf_counter()
        out = model.generate(
            ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, **kw
        )
        total = time.perf_counter() - t0
    decode_ms = 1e3 * (total - prefill) / max(1, new - 1)
    return out, cache, prefill, decode_ms


def _nbytes(cache) -> int:  # noqa: ANN001
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(la.keys.numel() * la.keys.element_size() * 2 for la in cache.layers)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (16-bit: bytes as priced)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2()
    model = model.to(getattr(torch, a.dtype)).eval()
    _, held = split_tokens(corpus_tokens(tok, "news"))
    ids = held[: a.prompt].unsqueeze(0)
    rows = []
    forms = {
        "int8 gk32 gv64": KVQuantConfig(8, 8, 32, 64, 0),
        "int4 gk32 gv64 s4": KVQuantConfig(4, 4, 32, 64, 0, sink=4),
        "k4v2 gk32 gv32 r32 s4": KVQuantConfig(4, 2, 32, 32, 32, sink=4),
        "int2 gk32 gv32 r32 s4": KVQuantConfig(2, 2, 32, 32, 32, sink=4),
    }
    dense, dcache, pre, dec = _run(model, ids, DynamicCache, a.new)
    rows.append(
        {
            "cache": "DynamicCache (dense)",
            "bytes": _nbytes(dcache),
            "prefill_s": pre,
            "decode_ms": dec,
            "first_diff": None,
        }
    )
    for name, form in forms.items():
        out, cache, pre, dec = _run(model, ids, lambda f=form: KVCache.for_model(model, f), a.new)
        rows.append(
            {
                "cache": name,
                "bytes": _nbytes(cache),
                "prefill_s": pre,
                "decode_ms": dec,
                "first_diff": _first_diff(out, dense, a.prompt),
            }
        )
    # the low-rank rewrite (fit on 16 calibration windows), one sink token
    lr = KVLowRankConfig(64, 128, 1, "whitened", sink=1)
    sites, _ = inspect_attention_sites(model)
    dtype = next(model.parameters()).dtype
    model.float()
    grams = attention_grams(model, sites, calibration_batches(tok, name="news", n=16))
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], lr) for s in sites}
    apply_lowrank_kv(model, sites, {s.fqn: lr for s in sites}, factors)
    model.to(dtype)
    out, cache, pre, dec = _run(model, ids, lambda: KVCache.for_model(model, lr), a.new)
    rows.append(
        {
            "cache": "lowrank k64 v128 whitened s1",
            "bytes": _nbytes(cache),
            "prefill_s": pre,
            "decode_ms": dec,
            "first_diff": _first_diff(out, dense, a.prompt),
        }
    )
    for r in rows:
        same = "equal" if r["first_diff"] is None else f"differs from token {r['first_diff']}"
        print(
            f"| {r['cache']} | {r['bytes'] / 2**20:.2f} MiB | {r['prefill_s']:.2f} s | "
            f"{r['decode_ms']:.0f} ms | {same} |",
            flush=True,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"prompt": a.prompt, "new": a.new, "rows": rows}, f, indent=1)
    return 0


def _first_diff(out: torch.Tensor, ref: torch.Tensor, prompt: int) -> int | None:
    """Index (among the generated tokens) of the first one that differs; None if all equal."""
    diff = (out[0, prompt:] != ref[0, prompt:]).nonzero()
    return None if diff.numel() == 0 else int(diff[0])


if __name__ == "__main__":
    sys.exit(main())
