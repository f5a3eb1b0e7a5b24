"""SmolLM2-135M converted to MLA and written as a DeepSeek-V3 checkpoint: transformers' own
``DeepseekV3ForCausalLM`` loads it (``AutoModelForCausalLM.from_pretrained``) and computes the
converted model's logits.

For each MLA config (every block converted, calibration as ``mla_quality.py``):

- ``slimfx.forms.mla.deepseek.export_deepseek_v3`` into a temporary directory (its own parity
  check on random ids, then the files);
- the checkpoint loaded back with ``from_pretrained``: held-out perplexity of both models, the
  largest |Δ logits| over the held-out windows, and greedy ``generate()`` of both — the converted
  model with ``MLALatentCache``, the DeepSeek model with transformers' own cache (which holds the
  latent and the RoPE key) — from held-out prompts;
- the cache values per token and layer in each format, the checkpoint's size, and what
  serving engines would read differently (``engine_notes``).

    OMP_NUM_THREADS=1 python benchmarks/mla_deepseek.py [--configs 0,1] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from _common import chosen

from slimfx.data.text import calibration_batches, heldout_windows
from slimfx.eval.perplexity import perplexity
from slimfx.forms.mla.cache import MLALatentCache
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import capture_attention_inputs, convert_model
from slimfx.forms.mla.deepseek import export_deepseek_v3
from slimfx.models import load_smollm2

#: label → (config, export_deepseek_v3 keywords)
CONFIGS = {
    "1/2 16-bit r144 8p (pca)": (MLAConfig(rank=144, rope_pairs=8), {}),
    "1/2 16-bit r144 8p (whitened: no bias)": (
        MLAConfig(rank=144, rope_pairs=8, method="whitened"), {}),
    "int8 r262 10p, exported at 16 bits": (
        MLAConfig(rank=262, rope_pairs=10, latent_bits=8), {"drop_latent_rounding": True}),
    # every frequency's first component (K·p = 33 ≥ 32 frequencies)
    "1/2 16-bit r128 per_frequency all 32 (pca)": (
        MLAConfig(rank=128, rope_pairs=11, rope_select="per_frequency"), {}),
    "1/2 16-bit r128 per_frequency all 32 (whitened), rms_norm_eps 1e-6": (
        MLAConfig(rank=128, rope_pairs=11, rope_select="per_frequency", method="whitened"),
        {"rms_norm_eps": 1e-6, "rtol": 0.05}),
    # the first components of the 18 fastest frequencies (K·p = 3·6): plain RoPE, base θ^(18/32)
    "1/2 16-bit r156 per_frequency 18 (pca)": (
        MLAConfig(rank=156, rope_pairs=6, rope_select="per_frequency"), {}),
    "1/2 16-bit r156 per_frequency 18 (whitened/attention), rms_norm_eps 1e-6: engine-ready": (
        MLAConfig(rank=156, rope_pairs=6, rope_select="per_frequency", method="whitened",
                  objective="attention"),
        {"rms_norm_eps": 1e-6, "rtol": 0.05, "untie_head": True}),
    # one choice of RoPE entries for all layers: the checkpoint's RoPE key is not padded
    "1/2 16-bit r144 8p shared (pca)": (
        MLAConfig(rank=144, rope_pairs=8, rope_share=True), {}),
    "1/2 16-bit r132 10p shared (pca)": (
        MLAConfig(rank=132, rope_pairs=10, rope_share=True), {}),
}


@torch.no_grad()
def compare(model, ds, held: torch.Tensor, prompts: torch.Tensor, steps: int) -> dict:
    diff = scale = 0.0
    for w in held:
        a = model(w[None], use_cache=False).logits
        b = ds(w[None], use_cache=False).logits
        diff, scale = max(diff, float((a - b).abs().max())), max(scale, float(a.abs().max()))
    n = model.config.num_hidden_layers
    same = tokens = 0
    for p in prompts:  # generation stops early at an end-of-text token
        t1 = model.generate(p[None], max_new_tokens=steps, do_sample=False,
                            past_key_values=MLALatentCache(n))
        t2 = ds.generate(p[None], max_new_tokens=steps, do_sample=False)
        same += int(torch.equal(t1, t2))
        tokens += t1.shape[1] - p.numel()
    return dict(max_abs_logit_diff=diff, logit_scale=scale, greedy_sequences_equal=same,
                greedy_sequences=len(prompts), greedy_tokens=tokens,
                ppl_converted=perplexity(model, held, progress=False),
                ppl_deepseek=perplexity(ds, held, progress=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--configs", default="", help="indices into CONFIGS (default: all)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    labels = chosen(CONFIGS, a.configs)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    calib = calibration_batches(tok, n=a.n_calib, seq_len=a.seq_len)
    held = heldout_windows(tok, n=a.n_eval, seq_len=a.seq_len)
    prompts = held[:4, :48]
    dense = perplexity(model, held, progress=False)
    print(f"dense perplexity {dense:.3f}", flush=True)
    layers = model.model.layers
    inputs = capture_attention_inputs(model, calib, range(len(layers)))
    originals = [blk.self_attn for blk in layers]
    work = Path(tempfile.mkdtemp(prefix="mla_deepseek_"))
    rows = []
    for label in labels:
        cfg, kw = CONFIGS[label]
        try:
            convert_model(model, cfg, calib, inputs=inputs)
            t = time.time()
            info = export_deepseek_v3(model, work / "ds", overwrite=True, **kw)
            export_s = time.time() - t
            ds = AutoModelForCausalLM.from_pretrained(work / "ds").eval()
            for blk in layers:  # DeepSeek's cache holds the latent at 16 bits
                blk.self_attn.latent_bits = 16
            row = dict(label=label, config=cfg.to_dict(), export_kwargs=kw, export_s=export_s,
                       deepseek_class=type(ds).__name__,
                       file_mb=(work / "ds" / "model.safetensors").stat().st_size / 1e6,
                       export=info.to_dict())
            row.update(compare(model, ds, held, prompts, a.steps))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
            del ds
        finally:
            for blk, attn in zip(layers, originals):
                blk.self_attn = attn
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} CPU",
                n_calib=a.n_calib, n_eval=a.n_eval, seq_len=a.seq_len, dense_ppl=dense,
                transformers=__import__("transformers").__version__)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
