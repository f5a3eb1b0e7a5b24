"""``optimize_checkpoint``: ``optimize`` of a checkpoint directory, one decoder block in memory.

    skeleton on meta ─▶ embedding/head from the checkpoint ─▶ block 0 inputs (the model's forward)
    for each block: load ─▶ Grams (GramRecorder) ─▶ priced candidates (build_problem) ─▶ outputs ─▶ free
    sensitivity (fisher): head loss ─▶ for each block, last first: load ─▶ backward ─▶ free
    solve once ─▶ layout (empty_like_plan on meta) ─▶ for each block: load ─▶ apply_plan ─▶ write ─▶ free

The statistics, the candidates, the solver and the rewrite are the in-memory path's own
functions (``cost.calibration``, ``cost.candidates``, ``planning.solve``, ``passes.swap``), run
on one block at a time; on the same checkpoint, calibration and options the plan and every
written tensor equal ``slimfx.optimize``'s (a test checks it bit for bit).

Memory: the embedding, the final norm and the head stay loaded; at most one decoder block is
loaded at a time; the calibration activations (batches × tokens × hidden, in the checkpoint's
dtype) are kept in memory — one copy of a block's inputs plus its outputs — and written to the
work directory at every block boundary (for resume, and for the backward of the ``fisher``
sensitivity, which reads every block's inputs once more, last block first).

Sensitivity: ``sensitivity="fisher"`` (Σ E[g²]E[y²]) is computed exactly, by a backward streamed
block by block. The probe estimators ("probe", "kfac", "measured") are refused: they need every
site's probe compressions inside one backward through the whole model.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimfx import validate
from slimfx.cost.calibration import CalibrationStats, prepare_batches
from slimfx.cost.sequential import _capture_inputs, _plan
from slimfx.cost.target import MeasuredCache, Target, latency_notes
from slimfx.ir.capture import eval_mode
from slimfx.ir.find import discover_linear_sites
from slimfx.ir.sites import LinearSite
from slimfx.loss_check import floor_warning
from slimfx.passes.base import PassResult
from slimfx.planning.configs import DEFAULT_FAMILIES
from slimfx.planning.plan import Plan
from slimfx.planning.problem import Budget, BudgetProblem
from slimfx.planning.solve import frontier as solve_frontier
from slimfx.planning.solve import solve as solve_budget
from slimfx.report import Report
from slimfx.report_builder import build_report, lead_notes, target_name
from slimfx.stages import (
    MemoryInstrument,
    _check_weights,
    _drop_tied_sites,
    _split_heldout,
    select_sites,
)
from slimfx.stream.checkpoint import Checkpoint, refuse_mixed_attention, release
from slimfx.stream.dist import Comm
from slimfx.stream.output import write_output
from slimfx.stream.statistics import (
    Moments,
    block_fisher,
    block_sites,
    block_statistics,
    fisher_moments,
    head_backward,
    merge_problems,
    price,
    sensitivity,
    tail_statistics,
)
from slimfx.stream.workdir import WorkDir, fingerprint

__all__ = ["optimize_checkpoint", "StreamResult", "FAIL_AFTER_BLOCK_ENV"]

#: test hook: raise after the statistics of this block index are on disk (a simulated crash)
FAIL_AFTER_BLOCK_ENV = "SLIMFX_STREAM_FAIL_AFTER_BLOCK"


@dataclass
class StreamResult:
    """What a streamed optimize did: the saved directory, the plan, the problem it solved,
    the report written beside it (``None`` on ranks other than 0, which write nothing), notes, seconds per stage, blocks computed in this run
    (fewer than all after a resume), the process's peak resident memory, and each stage's
    resident memory (``memory``: stage → MB before, after and the stage's own peak, as
    ``stages.MemoryInstrument`` records it; empty off Linux), and seconds of a stage's parts
    summed over the blocks computed in this run (``parts``: "calibration+candidates:
    statistics" — the blocks' forward passes and Grams, "…: gram_reduction" — of that, the
    reduction over ranks, "…: candidates" — the priced fits)."""

    out: Path
    plan: Plan
    problem: BudgetProblem
    report: Report | None
    sites: list[LinearSite]
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    blocks_computed: int = 0
    peak_rss_mb: float = 0.0
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)


def _peak_rss_mb(memory: MemoryInstrument) -> float:
    """This run's peak resident MB: the instrument's (its stage resets of the high-water mark
    make ``ru_maxrss`` report only the last stage's), else ``ru_maxrss`` (no ``/proc``)."""
    peak = memory.peak_mb
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _token_batches(
    model: nn.Module, calibration: Any, tokenizer: Any, seq_len: int, name: str
) -> list[Tensor]:
    batches = prepare_batches(
        validate.calibration_items(calibration, name), tokenizer=tokenizer, seq_len=seq_len
    )
    vocab = model.get_input_embeddings().num_embeddings
    for i, b in enumerate(batches):
        if not isinstance(b, Tensor) or b.is_floating_point() or b.dtype == torch.bool:
            raise TypeError(
                f"{name} batch {i}: the streamed path takes token ids (integer "
                f"tensors, or texts with tokenizer=), got {type(b).__name__}"
            )
        if b.numel() == 0:
            raise ValueError(f"{name} batch {i} is empty")
        lo, hi = int(b.min()), int(b.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"{name} batch {i}: token id {lo if lo < 0 else hi} is outside "
                f"[0, {vocab}) (the model's embedding has {vocab} rows)"
            )
    return batches


def _weigh(problem: BudgetProblem, sens: dict[str, float]) -> BudgetProblem:
    """Every option's error times its site's sensitivity (what ``build_problem`` does with
    statistics that carry one; the options were priced with weight 1)."""
    sites = [
        dataclasses.replace(
            so,
            options=[
                dataclasses.replace(o, error=o.error * float(sens.get(so.name, 1.0)))
                for o in so.options
            ],
            sensitivity=float(sens.get(so.name, 1.0)),
        )
        for so in problem.sites
    ]
    meta = {**problem.meta, "sensitivity": True}
    return BudgetProblem(sites, workload=problem.workload, target=problem.target, meta=meta)


def optimize_checkpoint(
    path: str | os.PathLike[str],
    budget: float | Budget | None = 0.5,
    *,
    calibration: Sequence,
    out: str | os.PathLike[str],
    tokenizer: Any = None,
    seq_len: int = 256,
    heldout: Sequence | None = None,
    target: str | Target = "cpu",
    workload: str = "decode",
    families: Sequence[str] = DEFAULT_FAMILIES,
    fisher: bool | None = None,
    sensitivity: str = "fisher",
    solver: str = "auto",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    latency_cache: MeasuredCache | str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    work: str | os.PathLike[str] | None = None,
    keep_work: bool = False,
    overwrite: bool = False,
    extras: Mapping[str, Callable[[Path], Any]] | None = None,
    progress: bool = True,
    sequential: bool = False,
) -> StreamResult:
    """Optimize the causal LM stored in checkpoint directory ``path`` (``config.json`` +
    safetensors) under ``budget`` with one decoder block in memory at a time, and write the
    rewritten model to ``out`` (what ``slimfx.save`` writes; ``slimfx.load(out)`` reads it).

    The keywords mean what they mean for ``slimfx.optimize``; calibration is token ids (or
    texts with ``tokenizer``). ``fisher=None`` turns the Fisher sensitivity on (every
    checkpoint streamed here is a causal LM calibrated on token ids, as ``optimize``'s default
    would); ``sensitivity`` other than "fisher" raises. ``dtype``: cast floating tensors on
    read (default: as stored). ``work``: the directory where finished blocks' statistics are
    kept (default ``.<out name>.slimfx-work`` beside ``out``; a new or empty directory, or a
    previous run's — one holding other files is refused); a run killed after block k resumes
    from block k+1 when called again with the same arguments; its files are removed after
    success unless ``keep_work``. ``overwrite``, ``extras`` as for ``slimfx.save``. A missing shard, a missing
    tensor or a shape mismatch raises ``CheckpointError`` before anything is written.
    ``sequential``: as for ``optimize`` — the plan is solved as usual, then each block is
    fitted with Grams taken on the outputs of the already rewritten blocks (the calibration
    batches carried through the write, on rank 0)."""
    from slimfx import files
    from slimfx.io import check_save_target

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    memory = MemoryInstrument()  # resident MB around each stage (peak reset at its start)
    notes: list[str] = []
    bud = Budget.of(budget)
    if bud.prices_cache:
        raise ValueError(
            "the streamed optimize prices weights only: a budget on the KV cache (kv= / "
            "total_bytes=) needs the in-memory optimize (slimfx.optimize) for now"
        )
    validate.check_options(
        target=target,
        workload=workload,
        families=families,
        seq_len=seq_len,
        include=include,
        exclude=exclude,
    )
    if fisher is None:
        fisher = True
    if fisher and sensitivity != "fisher":
        raise ValueError(
            f"sensitivity={sensitivity!r} is not available streamed: the probe estimators need "
            "every site's probe compressions in one backward through the whole model; use "
            "sensitivity='fisher' (streamed exactly, block by block) or fisher=False"
        )
    outp = files.target(out)
    src = files.target(path)
    if outp == src or outp in src.parents:
        raise ValueError(
            f"out={str(out)!r} {'is' if outp == src else 'holds'} the checkpoint being read "
            f"({path}): the save would replace it — write the result elsewhere"
        )
    comm = Comm()
    check_save_target(outp, overwrite)
    cache = MeasuredCache.of(latency_cache, target)
    ckpt = Checkpoint(path, dtype)
    model = ckpt.skeleton()  # raises on a missing shard / tensor or a shape mismatch
    refuse_mixed_attention(model)
    if work is not None:
        wp = files.target(work)
        for label, d in (("out", outp), ("the checkpoint", src)):
            if wp == d or d in wp.parents:
                raise ValueError(f"work={str(work)!r} is inside {label} ({d}): give a work "
                                 "folder of its own")  # fmt: skip

    # ---------------------------------------------------------------- sites and blocks
    all_sites = discover_linear_sites(model)
    chosen = select_sites(all_sites, include, exclude, notes)
    if include is None and bud.latency is None:
        chosen = _drop_tied_sites(chosen, notes)
    keep = {s.fqn for s in chosen}
    chain, tail_all = _plan(model, all_sites)
    names = [n for n, _ in chain]
    if not names:
        raise ValueError(f"{type(model).__name__}: no chain of decoder blocks to stream")
    inside = tuple(f"{n}." for n in names)
    tail = [s for s in chosen if s.fqn in {t.fqn for t in tail_all}]
    if any(not s.fqn.startswith(inside) and s not in tail for s in chosen):
        raise ValueError(
            "sites outside the decoder blocks other than after them (e.g. before "
            "block 0) are not supported streamed"
        )
    t = time.perf_counter()
    memory.before("", None)
    ckpt.materialize(model, "", skip=names)
    _check_weights(model, [s for s in chosen if not s.fqn.startswith(inside)])  # the head
    batches = _token_batches(model, calibration, tokenizer, seq_len, "calibration")
    held_in = _token_batches(model, heldout, tokenizer, seq_len, "heldout") if heldout else None
    fit, held, note = _split_heldout(batches, held_in)
    if note:
        notes.append(note)
    if len(fit) < comm.world:
        raise ValueError(
            f"{len(fit)} calibration batch(es) for {comm.world} ranks: every rank needs one"
        )
    key = fingerprint(
        {
            "checkpoint": str(Path(path).resolve()),
            "config": (Path(path) / "config.json").read_text(),
            "files": ckpt.file_stamps(),  # weights re-saved under the same names: not reused
            "dtype": str(dtype),
            "families": list(families),
            "target": target_name(target),
            "workload": workload,
            "include": include,
            "exclude": exclude,
            "fisher": fisher,
            "cache": str(latency_cache),
            "world": comm.world,
        },
        fit,
    )
    work_path = Path(work) if work else outp.parent / f".{outp.name}.slimfx-work"
    if comm.rank == 0:  # rank 0 clears a stale work directory before the others look
        wd = WorkDir(work_path, key)
    comm.barrier()
    if comm.rank > 0:
        wd = WorkDir(work_path, key)
    if wd.cleared:
        notes.append("stream: the work directory held another run's statistics; started over")
    inp = f"in-r{comm.rank}" if comm.active else "in"  # each rank's activations
    timings["load_head"] = time.perf_counter() - t
    memory.after("load_head", None, None)

    # ---------------------------------------------------------------- statistics, candidates
    t = time.perf_counter()
    memory.before("", None)
    mine = comm.mine(len(fit))
    local = [fit[b] for b in mine]
    start = comm.min(wd.resume_point(len(names), inp))
    if start:
        notes.append(
            f"stream: resumed at block {start} of {len(names)} (statistics of blocks "
            f"0–{start - 1} read from the work directory)"
        )
        inputs = wd.load(inp, start)
    else:
        with eval_mode(model), torch.no_grad():
            inputs = _capture_inputs(model, model.get_submodule(names[0]), local)
        wd.save(inp, 0, inputs)
    fail_after = os.environ.get(FAIL_AFTER_BLOCK_ENV)
    computed = 0
    clock: Counter[str] = Counter()  # the stage's parts, summed over blocks
    pricing = {"target": target, "workload": workload, "families": tuple(families),
               "cache": cache}  # fmt: skip
    bar = tqdm(range(start, len(names)), desc="stream: statistics", unit="block",
               disable=not progress or comm.rank > 0, leave=False)  # fmt: skip
    for i in bar:
        name = names[i]
        block = ckpt.materialize(model, name)
        _check_weights(model, [s for s in chosen if s.fqn.startswith(f"{name}.")])
        with eval_mode(block), torch.no_grad():
            sites = block_sites(block, name, inputs[0], keep)
            t_stat = time.perf_counter()
            stats, nxt = block_statistics(model, block, sites, inputs, mine, comm, clock)
            t_price = time.perf_counter()
            clock["statistics"] += t_price - t_stat
            if stats:
                stats.check_not_silent()  # all-zero inputs: every error would measure 0
            problem = price(model, sites, stats, comm, **pricing) if stats else None
            clock["candidates"] += time.perf_counter() - t_price
            as_tuple = i == len(names) - 1 and isinstance(
                block(*inputs[0][0], **inputs[0][1]), tuple
            )  # the last block's output type: the head's replay returns the same
        release(block)
        if comm.rank == 0:  # the Grams stay on disk until the block is rewritten
            thin = stats.underdetermined() if stats else {}
            wd.save("stats", i, stats)
            wd.save("block", i, {"sites": sites, "problem": problem, "as_tuple": as_tuple,
                                 "thin": thin})  # fmt: skip
        wd.save(inp, i + 1, nxt)
        if not fisher:
            wd.drop(inp, i)
        inputs, computed = nxt, computed + 1
        stats = problem = None  # on disk now: not held through the later stages
        if fail_after is not None and i == int(fail_after):
            raise RuntimeError(
                f"{FAIL_AFTER_BLOCK_ENV}={fail_after}: simulated crash after block {i}"
            )
    comm.barrier()  # every block file is written
    final = inputs
    del inputs
    entries = [wd.load("block", i) for i in range(len(names))]
    as_tuple = entries[-1]["as_tuple"]
    parts = [e["problem"] for e in entries if e["problem"] is not None]
    by_block = {names[i]: e["sites"] for i, e in enumerate(entries)}
    thin = {k: v for e in entries for k, v in e["thin"].items()}
    del entries
    tstats = None
    if tail:  # sites after the blocks (an untied head): the model's forward over the last states
        with eval_mode(model), torch.no_grad():
            tstats = tail_statistics(model, names, tail, local, final, mine, as_tuple, comm)
        tstats.check_not_silent()
        parts.append(price(model, tail, tstats, comm, **pricing))
        thin.update(tstats.underdetermined())
    sites = [s for n in names for s in by_block[n]] + tail
    if not sites:
        raise ValueError("include/exclude leave no linear site to optimize")
    index = {n: i for i, n in enumerate(names)}

    def stats_of(name: str) -> CalibrationStats | None:
        """A block's statistics, read back from the work directory ("" : the tail's)."""
        return tstats if name == "" else wd.load("stats", index[name])

    if thin:
        grp, (n_tok, f) = next(iter(thin.items()))
        notes.append(
            f"calibration too small: {len(thin)} input group(s) saw fewer tokens than "
            f"input features (e.g. {grp}: {n_tok} tokens for {f} features); activation-aware "
            "estimates are optimistic there — pass more calibration tokens"
        )
    problem = merge_problems(parts, families)
    timings["calibration+candidates"] = time.perf_counter() - t
    breakdown = {f"calibration+candidates: {k}": round(v, 3) for k, v in clock.items()}
    memory.after("calibration+candidates", None, None)

    # ---------------------------------------------------------------- fisher, streamed backward
    if fisher:
        t = time.perf_counter()
        memory.before("", None)
        sens = _streamed_fisher(
            model, ckpt, wd, inp, names, by_block, tail, local, mine, final, as_tuple, comm,
            progress,
        )  # fmt: skip
        problem = _weigh(problem, sens)
        notes.append(
            "sensitivity: each site's error weighted by its loss sensitivity on the calibration "
            "text — Σ E[g²]E[y²] (Fisher), mean-normalized, its backward streamed block by "
            "block (the default for a causal LM; fisher=False turns it off)"
        )
        timings["fisher"] = time.perf_counter() - t
        memory.after("fisher", None, None)
    del final

    # ---------------------------------------------------------------- solve
    t = time.perf_counter()
    memory.before("", None)
    solution = solve_budget(problem, bud, method=solver) if comm.rank == 0 else None
    solution = comm.broadcast(solution)  # rank 0 solves
    if solution.note:
        notes.append(f"solver: {solution.note}")
    plan = solution.to_plan(
        shapes={s.fqn: s.site_shape for s in sites},
        meta={
            "budget": bud.to_dict(),
            "target": target_name(target),
            "workload": workload,
            "families": list(families),
            "solver": solution.solver,
            "model_class": type(model).__name__,
        },
    )
    timings["solve"] = time.perf_counter() - t
    memory.after("solve", None, None)

    # ---------------------------------------------------------------- apply and write
    if comm.rank > 0:  # rank 0 writes
        comm.barrier()
        return StreamResult(outp, plan, problem, None, sites, notes, timings, computed,
                            _peak_rss_mb(memory), memory.memory, breakdown)  # fmt: skip
    t = time.perf_counter()
    memory.before("", None)
    try:
        result, measured, output = write_output(
            ckpt, model, plan, names, by_block, tail, stats_of, held, outp, as_tuple, progress,
            sequential=fit if sequential and plan.rewrites() else None,
        )  # fmt: skip
        if sequential and plan.rewrites():
            notes.append(
                "sequential: each block factorized with statistics from the rewritten prefix"
            )
    except BaseException:
        comm.barrier()
        raise
    timings["apply+write"] = time.perf_counter() - t
    memory.after("apply+write", None, None)
    try:
        report = _report(
            sites,
            plan,
            problem,
            result,
            measured,
            bud,
            target,
            workload,
            cache,
            solution.solver,
            notes,
            len(names),
            type(model).__name__,
            output.params,
        )
        timings["total"] = time.perf_counter() - t_start
        report.timings = timings
        report.meta["peak_rss_mb"] = round(_peak_rss_mb(memory), 1)
        if memory.memory:
            report.meta["stage_memory_mb"] = memory.memory
        report.meta["stage_parts_s"] = breakdown
        output.commit(report, extras or {})
    except BaseException:
        output.discard()
        raise
    finally:
        comm.barrier()
    if not keep_work:
        wd.remove()
    return StreamResult(
        outp,
        plan,
        problem,
        report,
        sites,
        notes,
        timings,
        computed,
        _peak_rss_mb(memory),
        memory.memory,
        breakdown,
    )


def _report(
    sites: list[LinearSite],
    plan: Plan,
    problem: BudgetProblem,
    result: PassResult,
    measured: dict[str, tuple[float, float]],
    bud: Budget,
    target: str | Target,
    workload: str,
    cache: MeasuredCache | None,
    solver: str,
    notes: list[str],
    blocks: int,
    model_class: str,
    params: tuple[int | None, int | None],
) -> Report:
    """The report ``optimize`` would build for this plan and problem."""
    report = build_report(sites, plan, problem, result, measured, bud, target, workload, cache)
    report.solver = solver
    notes += latency_notes(cache, problem.meta.get("latency_sources", {}), target_name(target),
                           None, bud.latency)  # as the in-memory candidates stage; fmt: skip
    lead_notes(report, notes)
    report.capture = {"method": "stream", "blocks": blocks}
    report.frontier = solve_frontier(problem, [round(0.1 * i, 1) for i in range(1, 11)])
    report.meta = {"model_class": model_class, "plan": plan.to_dict(), "stream": True}
    report.runtime = "torch-eager"  # what slimfx.load(out) runs (api.RUNTIMES)
    report.finalize(*params)
    note = floor_warning(report)  # as optimize's diagnostics
    if note:
        report.notes.append(note)
    return report


def _streamed_fisher(
    model: nn.Module,
    ckpt: Checkpoint,
    wd: WorkDir,
    inp: str,
    names: list[str],
    by_block: dict[str, list[LinearSite]],
    tail: list[LinearSite],
    local: list[Tensor],
    mine: list[int],
    final: list[Any],
    as_tuple: bool,
    comm: Comm,
    progress: bool,
) -> dict[str, float]:
    """The Fisher sensitivity of every site (``cost.calibration``'s recorder and formula),
    the backward run block by block from the head down, each rank on its own batches; the
    per-batch moments are summed in batch order."""
    per: dict[int, Moments] = {}
    grads = []
    with eval_mode(model):
        for j, b in enumerate(mine):
            g, per[b] = head_backward(model, names, tail, local[j], final[j], as_tuple)
            grads.append(g)
    moments = fisher_moments(comm.gather(per))
    bar = tqdm(list(reversed(range(len(names)))), desc="stream: fisher", unit="block",
               disable=not progress or comm.rank > 0, leave=False)  # fmt: skip
    for i in bar:
        block = ckpt.materialize(model, names[i])
        inputs = wd.load(inp, i)
        sites = by_block[names[i]]
        per = {}
        with eval_mode(block):
            for j, b in enumerate(mine):
                grads[j], per[b] = block_fisher(model, block, sites, inputs[j], grads[j])
        moments.update(fisher_moments(comm.gather(per)))
        release(block)
    all_sites = [s for n in names for s in by_block[n]] + tail
    return sensitivity(model, all_sites, moments)
