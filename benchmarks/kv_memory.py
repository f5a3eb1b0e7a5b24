"""SmolLM2-135M at long context: peak memory and decode speed, compressed KV cache vs 16-bit.

Each configuration runs in a fresh subprocess (``--worker``) so its peak RSS (the kernel's
``VmHWM``) is its own: the model is loaded, then a prompt of ``context − new`` tokens of the
news corpus's held-out half (repeated if shorter) is prefilled **in chunks** of ``--chunk``
tokens and ``--new`` tokens are decoded greedily, batch 1, fp32 (ONNX Runtime's CPU provider
has no bfloat16 MatMul; the torch runs use fp32 too so both paths compare).

- ``torch dense``: ``model.generate(..., prefill_chunk_size=chunk)`` with the default
  ``DynamicCache``;
- ``torch <form>``: the same ``generate()`` with ``KVCache.for_model(model, form)`` (each
  chunk's call flushes the blocks that left the window, so the 16-bit window never holds more
  than ``residual + key_group + chunk`` tokens);
- ``torch-inplace <form>``: the same with ``use_fused_decode(model)`` — a quantized store is
  read in place at each decode step (on the CPU the torch op ``kv_decode_attention_folded``,
  its scales folded into the two products) instead of dequantized by ``update``;
- ``compiled dense`` / ``compiled <form>`` / ``compiled-inplace <form>`` (not in the default
  list; the first decode step compiles, the median ignores it): ``generate()`` over a static
  cache of ``context`` tokens — transformers' ``StaticCache`` for dense, ``StaticKVCache`` for a
  form — with the decode steps compiled by ``generate`` itself (``CompileConfig(mode="default")``,
  allowed on the CPU); the prompt is prefilled in one eager call (``generate`` would compile a
  chunked prefill too). ``compiled-inplace`` adds ``use_fused_decode``: the static layers' steps
  read the tokens written so far, the store in place (an opaque op in the compiled graph),
  instead of dequantizing the whole preallocated store;
- ``ort dense`` / ``ort <form>``: ``slimfx.backends.onnx_kv``'s step graph (exported once per
  form in a separate process before the runs) driven by ``OrtKVDecoder``: the prompt in calls
  of ``chunk`` tokens, then one token a call; the store stays uint8/float16 between steps.

The ``latent …`` form (the default 1/8-of-the-cache candidate: a whitened low-rank latent,
int4 with its smallest channels at int2, per channel in blocks of 64 tokens, 4 sink tokens)
first rewrites every attention layer (``apply_lowrank_kv``, factors fitted on 16 × 256 tokens
of the news corpus's first half by a ``fit`` worker before the runs and read from the work
folder by the torch worker and the export, so no row's memory includes the fit); its cache
rebuilds K/V from the whole latent at every step, on both paths.

Reported per run: peak RSS, RSS after loading the model (torch) or opening the session (ORT),
their difference (what prefill + decode added), the bytes of the cache arrays after the run,
prefill seconds and decode ms/token (median over the decode steps; torch: time between
consecutive logits-processor calls of ``generate``).

With ``--parity``, for each ``ort <form>`` configuration instead: torch (the same form's
``KVCache``) and ONNX Runtime side by side on a 150-token prompt in calls of 64 tokens and 20
greedy steps — the largest |logit difference| over every call and whether the greedy tokens
agree (fp32 both; a quantized store can differ by one code step where ORT's projections differ
from torch's in the last float32 bit).

    python benchmarks/kv_memory.py [--contexts 8192] [--new 16] [--chunk 512] [--threads 1]
        [--work DIR] [--json f] [--parity]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMS = {
    "int8 gk32 gv64 s4": dict(key_bits=8, value_bits=8, key_group=32, value_group=64, sink=4),
    "int4 gk32 gv64 s4": dict(key_bits=4, value_bits=4, key_group=32, value_group=64, sink=4),
    "int2 gk32 gv32 r32 s4": dict(
        key_bits=2, value_bits=2, key_group=32, value_group=32, residual=32, sink=4
    ),
}
#: asked for by name only (not in the default list)
INT8 = "int8 gk32 gv64 s4"
#: the default 1/8 latent of ``forms.kv.candidates.LATENTS`` on SmolLM2's kv width 192
LATENT = "latent k88 v136 int4 ch k48v72@int2 g64 s4"
CONFIGS = [
    "torch dense",
    *(f"torch {n}" for n in FORMS if n != INT8),
    *(f"torch-inplace {n}" for n in FORMS if n != INT8),
    f"torch {LATENT}",
    "ort dense",
    *(f"ort {n}" for n in FORMS if n != INT8),
    f"ort {LATENT}",
]


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _form(name: str):  # noqa: ANN202
    from slimfx.forms.kv.config import KVDenseConfig, KVLatentQuantConfig, KVQuantConfig

    if name == LATENT:
        return KVLatentQuantConfig(88, 136, 1, "whitened", 4, 64, 0, 4, "channel", 2, 48, 72)
    return KVDenseConfig() if name == "dense" else KVQuantConfig(**FORMS[name])


def _factors_path(work: Path) -> Path:
    return work / "latent_factors.pt"


def _fit(work: Path) -> None:
    """Worker: fit the latent form's factors of every SmolLM2 attention layer (16 × 256
    tokens of the news corpus's first half) into ``work``."""
    import torch

    from slimfx.data.text import calibration_batches
    from slimfx.forms.kv.calibrate import attention_grams, fit_site
    from slimfx.ir.find import inspect_attention_sites
    from slimfx.models import load_smollm2

    model, tok = load_smollm2()
    sites, _ = inspect_attention_sites(model)
    grams = attention_grams(model, sites, calibration_batches(tok, name="news", n=16, seq_len=256))
    cfg = _form(LATENT)
    torch.save({s.fqn: fit_site(model, s, grams[s.fqn], cfg) for s in sites}, _factors_path(work))


