"""Cumulative-error calibration: statistics from the already-compressed prefix.

Compressing every layer from the *original* model's activations ignores that layer k, once
rewritten, sees the outputs of compressed layers 0 … k−1. The sequential mode (the order of
SAES-SVD and GPTQ) walks the decoder blocks in order:

    h₀ = inputs of block 0 (captured once per batch, the forward stopped there)
    for each block i:
        run block i on hᵢ with Gram hooks on its sites  → stats of block i
        on_block(i, name, sites, stats)                  (the caller rewrites block i in place)
        hᵢ₊₁ = (rewritten) block i on hᵢ

so each block's Gram matrices come from the rewritten prefix and its rewrite can compensate
the error upstream. Only one block's inputs live at a time, on CPU. Sites outside the blocks
(e.g. ``lm_head``) form a last pseudo-block named ``""``: after all blocks are rewritten the
whole model runs once more with hooks on those sites (one extra forward per batch). Sites
*before* the first block (rare in decoders) land there too, so the blocks are calibrated on
their dense outputs.

Cost: one partial forward to capture h₀, two runs of every block (statistics, then outputs
of the rewritten block), and one full forward when there is a tail.

Assumptions: the blocks are the children of one ``nn.ModuleList`` / ``nn.Sequential`` that
the model applies one after the other, each consuming the previous one's output (its first
positional argument, or ``hidden_states=``); the other arguments (attention mask, position
ids / embeddings) are the same for every block, so block 0's are reused. That holds for
Llama / Mistral / Qwen2-style decoders; models that pass per-layer masks (sliding-window
layers alternating with global ones) are not handled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimfx.cost.calibration import (
    CalibrationStats,
    GramRecorder,
    call_model,
    check_batches,
    model_device,
    to_device,
)
from slimfx.ir.capture import eval_mode
from slimfx.ir.sites import LinearSite

__all__ = ["find_blocks", "run_sequential", "OnBlock"]

OnBlock = Callable[[int, str, list[LinearSite], CalibrationStats], None]


class _StopForward(Exception):
    """Raised by the capture hook to end the forward at block 0."""


def _in(fqn: str, prefix: str) -> bool:
    return fqn == prefix or fqn.startswith(prefix + ".")


def _plan(
    model: nn.Module, sites: Sequence[LinearSite]
) -> tuple[list[tuple[str, list[LinearSite]]], list[LinearSite]]:
    """The chain of children to run in order (``(name, sites)``, glue children with no sites
    included) and the sites outside it."""
    candidates = []  # (name, container, [(child full name, sites)])
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        prefix = f"{name}." if name else ""
        children = [
            (f"{prefix}{c}", [s for s in sites if _in(s.fqn, f"{prefix}{c}")])
            for c, _ in mod.named_children()
        ]
        if any(ss for _, ss in children):
            candidates.append((name, mod, children))
    # A ModuleList inside a block of another ModuleList holds parallel parts (experts,
    # heads), not a chain: leave those out.
    lists = [(n, ch) for n, m, ch in candidates if isinstance(m, nn.ModuleList)]
    kept = []
    for name, mod, children in candidates:
        nested = isinstance(mod, nn.ModuleList) and any(
            other != name and any(ss and _in(name, full) for full, ss in ch) for other, ch in lists
        )
        if not nested:
            kept.append((name, children))
    if not kept:
        return [], list(sites)

    def score(c: tuple[str, list[tuple[str, list[LinearSite]]]]) -> tuple[int, int, int]:
        name, children = c
        bearing = [ss for _, ss in children if ss]
        return (len(bearing), sum(len(ss) for ss in bearing), -name.count("."))

    _, children = max(kept, key=score)
    idx = [i for i, (_, ss) in enumerate(children) if ss]
    chain = children[idx[0] : idx[-1] + 1]
    inside = {s.fqn for _, ss in chain for s in ss}
    return chain, [s for s in sites if s.fqn not in inside]


def find_blocks(
    model: nn.Module, sites: Sequence[LinearSite]
) -> list[tuple[str, list[LinearSite]]]:
    """The decoder blocks that hold sites, in order, as ``(block FQN, its sites)``.

    The blocks are the children of the ``nn.ModuleList`` / ``nn.Sequential`` with the most
    children that contain sites (a ModuleList nested in another one's block — experts,
    heads — is not a chain and never chosen). Sites outside the blocks come last as a
    pseudo-block named ``""``.
    """
    chain, tail = _plan(model, sites)
    blocks = [(name, ss) for name, ss in chain if ss]
    if tail:
        blocks.append(("", tail))
    return blocks


def _with_stream(
    args: tuple[Any, ...], kwargs: dict[str, Any], h: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args and isinstance(args[0], Tensor):
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    h = getattr(out, "last_hidden_state", None)
    if isinstance(h, Tensor):
        return h
    raise TypeError(
        f"cannot take the hidden state from a block output of type {type(out).__name__}"
    )


def _capture_inputs(
    model: nn.Module, first: nn.Module, batches: list[Any]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Block 0's (args, kwargs) for every batch, on CPU; the forward stops at block 0."""
    stored: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kw = dict(kwargs)
        if "past_key_values" in kw:  # a cache would grow every time the block reruns
            kw["past_key_values"] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        stored.append((to_device(args, "cpu"), to_device(kw, "cpu")))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            n = len(stored)
            try:
                call_model(model, batch)
            except _StopForward:
                pass
            if len(stored) != n + 1:
                raise RuntimeError("the first block was not called by the model's forward")
    finally:
        handle.remove()
    return stored


