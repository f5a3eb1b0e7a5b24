"""Mixed compression families vs single families on SmolLM2-135M and all-MiniLM-L6-v2 (issue 3).

One calibration pass and one candidate set per model: every family's candidates are computed
once and merged into one ``BudgetProblem``; each variant below is that problem with the other
families' options removed (dense always stays), solved per budget by the exact knapsack:

  int4 RTN     family ``int4``        (asymmetric g32/g64/g128, symmetric g128; RTN)
  int4 GPTQ    family ``int4_gptq``   (asymmetric g32/g64/g128; activation-aware GPTQ)
  mixed        every family given to ``--families``
  int8, lowrank, 2:4, LoRC/LQ-LoRA, 2:4+lowrank: the other families alone
  int4 RTN gG / int4 GPTQ gG: one group size only (``--no-groups`` drops these)

Budget = fraction of the 16-bit bytes of the compressed sites. SmolLM2's lm_head is tied to the
embedding: compressing it would store a second copy, so it stays dense and is left out of the
budget (the table also gives the fraction over all linears, lm_head included, the convention
of ``lowrank_quality.py``); the sites are the 210 decoder linears. MiniLM: the 36 encoder
linears (its pooler is unused by mean-pooled sentence embeddings and stays dense).

Quality: SmolLM2 perplexity on held-out news windows (calibration windows from the first half of
gensim's ``lee_background.cor``, held-out windows from the second half, as in
``lowrank_quality.py``); MiniLM per-sentence cosine of sentence embeddings before/after
(calibration sentences from the first half of the news articles, evaluation sentences from the
second half). A plan is evaluated by writing each site's reconstructed weight
``reconstruct(d, factorize(W, d, G))`` (the functions the passes use) into the model's own
linear, then restoring it; ``--check-apply`` compares that once with ``apply_plan``.

    OMP_NUM_THREADS=1 python benchmarks/mixed_quality.py [--budgets 0.5,0.35,0.3,0.25]
        [--families int4,int4_gptq] [--n-calib 32] [--n-eval 32] [--models smollm2,minilm]
        [--include 'model.layers.0.*'] [--no-fisher] [--no-groups] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from slimfx.api import find_sites
from slimfx.cost.calibration import CalibrationStats, collect_stats
from slimfx.cost.candidates import build_problem
from slimfx.eval.grid import GridStats, grid_stats
from slimfx.numerics import factorize, reconstruct
from slimfx.numerics.quant import dequantize, quantize_rtn
from slimfx.planning.configs import (
    Decision,
    DenseConfig,
    LowRankConfig,
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)
from slimfx.planning.problem import Budget, BudgetProblem, InfeasibleBudgetError, SiteOptions
from slimfx.planning.solve import Solution, solve

ALL_FAMILIES = (
    "lowrank", "int8", "int4", "int4_gptq", "sparse24", "lowrank_quant", "sparse24_lowrank"
)
LABEL = {
    "int4": "int4 RTN",
    "int4_gptq": "int4 GPTQ",
    "int8": "int8",
    "lowrank": "lowrank",
    "sparse24": "2:4",
    "lowrank_quant": "LoRC/LQ-LoRA",
    "sparse24_lowrank": "2:4+lowrank",
}
MAIN_ORDER = ("int4", "int4_gptq", "mixed", "int8", "lowrank", "sparse24", "lowrank_quant",
              "sparse24_lowrank")
GROUPS = (32, 64, 128)
LABELS_ALL = {
    "mixed": "mixed",
    **LABEL,
    **{f"{f}_g{g}": f"{LABEL[f]} g{g}" for f in ("int4", "int4_gptq") for g in GROUPS},
}


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries only the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- variants


def family_of(d: Decision) -> str | None:
    """The candidate family that proposes ``d`` (None for dense)."""
    if isinstance(d, DenseConfig):
        return None
    if isinstance(d, LowRankConfig):
        return "lowrank"
    if isinstance(d, QuantConfig):
        if d.bits == 8:
            return "int8"
        return "int4_gptq" if d.method == "gptq" else "int4"
    if isinstance(d, Sparse24Config):
        return "sparse24"
    if isinstance(d, LowRankQuantConfig):
        return "lowrank_quant"
    if isinstance(d, Sparse24LowRankConfig):
        return "sparse24_lowrank"
    raise ValueError(f"no family for decision {d.short()}")


@dataclass(frozen=True)
class Variant:
    """A restriction of the full problem: the families allowed, optionally one group size."""

    key: str
    label: str
    families: tuple[str, ...]
    group_size: int | None = None

    def allows(self, d: Decision) -> bool:
        fam = family_of(d)
        if fam is None:
            return True
        if fam not in self.families:
            return False
        return self.group_size is None or getattr(d, "group_size", None) == self.group_size

    @property
    def single(self) -> bool:
        return len(self.families) == 1


def make_variants(families: Sequence[str], groups: bool) -> list[Variant]:
    """The main columns (each family alone, and ``mixed`` when there are several), then the
    per-group int4 columns."""
    fams = [f for f in ALL_FAMILIES if f in families]
    by_key = {f: Variant(f, LABEL[f], (f,)) for f in fams}
    if len(fams) > 1:
        by_key["mixed"] = Variant("mixed", "mixed", tuple(fams))
    out = [by_key[k] for k in MAIN_ORDER if k in by_key]
    if groups:
        for f in ("int4", "int4_gptq"):
            if f in fams:
                out += [Variant(f"{f}_g{g}", f"{LABEL[f]} g{g}", (f,), g) for g in GROUPS]
    return out


def restrict(problem: BudgetProblem, variant: Variant) -> BudgetProblem:
    """``problem`` with only the options ``variant`` allows (dense is always allowed)."""
    sites = [
        SiteOptions(
            s.name,
            [o for o in s.options if variant.allows(o.decision)],
            s.dense_bytes,
            s.dense_latency_s,
            s.sensitivity,
        )
        for s in problem.sites
    ]
    meta = {**problem.meta, "variant": variant.key}
    return BudgetProblem(sites, problem.workload, problem.target, meta)


def merge_problems(parts: Sequence[BudgetProblem]) -> BudgetProblem:
    """One problem whose sites offer dense plus every part's non-dense options (each part built
    for the same sites with one family; a decision offered twice is kept once)."""
    first = parts[0]
    sites = []
    for i, s in enumerate(first.sites):
        opts = [o for o in s.options if isinstance(o.decision, DenseConfig)][:1]
        seen = {o.decision for o in opts}
        for p in parts:
            ps = p.sites[i]
            if ps.name != s.name:
                raise ValueError(f"parts list sites in different orders: {ps.name} vs {s.name}")
            for o in ps.options:
                if o.decision not in seen:
                    seen.add(o.decision)
                    opts.append(o)
        sites.append(SiteOptions(s.name, opts, s.dense_bytes, s.dense_latency_s, s.sensitivity))
    meta = {**first.meta, "families": [f for p in parts for f in p.meta.get("families", [])]}
    return BudgetProblem(sites, first.workload, first.target, meta)


@dataclass
class Cell:
    """One (variant, budget): the solution or why there is none, and the measured quality."""

    variant: str
    budget: float
    status: str  # "ok" or "infeasible"
    smallest: float | None = None  # smallest achievable fraction when infeasible
    fraction: float | None = None
    objective: float | None = None
    solver: str = ""
    picks: dict[str, int] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    samples: list[float] = field(default_factory=list)  # per window / sentence, for pairing
    by_family: dict[str, list[float]] = field(default_factory=dict)  # family → [est, held-out]
    decisions: dict[str, Decision] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "decisions"}
        out["plan"] = {f: d.short() for f, d in self.decisions.items()}
        return out


def solve_cell(problem: BudgetProblem, variant: Variant, budget: float) -> Cell:
    """Solve the restricted problem at ``budget``; infeasible becomes a cell, not an error."""
    sub = restrict(problem, variant)
    smallest = sub.min_bytes() / sub.dense_bytes
    try:
        sol: Solution = solve(sub, Budget(memory=budget))
    except InfeasibleBudgetError:
        return Cell(variant.key, budget, "infeasible", smallest=smallest)
    picks = Counter(family_of(sol.decision(s.name)) or "dense" for s in sub.sites)
    return Cell(
        variant.key,
        budget,
        "ok",
        fraction=sol.fraction,
        objective=sol.error,
        solver=f"{sol.solver} {sol.status}",
        picks=dict(sorted(picks.items())),
        decisions={s.name: sol.decision(s.name) for s in sub.sites},
    )


# ------------------------------------------------------------------------ evaluation


class WeightSwap:
    """Evaluates plans on the model itself: each planned site's weight is replaced by the dense
    matrix its compressed form computes, and restored afterwards. Reconstructions are cached
    per (site, decision) up to ``cache_bytes``."""

    def __init__(
        self,
        model: torch.nn.Module,
        fqns: Sequence[str],
        grams: Mapping[str, Tensor | None],
        cache_bytes: float = 3e9,
    ) -> None:
        mods = dict(model.named_modules())
        self.mods = {f: mods[f] for f in fqns}
        self.dense = {f: m.weight.detach().clone() for f, m in self.mods.items()}
        self.grams = grams
        self.cache: dict[tuple[str, Decision], Tensor] = {}
        self.cache_bytes, self.cached = cache_bytes, 0
        self.seconds = 0.0

    def approx(self, fqn: str, d: Decision) -> Tensor:
        hit = self.cache.get((fqn, d))
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        W = self.dense[fqn]
        Wh = reconstruct(d, factorize(W, d, self.grams.get(fqn))).to(W.dtype)
        self.seconds += time.perf_counter() - t0
        nbytes = Wh.numel() * Wh.element_size()
        if self.cached + nbytes <= self.cache_bytes:
            self.cache[(fqn, d)] = Wh
            self.cached += nbytes
        return Wh

    @contextlib.contextmanager
    def applied(self, decisions: Mapping[str, Decision]) -> Iterator[None]:
        try:
            with torch.no_grad():
                for fqn, d in decisions.items():
                    if not isinstance(d, DenseConfig):
                        self.mods[fqn].weight.copy_(self.approx(fqn, d))
            yield
        finally:
            with torch.no_grad():
                for fqn in decisions:
                    self.mods[fqn].weight.copy_(self.dense[fqn])


def build_all(
    sites: Sequence[Any],
    weights: Mapping[str, Tensor],
    stats: CalibrationStats,
    families: Sequence[str],
) -> tuple[BudgetProblem, dict[str, float]]:
    """Every family's candidates, once, merged into one problem; seconds per family."""
    parts, secs = [], {}
    for fam in families:
        t0 = time.perf_counter()
        p, _ = build_problem(sites, weights, stats, families=(fam,), progress=False)
        secs[fam] = round(time.perf_counter() - t0, 1)
        n = sum(len(s.options) - 1 for s in p.sites)
        log(f"  candidates {fam}: {n} options in {secs[fam]} s")
        parts.append(p)
    return merge_problems(parts), secs


