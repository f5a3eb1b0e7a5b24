"""SmolLM2-135M: MLA under a joint weights + KV budget — does a block whose q_proj/o_proj the
weights budget rewrote still convert to MLA, and do the two compressions add up?

One planning run (``slimfx.stages.plan_model`` with ``Budget(memory=1.0, kv=1.0, context=C)``
and ``kv_forms=[KVDenseConfig(), "mla"]``: every linear candidate of the default families, every
attention site's MLA candidates, MLA the only cache compression offered) prices one problem;
each row is solved on it and evaluated as ``kv_mix.evaluate`` does (linears swapped, MLA layers
converted by ``apply_mla``, held-out perplexity):

- dense;
- weights only: ``Budget(memory=m, kv=1.0, context=C)`` for m in (0.5, 0.35);
- MLA only: ``Budget(kv=f, context=C)`` (linears dense) for f in (0.475, 0.37);
- joint: ``Budget(memory=m, kv=f, context=C)`` for every (m, f) pair of the two, solved twice:
  with MLA's factors 16-bit only (the problem's ``factor_bits=8`` options removed) and with the
  int8-factor options the weights budget brings (``MLAConfig(factor_bits=8)``).

Each row: perplexity, weight fraction, KV fraction, MLA layers (of them with int8 factors), and
how many q_proj/o_proj of the MLA layers are rewritten (not dense). ``--joint-only`` skips the
weights-only and MLA-only rows. ``--generate`` also builds the joint model with
``slimfx.optimize`` at ``Budget(memory=0.5, kv=0.475, context=C)`` (a second planning run),
greedily decodes 20 tokens from a news prompt and lists the report's MLA blocks.

    python benchmarks/mla_joint.py [--n-calib 16] [--n-eval 8] [--context 8192]
        [--joint-only] [--generate] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import dump, run_meta
from kv_mix import add_data_args, evaluate, factors_16_bit, smollm2_and_windows, uniform_plan

import slimfx
from slimfx.forms.kv.apply import split_plan
from slimfx.forms.kv.config import KVDenseConfig
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.module import MLAAttention
from slimfx.planning.problem import Budget, BudgetProblem, InfeasibleBudgetError
from slimfx.planning.shapes import KV_CACHE_BYTES
from slimfx.planning.solve import solve
from slimfx.stages import PlanningOptions, plan_model

MEMORY = (0.5, 0.35)
KV = (0.475, 0.37)


def mla_counts(pl, plan) -> tuple[int, int, int]:
    """(MLA layers, of them with int8 factors, rewritten q_proj/o_proj among them) of
    ``plan``."""
    _, kv = split_plan(plan)
    mla = [kv[a.fqn] for a in pl.attention_sites if isinstance(kv.get(a.fqn), MLAConfig)]
    f8 = sum(c.factor_bits == 8 for c in mla)
    sites = [a for a in pl.attention_sites if isinstance(kv.get(a.fqn), MLAConfig)]
    qo = sum(plan[a.projection(r)].kind != "dense" for a in sites for r in "qo")
    return len(mla), f8, qo


def generate(model, tok, calib, held, context: int) -> dict:
    """Build the joint model with ``slimfx.optimize``, decode 20 greedy tokens, list its MLA."""
    t = time.perf_counter()
    out = slimfx.optimize(
        model,
        Budget(memory=0.5, kv=0.475, context=context),
        calibration=calib,
        kv_forms=[KVDenseConfig(), "mla"],
        progress=False,
    )
    built = time.perf_counter() - t
    rep = slimfx.report_of(out)
    mla_rep = [k.fqn for k in rep.kv_sites if k.chosen.startswith("mla")]
    mods = [(n, m) for n, m in out.named_modules() if isinstance(m, MLAAttention)]
    qo = sum(
        type(getattr(m, p)).__name__ != "Linear" for _, m in mods for p in ("q_proj", "o_proj")
    )
    ids = held[:1, :32]
    with torch.no_grad():
        gen = out.generate(ids, max_new_tokens=20, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1] :])
    print(f"optimize: {built:.0f} s; {rep.headline()}", file=sys.stderr)
    print(f"\nprompt: {tok.decode(ids[0])!r}\ncontinuation: {text!r}")
    print(f"report MLA blocks ({len(mla_rep)}): {', '.join(mla_rep)}")
    print(f"MLAAttention modules: {len(mods)}; rewritten q_proj/o_proj inside them: {qo}")
    return {
        "seconds": built,
        "prompt": tok.decode(ids[0]),
        "continuation": text,
        "report_mla_blocks": mla_rep,
        "mla_modules": len(mods),
        "mla_rewritten_qo": qo,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    add_data_args(ap)
    ap.add_argument("--generate", action="store_true", help="also build and decode the joint model")
    ap.add_argument("--joint-only", action="store_true", help="only the dense and joint rows")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    model, tok, calib, held = smollm2_and_windows(a)
    t0 = time.perf_counter()
    pl = plan_model(
        model,
        Budget(memory=1.0, kv=1.0, context=a.context),
        PlanningOptions(calibration=calib, progress=False, kv_forms=[KVDenseConfig(), "mla"]),
    )
    plan_s = time.perf_counter() - t0
    W = pl.problem.dense_bytes
    C = pl.problem.dense_costs[KV_CACHE_BYTES]
    print(f"planning: {plan_s:.0f} s", file=sys.stderr, flush=True)
    shapes = {s.fqn: s.site_shape for s in [*pl.sites, *pl.attention_sites]}
    rows = []
    print("| row | ppl | weight frac | kv frac | MLA layers (int8 factors) | rewritten q/o in MLA "
          "| s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    only16 = factors_16_bit(pl.problem)

    def run(label: str, budget: Budget | None, problem: BudgetProblem = pl.problem) -> None:
        t = time.perf_counter()
        wf = kf = 1.0
        if budget is None:
            plan = uniform_plan(pl, KVDenseConfig())
        else:
            try:
                sol = solve(problem, budget)
            except InfeasibleBudgetError as e:
                print(f"| {label} | infeasible: {e} |", flush=True)
                rows.append({"label": label, "budget": budget.to_dict(), "error": str(e)})
                return
            plan = sol.to_plan(shapes)
            wf, kf = sol.bytes / W, sol.costs.get(KV_CACHE_BYTES, 0) / C
        ppl = evaluate(pl, plan, held)
        n_mla, f8, qo = mla_counts(pl, plan)
        s = time.perf_counter() - t
        rows.append(
            {
                "label": label,
                "budget": None if budget is None else budget.to_dict(),
                "ppl": ppl,
                "weight_fraction": wf,
                "kv_fraction": kf,
                "mla_layers": n_mla,
                "mla_int8_factor_layers": f8,
                "mla_rewritten_qo": qo,
                "seconds": s,
            }
        )
        print(
            f"| {label} | {ppl:.2f} | {wf:.3f} | {kf:.3f} | {n_mla} ({f8}) | {qo} | {s:.0f} |",
            flush=True,
        )

    run("dense", None)
    if not a.joint_only:
        for m in MEMORY:
            run(f"weights memory={m}", Budget(memory=m, kv=1.0, context=a.context))
        for f in KV:
            run(f"MLA kv={f}", Budget(kv=f, context=a.context))
    for m in MEMORY:
        for f in KV:
            b = Budget(memory=m, kv=f, context=a.context)
            run(f"joint memory={m} kv={f}, 16-bit factors", b, only16)
            run(f"joint memory={m} kv={f}, int8 factors offered", b)
    gen = generate(model, tok, calib, held, a.context) if a.generate else None
    meta = run_meta(
        planning_seconds=plan_s,
        weights_dense_bytes=W,
        cache_dense_bytes_per_sequence=C,
        timings=pl.timings,
        generate=gen,
    )
    dump(a.json, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
