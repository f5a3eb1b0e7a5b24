"""`make demo`: optimize SmolLM2-135M on real news text under one budget, print the report
and the perplexity before and after, and write the plot.

    python examples/demo.py [--budget 0.8] [--families lowrank] [--out out/demo]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import slimfx
from slimfx.data.text import calibration_batches, heldout_windows
from slimfx.eval import perplexity
from slimfx.models import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--families", default="lowrank")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--no-fisher", action="store_true", help="unweighted error (faster)")
    a = ap.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    calib = calibration_batches(tok, name="lee", n=a.n_calib, seq_len=a.seq_len)
    held = heldout_windows(tok, name="lee", n=a.n_eval, seq_len=a.seq_len)

    t0 = time.perf_counter()
    small = slimfx.optimize(
        model, a.budget, calibration=calib, families=tuple(a.families.split(",")),
        fisher=not a.no_fisher,
    )
    print(f"optimize: {time.perf_counter() - t0:.1f} s")
    rep = slimfx.report_of(small)
    print(rep)

    p0 = perplexity(model, held)
    p1 = perplexity(small, held)
    print(
        f"\nperplexity on held-out news text ({held.shape[0]} windows × {held.shape[1]} tokens): "
        f"dense {p0:.2f} → slimfx {p1:.2f} ({100 * (p1 / p0 - 1):+.1f}%)"
    )
    prompt = tok("The weather in Sydney today", return_tensors="pt").input_ids
    out = small.generate(prompt, max_new_tokens=20, do_sample=False)
    print("generate():", tok.decode(out[0], skip_special_tokens=True))

    out_dir = Path(a.out)
    slimfx.save(small, out_dir)
    (out_dir / "report.md").write_text(rep.to_markdown())
    rep.plot(out_dir / "report.png")
    print(f"wrote {out_dir}/report.md, report.json, plan.json, report.png, model.safetensors")


if __name__ == "__main__":
    main()
