"""Micro-benchmarks of one linear in each compressed form, into a :class:`MeasuredCache`.

:func:`measure_target` builds each (shape, decision) as the slimfx module the rewrite would
install, runs it through a *runner* (eager by default; ``slimfx.latency_calibration`` passes the Triton
lowering or an ONNX Runtime session of the form's export) and stores the median seconds under
the target's name, for ``slimfx.cost.target.latency`` to find.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from slimfx import forms
from slimfx.cost.cache_file import where_measured
from slimfx.cost.target import (
    MeasuredCache,
    Workload,
    measured_dtype,
    workload_of,
)
from slimfx.ir.sites import LinearSite
from slimfx.planning.configs import Decision, DenseConfig, LowRankConfig

__all__ = ["measure_target", "DEFAULT_SHAPES", "default_decisions", "Runner"]


def _build_module(
    decision: Decision,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """The slimfx module of ``decision`` for ``weight``. ``svd``: the weight's (U, S, Vh), so a
    plain low-rank ladder costs one SVD per shape rather than one per rank (timings only need
    factors of the right shapes)."""
    out_f, in_f = weight.shape
    if forms.form_of(decision).native:
        lin = nn.Linear(
            in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        lin.weight.data.copy_(weight)
        if bias is not None:
            lin.bias.data.copy_(bias)
        return lin
    from slimfx.numerics import factorize

    cls = forms.form_of(decision).get("module")
    if svd is not None and isinstance(decision, LowRankConfig) and decision.rank <= len(svd[1]):
        U, S, Vh = svd
        r = decision.rank
        tensors = {"U": U[:, :r] * S[:r], "V": Vh[:r]}
    else:
        tensors = factorize(weight.float().cpu(), decision, None)
    tensors = {
        k: v.to(weight.device, weight.dtype if v.is_floating_point() else v.dtype)
        for k, v in tensors.items()
    }
    mod = cls.empty(decision, in_f, out_f, bias is not None, weight.dtype, weight.device)
    return mod.load_factors(tensors, bias)


def _time(
    fn: Callable[[], Any], device: torch.device, repeats: int, min_s: float, max_s: float
) -> float:
    """Median seconds of ``fn`` after warm-up: at least 3 runs and ``min_s`` in total, at most
    ``repeats`` runs unless that is shorter than ``min_s``, stopping early past ``max_s``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - start < 0.05:  # cheap: warm caches and clocks a little more
        for _ in range(2):
            fn()
        sync()
    times: list[float] = []
    total = 0.0
    while True:
        start = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - start
        times.append(dt)
        total += dt
        n = len(times)
        if n >= 3 and total >= min_s and (n >= repeats or total >= max_s):
            break
        if n >= 1000:
            break
    return statistics.median(times)


#: SmolLM2-135M's linear shapes (in, out): q/o, k/v, gate/up, down, lm_head — the project's
#: reference model; pass the shapes of your own model's sites for exact matches.
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = (
    (576, 576),
    (576, 192),
    (576, 1536),
    (1536, 576),
    (576, 49152),
)


def timed_dense(in_f: int, out_f: int) -> list[Decision]:
    """The dense form's timed layout: the plain linear."""
    return [DenseConfig()]


def default_decisions(in_f: int, out_f: int) -> list[Decision]:
    """What each registered form times by default (``Form.timed``): dense, the low-rank ladder
    the ``lowrank`` family offers for this shape, and the int8 / int4 layouts the quantization
    families offer (GPTQ and RTN share a layout and so one measurement: :func:`runtime_label`).
    Forms with no default layouts (2:4, combined forms) are timed only when asked for."""
    timed = [f.get("timed") for f in forms.forms() if f.has("timed")]
    return [d for fn in timed for d in fn(in_f, out_f)]


#: ``runner(module) -> (callable, info)``: what to time for one built module, and what to
#: record beside its measurements (the runtime, the kernel that ran, …).
Runner = Callable[[nn.Module], tuple[Callable[[torch.Tensor], Any], dict[str, Any]]]


class _Copies(nn.Module):
    """``copies`` of one built linear with distinct weights (each tensor rolled along its first
    axis), all applied to the same input: one call reads every copy's weights once, so with
    enough copies the weights stream from memory rather than sit in a cache."""

    def __init__(self, module: nn.Module, copies: int) -> None:
        super().__init__()
        self.in_features = int(module.in_features)
        self.out_features = int(module.out_features)
        mods = [module]
        for i in range(1, copies):
            m = copy.deepcopy(module)
            with torch.no_grad():
                for t in [*m.parameters(), *m.buffers()]:
                    if t.dim() and t.shape[0] > 1:
                        t.copy_(torch.roll(t, i % t.shape[0], 0))
            mods.append(m)
        self.copies = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m in self.copies)


def _copies_for(module: nn.Module, rotate_bytes: int, max_copies: int) -> int:
    stored = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return max(1, min(max_copies, math.ceil(rotate_bytes / max(stored, 1))))