@dataclass
class Evaluation:
    """What one plan measured: headline numbers, per-sample values, per-family objectives."""

    quality: dict[str, float]
    samples: list[float]
    by_family: dict[str, list[float]]


def run_grid(
    problem: BudgetProblem,
    variants: Sequence[Variant],
    budgets: Sequence[float],
    evaluate: Callable[[Mapping[str, Decision]], Evaluation],
) -> list[Cell]:
    """Solve every (variant, budget) and evaluate the feasible plans (one evaluation per
    distinct plan)."""
    cells: list[Cell] = []
    seen: dict[tuple, Evaluation] = {}
    for b in budgets:
        for v in variants:
            c = solve_cell(problem, v, b)
            if c.status == "ok":
                key = tuple(sorted((f, d.short()) for f, d in c.decisions.items()))
                if key not in seen:
                    seen[key] = evaluate(c.decisions)
                ev = seen[key]
                c.quality, c.samples, c.by_family = ev.quality, ev.samples, ev.by_family
            q = ", ".join(f"{k} {x:.4g}" for k, x in c.quality.items())
            log(f"  {b:g} {v.label}: {c.status} {q}")
            cells.append(c)
    return cells


class HeldoutErrors:
    """The solver's per-site error, re-measured on held-out inputs.

    The problem's errors are tr(E G Eᵀ)/tr(W G Wᵀ) on the damped *calibration* Gram, times the
    site's sensitivity; fitted forms (GPTQ, whitened SVD, LQ-LoRA, S+L) are fitted to that same
    Gram, so their estimate is in-sample. Here the same ratio uses the raw Gram of held-out
    inputs (dense model's activations, windows/sentences not used for calibration nor for
    the quality metric), so a family whose estimate is optimistic shows a ratio above 1."""

    def __init__(
        self,
        problem: BudgetProblem,
        dense: Mapping[str, Tensor],
        grams: Mapping[str, Tensor | None],
        sens: Mapping[str, float],
    ) -> None:
        self.est = {(s.name, o.decision): o.error for s in problem.sites for o in s.options}
        self.dense, self.sens = dense, sens
        self.G = {f: None if g is None else g.to(torch.float32) for f, g in grams.items()}
        self.den = {f: self._quad(W, self.G[f]) for f, W in dense.items()}
        self.cache: dict[tuple[str, Decision], float] = {}

    @staticmethod
    def _quad(M: Tensor, G: Tensor | None) -> float:
        M = M.detach().to(torch.float32)
        if G is None:
            return float(M.square().sum(dtype=torch.float64))
        return float(((M @ G) * M).sum(dtype=torch.float64))

    def rel(self, fqn: str, d: Decision, approx: Tensor) -> float:
        """Held-out relative output error of ``approx`` (the weight ``d`` computes)."""
        key = (fqn, d)
        if key not in self.cache:
            num = self._quad(self.dense[fqn].float() - approx.float(), self.G[fqn])
            self.cache[key] = num / self.den[fqn] if self.den[fqn] > 0 else float(num > 0)
        return self.cache[key]

    def plan(
        self, decisions: Mapping[str, Decision], weight: Callable[[str], Tensor]
    ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """(estimate and held-out objectives, per-family [estimate, held-out]) of a plan whose
        reconstructed weights ``weight(fqn)`` returns."""
        fam: dict[str, list[float]] = {}
        for fqn, d in decisions.items():
            f = family_of(d)
            if f is None:
                continue
            acc = fam.setdefault(f, [0.0, 0.0])
            acc[0] += self.est[(fqn, d)]
            acc[1] += self.sens[fqn] * self.rel(fqn, d, weight(fqn))
        tot = {
            "est_obj": sum(v[0] for v in fam.values()),
            "heldout_obj": sum(v[1] for v in fam.values()),
        }
        return tot, fam

    def family_bias(self) -> dict[str, dict[str, float]]:
        """Per family, over every (site, decision) measured: held-out / estimate ratio
        quartiles (sensitivity cancels)."""
        ratios: dict[str, list[float]] = {}
        for (fqn, d), h in self.cache.items():
            e = self.est[(fqn, d)] / self.sens[fqn] if self.sens[fqn] > 0 else 0.0
            if e > 0:
                ratios.setdefault(family_of(d) or "dense", []).append(h / e)
        out = {}
        for f, r in sorted(ratios.items()):
            t = torch.tensor(r, dtype=torch.float64)
            q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
            out[f] = {"n": len(r), "q1": float(q[0]), "median": float(q[1]), "q3": float(q[2])}
        return out


def window_nll(model: torch.nn.Module, windows: Tensor, batch_size: int = 4) -> Tensor:
    """Summed next-token NLL (nats) of each window, float64 (n,); perplexity is
    exp(Σ / (n·(L−1))), as ``slimfx.eval.perplexity`` computes it."""
    out = []
    with torch.inference_mode():
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s : s + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            out.append(nll.view(ids.shape[0], -1).sum(1).double())
    return torch.cat(out)


# -------------------------------------------------------------------- grid + RTN error


def rel_weight_error(W: Tensor, g: int) -> float:
    """‖W − Ŵ‖² / ‖W‖² of slimfx's int4 asymmetric RTN at group ``g``."""
    Wh = dequantize(quantize_rtn(W, 4, g, False), 4, g, False, W.shape[1])
    return float((W.double() - Wh.double()).square().sum() / W.double().square().sum())


def weight_report(weights: Mapping[str, Tensor]) -> dict[str, Any]:
    """Grid detector counts (32-blocks on a 4-bit affine grid; 64-blocks too) and slimfx's
    int4 RTN relative weight error per group size (min / mean / max over sites)."""
    g32, g64 = GridStats(0, 0, 0, 0), GridStats(0, 0, 0, 0)
    for W in weights.values():
        g32 = g32 + grid_stats(W, 32, 4)
        g64 = g64 + grid_stats(W, 64, 4)
    errs: dict[str, Any] = {}
    for g in GROUPS:
        e = [rel_weight_error(W, g) for W in weights.values() if W.shape[1] % g == 0]
        errs[f"g{g}"] = (
            {"sites": len(e), "min": min(e), "mean": sum(e) / len(e), "max": max(e)} if e else None
        )
    return {"grid32": g32.__dict__, "grid64": g64.__dict__, "rtn_rel_weight_error": errs}


def grid_line(name: str, rep: dict[str, Any]) -> str:
    g32, g64 = GridStats(**rep["grid32"]), GridStats(**rep["grid64"])
    errs = "; ".join(
        f"{g} {e['mean']:.2e} ({e['min']:.1e}…{e['max']:.1e}, {e['sites']} sites)"
        if e
        else f"{g} n/a (no site's in_features divisible)"
        for g, e in rep["rtn_rel_weight_error"].items()
    )
    return (
        f"{name}: {g32.affine}/{g32.blocks} 32-blocks ({100 * g32.fraction():.1f}%) fit an "
        f"affine 4-bit grid, {100 * g32.fraction('few_distinct'):.1f}% have ≤16 distinct values, "
        f"{100 * g32.fraction('integer_offset'):.1f}% have an offset that is an integer number "
        f"of steps (exact in an integer-zero-point format); 64-blocks on one 4-bit grid: "
        f"{100 * g64.fraction():.1f}%. int4 asym RTN relative weight error ‖W−Ŵ‖²/‖W‖²: {errs}"
    )


# --------------------------------------------------------------------------- models


def _grid_and_report(
    rec: dict[str, Any],
    a: argparse.Namespace,
    sites: Sequence[Any],
    weights: Mapping[str, Tensor],
    stats: CalibrationStats,
    heldout: CalibrationStats,
    families: Sequence[str],
    budgets: Sequence[float],
    model: torch.nn.Module,
    measure: Callable[[], tuple[dict[str, float], list[float]]],
) -> WeightSwap:
    """Candidates once, then every (variant, budget): solve, swap weights in, ``measure``."""
    t0 = time.perf_counter()
    problem, rec["seconds"]["candidates"] = build_all(sites, weights, stats, families)
    rec["seconds"]["candidates_total"] = round(time.perf_counter() - t0, 1)
    rec["options"] = sum(len(s.options) for s in problem.sites)
    rec["dense_bytes"] = problem.dense_bytes
    fqns = [s.fqn for s in sites]
    grams = {f: stats.fit_gram(f) for f in fqns}
    swap = WeightSwap(model, fqns, grams, a.cache_gb * 1e9)
    sens = {f: stats.sensitivity_of(f) for f in fqns}
    held = HeldoutErrors(problem, swap.dense, {f: heldout.gram(f) for f in fqns}, sens)

    def evaluate(decisions: Mapping[str, Decision]) -> Evaluation:
        with swap.applied(decisions):
            quality, samples = measure()
            objs, fam = held.plan(decisions, lambda f: swap.mods[f].weight.detach())
        return Evaluation({**quality, **objs}, samples, fam)

    t0 = time.perf_counter()
    rec["cells"] = run_grid(problem, make_variants(families, not a.no_groups), budgets, evaluate)
    rec["seconds"]["solve_and_eval"] = round(time.perf_counter() - t0, 1)
    rec["seconds"]["factorize_for_eval"] = round(swap.seconds, 1)
    rec["family_bias"] = held.family_bias()
    return swap


def smollm2_part(a: argparse.Namespace, budgets: list[float], families: list[str]) -> dict:
    """Perplexity grid for SmolLM2-135M; returns a JSON-able record."""
    from slimfx.data.text import calibration_batches, heldout_windows
    from slimfx.eval import perplexity
    from slimfx.models import load_smollm2

    rec: dict[str, Any] = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, fp32)", "seconds": {}}
    model, tok = load_smollm2()
    calib = calibration_batches(tok, name=a.corpus, n=a.n_calib, seq_len=a.seq_len)
    windows = heldout_windows(tok, name=a.corpus, n=a.n_eval + a.n_diag, seq_len=a.seq_len)
    held, diag = windows[: a.n_eval], windows[a.n_eval :]
    all_sites, _ = find_sites(model, ((), {"input_ids": calib[0][:, :16], "use_cache": False}))
    sites = [s for s in all_sites if not s.tied]
    if a.include:
        sites = [s for s in sites if any(fnmatch.fnmatchcase(s.fqn, p) for p in a.include)]
    mods = dict(model.named_modules())
    weights = {s.fqn: mods[s.fqn].weight.detach() for s in sites}
    rec["sites"] = len(sites)
    rec["lm_head_bytes"] = sum(2 * s.numel for s in all_sites if s.tied)
    rec["weights"] = weight_report(weights)
    emb = model.get_input_embeddings().weight.detach()
    rec["embedding_grid"] = {
        "q8_32": grid_stats(emb, 32, 8).__dict__,
        "q4_32": grid_stats(emb, 32, 4).__dict__,
    }
    t0 = time.perf_counter()
    stats = collect_stats(model, all_sites, calib, fisher=not a.no_fisher, progress=False)
    rec["seconds"]["calibration"] = round(time.perf_counter() - t0, 1)
    heldout = collect_stats(model, sites, [w[None] for w in diag], progress=False)
    log(f"smollm2: {len(sites)} sites, stats ({'Fisher' if not a.no_fisher else 'no Fisher'}) "
        f"{rec['seconds']['calibration']} s")
    t0 = time.perf_counter()
    rec["dense_ppl"] = perplexity(model, held, progress=False)
    rec["seconds"]["one_eval"] = round(time.perf_counter() - t0, 1)
    dense_nll = window_nll(model, held)
    count = held.shape[0] * (held.shape[1] - 1)
    ppl2 = math.exp(float(dense_nll.sum()) / count)
    assert abs(ppl2 / rec["dense_ppl"] - 1) < 1e-6, (ppl2, rec["dense_ppl"])  # same metric
    log(f"smollm2: dense ppl {rec['dense_ppl']:.3f} ({rec['seconds']['one_eval']} s)")

    def measure() -> tuple[dict[str, float], list[float]]:
        nll = window_nll(model, held)
        return {"ppl": math.exp(float(nll.sum()) / count)}, (nll / (held.shape[1] - 1)).tolist()

    swap = _grid_and_report(
        rec, a, sites, weights, stats, heldout, families, budgets, model, measure
    )
    if a.check_apply:
        rec["check_apply"] = check_apply(model, sites, swap.grams, rec["cells"], held)
    rec["fisher"] = not a.no_fisher
    rec["held"] = list(held.shape)
    rec["diag_windows"] = int(diag.shape[0])
    return rec