def _run_block(
    block: nn.Module, inputs: list[tuple[tuple[Any, ...], dict[str, Any]]], device: torch.device
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Run ``block`` on every stored input; returns the next block's inputs (on CPU)."""
    nxt = []
    for args, kwargs in inputs:
        a, kw = to_device(args, device), to_device(kwargs, device)
        h = _output(block(*a, **kw)).detach().cpu()
        nxt.append(_with_stream(args, kwargs, h))
    return nxt


def run_sequential(
    model: nn.Module,
    sites: Sequence[LinearSite],
    batches: Iterable[Any],
    on_block: OnBlock,
    *,
    progress: bool = True,
) -> None:
    """Calibrate and rewrite block by block, each block's statistics taken on the outputs of
    the already-rewritten blocks before it.

    ``on_block(i, name, block_sites, stats)`` is called once per block of
    :func:`find_blocks` (in order, the ``""`` pseudo-block last) with the Gram matrices of that
    block's sites; it may rewrite the block in place (module swap inside it). The block then
    reruns on the same inputs to give the next block's inputs. Batches are as for
    ``collect_stats``. The model runs in eval mode under no_grad; training flags are restored
    and every hook removed afterwards.
    """
    batches = check_batches(batches)
    sites = list(sites)
    if not sites:
        raise ValueError("no sites to calibrate")
    chain, tail = _plan(model, sites)
    device = model_device(model)
    index = 0
    with eval_mode(model), torch.no_grad():
        if chain:
            inputs = _capture_inputs(model, model.get_submodule(chain[0][0]), batches)
            bar = tqdm(chain, desc="sequential", unit="block", disable=not progress, leave=False)
            for name, block_sites in bar:
                if block_sites:
                    start = time.perf_counter()
                    with GramRecorder(dict(model.named_modules()), block_sites) as rec:
                        _run_block(model.get_submodule(name), inputs, device)
                    on_block(
                        index, name, list(block_sites), rec.stats(None, time.perf_counter() - start)
                    )
                    index += 1
                inputs = _run_block(model.get_submodule(name), inputs, device)
            del inputs
        if tail:
            start = time.perf_counter()
            with GramRecorder(dict(model.named_modules()), tail) as rec:
                for batch in batches:
                    call_model(model, batch)
            on_block(index, "", list(tail), rec.stats(None, time.perf_counter() - start))
