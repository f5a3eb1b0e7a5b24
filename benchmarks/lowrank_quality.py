"""SmolLM2-135M perplexity under low-rank compression: uniform vs solver-allocated ranks.

For each memory budget (fraction of the linears' 16-bit bytes, lm_head included) compares:
  A. uniform plain SVD      — every layer keeps the same fraction of its bytes, truncated SVD
  B. uniform whitened SVD   — same ranks, activation-aware (SVD-LLM-style) factors
  C. solver whitened        — per-layer ranks from the exact knapsack over error curves
  D. solver + sequential    — C's plan realized block by block from the rewritten prefix
  E. solver + Fisher        — C with each layer's error weighted by its Fisher sensitivity

The tied lm_head cannot be compressed without paying for a second copy (the embedding keeps
the dense one), so uniform baselines keep it dense and spread the budget over the rest; the
solver faces the same prices. Calibration and evaluation windows never overlap.

    python benchmarks/lowrank_quality.py [--budgets 0.9,0.8,0.7,0.6] [--n-calib 32] [--n-eval 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time

import torch

from slimfx.api import find_sites
from slimfx.cost.calibration import collect_stats
from slimfx.cost.candidates import build_problem
from slimfx.data.text import calibration_batches, heldout_windows
from slimfx.eval import perplexity
from slimfx.models import load_smollm2
from slimfx.passes.swap import apply_plan
from slimfx.planning.configs import DenseConfig, LowRankConfig
from slimfx.planning.plan import Plan
from slimfx.planning.problem import Budget
from slimfx.planning.solve import solve


def uniform_plan(sites, budget: float, method: str) -> Plan:
    """Same byte fraction in every untied layer; tied layers stay dense."""
    total = sum(2 * s.numel for s in sites)
    fixed = sum(2 * s.numel for s in sites if s.tied)
    ratio = (budget * total - fixed) / (total - fixed)
    dec = {}
    for s in sites:
        if s.tied:
            dec[s.fqn] = DenseConfig()
            continue
        r = int(ratio * s.numel / (s.in_features + s.out_features))
        dec[s.fqn] = LowRankConfig(max(1, r), method) if r < min(s.shape) else DenseConfig()
    return Plan(dec, {s.fqn: s.shape for s in sites})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.9,0.8,0.7,0.6")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--corpus", default="lee")
    a = ap.parse_args()
    torch.manual_seed(0)
    budgets = [float(x) for x in a.budgets.split(",")]

    model, tok = load_smollm2()
    calib = calibration_batches(tok, name=a.corpus, n=a.n_calib, seq_len=a.seq_len)
    held = heldout_windows(tok, name=a.corpus, n=a.n_eval, seq_len=a.seq_len)
    sites, _ = find_sites(model, ((), {"input_ids": calib[0][:, :16], "use_cache": False}))
    t0 = time.perf_counter()
    stats = collect_stats(model, sites, calib, fisher=True, progress=False)
    mods = dict(model.named_modules())
    weights = {s.fqn: mods[s.fqn].weight.detach() for s in sites}
    grams = {s.fqn: stats.fit_gram(s.fqn) for s in sites}
    plain = dataclasses.replace(stats, sensitivity=None)  # same Grams, no loss weighting
    problem, _ = build_problem(sites, weights, plain, families=("lowrank",), progress=False)
    problem_f, _ = build_problem(sites, weights, stats, families=("lowrank",), progress=False)
    print(f"stats + candidates: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    ppl_dense = perplexity(model, held, progress=False)
    rows = []
    for b in budgets:
        plans = {
            "A uniform SVD": uniform_plan(sites, b, "svd"),
            "B uniform whitened": uniform_plan(sites, b, "whitened"),
            "C solver whitened": solve(problem, Budget(memory=b)).to_plan(
                {s.fqn: s.shape for s in sites}
            ),
            "E solver Fisher": solve(problem_f, Budget(memory=b)).to_plan(
                {s.fqn: s.shape for s in sites}
            ),
        }
        res = {}
        for name, plan in plans.items():
            new, _ = apply_plan(model, plan, sites, grams, inplace=False)
            res[name] = perplexity(new, held, progress=False)
            del new
        from slimfx.stages import _apply_sequential

        new, _ = _apply_sequential(model, plans["C solver whitened"], sites, calib, False, False)
        res["D solver sequential"] = perplexity(new, held, progress=False)
        del new
        rows.append((b, res))
        print(b, {k: round(v, 2) for k, v in res.items()}, file=sys.stderr)

    cols = list(rows[0][1])
    print(f"\nSmolLM2-135M perplexity, {a.corpus} held-out {held.shape[0]}×{held.shape[1]} tokens; "
          f"dense fp32 = {ppl_dense:.2f}")
    print(f"{datetime.date.today()} · {platform.machine()} CPU · torch {torch.__version__}")
    print("| budget | " + " | ".join(cols) + " | A / E |")
    print("|---|" + "---|" * (len(cols) + 1))
    for b, res in rows:
        gain = res["A uniform SVD"] / res["E solver Fisher"]
        print(f"| {b:.1f} | " + " | ".join(f"{res[c]:.2f}" for c in cols) + f" | ×{gain:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