def check_apply(
    model: torch.nn.Module,
    sites: Sequence[Any],
    grams: Mapping[str, Tensor | None],
    cells: Sequence[Cell],
    held: Tensor,
) -> dict[str, Any]:
    """Perplexity of the first feasible mixed plan through ``apply_plan`` (real slimfx modules)
    vs the weight-swap evaluation."""
    from slimfx.eval import perplexity
    from slimfx.passes.swap import apply_plan
    from slimfx.planning.plan import Plan

    c = next((c for c in cells if c.variant == "mixed" and c.status == "ok"), None)
    if c is None:
        return {}
    plan = Plan(dict(c.decisions), {s.fqn: s.shape for s in sites})
    new, _ = apply_plan(model, plan, sites, grams, inplace=False)
    ppl = perplexity(new, held, progress=False)
    out = {"budget": c.budget, "apply_plan_ppl": ppl, "swap_ppl": c.quality["ppl"]}
    log(f"check-apply: {out}")
    return out


def minilm_part(a: argparse.Namespace, budgets: list[float], families: list[str]) -> dict:
    """Sentence-embedding cosine grid for all-MiniLM-L6-v2; returns a JSON-able record."""
    from slimfx.data.text import news_text
    from slimfx.eval import embedding_cosine, sentence_embeddings, sentences
    from slimfx.models import load_minilm

    rec: dict[str, Any] = {"model": "all-MiniLM-L6-v2 (fp32)", "seconds": {}}
    model, tok = load_minilm()
    articles = news_text().split("\n\n")
    half = len(articles) // 2
    calib_s = sentences("\n".join(articles[:half]), a.minilm_calib)
    second = sentences("\n".join(articles[half:]), a.minilm_eval + a.minilm_diag)
    eval_s, diag_s = second[: a.minilm_eval], second[a.minilm_eval :]

    def batches(sents: list[str]) -> list[dict[str, Tensor]]:
        return [dict(tok(s, return_tensors="pt")) for s in sents]  # one sentence: no padding

    calib = batches(calib_s)
    all_sites, _ = find_sites(model, ((), calib[0]))
    sites = [s for s in all_sites if not s.fqn.startswith("pooler")]
    mods = dict(model.named_modules())
    weights = {s.fqn: mods[s.fqn].weight.detach() for s in sites}
    rec["sites"] = len(sites)
    rec["weights"] = weight_report(weights)
    t0 = time.perf_counter()
    stats = collect_stats(model, sites, calib, fisher=False, progress=False)
    rec["seconds"]["calibration"] = round(time.perf_counter() - t0, 1)
    heldout = collect_stats(model, sites, batches(diag_s), progress=False)
    rec["calib_tokens"] = sum(int(b["input_ids"].numel()) for b in calib)
    ref = sentence_embeddings(model, tok, eval_s)

    def measure() -> tuple[dict[str, float], list[float]]:
        cos = embedding_cosine(ref, sentence_embeddings(model, tok, eval_s))
        return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}, cos.tolist()

    _grid_and_report(rec, a, sites, weights, stats, heldout, families, budgets, model, measure)
    rec["n_calib"], rec["n_eval"], rec["n_diag"] = len(calib_s), len(eval_s), len(diag_s)
    return rec