def _eager(module: nn.Module) -> tuple[Callable[[torch.Tensor], Any], dict[str, Any]]:
    """The module as ``optimize`` returns it: quantized linears packed for torch's CPU kernels
    (``slimfx.ir.cpu_runtime.prepare_cpu``); ``info["kernel"]`` says what runs."""
    from slimfx.ir.cpu_runtime import prepare_cpu

    runs = prepare_cpu(module)
    kernels = sorted({rt.label() for rt in runs.values()})
    return module, {"runtime": "torch eager", "kernel": "/".join(kernels) or "F.linear"}


def measure_target(
    target_name: str,
    shapes: Iterable[tuple[int, int] | LinearSite] | None = None,
    decisions: Sequence[Decision] | Callable[[int, int], Sequence[Decision]] | None = None,
    workloads: Iterable[str | Workload] | None = None,
    path: str | os.PathLike[str] = "latency.json",
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    repeats: int = 10,
    min_s: float = 0.02,
    max_s: float = 1.0,
    progress: bool = True,
    runner: Runner | None = None,
    rotate_bytes: int = 64 << 20,
    max_copies: int = 64,
) -> MeasuredCache:
    """Time each (shape, decision, workload) with the slimfx modules on ``device`` and store
    the median seconds in the cache at ``path`` (entries already there are kept, the ones
    measured again replaced) under ``target_name``.

    ``shapes``: ``(in, out)`` pairs or sites (default :data:`DEFAULT_SHAPES`); ``decisions``:
    a list, or a function ``(in, out) -> decisions`` (default :func:`default_decisions`);
    ``workloads``: default decode and prefill. ``dtype`` defaults to the target's compute
    dtype (:func:`~slimfx.cost.target.measured_dtype`; float32 for an unknown target on CPU,
    bfloat16 on CUDA).
    Decisions that do not fit a shape, or have no module yet, are skipped. On CPU this times
    the CPU: the numbers stand for the target only when run on it.

    ``runner(module) -> (fn, info)`` says what runs a built module (default: its eager forward):
    ``fn(x)`` is timed and ``info`` saved with each entry — e.g. the Triton-lowered module, or an
    ONNX Runtime session of the module's export (``slimfx.latency_calibration``). A runner that raises
    ``ValueError`` for a decision skips it (its runtime cannot run that form).

    Caches: a small weight read again and again sits in the L2 (or a CPU's L3) and times far
    faster than inside a model, where every layer's weights stream from memory. So each form is
    built as several copies with distinct weights — enough to store ``rotate_bytes`` (64 MiB,
    beyond an H100's 50 MB L2), at most ``max_copies`` — run one after the other on the same
    input, and the time of one call divided by the copies is recorded (``copies`` in the
    entry's info). ``rotate_bytes=0`` times one copy.
    """
    from tqdm.auto import tqdm

    dev = torch.device(device)
    dtype = measured_dtype(target_name, dev) if dtype is None else dtype
    shapes = DEFAULT_SHAPES if shapes is None else shapes
    decisions = default_decisions if decisions is None else decisions
    wls = [workload_of(w) for w in (("decode", "prefill") if workloads is None else workloads)]
    cache = MeasuredCache(path)
    run = _eager if runner is None else runner
    gen = torch.Generator().manual_seed(0)
    for shape in tqdm(list(shapes), desc="calibrate-target", disable=not progress, leave=False):
        if isinstance(shape, LinearSite):
            in_f, out_f = shape.in_features, shape.out_features
        else:
            in_f, out_f = shape
        w = torch.randn(out_f, in_f, generator=gen).div_(math.sqrt(in_f)).to(dev, dtype)
        todo = decisions(in_f, out_f) if callable(decisions) else decisions
        svd = None
        if any(isinstance(d, LowRankConfig) for d in todo):
            svd = torch.linalg.svd(w.float().cpu(), full_matrices=False)
        for decision in todo:
            try:
                mod = _build_module(decision, w, None, svd)
            except (KeyError, ValueError, NotImplementedError):
                continue  # no module for this kind, or the rank does not fit the shape
            n = _copies_for(mod, rotate_bytes, max_copies)
            try:
                fn, info = run(_Copies(mod, n))
            except ValueError:
                continue  # the runtime cannot run this form
            for wl in wls:
                x = torch.randn(wl.tokens, in_f, generator=gen).to(dev, dtype)
                with torch.inference_mode():
                    secs = _time(lambda f=fn, x=x: f(x), dev, repeats, min_s, max_s) / n
                key = MeasuredCache.key(
                    "linear", wl.tokens, in_f, out_f, str(dtype), decision, target_name
                )
                cache.put(key, secs, torch_device=str(dev), copies=n, **{**where_measured(dev), **info})
            del mod, fn
        cache.save()  # after each shape: a run cut short keeps what it measured
    cache.save()
    return cache