def _load(form: str, work: Path):  # noqa: ANN202
    """SmolLM2 (fp32) and its tokenizer; for the latent form, every attention layer rewritten
    to rebuild K/V from the latent (the ``fit`` worker's factors)."""
    from slimfx.models import load_smollm2

    model, tok = load_smollm2()
    if form == LATENT:
        import torch

        from slimfx.forms.kv.lowrank import apply_lowrank_kv
        from slimfx.ir.find import inspect_attention_sites

        sites, _ = inspect_attention_sites(model)
        factors = torch.load(_factors_path(work))
        apply_lowrank_kv(model, sites, {s.fqn: _form(form) for s in sites}, factors)
    return model, tok


def _prompt(tok, n: int):  # noqa: ANN001, ANN202
    import torch

    from slimfx.data.text import corpus_tokens, split_tokens

    _, held = split_tokens(corpus_tokens(tok, "news"))
    reps = -(-n // held.numel())
    return torch.cat([held] * reps)[:n].unsqueeze(0)


def _onnx_path(work: Path, form: str) -> Path:
    return work / (form.replace(" ", "_") + ".onnx")


def _export(work: Path, form: str) -> None:
    """Worker: export the SmolLM2 step graph of ``form`` (all layers) into ``work``."""
    from slimfx.backends.onnx_kv import export_onnx_kv

    model, _ = _load(form, work)
    export_onnx_kv(model, _onnx_path(work, form), _form(form))


def _torch_run(
    work: Path, form: str, context: int, new: int, chunk: int, inplace: bool = False,
    compiled: bool = False,
) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.cache_utils import DynamicCache

    from slimfx.forms.kv.cache import KVCache

    model, tok = _load(form, work)
    ids = _prompt(tok, context - new)
    rss_loaded = _status("VmRSS")
    stamps: list[float] = []

    class _Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):  # noqa: ANN001, ANN204
            stamps.append(time.perf_counter())
            return scores

    cache = DynamicCache() if form == "dense" else KVCache.for_model(model, _form(form))
    extra: dict = dict(prefill_chunk_size=chunk)
    if compiled:
        from transformers import CompileConfig
        from transformers.cache_utils import StaticCache

        from slimfx.forms.kv.static_cache import StaticKVCache

        n = model.config.num_hidden_layers
        cache = (StaticCache(config=model.config, max_cache_len=context) if form == "dense"
                 else StaticKVCache([_form(form)] * n, context))  # fmt: skip
        cc = CompileConfig(mode="default", dynamic=False)
        cc._compile_all_devices = True  # transformers compiles on accelerators only otherwise
        extra = dict(compile_config=cc)
    if inplace:
        from slimfx.forms.kv.fused import use_fused_decode

        use_fused_decode(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            past_key_values=cache,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            logits_processor=LogitsProcessorList([_Clock()]),
            **extra,
        )
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    if hasattr(cache, "nbytes"):
        nbytes = cache.nbytes()
    else:  # 16-bit layers; a static quantized layer's ring, sinks and preallocated store
        nbytes = sum(
            t.nbytes
            for la in cache.layers
            for t in (la.keys, la.values, getattr(la, "sink_keys", None),
                      getattr(la, "sink_values", None), *getattr(la, "store", {}).values())
            if t is not None
        )  # fmt: skip
    paths = {getattr(la.self_attn, "last_decode_path", "") for la in model.model.layers}
    return {
        "decode_path": ",".join(sorted(p for p in paths if p))
        or ("sdpa" if form == "dense" else "sdpa over the store dequantized by update"),
        "rss_loaded": rss_loaded,
        "prefill_s": stamps[0] - t0,
        "decode_ms": 1e3 * statistics.median(steps),
        "cache_bytes": nbytes,
    }


def _ort_run(work: Path, form: str, context: int, new: int, chunk: int, threads: int) -> dict:
    import numpy as np

    from slimfx.backends.onnx_kv_decoder import OrtKVDecoder
    from slimfx.models import load_smollm2

    _, tok = load_smollm2()
    ids = _prompt(tok, context - new).numpy()
    dec = OrtKVDecoder(_onnx_path(work, form), threads=threads)
    rss_loaded = _status("VmRSS")
    t0 = time.perf_counter()
    for a in range(0, ids.shape[1], chunk):
        logits = dec.step(ids[:, a : a + chunk])
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(new - 1):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        t = time.perf_counter()
        logits = dec.step(nxt)
        steps.append(time.perf_counter() - t)
    return {
        "rss_loaded": rss_loaded,
        "prefill_s": prefill,
        "decode_ms": 1e3 * statistics.median(steps),
        "cache_bytes": dec.cache_nbytes(),
    }