# ------------------------------------------------------------------------- reporting


def cell_text(c: Cell | None, metric: Callable[[Cell], str]) -> str:
    if c is None:
        return "–"
    if c.status == "infeasible":
        return f"infeasible (smallest achievable {c.smallest:.3f})"
    return metric(c)


def table(
    rec: dict,
    variants: Sequence[Variant],
    budgets: Sequence[float],
    metric: Callable[[Cell], str],
    budget_col: Callable[[float], str],
) -> list[str]:
    by = {(c.variant, c.budget): c for c in rec["cells"]}
    lines = ["| budget | " + " | ".join(v.label for v in variants) + " |"]
    lines.append("|---|" + "---|" * len(variants))
    for b in budgets:
        cells = [cell_text(by.get((v.key, b)), metric) for v in variants]
        lines.append(f"| {budget_col(b)} | " + " | ".join(cells) + " |")
    return lines


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of a − b over paired samples and twice its standard error."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")
    return float(d.mean()), 2 * se


def checks(rec: dict, budgets: Sequence[float], key: str, better: str, unit: str) -> list[str]:
    """'mixed at least as good as the best single family' per budget, PASS/FAIL with numbers
    and the paired difference per window / sentence (± 2 standard errors)."""
    by = {(c.variant, c.budget): c for c in rec["cells"]}
    singles = {c.variant for c in rec["cells"] if c.variant != "mixed"}
    out = []
    for b in budgets:
        m = by.get(("mixed", b))
        feas = [by[(v, b)] for v in singles if (v, b) in by and by[(v, b)].status == "ok"]
        if m is None or m.status != "ok":
            out.append(f"- {b:g}: n/a (mixed {'infeasible' if m else 'not run'})")
            continue
        if not feas:
            out.append(f"- {b:g}: n/a (no single family feasible); mixed {m.quality[key]:.4g}")
            continue
        pick = min if better == "lower" else max
        best = pick(feas, key=lambda c: (c.quality[key], c.variant))
        mv, bv = m.quality[key], best.quality[key]
        ok = mv <= bv if better == "lower" else mv >= bv
        sym = ("≤" if ok else ">") if better == "lower" else ("≥" if ok else "<")
        dm, se2 = paired(m.samples, best.samples)
        out.append(
            f"- {b:g}: **{'PASS' if ok else 'FAIL'}** mixed {key} {mv:.4g} {sym} best single "
            f"{bv:.4g} ({LABELS_ALL.get(best.variant, best.variant)}); paired mixed − best "
            f"{dm:+.4f} ± {se2:.4f} {unit} (2 SE); solver objective {m.objective:.4g} vs "
            f"{best.objective:.4g}, on held-out inputs {m.quality['heldout_obj']:.4g} vs "
            f"{best.quality['heldout_obj']:.4g}"
        )
    return out


