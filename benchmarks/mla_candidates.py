"""The MLA options ``mla_candidates`` offers the budget solver on SmolLM2-135M, next to the
KV-cache issue's quantized caches on the same error scale.

For a few attention sites: per latent rank (default fractions of the full rank) × kept RoPE pairs
× latent bits, the unweighted relative squared error of the block output on the calibration
inputs and the KV bytes per token of that block; the same error for ``KVQuantConfig`` int4 /
int2 caches (``slimfx.forms.kv.simulate.attention_error``); and the seconds per site.

    OMP_NUM_THREADS=1 python benchmarks/mla_candidates.py [--layers 2,15,28] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

from slimfx.data.text import calibration_batches
from slimfx.forms.kv.calibrate import attention_grams, capture_attention_inputs
from slimfx.forms.kv.config import KVQuantConfig
from slimfx.forms.kv.simulate import attention_error
from slimfx.forms.mla.candidates import MLAContext, mla_candidates
from slimfx.ir.find import describe_attention
from slimfx.models import load_smollm2
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,15,28")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    model, tok = load_smollm2()
    calib = calibration_batches(tok, n=a.n_calib, seq_len=a.seq_len)
    sites = [
        describe_attention(model.model.layers[i].self_attn, f"model.layers.{i}.self_attn",
                           model.config, i)
        for i in (int(x) for x in a.layers.split(","))
    ]
    t = time.time()
    inputs = capture_attention_inputs(model, sites, calib)
    grams = attention_grams(model, sites, calib)
    capture_s = time.time() - t
    ctx = MLAContext(rope_pairs=(8, 10), latent_bits=(16, 8))
    rows = []
    for site in sites:
        t = time.time()
        cands = mla_candidates(model, site, inputs[site.fqn], grams[site.fqn], context=ctx)
        secs = time.time() - t
        print(f"{site.fqn}: {len(cands)} candidates in {secs:.1f} s", flush=True)
        for cfg, err, costs in cands:
            rows.append(dict(site=site.fqn, option=cfg.short(), error=err,
                             kv_bytes_per_token=costs[KV_BYTES_PER_TOKEN], seconds_site=secs))
            print(f"  {cfg.short():60s} err {err:.4f}  KV B/token {costs[KV_BYTES_PER_TOKEN]:.0f}")
        attn = model.get_submodule(site.fqn)
        for bits in (4, 2):
            q = KVQuantConfig(key_bits=bits, value_bits=bits)
            err = attention_error(attn, inputs[site.fqn], q)
            kv = q.costs(site.site_shape)[KV_BYTES_PER_TOKEN]
            rows.append(dict(site=site.fqn, option=f"kv int{bits}", error=err,
                             kv_bytes_per_token=kv))
            print(f"  {'kv int' + str(bits):60s} err {err:.4f}  KV B/token {kv:.0f}")
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} CPU",
                n_calib=a.n_calib, seq_len=a.seq_len, capture_s=capture_s,
                dense_kv_bytes_per_token=sites[0].site_shape.kv_bytes_per_token())
    print(meta)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