def _parity(work: Path, form: str) -> dict:
    import numpy as np
    import torch

    from slimfx.backends.onnx_kv_decoder import OrtKVDecoder
    from slimfx.forms.kv.cache import KVCache

    model, tok = _load(form, work)
    ids = _prompt(tok, 150)
    dec = OrtKVDecoder(_onnx_path(work, form), threads=1)
    cache = KVCache.for_model(model, _form(form))
    worst, same = 0.0, True

    def call(c: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        nonlocal worst
        ref = model(input_ids=c, past_key_values=cache, use_cache=True).logits
        got = dec.step(c)
        worst = max(worst, float(np.abs(got - ref.numpy()).max()))
        return ref, got

    with torch.no_grad():
        for c in ids.split(64, dim=1):
            ref, got = call(c)
        for _ in range(20):
            nxt = ref[:, -1:].argmax(-1)
            same &= int(nxt) == int(got[0, -1].argmax())
            ref, got = call(nxt)
    return {"max_abs_logit_diff": worst, "max_abs_logit": float(ref.abs().max()),
            "greedy_equal": same}  # fmt: skip


def _worker(a: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(a.threads)
    backend, form = a.worker.split(" ", 1)
    if backend == "fit":
        _fit(Path(a.work))
        return 0
    if backend == "export":
        _export(Path(a.work), form)
        return 0
    if backend == "parity":
        row = _parity(Path(a.work), form)
    elif backend in ("torch", "torch-inplace", "compiled", "compiled-inplace"):
        inplace, compiled = backend.endswith("-inplace"), backend.startswith("compiled")
        row = _torch_run(Path(a.work), form, a.context, a.new, a.chunk, inplace, compiled)
    else:
        row = _ort_run(Path(a.work), form, a.context, a.new, a.chunk, a.threads)
    row.update(config=a.worker, context=a.context, peak_rss=_status("VmHWM"))
    print("RESULT " + json.dumps(row), flush=True)
    return 0


def _spawn(a: argparse.Namespace, worker: str, context: int) -> dict | None:
    cmd = [
        sys.executable, __file__, "--worker", worker, "--context", str(context),
        "--new", str(a.new), "--chunk", str(a.chunk), "--threads", str(a.threads),
        "--work", a.work,
    ]  # fmt: skip
    root = str(Path(__file__).resolve().parents[1])  # this checkout's slimfx first
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=path)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        print(f"{worker} @ {context}: failed\n{p.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192])
    ap.add_argument("--context", type=int, default=8192, help=argparse.SUPPRESS)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--work", default="", help="folder for the ONNX exports (default: a temp dir)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="")
    ap.add_argument("--parity", action="store_true", help="torch vs ORT logits (module doc)")
    a = ap.parse_args()
    if a.worker:
        return _worker(a)
    a.work = a.work or tempfile.mkdtemp(prefix="kv_memory_")
    if any(c.endswith(LATENT) for c in a.configs) and not _factors_path(Path(a.work)).exists():
        _spawn(a, f"fit {LATENT}", 0)
    for c in a.configs:
        backend, form = c.split(" ", 1)
        if backend == "ort" and not _onnx_path(Path(a.work), form).exists():
            t = time.perf_counter()
            _spawn(a, f"export {form}", 0)
            print(f"exported {form} in {time.perf_counter() - t:.0f} s", flush=True)
    if a.parity:
        print("| form | max abs logit diff | max abs logit | greedy tokens equal |")
        for c in a.configs:
            backend, form = c.split(" ", 1)
            if backend == "ort" and form != "dense":
                r = _spawn(a, f"parity {form}", 0)
                if r is not None:
                    print(f"| {form} | {r['max_abs_logit_diff']:.3g} | "
                          f"{r['max_abs_logit']:.1f} | {r['greedy_equal']} |", flush=True)  # fmt: skip
        return 0
    rows = []
    print("| config | context | peak RSS | after load | added | cache arrays | prefill | "
          "decode | decode path |", flush=True)  # fmt: skip
    for context in a.contexts:
        for c in a.configs:
            r = _spawn(a, c, context)
            if r is None:
                continue
            rows.append(r)
            mib = 2**20
            print(
                f"| {c} | {context} | {r['peak_rss'] / mib:.0f} MiB | "
                f"{r['rss_loaded'] / mib:.0f} MiB | "
                f"{(r['peak_rss'] - r['rss_loaded']) / mib:.0f} MiB | "
                f"{r['cache_bytes'] / mib:.1f} MiB | {r['prefill_s']:.1f} s | "
                f"{r['decode_ms']:.0f} ms | {r.get('decode_path', 'ORT graph')} |",
                flush=True,
            )
            if a.json:
                Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