def bias_lines(rec: dict) -> list[str]:
    return [
        f"- {f}: median {v['median']:.2f} (quartiles {v['q1']:.2f}–{v['q3']:.2f}, "
        f"{v['n']} site×decision pairs)"
        for f, v in rec["family_bias"].items()
    ]


def picks_lines(rec: dict, budgets: Sequence[float]) -> list[str]:
    by = {(c.variant, c.budget): c for c in rec["cells"]}
    out = []
    for b in budgets:
        m = by.get(("mixed", b))
        if m is not None and m.status == "ok":
            picks = ", ".join(f"{k} {n}" for k, n in sorted(m.picks.items(), key=lambda t: -t[1]))
            out.append(f"- {b:g} (bytes {m.fraction:.3f}, {m.solver}): {picks}")
    return out


def report(rec: dict, variants: list[Variant], budgets: list[float], smol: bool) -> list[str]:
    main = [v for v in variants if v.group_size is None]
    grp = [v for v in variants if v.group_size is not None]
    if smol:
        extra, dense = rec["lm_head_bytes"], rec["dense_bytes"]

        def bcol(b: float) -> str:
            return f"{b:g} ({(b * dense + extra) / (dense + extra):.3f})"

        def metric(c: Cell) -> str:
            return f"{c.quality['ppl']:.2f}"

        key, better, unit = "ppl", "lower", "nats/token"
        head = (
            f"SmolLM2-135M perplexity (lower is better), held-out {rec['held'][0]}×"
            f"{rec['held'][1]} tokens; dense fp32 = {rec['dense_ppl']:.2f}; "
            f"{'Fisher-weighted' if rec['fisher'] else 'unweighted'} solver errors; "
            f"{rec['sites']} decoder linears (budget in parentheses: fraction of all linears, "
            "the dense tied lm_head included)"
        )
    else:

        def bcol(b: float) -> str:
            return f"{b:g}"

        def metric(c: Cell) -> str:
            return f"{c.quality['mean_cos']:.4f} / {c.quality['min_cos']:.4f}"

        key, better, unit = "mean_cos", "higher", "cosine"
        head = (
            f"all-MiniLM-L6-v2 sentence-embedding cosine to the fp32 model, mean / min over "
            f"{rec['n_eval']} held-out sentences (higher is better); calibration "
            f"{rec['n_calib']} sentences ({rec['calib_tokens']} tokens); unweighted solver "
            f"errors (no Fisher: an encoder has no LM loss); {rec['sites']} encoder linears"
        )
    out = [head, "", *table(rec, main, budgets, metric, bcol)]
    if grp:
        out += ["", "One int4 group size only:", "", *table(rec, grp, budgets, metric, bcol)]
    out += ["", "Achieved bytes fraction / solver:", ""]
    out += table(rec, main, budgets, lambda c: f"{c.fraction:.3f} / {c.solver}", bcol)
    out += ["", "Solver objective on calibration (estimate) / on held-out inputs, Σ sensitivity·"
            "relative output error:", ""]
    out += table(
        rec,
        main,
        budgets,
        lambda c: f"{c.quality['est_obj']:.4g} / {c.quality['heldout_obj']:.4g}",
        bcol,
    )
    out += ["", "Held-out / estimated relative output error per family (every site×decision "
            "evaluated):", *bias_lines(rec)]
    out += ["", "Mixed ≥ best single family:", *checks(rec, budgets, key, better, unit)]
    out += ["", "Mixed solver picks (sites per family):", *picks_lines(rec, budgets)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0.5,0.35,0.3,0.25")
    ap.add_argument("--families", default=",".join(ALL_FAMILIES))
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--n-calib", type=int, default=32, help="SmolLM2 calibration windows")
    ap.add_argument("--n-eval", type=int, default=32, help="SmolLM2 held-out windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--corpus", default="lee")
    ap.add_argument("--minilm-calib", type=int, default=256, help="MiniLM calibration sentences")
    ap.add_argument("--minilm-eval", type=int, default=256, help="MiniLM evaluation sentences")
    ap.add_argument("--n-diag", type=int, default=16,
                    help="SmolLM2 held-out windows (after the eval ones) for the error check")
    ap.add_argument("--minilm-diag", type=int, default=128,
                    help="MiniLM held-out sentences (after the eval ones) for the error check")
    ap.add_argument("--include", action="append", help="SmolLM2 site glob (repeatable)")
    ap.add_argument("--no-fisher", action="store_true", help="SmolLM2: unweighted errors")
    ap.add_argument("--no-groups", action="store_true", help="skip the per-group int4 columns")
    ap.add_argument("--check-apply", action="store_true", help="compare with apply_plan once")
    ap.add_argument("--cache-gb", type=float, default=3.0, help="reconstructed-weight cache")
    ap.add_argument("--json", help="write every number (and every plan) to this file")
    a = ap.parse_args()
    torch.manual_seed(0)
    budgets = [float(x) for x in a.budgets.split(",")]
    families = [f for f in a.families.split(",") if f]
    bad = [f for f in families if f not in ALL_FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; known: {ALL_FAMILIES}")
    models = a.models.split(",")
    t_start = time.perf_counter()
    variants = make_variants(families, not a.no_groups)
    out: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "budgets": budgets,
        "families": families,
    }
    lines = [
        f"{out['date']} · {out['machine']} · torch {out['torch']} · "
        f"OMP_NUM_THREADS={out['omp_threads']}",
        "",
    ]
    if "smollm2" in models:
        rec = smollm2_part(a, budgets, families)
        out["smollm2"] = rec
        e4, e8 = (GridStats(**rec["embedding_grid"][k]) for k in ("q4_32", "q8_32"))
        lines += [
            grid_line("SmolLM2 decoder linears", rec["weights"]),
            f"SmolLM2 tied embedding / lm_head: {100 * e4.fraction():.1f}% of 32-blocks on a "
            f"4-bit grid, {100 * e8.fraction():.1f}% on an 8-bit grid (GGUF Q8_0).",
            "",
            *report(rec, variants, budgets, smol=True),
            "",
        ]
        ca = rec.get("check_apply")
        if ca:
            lines += [
                f"apply_plan check: mixed plan at {ca['budget']:g} through slimfx's modules "
                f"ppl {ca['apply_plan_ppl']:.6f} vs weight swap {ca['swap_ppl']:.6f}",
                "",
            ]
        lines += [
            f"SmolLM2 seconds: {json.dumps(rec['seconds'])}",
            "",
        ]
    if "minilm" in models:
        rec = minilm_part(a, budgets, families)
        out["minilm"] = rec
        lines += [
            grid_line("MiniLM encoder linears", rec["weights"]),
            "",
            *report(rec, variants, budgets, smol=False),
            "",
            f"MiniLM seconds: {json.dumps(rec['seconds'])}",
            "",
        ]
    out["seconds_total"] = round(time.perf_counter() - t_start, 1)
    lines.append(f"total {out['seconds_total']:.0f} s")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=_json_default, sort_keys=True)
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, Cell):
        return o.to_json()
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
