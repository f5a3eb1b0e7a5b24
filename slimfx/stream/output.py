"""The streamed write: each block loaded, rewritten by the plan, measured, written and freed;
the directory committed atomically in ``slimfx.save``'s format (``slimfx.load`` reads it).

The plan is realized by ``passes.swap.apply_plan`` on one block at a time with the Gram
matrices calibration stored, so each written tensor is what the in-memory ``optimize``
writes. The measured output error of each rewritten site uses the held-out batches carried
through the already rewritten blocks (as ``optimize``'s measure stage, which runs the
rewritten model), with ``stages.measure_site_errors`` on the block.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimfx.cost.calibration import CalibrationStats, GramRecorder, call_model
from slimfx.cost.sequential import _capture_inputs, _run_block
from slimfx.io import GENERATION_CONFIG, TOKENIZER_FILES, WEIGHTS_FILE
from slimfx.ir.capture import eval_mode
from slimfx.ir.match import linear_weight
from slimfx.ir.sites import LinearSite
from slimfx.passes.base import PassResult
from slimfx.passes.swap import apply_plan, empty_like_plan
from slimfx.planning.configs import DenseConfig
from slimfx.planning.plan import Plan
from slimfx.report import Report
from slimfx.stages import FitGrams, measure_site_errors
from slimfx.stream.blocks import replayed, stream_of
from slimfx.stream.checkpoint import Checkpoint, release
from slimfx.stream.writer import StreamedSafetensors, layout_of, stored_tensors

__all__ = ["write_output", "Output"]


class Output:
    """A save being written: a temporary directory beside ``out`` until :meth:`commit`."""

    def __init__(self, out: Path) -> None:
        from slimfx import files

        self.out = out
        files.recover(out)
        self.tmp = files.tmp_dir(out)
        self.model_class = ""
        #: the model's parameter counts before and after the rewrite (the report's totals)
        self.params: tuple[int | None, int | None] = (None, None)

    def commit(self, report: Report, extras: Mapping[str, Callable[[Path], Any]] = {}) -> None:
        """Write the report, ``extras`` (as ``slimfx.save``'s) and the manifest, flush, and
        exchange the directory into place."""
        from slimfx import files
        from slimfx.io import manifest_info

        report.save(self.tmp / "report.json")
        for name, write in extras.items():
            write(self.tmp / name)
        files.finish(self.tmp, self.out, "slimfx.json", manifest_info(self.model_class, hf=True))

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _measure_block(
    block: nn.Module,
    name: str,
    dense: Mapping[str, tuple[Tensor, Tensor | None]],
    inputs: Sequence[Any],
) -> dict[str, tuple[float, float]]:
    """``measure_site_errors`` on one block, called as the model called it; names full."""
    pre = f"{name}."
    local = {k[len(pre) :]: v for k, v in dense.items()}
    got = measure_site_errors(block, local, inputs, lambda call: block(*call[0], **call[1]))
    return {pre + k: v for k, v in got.items()}


def _dense_ref(model: nn.Module, plan: Plan, sites: Sequence[LinearSite]) -> dict[str, Any]:
    ref = {}
    for s in sites:
        if not isinstance(plan[s.fqn], DenseConfig):
            m = model.get_submodule(s.fqn)
            b = None if getattr(m, "bias", None) is None else m.bias.detach().clone()
            ref[s.fqn] = (linear_weight(m).detach().clone(), b)
    return ref


def _apply(
    model: nn.Module,
    plan: Plan,
    sites: list[LinearSite],
    stats: CalibrationStats,
    merged: PassResult,
) -> None:
    if not sites:
        return
    sub = Plan({s.fqn: plan[s.fqn] for s in sites}, {s.fqn: s.site_shape for s in sites})
    grams = FitGrams(stats, [s.fqn for s in sites])  # one damped Gram formed at a time
    _, res = apply_plan(model, sub, sites, grams, inplace=True, strict=True)
    merged.records.extend(res.records)
    merged.modified |= res.modified


def _prefix_stats(
    model: nn.Module, block: nn.Module, sites: list[LinearSite], inputs: list[Any]
) -> CalibrationStats:
    """The Grams of ``block``'s sites (dense) on ``inputs``, the rewritten prefix's outputs."""
    with eval_mode(block), torch.no_grad():
        with GramRecorder(dict(model.named_modules()), sites) as rec:
            _run_block(block, inputs, torch.device("cpu"))
    return rec.stats()


def write_output(
    ckpt: Checkpoint,
    model: nn.Module,
    plan: Plan,
    names: list[str],
    block_sites: Mapping[str, list[LinearSite]],
    tail: list[LinearSite],
    stats_of: Callable[[str], CalibrationStats | None],
    held: list[Tensor],
    out: Path,
    as_tuple: bool,
    progress: bool,
    sequential: list[Tensor] | None = None,
) -> tuple[PassResult, dict[str, tuple[float, float]], Output]:
    """Rewrite and write every block, then the rest of the model, into a new save directory
    (not yet committed: the caller commits it with the report); ``stats_of(block name)``
    reads a block's Grams back (``""``: the sites after the blocks). Returns the merged pass
    result, the measured errors and the pending :class:`Output`.

    ``sequential``: the calibration batches to fit each block with statistics from the already
    rewritten prefix instead (``optimize(sequential=True)``, ``cost.sequential``): they are
    carried through the rewritten blocks, each block's Grams recorded on them with the dense
    block, and ``stats_of`` is not read."""
    sites = [s for n in names for s in block_sites[n]] + tail
    layout_model = ckpt.skeleton()
    before = sum(p.numel() for p in layout_model.parameters())
    empty_like_plan(layout_model, plan, sites)
    layout, _aliases = layout_of(layout_model)
    output = Output(out)
    output.params = (before, sum(t.numel() for t in (*layout_model.parameters(),
                                                     *layout_model.buffers())))  # as optimize
    output.model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    merged = PassResult(name="apply_plan(stream)")
    measured: dict[str, tuple[float, float]] = {}
    try:
        plan.save(output.tmp / "plan.json")
        (output.tmp / "config.json").write_text(layout_model.config.to_json_string())
        for name in (GENERATION_CONFIG, *TOKENIZER_FILES):  # generation settings, tokenizer
            if (ckpt.path / name).is_file():
                shutil.copyfile(ckpt.path / name, output.tmp / name)
        file = StreamedSafetensors(output.tmp / WEIGHTS_FILE, layout, {"format": "pt"})
        try:
            with eval_mode(model), torch.no_grad():
                inputs = _capture_inputs(model, model.get_submodule(names[0]), held)
                fit = (
                    None
                    if sequential is None
                    else _capture_inputs(model, model.get_submodule(names[0]), sequential)
                )
            bar = tqdm(names, desc="stream: write", unit="block", disable=not progress, leave=False)
            for name in bar:
                block = ckpt.materialize(model, name)
                bs = block_sites[name]
                dense = _dense_ref(model, plan, bs)
                if fit is not None and bs:  # Grams on the rewritten prefix's outputs
                    stats = _prefix_stats(model, block, bs, fit)
                else:
                    stats = stats_of(name) if bs else None
                _apply(model, plan, bs, stats, merged)
                block = model.get_submodule(name)
                with eval_mode(block), torch.no_grad():
                    if dense:
                        measured.update(_measure_block(block, name, dense, inputs))
                    inputs = _run_block(block, inputs, torch.device("cpu"))
                    if fit is not None:
                        fit = _run_block(block, fit, torch.device("cpu"))
                file.write(stored_tensors(block, name, layout))
                release(block)
            dense = _dense_ref(model, plan, tail)
            if fit is not None and tail:  # the head's Grams behind the rewritten blocks
                with eval_mode(model), torch.no_grad():
                    with replayed(model, names, [stream_of(x) for x in fit], as_tuple):
                        with GramRecorder(dict(model.named_modules()), tail) as rec:
                            for b in sequential or []:
                                call_model(model, b)
                tail_stats = rec.stats()
            else:
                tail_stats = stats_of("") if tail else None
            _apply(model, plan, tail, tail_stats, merged)
            if dense:
                with eval_mode(model), torch.no_grad():
                    with replayed(model, names, [stream_of(x) for x in inputs], as_tuple):
                        measured.update(measure_site_errors(model, dense, held))
            file.write(stored_tensors(model, "", file.pending()))
            file.close()
        except BaseException:
            file.abort()
            raise
    except BaseException:
        output.discard()
        raise
    return merged, measured, output
