"""One block's statistics and priced candidates, and the Fisher moments of a streamed backward,
on one process or sharded over ranks (``slimfx.stream.dist``).

Everything is ``cost``'s own code on a block: ``GramRecorder`` for the Grams, ``build_problem``
for the candidates, ``_FisherRecorder`` for E[y²] and E[g²]. On one process a block's Grams are
accumulated over all batches by one recorder (exactly as ``optimize``'s calibration does);
sharded, each batch's Gram is recorded on its rank and the per-batch Grams are summed in batch
order on every rank, which gives the same float64 sums (bit for bit while a batch's activations
fit one of ``accumulate_gram``'s chunks: tokens × in ≤ 4M elements).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.cost.calibration import (
    CalibrationStats,
    GramRecorder,
    _FisherRecorder,
    _loss_of,
    call_model,
)
from slimfx.cost.candidates import build_problem
from slimfx.cost.sequential import _run_block
from slimfx.ir.find import discover_linear_sites
from slimfx.ir.match import linear_weight
from slimfx.ir.sites import LinearSite
from slimfx.planning.problem import BudgetProblem, SiteOptions
from slimfx.stream.blocks import Inputs, block_backward, replayed, stream_of
from slimfx.stream.dist import Comm, ordered_sum

__all__ = [
    "block_sites",
    "block_statistics",
    "price",
    "assign_groups",
    "fisher_moments",
    "merge_problems",
]

_CPU = torch.device("cpu")


def block_sites(block: nn.Module, name: str, inputs: Inputs, keep: set[str]) -> list[LinearSite]:
    """The block's linear sites in call order, grouped by shared input (one run of the block
    on one batch), under their full names; only those in ``keep``."""
    args, kwargs = inputs
    local = discover_linear_sites(block, tuple(args), dict(kwargs))
    pre = f"{name}."
    sites = [
        dataclasses.replace(s, fqn=pre + s.fqn, weight=pre + s.weight, group=pre + s.group)
        for s in local
    ]
    return [s for s in sites if s.fqn in keep]


def block_statistics(
    model: nn.Module,
    block: nn.Module,
    sites: list[LinearSite],
    inputs: list[Inputs],
    mine: list[int],
    comm: Comm,
    clock: Counter[str] | None = None,
) -> tuple[CalibrationStats | None, list[Inputs]]:
    """The block's Grams (``None`` without sites) and its outputs for this rank's batches
    (``inputs[j]`` is batch ``mine[j]``), in one run of the block; sharded, the seconds of
    the Grams' reduction over ranks are added to ``clock["gram_reduction"]``."""
    modules = dict(model.named_modules())
    if not sites:
        return None, _run_block(block, inputs, _CPU)
    if not comm.active:
        with GramRecorder(modules, sites) as rec:
            nxt = _run_block(block, inputs, _CPU)
        return rec.stats(), nxt
    per: dict[int, tuple[dict[str, Tensor], dict[str, int]]] = {}
    nxt = []
    for b, x in zip(mine, inputs):
        with GramRecorder(modules, sites) as rec:
            nxt += _run_block(block, [x], _CPU)
        per[b] = (rec.grams, rec.tokens)
    t = time.perf_counter()
    stats = _reduce(per, sites, comm)
    if clock is not None:
        clock["gram_reduction"] += time.perf_counter() - t
    return stats, nxt


def _reduce(
    per: dict[int, tuple[dict[str, Tensor], dict[str, int]]], sites: list[LinearSite], comm: Comm
) -> CalibrationStats:
    """Every rank's per-batch Grams summed in batch order."""
    grams = comm.ordered_sum({b: g for b, (g, _) in per.items()})
    tokens: Counter[str] = Counter()
    for t in comm.gather({b: t for b, (_, t) in per.items()}).values():
        tokens.update(t)
    return CalibrationStats(grams, dict(tokens), {s.fqn: s.group for s in sites})


def tail_statistics(
    model: nn.Module,
    names: list[str],
    tail: list[LinearSite],
    batches: list[Tensor],
    final: list[Inputs],
    mine: list[int],
    as_tuple: bool,
    comm: Comm,
) -> CalibrationStats:
    """The Grams of the sites after the blocks: the model's own forward over this rank's
    batches with the blocks replayed from their last hidden states ``final``."""
    modules = dict(model.named_modules())

    def run(js: Sequence[int]) -> None:
        with replayed(model, names, [stream_of(final[j]) for j in js], as_tuple):
            for j in js:
                call_model(model, batches[j])

    if not comm.active:
        with GramRecorder(modules, tail) as rec:
            run(range(len(batches)))
        return rec.stats()
    per = {}
    for j, b in enumerate(mine):
        with GramRecorder(modules, tail) as rec:
            run([j])
        per[b] = (rec.grams, rec.tokens)
    return _reduce(per, tail, comm)


