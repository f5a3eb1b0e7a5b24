"""Does a site's sensitivity weight predict the loss its compression costs? (issue 15)

Part 1 — predictiveness. For every measured site and two forms (int4 RTN g128 asymmetric; a
whitened low-rank at 1/4 of the dense bytes) the held-out loss increase is measured by writing
the form's weight into the model (one site at a time) and compared, by Spearman rank
correlation over (site, form) pairs and per form, with each predictor:

  unweighted      rel_err (what ``fisher=False`` sums)
  fisher          s_fisher · rel_err, s = Σ E[g²]E[y²] (the previous default)
  probe           s_probe · rel_err, s = ½E[(ĝᵀΔW x)²]/rel_err of two probes
  probe-kind      the same from the probe of the form's kind only (int4 → int4 probe,
                  low-rank → plain-SVD probe): a per-family weight
  geo             √(s_fisher · s_probe) · rel_err, median-normalized (the default)
  geo-kind        √(s_fisher · s_probe-kind) · rel_err
  kfac            s_kfac · rel_err, its diagonal Kronecker-factored approximation
  kfac-direct     ½ tr(ΔW Σₓ ΔWᵀ diag Σ_g) of the form itself
  exact-direct    ½ E[(ĝᵀ ΔW x)²] of the form itself (one more gradient pass)
  measured        s_meas · rel_err, s = measured calibration-loss increase of the two probes
                  (KL to the dense model for the LMs, 1 − cos for MiniLM)
                  per unit rel_err (ZipLM/HAWQ-style; 2 forwards of the calibration per site)

Models: SmolLM2-135M (LM loss on news text; measured: held-out cross-entropy increase and KL to
the dense model), all-MiniLM-L6-v2 (loss 1 − cos to the dense sentence embedding; its
gradient vanishes at the dense model, so the recorder backpropagates pseudo-gradients z ~ N(0,
H) with H the loss's Hessian in embedding space), and a randomly initialized OLMo-2-style
decoder (post-norms and qk-norm; its cross-entropy is not at a minimum, so the recorder uses
labels sampled from the model's own next-token distribution and the measured loss is KL to the
dense model).

Part 2 — quality (``--ppl``): SmolLM2 perplexity of the solver's plans at each budget with
each weighting (``--weightings``; per-kind weights multiply each option by its kind's weight)
on one candidate set (families lowrank, int8, int4, int4_gptq; the candidates' errors are
built once unweighted and multiplied by each weighting, which is what ``build_problem`` does
with the weights in the stats). Each plan is also scored by its KL to the dense model on
``--ppl-check`` held-out *calibration* windows (disjoint from the fit and the evaluation
windows), and ``auto`` reports which plan a choice by that score would keep among
``--auto``'s weightings (one solve and one scoring forward per weighting).

    OMP_NUM_THREADS=1 python benchmarks/sensitivity.py [--models smollm2,minilm,olmo2]
        [--every 3] [--n-calib 8] [--n-held 4] [--ppl] [--budgets 0.8,0.5,0.35,0.3,0.25]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from slimfx.api import find_sites
from slimfx.cost.calibration import call_model, collect_sensitivity, collect_stats
from slimfx.cost.probe_loss import measured_raw
from slimfx.cost.sensitivity import (
    PROBES,
    combine_geometric,
    kind_weights,
    probe_deltas,
    probe_weights,
    robust_normalize,
)
from slimfx.numerics import factorize, reconstruct
from slimfx.planning.configs import LowRankConfig

PREDICTORS = (
    "unweighted", "fisher", "probe", "probe-kind", "geo", "geo-kind", "kfac", "kfac-direct",
    "exact-direct", "measured",
)
KIND_OF_FORM = {"int4_g128": "quant", "lowrank_w0.25": "lowrank"}
FORMS = ("int4_g128", "lowrank_w0.25")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties broken by order; values here are continuous)."""
    ra = torch.empty(len(a)).index_put_(
        (torch.tensor(a).argsort(),), torch.arange(len(a), dtype=torch.float32)
    )
    rb = torch.empty(len(b)).index_put_(
        (torch.tensor(b).argsort(),), torch.arange(len(b), dtype=torch.float32)
    )
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def form_deltas(W: Tensor, gram: Tensor | None) -> dict[str, Tensor]:
    """ΔW of the two measured forms: int4 g128 RTN (the probe itself) and whitened low-rank."""
    out_f, in_f = W.shape
    r = max(1, int(0.25 * in_f * out_f // (in_f + out_f)))
    d = LowRankConfig(rank=r, method="whitened" if gram is not None else "svd")
    Wr = reconstruct(d, factorize(W, d, gram)).to(torch.float32)
    return {"int4_g128": probe_deltas(W)["int4_g128"], "lowrank_w0.25": W.float() - Wr}


def predictiveness(
    name: str,
    model: torch.nn.Module,
    sites: Sequence[Any],
    measure_sites: Sequence[Any],
    calib: Sequence[Any],
    held_loss: Callable[[], dict[str, float]],
    calib_loss: Callable[[], float],
    loss_fn: Callable[[torch.nn.Module, Any], Tensor] | None,
) -> dict[str, Any]:
    """Part 1 for one model; returns a JSON-able record."""
    rec: dict[str, Any] = {"model": name, "sites": len(sites), "measured_sites": len(measure_sites)}
    mods = dict(model.named_modules())
    t0 = time.perf_counter()
    collect_stats(model, sites, calib, fisher=True, progress=False, loss_fn=loss_fn)
    rec["seconds_fisher_pass"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    stats, _ = collect_sensitivity(model, sites, calib, progress=False, loss_fn=loss_fn)
    rec["seconds_probe_pass"] = round(time.perf_counter() - t0, 1)
    deltas = {
        s.fqn: form_deltas(mods[s.fqn].weight.detach(), stats.fit_gram(s.fqn))
        for s in measure_sites
    }
    extra = {f: {"form:" + k: v for k, v in d.items()} for f, d in deltas.items()}
    stats, rec_ = collect_sensitivity(
        model, sites, calib, progress=False, loss_fn=loss_fn, extra=extra
    )

    def gram_of(fqn: str) -> tuple[Tensor | None, int]:
        return stats.fit_gram(fqn), stats.tokens.get(stats.group_of(fqn), 0)

    weights = {  # the previous default had no floor
        e: robust_normalize(rec_.raw(e, gram_of), floor=0.0 if e == "fisher" else 0.05)[0]
        for e in ("fisher", "probe", "kfac")
    }
    weights["geo"] = combine_geometric(weights["fisher"], weights["probe"])[0]
    probe_scale = robust_normalize(rec_.raw("probe", gram_of))[1]
    kind_w = kind_weights(rec_.ratios("probe", gram_of), probe_scale)
    # measured probe weight: calibration-loss increase of each probe per unit rel_err
    base_c = calib_loss()
    base_h = held_loss()
    meas_raw: dict[str, float] = {}
    rows = []
    t0 = time.perf_counter()
    for s in measure_sites:
        m = mods[s.fqn]
        W = m.weight.detach().clone()
        pred = rec_.predicted(s.fqn, *gram_of(s.fqn))
        logs = []
        with torch.no_grad():
            for p in PROBES:
                m.weight.copy_(W - rec_.deltas[s.fqn][p].to(W.dtype))
                dl = calib_loss() - base_c
                m.weight.copy_(W)
                if dl > 0 and pred[p]["rel"] > 0:
                    logs.append(math.log(dl / pred[p]["rel"]))
            meas_raw[s.fqn] = math.exp(sum(logs) / len(logs)) if logs else 0.0
            for form in FORMS:
                m.weight.copy_(W - deltas[s.fqn][form].to(W.dtype))
                h = held_loss()
                m.weight.copy_(W)
                pf = pred["form:" + form]
                rows.append({
                    "site": s.fqn, "form": form, "rel": pf["rel"],
                    **{f"d_{k}": h[k] - base_h[k] for k in h},
                    "unweighted": pf["rel"],
                    **{e: weights[e][s.fqn] * pf["rel"] for e in weights},
                    # the weight from the probe of the form's own kind only
                    "probe-kind": pred[PROBES[FORMS.index(form)]]["probe"]
                    / max(pred[PROBES[FORMS.index(form)]]["rel"], 1e-300) * pf["rel"],
                    "geo-kind": math.sqrt(weights["fisher"][s.fqn]
                                          * kind_w[s.fqn][KIND_OF_FORM[form]]) * pf["rel"],
                    "kfac-direct": pf.get("kfac", float("nan")),
                    "exact-direct": pf["probe"],
                })
    rec["seconds_measure"] = round(time.perf_counter() - t0, 1)
    meas = robust_normalize(meas_raw)[0]
    for r in rows:
        r["measured"] = meas[r["site"]] * r["rel"]
    rec["rows"] = rows
    rec["spearman"] = {}
    for target in [k for k in rows[0] if k.startswith("d_")]:
        for subset in ("all", *FORMS):
            sel = [r for r in rows if subset == "all" or r["form"] == subset]
            y = [r[target] for r in sel]
            rec["spearman"][f"{target}/{subset}"] = {
                p: round(spearman([r[p] for r in sel], y), 3) for p in PREDICTORS
            }
    return rec


# ------------------------------------------------------------------------------ models


def lm_losses(model: torch.nn.Module, windows: Tensor) -> Callable[[], dict[str, float]]:
    """Held-out mean cross-entropy and mean KL(dense ‖ current) per token."""
    with torch.inference_mode():
        ref = [torch.log_softmax(model(input_ids=w[None], use_cache=False).logits[0, :-1], -1)
               for w in windows]

    def f() -> dict[str, float]:
        ce = kl = 0.0
        n = 0
        with torch.inference_mode():
            for w, lp_ref in zip(windows, ref):
                lp = torch.log_softmax(model(input_ids=w[None], use_cache=False).logits[0, :-1], -1)
                ce += float(-lp.gather(-1, w[1:, None]).sum())
                kl += float((lp_ref.exp() * (lp_ref - lp)).sum())
                n += w.numel() - 1
        return {"ce": ce / n, "kl": kl / n}

    return f


def smollm2(a: argparse.Namespace) -> dict[str, Any]:
    from slimfx.data.text import calibration_batches, heldout_windows
    from slimfx.models import load_smollm2

    model, tok = load_smollm2()
    calib = calibration_batches(tok, n=a.n_calib, seq_len=a.seq_len)
    held = heldout_windows(tok, n=a.n_held, seq_len=a.seq_len)
    all_sites, _ = find_sites(model, ((), {"input_ids": calib[0][:, :16], "use_cache": False}))
    sites = [s for s in all_sites if not s.tied]
    meas = [s for s in sites if int(s.fqn.split(".")[2]) % a.every == 0]
    held_loss = lm_losses(model, held)
    calib_eval = torch.cat(calib[: a.n_probe_calib])
    c_loss = lm_losses(model, calib_eval)
    if a.ppl_only:
        return {"model": "SmolLM2-135M", "ppl": ppl_grid(a, model, tok, sites, calib)}
    rec = predictiveness("SmolLM2-135M", model, sites, meas, calib, held_loss,
                         lambda: c_loss()["kl"], None)
    if a.ppl:
        rec["ppl"] = ppl_grid(a, model, tok, sites, calib)
    return rec


def olmo2(a: argparse.Namespace) -> dict[str, Any]:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from slimfx.data.text import calibration_batches, heldout_windows
    from slimfx.models import load_smollm2

    _, tok = load_smollm2()
    torch.manual_seed(0)
    cfg = Olmo2Config(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=False)
    model = Olmo2ForCausalLM(cfg).eval()
    calib = calibration_batches(tok, n=a.n_calib, seq_len=128)
    held = heldout_windows(tok, n=a.n_held, seq_len=128)
    all_sites, _ = find_sites(model, ((), {"input_ids": calib[0][:, :16], "use_cache": False}))
    sites = [s for s in all_sites if s.fqn != "lm_head"]
    gen = torch.Generator().manual_seed(1)

    def sampled_ce(m: torch.nn.Module, batch: Tensor) -> Tensor:
        logits = m(input_ids=batch, use_cache=False).logits[0]
        y = torch.multinomial(torch.softmax(logits.detach().float(), -1), 1, generator=gen)
        return torch.nn.functional.cross_entropy(logits, y[:, 0])

    held_loss = lm_losses(model, held)
    c_loss = lm_losses(model, torch.cat(calib[: a.n_probe_calib]))
    return predictiveness("OLMo-2-style random (post-norm, qk-norm)", model, sites, sites,
                          calib, lambda: {"kl": held_loss()["kl"]}, lambda: c_loss()["kl"],
                          sampled_ce)


def minilm(a: argparse.Namespace) -> dict[str, Any]:
    from slimfx.data.text import news_text
    from slimfx.eval import sentences
    from slimfx.models import load_minilm

    model, tok = load_minilm()
    arts = news_text().split("\n\n")
    half = len(arts) // 2
    cal_s = sentences("\n".join(arts[:half]), a.n_calib * 8)
    held_s = sentences("\n".join(arts[half:]), a.n_held * 16)
    calib = [dict(tok(s, return_tensors="pt")) for s in cal_s]
    held = [dict(tok(s, return_tensors="pt")) for s in held_s]
    all_sites, _ = find_sites(model, ((), calib[0]))
    sites = [s for s in all_sites if not s.fqn.startswith("pooler")]

    def emb(batch: Mapping[str, Tensor]) -> Tensor:
        return model(**batch).last_hidden_state.mean(1)[0]

    with torch.inference_mode():
        ref_c = [emb(b) for b in calib]
        ref_h = [emb(b) for b in held]
    gen = torch.Generator().manual_seed(2)
    index = {id(b): i for i, b in enumerate(calib)}

    def pseudo(m: torch.nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        e = m(**batch).last_hidden_state.mean(1)[0]
        r = ref_c[index[id(batch)]]
        u = torch.randn(r.shape, generator=gen)
        rh = r / r.norm()
        z = (u - rh * (rh @ u)) / r.norm()  # z ~ N(0, H), H = (I − r̂r̂ᵀ)/‖r‖²
        return z @ e

    def cos_loss(batches: Sequence[Mapping[str, Tensor]], refs: Sequence[Tensor]) -> float:
        with torch.inference_mode():
            return sum(1 - float(torch.cosine_similarity(emb(b), r, 0))
                       for b, r in zip(batches, refs)) / len(batches)

    return predictiveness("all-MiniLM-L6-v2", model, sites, sites, calib,
                          lambda: {"cos": cos_loss(held, ref_h)},
                          lambda: cos_loss(calib[: 4 * a.n_probe_calib],
                                           ref_c[: 4 * a.n_probe_calib]), pseudo)


# ------------------------------------------------------------------------------ part 2


def ppl_grid(a: argparse.Namespace, model: torch.nn.Module, tok: Any, sites: Sequence[Any],
             calib: Sequence[Tensor]) -> dict[str, Any]:
    """SmolLM2 perplexity per budget and weighting, one candidate set."""
    sys.path.insert(0, "benchmarks")
    from mixed_quality import WeightSwap, window_nll  # noqa: E402

    from slimfx.cost.candidates import build_problem
    from slimfx.data.text import calibration_batches, heldout_windows
    from slimfx.planning.problem import Budget, BudgetProblem, InfeasibleBudgetError, SiteOptions
    from slimfx.planning.solve import solve

    out: dict[str, Any] = {}
    both = calibration_batches(tok, n=a.ppl_calib + a.ppl_check, seq_len=a.seq_len)
    pcal, check = both[: a.ppl_calib], torch.cat(both[a.ppl_calib :])  # same seed: disjoint
    check_loss = lm_losses(model, check)  # held-out *calibration* windows: what "auto" sees
    held = heldout_windows(tok, n=a.ppl_eval, seq_len=a.seq_len)
    t0 = time.perf_counter()
    stats, rec = collect_sensitivity(model, sites, pcal, progress=False)
    out["seconds_probe_pass"] = round(time.perf_counter() - t0, 1)

    def gram_of(fqn: str) -> tuple[Tensor | None, int]:
        return stats.fit_gram(fqn), stats.tokens.get(stats.group_of(fqn), 0)

    ratios = rec.ratios("probe", gram_of)
    fisher_w = robust_normalize(rec.raw("fisher", gram_of), floor=0.0)[0]
    kind_w = kind_weights(ratios, stats.sensitivity_scale)
    weights: dict[str, dict[str, Any]] = {
        "unweighted": {s.fqn: 1.0 for s in sites},
        "fisher": fisher_w,
        "probe": stats.sensitivity,
        "probe-kind": kind_w,
        "geo": probe_weights(rec, "geo", gram_of)[0],  # = √(fisher_w · probe), renormalized
        "geo-kind": {
            f: {k: math.sqrt(fisher_w[f] * v) for k, v in kw.items()} for f, kw in kind_w.items()
        },
    }
    weights = {k: v for k, v in weights.items() if k in a.weightings.split(",")}
    if a.measured_windows > 0:
        t0 = time.perf_counter()
        with torch.no_grad():
            raw = measured_raw(model, sites, pcal, call_model, stats.fit_gram,
                               windows=a.measured_windows)
        weights["measured"] = robust_normalize(raw)[0]
        out["seconds_measured"] = round(time.perf_counter() - t0, 1)
        log(f"measured weights {out['seconds_measured']} s")
    out["weights"] = weights
    stats.sensitivity = None
    mods = dict(model.named_modules())
    wts = {s.fqn: mods[s.fqn].weight.detach() for s in sites}
    t0 = time.perf_counter()
    base, _ = build_problem(sites, wts, stats, families=tuple(a.families.split(",")),
                            progress=False)
    out["seconds_candidates"] = round(time.perf_counter() - t0, 1)
    swap = WeightSwap(model, [s.fqn for s in sites], {s.fqn: stats.fit_gram(s.fqn) for s in sites})
    count = held.shape[0] * (held.shape[1] - 1)
    out["dense"] = math.exp(float(window_nll(model, held).sum()) / count)
    cells = []
    def weight_of(w: Any, decision: Any) -> float:
        return float(w.get(decision.kind, 1.0)) if isinstance(w, dict) else float(w)

    for b in [float(x) for x in a.budgets.split(",")]:
        lowrank_only = b >= 0.8
        for wname, w in weights.items():
            sites_w = []
            for so in base.sites:
                opts = [o for o in so.options if not lowrank_only or
                        type(o.decision).__name__ in ("DenseConfig", "LowRankConfig")]
                ws = w[so.name]
                opts = [dataclasses.replace(o, error=o.error * weight_of(ws, o.decision))
                        for o in opts]
                site_w = ws if not isinstance(ws, dict) else max(ws.values())
                sites_w.append(SiteOptions(so.name, opts, so.dense_bytes, so.dense_latency_s,
                                           site_w))
            prob = BudgetProblem(sites_w, base.workload, base.target, base.meta)
            try:
                sol = solve(prob, Budget(memory=b))
            except InfeasibleBudgetError:
                cells.append({"budget": b, "weighting": wname, "ppl": None})
                continue
            dec = {s.name: sol.decision(s.name) for s in prob.sites}
            with swap.applied(dec):
                ppl = math.exp(float(window_nll(model, held).sum()) / count)
                chk = check_loss() if a.ppl_check else {}
            cells.append({"budget": b, "weighting": wname, "ppl": round(ppl, 3),
                          "fraction": round(sol.fraction, 4), "lowrank_only": lowrank_only,
                          "check_ce": chk.get("ce"), "check_kl": chk.get("kl"),
                          "kinds": dict(Counter(d.kind for d in dec.values()))})
            log(f"ppl budget {b} {wname}: {ppl:.3f} check {chk}")
    out["cells"] = cells
    out["auto"] = auto_pick(cells, a.auto.split(","))
    return out


def auto_pick(cells: Sequence[Mapping[str, Any]], among: Sequence[str]) -> list[dict]:
    """Per budget, the plan among the weightings ``among`` with the lowest KL to the dense
    model on the held-out calibration windows (what ``sensitivity="auto"`` would keep)."""
    out = []
    for b in sorted({c["budget"] for c in cells}, reverse=True):
        cand = [c for c in cells if c["budget"] == b and c["weighting"] in among
                and c.get("check_kl") is not None]
        if cand:
            best = min(cand, key=lambda c: c["check_kl"])
            out.append({"budget": b, "among": list(among), "picked": best["weighting"],
                        "ppl": best["ppl"]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="olmo2,minilm,smollm2")
    ap.add_argument("--every", type=int, default=3, help="SmolLM2: measure every k-th layer")
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--n-held", type=int, default=4)
    ap.add_argument("--n-probe-calib", type=int, default=2,
                    help="calibration windows for the measured-probe predictor")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl", action="store_true", help="SmolLM2 perplexity per budget")
    ap.add_argument("--budgets", default="0.8,0.5,0.35,0.3,0.25")
    ap.add_argument("--families", default="lowrank,int8,int4,int4_gptq")
    ap.add_argument("--ppl-calib", type=int, default=16)
    ap.add_argument("--ppl-eval", type=int, default=16)
    ap.add_argument("--ppl-check", type=int, default=4,
                    help="held-out calibration windows scored per plan (for 'auto')")
    ap.add_argument("--weightings", default="unweighted,fisher,probe,probe-kind,geo,geo-kind")
    ap.add_argument("--auto", default="fisher,probe-kind",
                    help="weightings 'auto' chooses among (lowest held-out calibration KL)")
    ap.add_argument("--ppl-only", action="store_true", help="SmolLM2: only the perplexity grid")
    ap.add_argument("--measured-windows", type=int, default=2,
                    help="perplexity grid: calibration windows of the measured weighting (0: off)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    res: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "machine": platform.machine(),
        "torch": torch.__version__, "args": vars(a),
    }
    for m in a.models.split(","):
        t0 = time.perf_counter()
        res[m] = {"smollm2": smollm2, "olmo2": olmo2, "minilm": minilm}[m](a)
        res[m]["seconds_total"] = round(time.perf_counter() - t0, 1)
        if "spearman" in res[m]:
            log(f"{m}: {json.dumps(res[m]['spearman'])}")
            log(f"{m}: probe pass {res[m]['seconds_probe_pass']} s, fisher pass "
                f"{res[m]['seconds_fisher_pass']} s")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    for m in a.models.split(","):
        if "spearman" in res[m]:
            print(f"\n{res[m]['model']}: {res[m]['measured_sites']} sites × 2 forms")
            print("| measured / forms | " + " | ".join(PREDICTORS) + " |")
            print("|---" * (len(PREDICTORS) + 1) + "|")
            for k, v in res[m]["spearman"].items():
                print(f"| {k} | " + " | ".join(f"{v[p]:.3f}" for p in PREDICTORS) + " |")
        if "ppl" in res[m]:
            print(json.dumps(res[m]["ppl"]["cells"]))
            print(json.dumps(res[m]["ppl"]["auto"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
