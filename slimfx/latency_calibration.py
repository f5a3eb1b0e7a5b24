"""Measure a deployment target's kernel times into a latency cache (``slimfx calibrate-target``).

    cache = slimfx.calibrate_target("ort-cpu", backend="onnx", out="ort.json", threads=2)
    model = slimfx.optimize(m, slimfx.Budget(latency=0.7), calibration=…, target="ort-cpu",
                            backend="onnx", latency_cache="ort.json")

Each linear shape is built in every form the default families offer (dense, the low-rank
ladder, int8 and int4 layouts: ``slimfx.cost.measure.default_decisions``) and run by what the
backend deploys:

- ``eager`` (alias ``torch``): the eager slimfx modules as ``optimize`` returns them
  (``F.linear`` for dense, int4/int8 packed for torch's CPU kernels by ``slimfx.prepare_cpu``,
  the reference ops where no kernel takes the layout);
- ``triton``: the modules lowered to the Triton kernels (``slimfx.backends.triton_lowering``) —
  a form no kernel takes is timed as the reference op that would run, and its entry says why;
- ``onnx``: ONNX Runtime running the form's ONNX export (MatMul / MatMulNBits), at the given
  MatMulNBits ``accuracy_level`` and thread count (``slimfx.backends.ort_timing``).

With ``attention=`` (``--attention`` on the command line) it also times one decode step of
each KV-cache and MLA form over a cache of each context (``slimfx.cost.measure_attention``:
the attention block minus its linear sites; a quantized store read in place as ``optimize``
installs it — the Triton kernel on CUDA, the torch op ``kv_decode_attention_folded`` on the
CPU — and MLA's decode kernel on CUDA) — ``eager`` and ``triton`` only.

The measured seconds land in a :class:`~slimfx.cost.target.MeasuredCache` under the target's
name; ``optimize(..., target=<name>, latency_cache=<file>)`` prices each option from it (the
report says ``measured`` or ``roofline`` per site).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from slimfx.cost.measure import DEFAULT_SHAPES, Runner, measure_target
from slimfx.cost.measure_attention import DEFAULT_CONTEXTS, measure_attention
from slimfx.cost.target import MeasuredCache, Workload
from slimfx.planning.configs import Decision
from slimfx.planning.shapes import AttentionShape

__all__ = ["BACKENDS", "calibrate_target", "parse_shapes", "triton_runner"]

BACKENDS = ("eager", "triton", "onnx")  # the names slimfx.backends.capabilities uses


def triton_runner(module: nn.Module) -> tuple[Callable[[torch.Tensor], Any], dict[str, Any]]:
    """Lower ``module``'s slimfx modules to Triton kernels; ``info["kernel"]`` names the
    kernel, or the reference op and the reason no kernel took the form."""
    from slimfx.backends.triton_lowering import lower_module

    module, result = lower_module(module)
    if not result.records:
        return module, {"runtime": "torch eager", "kernel": "F.linear"}
    rec = result.records[0]
    if rec.status != "applied":  # what runs is torch's reference op, not a Triton kernel
        return module, {"runtime": "torch eager", "kernel": f"reference op (fallback: {rec.reason})"}
    return module, {"runtime": "triton", "kernel": str(rec.extra.get("kernel", "?"))}


def parse_shapes(text: str | None) -> list[tuple[int, int]]:
    """``"576x576,576x192"`` → ``[(576, 576), (576, 192)]`` (in × out); ``None`` or
    ``"smollm2"`` → SmolLM2-135M's shapes (``DEFAULT_SHAPES``)."""
    if text is None or text.strip().lower() == "smollm2":
        return list(DEFAULT_SHAPES)
    shapes = []
    for part in text.split(","):
        try:
            i, o = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"bad shape {part!r}: write IN x OUT, e.g. 576x1536 (comma-separated)"
            ) from None
        if i < 1 or o < 1:
            raise ValueError(f"bad shape {part!r}: sizes must be ≥ 1")
        shapes.append((i, o))
    return shapes


def calibrate_target(
    target: str,
    *,
    out: str | os.PathLike[str],
    backend: str = "eager",
    device: str = "cpu",
    shapes: Iterable[tuple[int, int]] | None = None,
    decisions: Sequence[Decision] | Callable[[int, int], Sequence[Decision]] | None = None,
    workloads: Iterable[str | Workload] | None = None,
    threads: int | None = None,
    accuracy_level: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    attention: Iterable[AttentionShape] | None = None,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    batches: Sequence[int] = (1,),
    **timing: Any,
) -> MeasuredCache:
    """Time every default form of each shape with ``backend`` on ``device`` and store the
    medians in the cache file ``out`` under ``target`` (entries already there are kept).

    ``shapes``: ``(in, out)`` pairs (default SmolLM2-135M's); ``decisions``: a list or a function
    of the shape (default ``default_decisions``: every layout the default families offer).
    ``threads``: torch's intra-op threads for ``eager`` / ``triton`` on CPU, ONNX Runtime's for
    ``onnx``. ``accuracy_level``: MatMulNBits' (``onnx`` only). ``timing``: ``repeats``,
    ``min_s``, ``max_s``, ``rotate_bytes``, ``max_copies`` of ``measure_target``.
    """
    backend = "eager" if backend == "torch" else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device}: no CUDA device here (torch {torch.__version__}); calibrate-target "
            "measures kernels on the device it will price — run it there, or use device cpu"
        )
    attention = list(attention or ())
    runner: Runner | None = None
    if attention and backend == "onnx":
        raise ValueError(
            "attention steps are timed with the PyTorch modules (and slimfx's decode kernels); "
            "ONNX Runtime's step graphs are not timed here (benchmarks/kv_ort_decode.py measures "
            "them): leave out attention with backend onnx"
        )
    if backend == "onnx":
        if dev.type != "cpu":
            raise ValueError("backend onnx times ONNX Runtime's CPU provider: use device cpu")
        if dtype not in (None, torch.float32):
            raise ValueError(f"backend onnx runs float32 weights, not {dtype}")
        from slimfx.backends.ort_timing import OnnxLinearRunner

        runner = OnnxLinearRunner(threads=threads, accuracy_level=accuracy_level)
        dtype = torch.float32
    elif backend == "triton":
        from slimfx.kernels import interpret_mode

        if dev.type == "cpu" and not interpret_mode():
            raise ValueError(
                "backend triton on cpu: no Triton kernel runs on the CPU (TRITON_INTERPRET is "
                "not set), so every entry would time the reference ops under the triton label; "
                "calibrate on the GPU the kernels will run on, or use backend eager / onnx"
            )
        runner = triton_runner
    old = torch.get_num_threads()
    if threads is not None and backend != "onnx":
        torch.set_num_threads(int(threads))
    try:
        if attention:  # first: checks its arguments before the linears' long run
            measure_attention(
                target, attention, None, contexts, out, dev, dtype=dtype, batches=batches,
                progress=progress,
            )  # fmt: skip
        return measure_target(
            target,
            shapes=list(shapes) if shapes is not None else None,
            decisions=decisions,
            workloads=workloads,
            path=out,
            device=dev,
            dtype=dtype,
            progress=progress,
            runner=runner,
            **timing,
        )
    finally:
        torch.set_num_threads(old)