def price(
    model: nn.Module,
    sites: list[LinearSite],
    stats: CalibrationStats,
    comm: Comm,
    **options: Any,
) -> BudgetProblem:
    """``build_problem`` for ``sites`` (options unweighted: sensitivity comes later). Sharded,
    each rank fits the input groups :func:`assign_groups` gives it (the sites of one group
    together, so they share one damped Gram and its GPTQ factor, as on one process) and the
    priced sites are gathered back into site order — the same options bit for bit."""
    owner = assign_groups(sites, comm.world)
    mine = [i for i, r in enumerate(owner) if r == comm.rank]
    local = None
    if mine:
        weights = {sites[i].fqn: linear_weight(model.get_submodule(sites[i].fqn)).detach()
                   for i in mine}
        local = build_problem([sites[i] for i in mine], weights, stats, progress=False,
                              **options)[0]  # fmt: skip
    if not comm.active and local is not None:
        return local
    parts = comm.gather({comm.rank: (mine, local)})
    by_site = {}
    problems = []
    for r in sorted(parts):
        idx, prob = parts[r]
        if prob is not None:
            problems.append(prob)
            by_site.update(zip(idx, prob.sites))
    merged = merge_problems(problems, options["families"])
    return dataclasses.replace(merged, sites=[by_site[i] for i in range(len(sites))])


def assign_groups(sites: Sequence[LinearSite], world: int) -> list[int]:
    """The rank that fits each site: whole input groups, largest estimated cost first, each to
    the least loaded rank (ties to the lower rank) — the same answer on every rank.

    Cost of a group of in-width ``n``: n³ (its one factorization) plus, per site of out-width
    ``m``, m·n·(m + n) (the Gram products and the GPTQ sweep); on SmolLM2's blocks this puts
    ``down_proj`` on one rank and the other three groups on the other, the split the measured
    fit times (0.49 s vs 0.12 + 0.07 + 0.24 s per block) say is best."""
    if world <= 1:
        return [0] * len(sites)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sites):
        groups.setdefault(s.group, []).append(i)

    def cost(idx: list[int]) -> float:
        n = float(sites[idx[0]].shape[1])
        return n**3 + sum(float(sites[i].shape[0]) * n * (sites[i].shape[0] + n) for i in idx)

    load = [0.0] * world
    owner = [0] * len(sites)
    order = sorted(groups.values(), key=lambda idx: (-cost(idx), idx[0]))
    for idx in order:
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += cost(idx)
        for i in idx:
            owner[i] = r
    return owner


def merge_problems(parts: Sequence[BudgetProblem], families: Sequence[str]) -> BudgetProblem:
    """One problem of the parts' sites, in order, with their metadata combined."""
    sources: Counter[str] = Counter()
    for p in parts:
        sources.update(p.meta["latency_sources"])
    first = parts[0]
    meta = {
        "families": list(families),
        "calibrated": True,
        "sensitivity": False,
        "tokens": first.meta["tokens"],
        "latency_sources": dict(sorted(sources.items())),
        "not_allowed": sum(p.meta["not_allowed"] for p in parts),
    }
    sites: list[SiteOptions] = [s for p in parts for s in p.sites]
    return BudgetProblem(sites, workload=first.workload, target=first.target, meta=meta)


Moments = dict[str, tuple[Tensor, Tensor, int]]


def _moments(rec: _FisherRecorder) -> Moments:
    return {s.fqn: (rec.y2[s.fqn], rec.g2[s.fqn], rec.rows[s.fqn]) for s in rec.sites}


def head_backward(
    model: nn.Module,
    names: list[str],
    tail: list[LinearSite],
    batch: Tensor,
    final: Inputs,
    as_tuple: bool,
) -> tuple[Tensor, Moments]:
    """The loss of one batch from its last hidden state: ∂L/∂(that state) and the Fisher
    moments of the sites after the blocks."""
    rec = _FisherRecorder(dict(model.named_modules()), tail)
    h = stream_of(final).detach().requires_grad_(True)
    with rec, torch.enable_grad(), replayed(model, names, [h], as_tuple):
        loss = _loss_of(model, batch, None)
        (g,) = torch.autograd.grad(loss, h, retain_graph=True)
        rec.backward(loss)
    return g.detach(), _moments(rec)


def block_fisher(
    model: nn.Module, block: nn.Module, sites: list[LinearSite], x: Inputs, grad: Tensor
) -> tuple[Tensor, Moments]:
    """One batch's backward through one block: ∂L/∂(block input) and its sites' moments."""
    rec = _FisherRecorder(dict(model.named_modules()), sites)
    with rec:
        g = block_backward(block, x, grad, rec, _CPU)
    return g, _moments(rec)


def fisher_moments(per_batch: dict[int, Moments]) -> Moments:
    """Per site, the batches' moments summed in batch order (``_FisherRecorder``'s sums)."""
    y2 = ordered_sum({b: {k: v[0] for k, v in m.items()} for b, m in per_batch.items()})
    g2 = ordered_sum({b: {k: v[1] for k, v in m.items()} for b, m in per_batch.items()})
    rows: Counter[str] = Counter()
    for m in per_batch.values():
        rows.update({k: v[2] for k, v in m.items()})
    return {k: (y2[k], g2[k], rows[k]) for k in y2}


def sensitivity(model: nn.Module, sites: list[LinearSite], moments: Moments) -> dict[str, float]:
    """``_FisherRecorder.sensitivity`` of the summed moments (mean-normalized)."""
    rec = _FisherRecorder(dict(model.named_modules()), sites)
    for s in sites:
        rec.y2[s.fqn], rec.g2[s.fqn], rec.rows[s.fqn] = moments[s.fqn]
    return rec.sensitivity()
