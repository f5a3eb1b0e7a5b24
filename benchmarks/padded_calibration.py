"""Calibration a user pads: the same real tokens given unpadded, right-padded or left-padded.

SmolLM2-135M, 16 articles of the news corpus's first half (each cut at 256 tokens, at least 32)
as calibration — row by row as ``(1, L)`` id tensors (``unpadded``), or four padded batches of
four rows with their ``attention_mask`` (``right``, ``left``, as ``tokenizer.pad`` gives them)
—; ``slimfx.optimize(model, budget, calibration=…)`` with the defaults; held-out perplexity on
16 windows × 256 tokens of the corpus's second half.

    OMP_NUM_THREADS=1 python benchmarks/padded_calibration.py [--budget 0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import dump, run_meta

import slimfx
from slimfx.data.text import heldout_windows, news_text
from slimfx.eval import perplexity
from slimfx.models import load_smollm2


def documents(tok: object, n: int = 16, max_len: int = 256, min_len: int = 32) -> list[list[int]]:
    """Token ids of the first ``n`` articles of the corpus's first half with ≥ ``min_len``
    tokens, each cut at ``max_len``."""
    docs = [d.strip() for d in news_text().split("\n\n") if d.strip()]
    ids = [tok(d, add_special_tokens=False)["input_ids"][:max_len] for d in docs[: len(docs) // 2]]
    return [x for x in ids if len(x) >= min_len][:n]


def batches(tok: object, ids: list[list[int]], mode: str, rows: int = 4) -> list:
    if mode == "unpadded":
        return [torch.tensor([x]) for x in ids]
    tok.padding_side = mode
    out = []
    for i in range(0, len(ids), rows):
        enc = tok.pad({"input_ids": ids[i : i + rows]}, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--modes", default="unpadded,right,left")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    ids = documents(tok)
    held = heldout_windows(tok, name="lee", n=16, seq_len=256)
    dense = perplexity(model, held, progress=False)
    print(f"{len(ids)} documents of {min(map(len, ids))}–{max(map(len, ids))} tokens; "
          f"dense perplexity {dense:.3f}")
    rows = []
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        small = slimfx.optimize(model, a.budget, calibration=batches(tok, ids, mode),
                                progress=False)  # fmt: skip
        ppl = perplexity(small, held, progress=False)
        notes = [n for n in slimfx.report_of(small).notes if "padding" in n]
        rows.append({"mode": mode, "perplexity": ppl, "seconds": time.perf_counter() - t0,
                     "notes": notes})  # fmt: skip
        print(f"{mode:9s} {ppl:8.3f} ({ppl / dense - 1:+.1%})  {rows[-1]['seconds']:.0f} s"
              + "".join(f"\n          note: {n}" for n in notes), flush=True)
    dump(a.json, run_meta(budget=a.budget, dense=dense, slimfx=slimfx.__file__), rows)


if __name__ == "__main__":
    main()
