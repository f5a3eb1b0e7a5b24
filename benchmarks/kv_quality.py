"""SmolLM2-135M held-out perplexity vs KV-cache bytes per token, uniform KV forms.

Every attention block is wrapped in ``SimulatedKVAttention``: each query attends to the past
keys/values as the compressed cache would hold them when decoding token by token (the first
``quantized_tokens(t)`` tokens dequantized, the residual window exact). Low-rank forms use
factors fitted on calibration windows of the corpus's first half (disjoint from the held-out
windows). The byte fraction is that of the 16-bit cache (23 040 B/token for SmolLM2) at the
stated context (``--context``, default 8192) and in the limit, scales/minimums and the 16-bit
tokens (window, sinks) included. ``store_share``: the share of (query, past token) pairs of a
window that read the compressed store — with 256-token windows, long blocks or residual
windows leave much of the past exact, which a long context would not.

    python benchmarks/kv_quality.py [--n-eval 16] [--n-calib 16] [--seq-len 256] [--corpus news]
        [--only NAME,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import dump, run_meta

from slimfx.data.text import calibration_batches, heldout_windows
from slimfx.eval import perplexity
from slimfx.forms.kv.calibrate import attention_grams, fit_site
from slimfx.forms.kv.config import (
    KVDenseConfig,
    KVLatentQuantConfig,
    KVLowRankConfig,
    KVQuantConfig,
    dense_fraction,
)
from slimfx.forms.kv.simulate import SimulatedKVAttention
from slimfx.ir.find import inspect_attention_sites
from slimfx.models import load_smollm2

FORMS = {
    "dense": KVDenseConfig(),
    "int8 gk32 gv64": KVQuantConfig(8, 8, 32, 64, 0),
    "int4 gk32 gv64": KVQuantConfig(4, 4, 32, 64, 0),
    "int4 gk32 gv32": KVQuantConfig(4, 4, 32, 32, 0),
    "int4 gk128 gv64": KVQuantConfig(4, 4, 128, 64, 0),
    "int4 gk32 gv64 r32": KVQuantConfig(4, 4, 32, 64, 32),
    "k4v2 gk32 gv32": KVQuantConfig(4, 2, 32, 32, 0),
    "int2 gk32 gv64": KVQuantConfig(2, 2, 32, 64, 0),
    "int2 gk32 gv32": KVQuantConfig(2, 2, 32, 32, 0),
    "int2 gk32 gv32 r32": KVQuantConfig(2, 2, 32, 32, 32),
    "int2 gk32 gv32 r128": KVQuantConfig(2, 2, 32, 32, 128),
    "lowrank 1/2 k96 v96 whitened": KVLowRankConfig(96, 96, 1, "whitened"),
    "lowrank 1/2 k96 v96 attention": KVLowRankConfig(96, 96, 1, "attention"),
    "lowrank 1/2 k64 v128 attention": KVLowRankConfig(64, 128, 1, "attention"),
    "lowrank 1/2 k96 v96 g3 attention": KVLowRankConfig(96, 96, 3, "attention"),
    "lowrank 2/3 k128 v128 attention": KVLowRankConfig(128, 128, 1, "attention"),
    "latent k128 v128 int4 g32": KVLatentQuantConfig(128, 128, 1, "attention", 4, 32, 0),
    "latent k96 v96 int4 g32": KVLatentQuantConfig(96, 96, 1, "attention", 4, 32, 0),
    "latent k64 v128 int4 g32": KVLatentQuantConfig(64, 128, 1, "attention", 4, 32, 0),
    "latent k128 v128 int8 g32": KVLatentQuantConfig(128, 128, 1, "attention", 8, 32, 0),
    # what each trick buys (second pass): sink tokens, rank split between keys and values
    "int4 gk128 gv64 s4": KVQuantConfig(4, 4, 128, 64, 0, sink=4),
    "k4v2 gk32 gv32 s4": KVQuantConfig(4, 2, 32, 32, 0, sink=4),
    "k4v2 gk128 gv32 s4": KVQuantConfig(4, 2, 128, 32, 0, sink=4),
    "int2 gk32 gv32 s4": KVQuantConfig(2, 2, 32, 32, 0, sink=4),
    "int2 gk32 gv32 r32 s4": KVQuantConfig(2, 2, 32, 32, 32, sink=4),
    "k4v2 gk32 gv32 r32 s4": KVQuantConfig(4, 2, 32, 32, 32, sink=4),
    "lowrank 1/2 k64 v128 attention s1": KVLowRankConfig(64, 128, 1, "attention", sink=1),
    "lowrank 1/2 k64 v128 attention s4": KVLowRankConfig(64, 128, 1, "attention", sink=4),
    "lowrank 1/2 k48 v144 attention s4": KVLowRankConfig(48, 144, 1, "attention", sink=4),
    "lowrank 1/2 k64 v128 whitened s4": KVLowRankConfig(64, 128, 1, "whitened", sink=4),
    "latent k64 v128 int8 g32 s4": KVLatentQuantConfig(64, 128, 1, "attention", 8, 32, 0, 4),
    "latent k64 v128 int4 g32 s4": KVLatentQuantConfig(64, 128, 1, "attention", 4, 32, 0, 4),
    "latent k128 v128 int4 g32 s4": KVLatentQuantConfig(128, 128, 1, "attention", 4, 32, 0, 4),
    # third pass: the latent quantized per channel (its channels carry the singular values)
    "latent k128 v128 int4 ch g32": KVLatentQuantConfig(
        128, 128, 1, "attention", 4, 32, 0, 0, "channel"
    ),
    "latent k96 v96 int4 ch g32": KVLatentQuantConfig(
        96, 96, 1, "attention", 4, 32, 0, 0, "channel"
    ),
    "latent k64 v128 int4 ch g32 s4": KVLatentQuantConfig(
        64, 128, 1, "attention", 4, 32, 0, 4, "channel"
    ),
    "latent k128 v128 int2 ch g32 s4": KVLatentQuantConfig(
        128, 128, 1, "attention", 2, 32, 0, 4, "channel"
    ),
    "latent k192 v192 int2 ch g32 s4": KVLatentQuantConfig(
        192, 192, 1, "attention", 2, 32, 0, 4, "channel"
    ),
    "latent k128 v128 int8 ch g32 s4": KVLatentQuantConfig(
        128, 128, 1, "attention", 8, 32, 0, 4, "channel"
    ),
    # fourth pass: toward 1/8 and 1/4 with sinks, Palu's plain whitening with sinks
    "latent k64 v104 int4 ch g64 s4": KVLatentQuantConfig(
        64, 104, 1, "whitened", 4, 64, 0, 4, "channel"
    ),
    "latent k64 v128 int4 ch g64 s4": KVLatentQuantConfig(
        64, 128, 1, "whitened", 4, 64, 0, 4, "channel"
    ),
    "latent k144 v192 int4 ch g64 s4": KVLatentQuantConfig(
        144, 192, 1, "whitened", 4, 64, 0, 4, "channel"
    ),
    "int2 gk64 gv64 r32 s4": KVQuantConfig(2, 2, 64, 64, 32, sink=4),
    "int4 gk32 gv64 s4": KVQuantConfig(4, 4, 32, 64, 0, sink=4),
    "lowrank 1/2 k64 v128 whitened s1": KVLowRankConfig(64, 128, 1, "whitened", sink=1),
    "lowrank 1/2 k80 v112 whitened s4": KVLowRankConfig(80, 112, 1, "whitened", sink=4),
    # fifth pass: mixed widths — a larger latent whose smallest channels are stored at 2 bits
    # (``low_bits``), against the uniform 4-bit latents of the same bytes above
    "latent k48 v88 int4 ch g64 s4": KVLatentQuantConfig(
        48, 88, 1, "whitened", 4, 64, 0, 4, "channel"
    ),
    **{
        f"latent k{k} v{v} int4 ch k{kl}v{vl}@int2 g64 s4": KVLatentQuantConfig(
            k, v, 1, "whitened", 4, 64, 0, 4, "channel", 2, kl, vl
        )
        for k, v, kl, vl in (
            (72, 120, 48, 80),  # ≈ 1/10
            (80, 112, 48, 72),
            (72, 128, 24, 48),  # ≈ 1/8
            (80, 144, 40, 80),
            (88, 136, 48, 80),
            (88, 136, 48, 72),
            (96, 144, 64, 104),
            (96, 152, 72, 112),
            (96, 152, 64, 104),
            (128, 192, 112, 160),  # more 2-bit channels: ≈ 0.146
            (192, 192, 64, 32),  # ≈ 1/4, full rank
        )
    },
}


def store_share(cfg: object, seq_len: int) -> float:
    """Share of the (query, past key) pairs of a ``seq_len`` window that read the compressed
    store (a window this short keeps much of the past exact when blocks or windows are long)."""
    pairs = sum(t + 1 for t in range(seq_len))
    if isinstance(cfg, (KVQuantConfig, KVLatentQuantConfig)):
        return sum(cfg.quantized_tokens(t) for t in range(seq_len)) / pairs
    if isinstance(cfg, KVLowRankConfig):  # every token but the sinks is rebuilt from the latent
        return sum(max(0, t + 1 - cfg.sink) for t in range(seq_len)) / pairs
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--corpus", default="news")
    ap.add_argument("--context", type=int, default=8192, help="context the bytes are counted at")
    ap.add_argument("--only", default="", help="comma-separated form names (default: all)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    names = [n for n in FORMS if not a.only or n in a.only.split(",") or n == "dense"]

    model, tok = load_smollm2()
    model.eval()
    held = heldout_windows(tok, name=a.corpus, n=a.n_eval, seq_len=a.seq_len)
    sites, rejected = inspect_attention_sites(model)
    assert not rejected, rejected
    mods = dict(model.named_modules())
    parents = {s.fqn: s.fqn.rpartition(".") for s in sites}
    shape = sites[0].site_shape
    grams = None
    if any(isinstance(FORMS[n], (KVLowRankConfig, KVLatentQuantConfig)) for n in names):
        calib = calibration_batches(tok, name=a.corpus, n=a.n_calib, seq_len=a.seq_len)
        t0 = time.perf_counter()
        grams = attention_grams(model, sites, calib)
        print(f"grams: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    rows = []
    dense_ppl = None
    for name in names:
        cfg = FORMS[name]
        t0 = time.perf_counter()
        for s in sites:
            factors = fit_site(model, s, grams[s.fqn], cfg) if hasattr(cfg, "method") else None
            parent, _, child = parents[s.fqn]
            setattr(mods[parent], child, SimulatedKVAttention(mods[s.fqn], cfg, factors))
        try:
            with torch.no_grad():
                ppl = perplexity(model, held, progress=False)
        finally:
            for s in sites:
                parent, _, child = parents[s.fqn]
                setattr(mods[parent], child, mods[s.fqn])
        dense_ppl = ppl if name == "dense" else dense_ppl
        row = {
            "form": name,
            "config": cfg.to_dict(),
            "fraction_at_context": dense_fraction(cfg, shape, a.context),
            "fraction_steady": dense_fraction(cfg, shape),
            "store_share": store_share(cfg, a.seq_len),
            "ppl": ppl,
            "delta": ppl / dense_ppl - 1,
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"| {name} | {row['fraction_at_context']:.3f} | {row['fraction_steady']:.3f} | "
            f"{row['store_share']:.2f} | {ppl:.2f} | {100 * row['delta']:+.1f}% |",
            flush=True,
        )
    meta = run_meta(
        n_eval=a.n_eval,
        seq_len=a.seq_len,
        corpus=a.corpus,
        context=a.context,
    )
    dump(a.json, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
