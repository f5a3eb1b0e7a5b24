"""SmolLM2-135M: the solver's per-layer KV-cache mix vs every uniform KV form at equal bytes, and
one joint weights + cache budget vs hand-chosen splits of the same bytes.

One planning run prices everything once (``slimfx.stages.plan_model`` with
``Budget(total_bytes=…, context=…, batch=…)``: calibration statistics and Fisher sensitivities,
every linear candidate of the default families, every attention site's KV candidates of
``forms.kv.candidates.default_kv_forms``); each budget below is then solved on that problem.

- **KV mix**: ``Budget(kv=f, context=C)`` for f = 1/2, 1/4, 1/8 (linears stay dense: no weight
  cap) vs each default KV form applied uniformly whose cache fraction at C is ≤ f.
- **Joint**: ``Budget(total_bytes=X, context=C, batch=B)`` with X = 0.35 of the linears' dense
  bytes + 0.25 of the dense cache of B sequences of C tokens, vs ``Budget(memory=m, kv=k,
  context=C)`` for hand-chosen weight shares m (k fills the rest of X).

Every plan is evaluated the same way: its linear decisions applied (the module swap), every
attention block wrapped in ``SimulatedKVAttention`` with its KV form (low-rank factors fitted
from the block's input Gram) — the cache as token-by-token decoding holds it (``tests/kv``
check the simulation against the real caches) — and held-out perplexity on windows of the
corpus's second half. With ``--steady`` each cache is simulated as at long context instead
(every past token older than the residual window read from the store — the state the
candidates are priced in, and what a cache counted at ``--context`` tokens holds for nearly
every query), which the first tokens of a 256-token window otherwise see exact.

The problem is priced under a budget that counts weight bytes, so the low-rank caches (and
MLA) are also offered with their own weights as int8 rows (``factor_bits=8``); with
``--compare-factors`` the joint row and the hand splits are each solved twice, without those
options (``factors_16_bit``) and with them.

    python benchmarks/kv_mix.py [--n-calib 16] [--n-eval 8] [--context 8192] [--batch 16]
        [--mla | --mla-only [--mla-ranks 0.25,0.5,0.75]] [--steady] [--rows all|joint]
        [--compare-factors] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from _common import dump, run_meta

from slimfx.data.text import calibration_batches, heldout_windows
from slimfx.eval import perplexity
from slimfx.forms.kv.apply import split_plan
from slimfx.forms.kv.calibrate import fit_site
from slimfx.forms.kv.candidates import default_kv_forms
from slimfx.forms.kv.config import KVDenseConfig
from slimfx.forms.kv.simulate import SimulatedKVAttention
from slimfx.forms.mla.candidates import apply_mla
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.plan import MLA_LADDER, ladder_context
from slimfx.models import load_smollm2
from slimfx.passes.swap import apply_plan
from slimfx.planning.plan import Plan
from slimfx.planning.problem import Budget, BudgetProblem, InfeasibleBudgetError
from slimfx.planning.shapes import KV_CACHE_BYTES
from slimfx.planning.solve import solve
from slimfx.stages import PlanningOptions, plan_model


def evaluate(pl, plan: Plan, held: torch.Tensor, steady: bool = False) -> float:
    """Held-out perplexity of ``plan``: linears swapped, MLA layers converted (fitted on the
    calibration batches), the other attention blocks simulated with their cache."""
    linear, kv = split_plan(plan)
    model, _ = apply_plan(pl.model, linear, pl.sites, pl.grams(), inplace=False, strict=True)
    mla = {k: d for k, d in kv.items() if isinstance(d, MLAConfig)}
    if mla:
        apply_mla(model, pl.attention_sites, mla, pl.fit_batches)
    mods = dict(model.named_modules())
    for site in pl.attention_sites:
        if site.fqn in mla:
            continue
        d = kv.get(site.fqn, KVDenseConfig())
        factors = None
        if d.owns:
            gram = pl.stats.fit_gram(site.projection("k"))
            factors = fit_site(pl.model, site, gram, getattr(d, "lowrank", d))
        parent, _, child = site.fqn.rpartition(".")
        setattr(mods[parent], child, SimulatedKVAttention(mods[site.fqn], d, factors, steady))
    with torch.no_grad():
        return perplexity(model, held, progress=False)


def factors_16_bit(problem: BudgetProblem) -> BudgetProblem:
    """``problem`` without the options whose own weights are int8 rows (``factor_bits=8``:
    low-rank caches, MLA)."""
    sites = [
        dataclasses.replace(
            so, options=[o for o in so.options if getattr(o.decision, "factor_bits", 16) == 16]
        )
        for so in problem.sites
    ]
    return BudgetProblem(sites, problem.workload, problem.target, problem.meta)


def uniform_plan(pl, form) -> Plan:
    """Every attention site in ``form``, every linear dense."""
    from slimfx.planning.configs import DenseConfig

    owned = {}
    decisions = {s.fqn: DenseConfig() for s in pl.sites}
    for a in pl.attention_sites:
        decisions[a.fqn] = form
        if form.owns:
            for r in form.owns:
                decisions.pop(a.projection(r))
                owned[a.projection(r)] = a.fqn
    shapes = {s.fqn: s.site_shape for s in [*pl.sites, *pl.attention_sites]}
    return Plan(decisions, shapes, {}, owned)


def add_data_args(ap: argparse.ArgumentParser) -> None:
    """The calibration / held-out windows and the context the cache is counted at."""
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--corpus", default="news")
    ap.add_argument("--context", type=int, default=8192)


def smollm2_and_windows(a: argparse.Namespace) -> tuple:
    """``(model, tokenizer, calibration windows, held-out windows)`` as ``add_data_args`` say."""
    torch.manual_seed(0)
    model, tok = load_smollm2()
    model.eval()
    calib = calibration_batches(tok, name=a.corpus, n=a.n_calib, seq_len=a.seq_len)
    held = heldout_windows(tok, name=a.corpus, n=a.n_eval, seq_len=a.seq_len)
    return model, tok, calib, held


def main() -> int:
    ap = argparse.ArgumentParser()
    add_data_args(ap)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", default="")
    ap.add_argument("--mla", action="store_true", help="offer MLA conversions too")
    ap.add_argument(
        "--mla-only",
        action="store_true",
        help="MLA alone: the solver's per-layer ranks vs each uniform MLA rank (no joint rows)",
    )
    ap.add_argument(
        "--mla-ranks",
        default="",
        help="comma-separated latent ranks (fractions of the full rank) for MLA_LADDER, "
        "instead of its default (0.25,0.5,0.75)",
    )
    ap.add_argument(
        "--steady",
        action="store_true",
        help="evaluate each cache as at long context (every past token older than the residual "
        "window read from the store, as the candidates are priced) instead of as token-by-token "
        "decoding of each window holds it",
    )
    ap.add_argument(
        "--rows", default="all", choices=["all", "joint"],
        help="joint: only the dense row, the joint budget and the hand splits",
    )  # fmt: skip
    ap.add_argument(
        "--compare-factors", action="store_true",
        help="solve the joint row and the hand splits also without the int8-factor options",
    )  # fmt: skip
    a = ap.parse_args()
    if a.mla_only and a.rows == "joint":
        ap.error("--rows joint has no rows with --mla-only (it compares per-layer MLA ranks)")
    if a.mla_ranks:  # the ladder plan_model offers and the uniform rows below both read it
        MLA_LADDER["rank_fractions"] = tuple(float(f) for f in a.mla_ranks.split(","))
    model, tok, calib, held = smollm2_and_windows(a)
    # the total budget of the joint row; the problem is priced once for it
    t0 = time.perf_counter()
    kv_forms = ["default", "mla"] if a.mla else None
    if a.mla_only:
        kv_forms = [KVDenseConfig(), "mla"]
    probe = plan_model(
        model,
        Budget(kv=1.0, context=a.context)  # MLA alone: the linears stay dense, unpriced
        if a.mla_only
        else Budget(memory=1.0, kv=1.0, context=a.context),  # a weight cap: linears priced
        PlanningOptions(calibration=calib, progress=False, kv_forms=kv_forms),
    )
    W = probe.problem.dense_bytes
    C = probe.problem.dense_costs[KV_CACHE_BYTES]
    X = 0.35 * W + 0.25 * a.batch * C
    pl = probe  # the same problem serves every budget at this context
    print(
        f"planning: {time.perf_counter() - t0:.0f} s; linears {W / 1e6:.1f} MB dense, cache "
        f"{C / 1e6:.1f} MB per sequence at {a.context} tokens; total budget {X / 1e9:.3f} GB",
        file=sys.stderr,
        flush=True,
    )
    shapes = {s.fqn: s.site_shape for s in [*pl.sites, *pl.attention_sites]}
    rows = []

    only16 = factors_16_bit(pl.problem)

    def run(label: str, budget: Budget | None, plan: Plan | None = None, frac: float | None = None,
            problem: BudgetProblem | None = None):  # fmt: skip
        t = time.perf_counter()
        sol = None
        if plan is None:
            try:
                sol = solve(problem or pl.problem, budget)
            except InfeasibleBudgetError as e:
                print(f"| {label} | infeasible: {e} |", flush=True)
                return None
            plan = sol.to_plan(shapes)
        ppl = evaluate(pl, plan, held, a.steady)
        _, kv = split_plan(plan)
        forms = sorted({d.short() for d in kv.values()})
        row = {
            "label": label,
            "budget": None if budget is None else budget.to_dict(),
            "kv_fraction": frac if sol is None else sol.costs.get(KV_CACHE_BYTES, 0) / C,
            "weight_fraction": None if sol is None else sol.bytes / W,
            "total_bytes": None
            if sol is None
            else sol.bytes + a.batch * sol.costs.get(KV_CACHE_BYTES, 0),
            "ppl": ppl,
            "forms": forms,
            "int8_factor_layers": sum(getattr(d, "factor_bits", 16) == 8 for d in kv.values()),
            "seconds": time.perf_counter() - t,
        }
        rows.append(row)
        wf = "" if row["weight_fraction"] is None else f"{row['weight_fraction']:.3f}"
        print(
            f"| {label} | {row['kv_fraction']:.3f} | {wf} | {ppl:.2f} | {len(forms)} forms "
            f"| {row['int8_factor_layers']} |", flush=True,
        )  # fmt: skip
        return row

    dense = run("dense", None, uniform_plan(pl, KVDenseConfig()), 1.0)
    shape = pl.attention_sites[0].site_shape
    uniform = [] if a.mla_only or a.rows == "joint" else default_kv_forms(shape)[1:]
    if (a.mla or a.mla_only) and a.rows == "all":  # the MLA ladder's configs (one shape)
        base = ladder_context(shape.head_dim).base
        full = base.full_rank(shape)
        for bits in MLA_LADDER["latent_bits"]:
            for f in MLA_LADDER["rank_fractions"]:
                r = min(full, max(1, round(f * full)))
                uniform.append(dataclasses.replace(base, rank=r, latent_bits=bits))
    for form in uniform:
        frac = form.cache_bytes(shape, a.context) / KVDenseConfig().cache_bytes(shape, a.context)
        run(f"uniform {form.short()}", None, uniform_plan(pl, form), frac)
    if a.mla_only:  # the solver at each uniform MLA rank's own bytes
        for row in [r for r in rows if r["label"].startswith("uniform mla")]:
            f = row["kv_fraction"]
            run(f"solver mla ranks kv={f:.3f}", Budget(kv=f, context=a.context))
    else:
        for f in (0.5, 0.25, 0.125) if a.rows == "all" else ():
            run(f"solver mix kv={f:g}", Budget(kv=f, context=a.context))
        twice = ((", 16-bit factors", only16), ("", None)) if a.compare_factors else (("", None),)
        joint = Budget(total_bytes=X, context=a.context, batch=a.batch)
        for tag, problem in twice:
            run(f"joint total={X / 1e9:.3f} GB{tag}", joint, problem=problem)
        for m in (0.25, 0.3, 0.35, 0.5, 0.8, 1.0):
            k = (X - m * W) / (a.batch * C)
            for tag, problem in twice if 0 < k <= 1 else ():
                run(f"hand split memory={m} kv={k:.3f}{tag}",
                    Budget(memory=m, kv=k, context=a.context), problem=problem)  # fmt: skip
    meta = run_meta(
        steady=a.steady,
        dense_ppl=dense["ppl"] if dense else None,
        weights_dense_bytes=W,
        cache_dense_bytes_per_sequence=C,
        total_bytes=X,
        timings=pl.timings,
    )
    dump(a.json, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
