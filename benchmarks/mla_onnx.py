"""SmolLM2-135M converted to MLA, exported to ONNX with its latent cache: parity with torch and
ONNX Runtime decode latency against the dense model's KV-cache export.

For each MLA config (every block converted, calibration as ``mla_quality.py``):

- export ``slimfx.backends.onnx_mla.export_mla_onnx`` (decode step, latent cache in/out);
- parity: a held-out prompt, ORT prefill + greedy decode through its own cache; torch
  (``MLALatentCache``) fed the same tokens; max |Δ logits| over every step, and whether
  ``generate()`` in torch gives the same greedy tokens;
- latency: median ms per ORT decode step after a prefill of ``context`` tokens (batch 1), the
  cache bytes per token as the graph stores them (fp32 model: floats take 4 bytes).

The dense row is ``slimfx.backends.onnx.export_onnx(model, ..., kv_cache=True)``.

    OMP_NUM_THREADS=1 python benchmarks/mla_onnx.py [--contexts 256,1024] [--steps 32]
        [--threads 1] [--configs 1,2] [--json out.json]

``--configs``: which of ``CONFIGS`` to run (0-based indices; default all); the dense row always
runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import chosen

from slimfx.backends.onnx import export_onnx
from slimfx.backends.onnx_mla import export_mla_onnx, latent_ort_session
from slimfx.backends.ort import ort_session
from slimfx.data.text import calibration_batches, heldout_windows
from slimfx.forms.mla.cache import MLALatentCache
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import capture_attention_inputs, convert_model
from slimfx.models import load_smollm2

CONFIGS = {
    "1/2 16-bit r144 8p": MLAConfig(rank=144, rope_pairs=8),
    "1/2 int8 r262 10p": MLAConfig(rank=262, rope_pairs=10, latent_bits=8),
    "1/2 int8 r262 10p, int8 factors": MLAConfig(
        rank=262, rope_pairs=10, latent_bits=8, factor_bits=8
    ),
}


def decode_ms(sess, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill ms, median ms per decode step) of greedy decoding through ``sess``."""
    t = time.perf_counter()
    logits, past = sess.step(prompt)
    prefill = (time.perf_counter() - t) * 1e3
    times = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        t = time.perf_counter()
        logits, past = sess.step(nxt, past)
        times.append((time.perf_counter() - t) * 1e3)
    return prefill, statistics.median(times)


def parity(model, sess, prompt: torch.Tensor, steps: int, latent_bits: int) -> dict:
    """Max |Δ logits| ORT vs torch over a prefill and ``steps`` decode steps (torch fed ORT's
    tokens), the logits' scale, and whether torch's greedy ``generate()`` gives ORT's tokens."""
    logits, past = sess.step(prompt)
    ort_logits, toks = [logits[:, -1]], []
    for i in range(steps):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        toks.append(nxt)
        if i + 1 < steps:
            logits, past = sess.step(nxt, past)
            ort_logits.append(logits[:, -1])
    ort_tokens = torch.from_numpy(np.concatenate(toks, 1))
    cache = MLALatentCache(model.config.num_hidden_layers, latent_bits=latent_bits)
    with torch.no_grad():
        ref = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in ort_tokens.T[:-1]:
            ref.append(model(t[:, None], past_key_values=cache, use_cache=True).logits[:, -1])
        hf = model.generate(prompt, max_new_tokens=steps, do_sample=False,
                            past_key_values=MLALatentCache(model.config.num_hidden_layers,
                                                           latent_bits=latent_bits))
    ref_t = torch.stack(ref)
    diff = (torch.from_numpy(np.stack(ort_logits)) - ref_t).abs().max().item()
    same = int((hf[:, prompt.shape[1]:] == ort_tokens).sum())
    return dict(max_abs_logit_diff=diff, logit_scale=ref_t.abs().max().item(),
                greedy_tokens_equal=same, greedy_tokens=steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="256,1024")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--configs", default="", help="indices into CONFIGS (default: all)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    labels = chosen(CONFIGS, a.configs)
    contexts = [int(c) for c in a.contexts.split(",")]
    torch.manual_seed(0)
    model, tok = load_smollm2()
    calib = calibration_batches(tok, n=a.n_calib, seq_len=256)
    windows = heldout_windows(tok, n=1, seq_len=max(contexts))
    prompts = {c: windows[:1, :c] for c in contexts}
    work = Path(tempfile.mkdtemp(prefix="mla_onnx_"))
    rows = []

    t = time.time()
    res = export_onnx(model, work / "dense.onnx", (prompts[contexts[0]][:, :8],), kv_cache=True)
    sess = ort_session(res.path, threads=a.threads)
    row = dict(label="dense (export_onnx kv_cache)", export_s=time.time() - t,
               file_mb=res.file_bytes / 1e6, cache_bytes_per_token=30 * 2 * 3 * 64 * 4)
    for c in contexts:
        row[f"prefill_ms_{c}"], row[f"decode_ms_{c}"] = decode_ms(sess, prompts[c], a.steps)
    rows.append(row)
    print(row, flush=True)
    del sess

    inputs = capture_attention_inputs(model, calib, range(len(model.model.layers)))
    originals = [blk.self_attn for blk in model.model.layers]
    for label in labels:
        cfg = CONFIGS[label]
        try:
            convert_model(model, cfg, calib, inputs=inputs)
            t = time.time()
            res = export_mla_onnx(model, work / "mla.onnx", prompts[contexts[0]][:, :8])
            row = dict(label=label, config=cfg.to_dict(), export_s=time.time() - t,
                       file_mb=res.file_bytes / 1e6,
                       cache_bytes_per_token=res.cache_bytes_per_token)
            sess = latent_ort_session(res.path, threads=a.threads)
            row.update(parity(model, sess, prompts[contexts[0]], a.steps, cfg.latent_bits))
            for c in contexts:
                row[f"prefill_ms_{c}"], row[f"decode_ms_{c}"] = decode_ms(sess, prompts[c], a.steps)
            rows.append(row)
            print(row, flush=True)
            del sess
        finally:
            for blk, attn in zip(model.model.layers, originals):
                blk.self_attn = attn
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} CPU",
                threads=a.threads, steps=a.steps, contexts=contexts, n_calib=a.n_calib,
                onnxruntime=__import__("onnxruntime").__version__)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
