"""GQA → MLA (latent attention) on SmolLM2-135M, training-free: perplexity vs KV bytes per token.

Every attention block (30 layers, 9 heads, 3 kv heads, head_dim 64, hidden 576) is converted with
one uniform ``MLAConfig``; the dense 16-bit cache holds 2·3·64 = 384 values per token per layer.
A config's share of the cache = (rank + 3·2·rope_pairs) / 384 (16-bit latent). Variants:

  svd            weight-only SVD of the norm-balanced [W_k,nope; W_v] (MHA2MLA-style baseline)
  whitened/kv    SVD of [W_k,nope; W_v]·L, L Lᵀ = E[x xᵀ]; keys and values norm-balanced
  pca/kv         principal components of the (centered) key/value outputs, norm-balanced
  pca/attention  the same, key error weighted by the group's query Gram, value error by o_proj
  +ls            up-projections refitted by least squares on the inputs the converted model
                 gives (layers converted in order)
  rope <p>p <s>  p RoPE pairs per kv head (K·p entries), scored by s (norm, norm_freq,
                 norm_attn, high_freq); "+mix": RoRoPE-style mixing; "+fold": rope_fold
  full rank      latent rank = 3·(64 − 2p) + 192: only the partial-RoPE change, no compression

Calibration: windows from the first half of the news corpus; held-out perplexity on windows of
the second half (as ``lowrank_quality.py``).

    OMP_NUM_THREADS=1 python benchmarks/mla_quality.py [--n-calib 16] [--n-eval 16]
        [--seq-len 256] [--preset fits|rope|rope_more|int8_final|ls|quick]
        [--rope-select norm_freq] [--rope-mix pca] [--rope-fold] [--json out.json]

Presets: ``rope``/``rope_more`` partial-RoPE handling at full rank; ``fits`` latent fits at 1/2
and 1/4 of the cache; ``int8_final`` int8 latent at equal bytes; ``ls`` sequential refinement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from slimfx.data.text import calibration_batches, heldout_windows
from slimfx.eval.perplexity import perplexity
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import capture_attention_inputs, convert_model, describe_block
from slimfx.models import load_smollm2

KV_VALUES = 384  # 2 · 3 kv heads · 64 dims


def configs(preset: str, rope: dict) -> list[tuple[str, MLAConfig]]:
    """(label, config) pairs of a preset: ``rope`` (RoPE handling at full rank: the partial-RoPE
    change alone, 4 pairs per kv head), ``fits`` (latent fits at 1/2 and 1/4 of the cache with
    the RoPE handling ``rope``), ``ls`` (the sequential least-squares refinements, after two
    quick extras)."""
    fits = {
        "svd (weight-only)": dict(method="svd", objective="kv"),
        "svd + ls": dict(method="svd", objective="kv", refine=True),
        "whitened/kv": dict(method="whitened", objective="kv"),
        "pca/kv": dict(method="pca", objective="kv"),
        "pca/attention": dict(method="pca", objective="attention"),
        "whitened/attention": dict(method="whitened", objective="attention"),
        "pca/attention + ls": dict(method="pca", objective="attention", refine=True),
        "pca/kv + ls": dict(method="pca", objective="kv", refine=True),
    }
    out: list[tuple[str, MLAConfig]] = []

    def tag(r: dict) -> str:
        return r["rope_select"] + (" +mix" if r.get("rope_mix") == "pca" else "") + (
            " +fold" if r.get("rope_fold") else "")

    def fit(share: float, p: int, label: str, r: dict = rope, bits: int = 16) -> None:
        rank = round(share * KV_VALUES) - 3 * 2 * p if bits == 16 else round(
            share * 2 * KV_VALUES) - 2 - 2 * 3 * 2 * p
        q = " int8" if bits == 8 else ""
        out.append((f"{share:g} {label}{q} rope {p}p {tag(r)}",
                    MLAConfig(rank=rank, rope_pairs=p, latent_bits=bits, **r, **fits[label])))

    def full(p: int, **r: object) -> None:
        rr = {"rope_select": "norm", **r}
        out.append((f"full rank, rope {p}p {tag(rr)}",
                    MLAConfig(rank=min(3 * (64 - 2 * p) + 192, 576), rope_pairs=p,
                              method="pca", objective="kv", **rr)))

    plain = dict(rope_select="norm")
    if preset == "rope":
        full(4, rope_select="norm")
        full(4, rope_select="norm_freq")
        full(4, rope_select="high_freq")
        full(4, rope_select="norm_attn")
        full(4, rope_select="norm_attn", rope_fold=True)
        full(4, rope_select="norm_attn", rope_fold=True, rope_mix="pca")
        full(4, rope_select="norm", rope_mix="pca")
        full(8, rope_select="norm_attn", rope_fold=True, rope_mix="pca")
    elif preset == "rope_more":
        for p in (4, 8, 16):
            full(p, rope_select="norm_freq", rope_mix="pca")
            full(p, rope_select="norm_attn", rope_mix="pca")
        full(8, rope_select="norm_freq")
    elif preset == "fits":
        fit(0.5, 4, "svd (weight-only)", plain)
        for label in ("pca/attention", "pca/kv", "whitened/kv", "whitened/attention",
                      "svd (weight-only)"):
            fit(0.5, 8, label)
        fit(0.5, 4, "pca/attention")
        fit(0.5, 16, "pca/attention")
        fit(0.25, 2, "svd (weight-only)", plain)
        for p in (2, 4, 8):
            fit(0.25, p, "pca/attention")
        fit(0.25, 4, "pca/attention", bits=8)
    elif preset == "int8":  # int8 latent at 1/2 and 1/4 of the cache
        attn_mix = dict(rope_select="norm_attn", rope_mix="pca")
        fit(0.5, 8, "pca/kv", attn_mix, bits=8)
        fit(0.5, 10, "pca/kv", bits=8)
        fit(0.5, 10, "pca/kv", attn_mix, bits=8)
        fit(0.5, 12, "pca/kv", bits=8)
        fit(0.25, 4, "pca/kv", bits=8)
        fit(0.25, 6, "pca/kv", bits=8)
    elif preset == "int8_final":  # the int8 rows, latent rounded in the forward
        fit(0.5, 10, "pca/kv", bits=8)
        fit(0.25, 6, "pca/kv", bits=8)
        fit(0.5, 8, "pca/kv", bits=8)
        fit(0.5, 12, "pca/kv", bits=8)
        fit(0.25, 4, "pca/kv", bits=8)
    elif preset == "ls":
        fit(0.25, 4, "pca/kv")  # (not sequential: quick extras first)
        fit(0.5, 8, "pca/kv", bits=8)
        fit(0.5, 8, "pca/kv + ls")
        fit(0.5, 8, "svd + ls")
    else:
        fit(0.5, 4, "svd (weight-only)", plain)
        fit(0.5, 4, "pca/attention")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--corpus", default="lee")
    ap.add_argument("--preset", default="fits", choices=("fits", "rope", "rope_more", "int8", "int8_final", "ls", "quick"))
    ap.add_argument("--rope-select", default="norm_freq", help="RoPE entry score for the fits")
    ap.add_argument("--rope-mix", default="pca", help="none | pca (RoRoPE-style) for the fits")
    ap.add_argument("--rope-fold", action="store_true", help="fits with rope_fold")
    ap.add_argument("--only", default="", help="comma-separated substrings of labels to run")
    ap.add_argument("--skip", type=int, default=0, help="skip the preset's first N configs")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_smollm2()
    model.eval()
    calib = calibration_batches(tok, name=a.corpus, n=a.n_calib, seq_len=a.seq_len)
    held = heldout_windows(tok, name=a.corpus, n=a.n_eval, seq_len=a.seq_len)
    dense = perplexity(model, held, progress=False)
    layers = model.model.layers
    shape = describe_block(layers[0].self_attn, model.config, 0).site_shape
    n_layers = len(layers)
    inputs = capture_attention_inputs(model, calib, range(n_layers))
    originals = [blk.self_attn for blk in layers]
    print(f"dense perplexity {dense:.3f} ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    wanted = [s for s in a.only.split(",") if s]
    rope = dict(rope_select=a.rope_select, rope_mix=a.rope_mix, rope_fold=a.rope_fold)
    for label, cfg in configs(a.preset, rope)[a.skip:]:
        if wanted and not any(w in label for w in wanted):
            continue
        t1 = time.time()
        try:
            convert_model(model, cfg, calib, inputs=inputs)
            ppl = perplexity(model, held, progress=False)
        finally:
            for blk, attn in zip(layers, originals):
                blk.self_attn = attn
        kv = cfg.kv_bytes_per_token(shape)
        row = dict(
            label=label, config=cfg.to_dict(), ppl=ppl, delta=ppl / dense - 1,
            kv_bytes_per_token_layer=kv, kv_share=kv / shape.kv_bytes_per_token(),
            weight_bytes_delta_model=n_layers * cfg.weight_bytes_delta(shape),
            seconds=time.time() - t1,
        )
        rows.append(row)
        print(f"{label:48s} share {row['kv_share']:.3f} ppl {ppl:8.3f} ({row['delta']:+.1%})"
              f"  Δweights {row['weight_bytes_delta_model'] / 1e6:+.2f} MB"
              f"  {row['seconds']:.0f} s", flush=True)
    meta = dict(
        date=datetime.date.today().isoformat(), machine=f"{platform.machine()} CPU",
        n_calib=a.n_calib, n_eval=a.n_eval, seq_len=a.seq_len, dense_ppl=dense,
        kv_bytes_per_token_dense_layer=shape.kv_bytes_per_token(),
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
